"""Glue for Self-Forcing and Causal-Forcing (same layout): what the patch lines call.

``DMDForesight`` and ``ODEForesight`` implement the glue contract
(``mirai_plugin.integrations.glue``). The patches add, to the upstream trainer,
only marked one-line calls into this module. Everything else — the head, its
optimizer, the capture, the encoder call, replay, logging values and the
checkpoint entry — lives here, in objects the upstream models do not own as
submodules: the generator's parameters, ``state_dict`` and checkpoint format
are unchanged, and with ``foresight_weight: 0`` (or the key absent) every call
is a no-op, so the patched trainer computes exactly what the unpatched one does.

Patched call sites, Stage 3 (DMD; ``model/dmd.py``, then ``trainer/distillation.py``)::

    self.foresight = DMDForesight(self, args)                      # end of DMD.__init__
    @with_foresight_capture                                        # on DMD.generator_loss: runs it in capturing()
    dmd_loss = self.foresight.add_term(dmd_loss, dmd_log_dict, pred_image, conditional_dict)  # before it returns

    foresight_of(self.model).load_checkpoint_state(state_dict)     # after torch.load(config.generator_ckpt)
    state_dict.update(foresight_of(self.model).checkpoint_state())  # Trainer.save, on every rank
    foresight_of(self.model).after_generator_step()                # after generator_optimizer.step()
    foresight_of(self.model).after_critic_step(TRAIN_GENERATOR)    # after critic_optimizer.step(): replay
    wandb_loss_dict.update(foresight_of(self.model).log_values())  # next to the DMD losses

Stage 2 (Causal-Forcing ODE regression; ``model/ode_regression.py``, then
``trainer/ode.py``) calls ``ODEForesight`` the same way, with the ground-truth
clean latent as the encoder input and no critic step::

    self.foresight = ODEForesight(self, args)                      # end of ODERegression.__init__
    @with_foresight_capture                                        # on ODERegression.generator_loss
    loss = self.foresight.add_term(loss, log_dict, clean_latent, conditional_dict)  # before it returns

    foresight_of(self.model).load_checkpoint_state(state_dict)     # after torch.load(config.generator_ckpt)
    state_dict.update(foresight_of(self.model).checkpoint_state())  # Trainer.save
    foresight_of(self.model).after_generator_step()                # after generator_optimizer.step()
    wandb_loss_dict.update(foresight_of(self.model).log_values())  # next to the ODE loss

The trainer files reach the glue through ``foresight_of(model)``, a no-op stand-in
for the models without one that the same trainer builds (CausVid, SiD).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.capture import CapturedHidden, HiddenRecord, capture_hidden
from mirai_plugin.checkpoint import restore_state
from mirai_plugin.collectives import broadcast_module, log_once
from mirai_plugin.config import ForesightConfig
from mirai_plugin.distributed import shard_head
from mirai_plugin.encoder import FrozenEncoder
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import load_checkpoint
from mirai_plugin.head import ForesightHead
from mirai_plugin.integrations.glue import CHECKPOINT_KEY, checkpoint_entry
from mirai_plugin.integrations.resolve import ODE_ENCODER, ResolvedRun, VideoRun, resolve_self_forcing  # noqa: F401
from mirai_plugin.wrappers import tokens_per_frame, wrapper_chain


def with_foresight_capture(generator_loss: Callable) -> Callable:
    """Decorator for ``generator_loss``: runs it inside the foresight capture.

    The capture hook exists only for the duration of the call and is removed even
    when the call raises. Without an enabled ``self.foresight`` it calls straight
    through.
    """

    @functools.wraps(generator_loss)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        foresight = getattr(self, "foresight", None)
        if foresight is None or not foresight.enabled:
            return generator_loss(self, *args, **kwargs)
        with foresight.capturing():
            return generator_loss(self, *args, **kwargs)

    return wrapper


class UpstreamForesight:
    """Shared state and trainer hooks; subclasses say where the encoder and inputs come from.

    ``resolved`` is what the upstream's resolver (``mirai_plugin.integrations.resolve``) made of the
    trainer's config, the same object ``mirai-plugin config check`` prints; ``None``: off.
    """

    def __init__(self, model: Any, resolved: ResolvedRun | None) -> None:
        self._model = model  # the upstream DMD / ODERegression object (holds the generator)
        self.resolved = resolved
        config = resolved.foresight if resolved is not None else ForesightConfig(weight=0.0)
        assert isinstance(config, ForesightConfig)  # the video resolvers give one
        self.config = config
        self.head: ForesightHead | None = None
        self._captured: CapturedHidden | None = None
        self._logged: dict[str, Tensor] = {}
        if resolved is None or not config.enabled:
            return
        student = wan_transformer(model.generator)
        self.config = config = config.replace(num_heads=config.num_heads or getattr(student, "num_heads", None))
        sharding, init = resolved.glue["foresight_head_sharding"], resolved.glue["foresight_head_init"]
        checkpoint = load_checkpoint(init, what="foresight_head_init") if init else None  # before any change
        log_once(f"mirai_plugin: foresight term on, {config}", logging.INFO)
        self.head = ForesightHead(config, student.dim, self._encoder_dim()).to(device=model_device(model))
        if sharding == "replicate":
            broadcast_module(self.head)  # ranks seed differently; the head starts identical everywhere
        else:
            assert isinstance(resolved.trainer, VideoRun)
            shard_head(self.head, sharding, **_head_wrap_kwargs(sharding, resolved.trainer, self.head))
        if checkpoint is not None:
            self.load_checkpoint_state(checkpoint, strict=True)

    # ------------------------------------------------------------ properties

    @property
    def enabled(self) -> bool:
        return self.head is not None

    @property
    def active(self) -> bool:
        """Enabled and on at this step of the weight schedule."""
        return self.head is not None and self.head.active

    # ------------------------------------------------------------- the term

    @contextlib.contextmanager
    def capturing(self) -> Iterator[CapturedHidden | None]:
        if not self.active:  # off, or off at this step by the weight schedule: no hook, no encoder
            yield None
            return
        with capture_hidden(self._model.generator, self.config.student_layer, select=self._select) as captured:
            self._captured = captured
            try:
                yield captured
            finally:
                self._captured = None

    _select: Callable[[Tensor], Tensor] | None = None

    def _take_records(self) -> list[HiddenRecord]:
        """This rollout's captured calls, taken out of the capture (cleared: the caller holds them now)."""
        if self._captured is None:
            raise MiraiError(
                "add_term was called outside the foresight capture: decorate generator_loss with "
                "@with_foresight_capture (the patch does this)"
            )
        records = self._captured.records
        self._captured.clear()
        return records

    def _term(self, video: Tensor, conditional_dict: dict, log_dict: dict, **head_kwargs: Any) -> Tensor:
        if self._captured is None:
            raise MiraiError(
                "add_term was called outside the foresight capture: decorate generator_loss with "
                "@with_foresight_capture (the patch does this)"
            )
        encoder = FrozenEncoder(self._encoder(), self.config.encoder_layer)
        encoder_hidden = encoder(video.detach(), conditional_dict)  # (b t e), stop-gradient target
        assert self.head is not None  # add_term checked that the term is on
        term = self.head(self._captured, encoder_hidden, **head_kwargs)
        log_dict["foresight_loss"] = term.detach()
        self._logged["foresight_loss"] = term.detach()
        return term

    # --------------------------------------------------------- trainer hooks

    def after_generator_step(self) -> None:
        """After the generator optimizer step: clip, step and zero the head's own optimizer."""
        if self.head is not None:
            self.head.step()

    def after_critic_step(self, train_generator: bool) -> None:
        """After the critic optimizer step (projector replay where the stage has it)."""

    def log_values(self) -> dict[str, float]:
        """Foresight values to log next to the trainer's losses (cleared once read)."""
        values = {name: value.item() for name, value in self._logged.items()}
        self._logged.clear()
        return values

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"foresight": {...}}`` for the trainer's checkpoint (empty when disabled)."""
        if self.head is None:
            return {}
        return {CHECKPOINT_KEY: self.head.training_state()}  # a collective: the trainer calls it on every rank

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any], *, strict: bool = False) -> None:
        """Resume the head (and its optimizer) from a checkpoint written by ``checkpoint_state``,
        or take its weights from an official Video-Mirai checkpoint (``mirai_projector``).

        Without either entry nothing happens unless ``strict``.
        """
        head = self.head
        if head is None or not isinstance(checkpoint, Mapping):
            return
        entry = checkpoint_entry(checkpoint)
        if entry is not None:
            head.load_training_state(entry)
        elif "mirai_projector" in checkpoint:
            official = ForesightHead.load_official(checkpoint, config=self.config)
            widths = (official.student_dim, official.encoder_dim)
            if widths != (head.student_dim, head.encoder_dim):
                raise MiraiError(
                    f"the official projector is for widths {widths[0]}->{widths[1]}, the trainer's head is "
                    f"{head.student_dim}->{head.encoder_dim}: it was trained with another generator or encoder"
                )
            # Through the head's state module (FSDP gathers), checked before anything loads.
            restore_state(head.optimization, official.state_dict(), None, what="official checkpoint")
        elif strict:
            raise MiraiError(
                f"checkpoint has neither a {CHECKPOINT_KEY!r} entry nor an official 'mirai_projector'; "
                f"keys: {sorted(checkpoint)[:8]}"
            )

    # ------------------------------------------------------- for subclasses

    def _encoder(self) -> Any:
        raise NotImplementedError

    def _encoder_dim(self) -> int:
        return wan_transformer(self._encoder()).dim


class DMDForesight(UpstreamForesight):
    """Stage 3 (DMD): the encoder is the frozen real score; targets come from the rollout.

    Args:
        dmd: the upstream ``DMD`` model (``generator``, ``real_score`` wrappers).
        args: the trainer's config; the official ``foresight_*`` keys are read
            (``ForesightConfig.from_upstream``), the segment size from
            ``num_frame_per_block`` and the clip norm from ``max_grad_norm_generator``.
    """

    def __init__(self, dmd: Any, args: Any) -> None:
        super().__init__(dmd, resolve_self_forcing(args, "dmd"))

    def _encoder(self) -> Any:
        # Looked up on every call: the trainer replaces `real_score` by its FSDP wrapper.
        return self._model.real_score

    def add_term(self, loss: Tensor, log_dict: dict, video: Tensor, conditional_dict: dict) -> Tensor:
        """``loss`` plus the foresight term of the rollout ``video`` (unchanged when disabled or off)."""
        if not self.active:
            return loss
        return loss + self._term(video, conditional_dict, log_dict)

    def after_critic_step(self, train_generator: bool) -> None:
        """On critic steps that are not generator steps: projector replay (``projector_every_step``)."""
        if self.head is not None and self.config.replay and not train_generator:
            replayed = self.head.replay()
            if replayed is not None:
                self._logged["replay_foresight_loss"] = replayed


class ODEForesight(UpstreamForesight):
    """Stage 2 (Causal-Forcing ODE regression, teacher-forced): the target is a frozen
    bidirectional Wan's view of the ground-truth clean video.

    Reads ``foresight_encoder_name`` (default ``Wan2.1-T2V-1.3B``) to build the frozen
    encoder with the upstream ``WanDiffusionWrapper`` and ``foresight_fusion``
    (default ``frame_mean``, the per-frame averaging the paper found best in Stage 2).
    The student state is the noisy half of the teacher-forcing sequence; no replay
    (every step is a generator step).
    """

    def __init__(self, model: Any, args: Any) -> None:
        resolved = resolve_self_forcing(args, "ode")
        self._frozen: nn.Module | None = None
        if resolved.enabled:
            self._frozen = _build_frozen_wan(resolved.glue["foresight_encoder_name"], model)
        super().__init__(model, resolved)

    @staticmethod
    def _select(hidden: Tensor) -> Tensor:
        # Teacher forcing runs [clean tokens, noisy tokens] through the blocks; the
        # generator's prediction (and so the student state) is the noisy half.
        return hidden[:, hidden.shape[1] // 2 :]

    def _encoder(self) -> Any:
        return self._frozen

    def add_term(self, loss: Tensor, log_dict: dict, clean_video: Tensor, conditional_dict: dict) -> Tensor:
        """``loss`` plus the foresight term with the ground-truth ``clean_video`` as the encoder input."""
        if not self.active:
            return loss
        s = tokens_per_frame(self._model.generator, *clean_video.shape[-2:])
        return loss + self._term(clean_video, conditional_dict, log_dict, tokens_per_frame=s)


# ----------------------------------------------------------------- helpers

STAGES = ("dmd", "ode")


def upstream_config(args: Any, stage: str) -> ForesightConfig:
    """The ``ForesightConfig`` the glue of ``stage`` (``"dmd"``: Stage 3, ``"ode"``: Stage 2) trains
    with: ``resolve_self_forcing(args, stage).foresight`` (the resolver checks the glue keys and the run too).
    """
    config = resolve_self_forcing(args, stage).foresight
    assert isinstance(config, ForesightConfig)
    return config


def wan_transformer(wrapper: nn.Module) -> Any:
    """The Wan transformer (``.blocks`` and ``.dim``) inside a WanDiffusionWrapper, through any wrapper."""
    for module, _ in wrapper_chain(wrapper, containers=True):
        if hasattr(module, "blocks") and hasattr(module, "dim"):
            return module
    raise MiraiError(f"no Wan transformer (with .blocks and .dim) found inside {type(wrapper).__name__}")


def model_device(model: Any) -> torch.device:
    """Where an upstream DMD / ODE object keeps its generator (its ``device``, or the generator's parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, int):
        return torch.device("cuda", device)
    if device is not None:
        return torch.device(device)
    return next(model.generator.parameters()).device


def _head_wrap_kwargs(sharding: str, run: VideoRun, head: nn.Module) -> dict[str, Any]:
    """The trainer's own FSDP settings (``sharding_strategy``, ``mixed_precision``, size-based
    wrapping), as the official trainer wraps its projector."""
    device = next(head.parameters()).device
    if sharding == "ddp":
        return {"device_ids": [device.index]} if device.type == "cuda" else {}
    if sharding != "fsdp":
        raise MiraiError(f"foresight_head_sharding must be one of ('replicate', 'ddp', 'fsdp'), got {sharding!r}")
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    strategies = {
        "full": ShardingStrategy.FULL_SHARD,
        "hybrid_full": ShardingStrategy.HYBRID_SHARD,
        "hybrid_zero2": ShardingStrategy._HYBRID_SHARD_ZERO2,
        "no_shard": ShardingStrategy.NO_SHARD,
    }
    return dict(
        sharding_strategy=strategies[run.sharding_strategy],  # checked by the resolver
        mixed_precision=MixedPrecision(torch.bfloat16, torch.float32, torch.float32) if run.mixed_precision else None,
        auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=int(5e7)),
        device_id=device if device.type == "cpu" else device.index,
    )


def _build_frozen_wan(model_name: str, model: nn.Module) -> nn.Module:
    wrapper_cls = importlib.import_module("utils.wan_wrapper").WanDiffusionWrapper
    encoder = wrapper_cls(model_name=model_name, is_causal=False)
    encoder.requires_grad_(False)
    dtype = getattr(model, "dtype", None)
    return encoder.to(device=model_device(model), dtype=dtype).eval()


_DISABLED = UpstreamForesight(None, None)


def foresight_of(model: nn.Module) -> UpstreamForesight:
    """The model's foresight glue, or a no-op stand-in (e.g. for CausVid/SiD models the
    same trainer file also builds)."""
    foresight = getattr(model, "foresight", None)
    return foresight if foresight is not None else _DISABLED

"""Glue for LlamaGen's ``autoregressive/train/train_c2i.py``: what the patch lines call.

``LlamaGenMirai`` implements the glue contract (``mirai_plugin.integrations.glue``).
The patch adds marked lines only. Everything else — the heads, their
optimizer, the EMA source, the capture and the checkpoint entry — lives in this
object, which the GPT does not own: the model's ``state_dict``, its optimizer and
the checkpoint's ``model`` / ``ema`` entries are unchanged, and with
``--mirai none`` (the default) every call is a no-op.

Patched call sites::

    add_mirai_arguments(parser)                                     # before parse_args
    mirai = LlamaGenMirai(model, args, steps_per_epoch, device)     # after the data, before compile and DDP;
                                                                    # its config: upstream_config(args, model, ...)
    mirai.load_checkpoint_state(checkpoint)                         # when resuming from --gpt-ckpt
    mirai.scaler = scaler                                           # after the GradScaler is made (fp16)
    mirai.begin_capture()                                           # before the training forward
    loss = mirai.add_term(loss, c_indices, z_indices)               # right after it: ends the capture
    mirai.after_generator_step()                                    # after scaler.step(optimizer)
    if mirai.enabled:                                               # next to the loss log
        logger.info(... mirai.log_values() ...)
    checkpoint.update(mirai.checkpoint_state())                     # when saving: {"foresight": ...}

The forward is not wrapped in ``with mirai.capturing():`` because a patch adds
lines and never re-indents upstream ones: ``begin_capture()`` enters the same
capture and ``add_term`` leaves it (the next ``begin_capture`` does if the
forward failed). Mirai-E (``--mirai E``) only needs the model's own inputs.
Mirai-I (``--mirai I``) needs the images of the batch: they are decoded from the
codes with the VQ tokenizer (``--mirai-vq-ckpt``), so the code dataset stays as
it is.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.capture import CapturedHidden, capture_hidden
from mirai_plugin.collectives import broadcast_module
from mirai_plugin.errors import MiraiError
from mirai_plugin.image import EMASource, FrozenImageEncoder, ImageForesightConfig, TokenForesightHead
from mirai_plugin.integrations.glue import CHECKPOINT_KEY, checkpoint_entry
from mirai_plugin.integrations.resolve import resolve_llamagen


def add_mirai_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--mirai*`` options (defaults: the paper's recipe; ``--mirai none`` is off)."""
    group = parser.add_argument_group("mirai-plugin: Mirai foresight alignment (training only)")
    group.add_argument("--mirai", choices=["none", "E", "I"], default="none",
                       help="E: EMA-copy targets at the K nearest grid neighbours; I: frozen image encoder")
    group.add_argument("--mirai-layer", type=int, default=7, help="0-based block (7: after 8 of GPT-B's 12)")
    group.add_argument("--mirai-neighbours", type=int, default=None, help="K (default 3 for E, 1 for I)")
    group.add_argument("--mirai-order", choices=["grid", "raster"], default="grid")
    group.add_argument("--mirai-border", choices=["raster", "drop"], default="raster")
    group.add_argument("--mirai-weight", type=float, default=2.0, help="lambda before the step-down")
    group.add_argument("--mirai-weight-after", type=float, default=1.0, help="lambda after the step-down")
    group.add_argument("--mirai-step-down", type=float, default=0.5,
                       help="fraction of training at which lambda steps down")
    group.add_argument("--mirai-warmup-steps", type=int, default=0, help="steps before the term starts")
    group.add_argument("--mirai-ema-decay", type=float, default=0.9999)
    group.add_argument("--mirai-projector-dim", type=int, default=2048)
    group.add_argument("--mirai-encoder", type=str, default="dinov2_vitb14",
                       help="I: a torch.hub DINOv2 name, or a file holding a torch.save'd encoder module")
    group.add_argument("--mirai-vq-model", type=str, default="VQ-16")
    group.add_argument("--mirai-vq-ckpt", type=str, default=None,
                       help="I: the tokenizer that made the codes (its checkpoint, or a torch.save'd module)")


class LlamaGenMirai:
    """The Mirai term inside LlamaGen's c2i trainer (no-op with ``--mirai none``).

    Implements ``TrainerGlue``. ``model`` is the GPT before ``torch.compile`` and DDP
    (they share its parameters); ``scaler``, the trainer's ``GradScaler``, is set by
    the patch once the trainer has made it: with fp16 the heads' gradients are
    unscaled with its scale, and a step with overflowing gradients is skipped.
    """

    def __init__(self, model: Any, args: Any, steps_per_epoch: int, device: torch.device | int) -> None:
        # One resolver reads the options for the glue and for `mirai-plugin config check --upstream llamagen`.
        self.resolved = resolve_llamagen(args, model=model, steps_per_epoch=steps_per_epoch)
        self.enabled = self.resolved.glue["mirai"] != "none"
        self.head: TokenForesightHead | None = None
        self.source: Any = None  # EMASource (E) or the decoded-image encoder (I)
        self.scaler: Any = None
        self._model = model
        self._open: contextlib.ExitStack | None = None  # a capture begin_capture() entered
        self._captured: CapturedHidden | None = None
        self._logged: list[float] = []
        if not self.enabled:
            return
        if isinstance(device, int):  # LlamaGen passes the local GPU index
            device = torch.device("cuda", device) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        cfg = self.resolved.foresight
        assert isinstance(cfg, ImageForesightConfig)
        self.config = cfg
        grid = round(model.block_size ** 0.5)
        width = model.config.dim
        if cfg.source == "ema":
            self.source = EMASource(model, cfg.student_layer, decay=cfg.ema_decay, blocks="layers")
            # a copy of this rank's weights as seeded; DDP gives every rank rank 0's model only later
            broadcast_module(self.source.model)
            target_dim = width
        else:
            self.source = _image_source(args, grid, device)
            target_dim = self.source.width
        self.head = TokenForesightHead(self.config, width, target_dim, (grid, grid)).to(device)
        broadcast_module(self.head)  # ranks seed differently; the heads start identical

    @property
    def active(self) -> bool:
        """Enabled and on at this step of the weight schedule (off during ``--mirai-warmup-steps``)."""
        return self.head is not None and self.head.active

    # -------------------------------------------------------------- the term

    @contextlib.contextmanager
    def capturing(self) -> Iterator[CapturedHidden | None]:
        """Capture ``layers[mirai_layer]`` during the training forward (no hook when not active)."""
        if not self.active:
            yield None
            return
        with capture_hidden(self._model, self.config.student_layer, blocks="layers") as captured:
            self._captured = captured
            try:
                yield captured
            finally:
                self._captured = None

    def begin_capture(self) -> None:
        """Enter ``capturing()`` for the next training forward; ``add_term`` leaves it.

        For a trainer whose forward a patch cannot wrap in a ``with`` block.
        """
        self._end_capture()  # a forward that failed before add_term left it open
        self._open = contextlib.ExitStack()
        self._open.enter_context(self.capturing())

    def add_term(self, loss: Tensor, c_indices: Tensor, z_indices: Tensor) -> Tensor:
        """``loss`` plus the term for this batch (``loss`` itself when not active); ends a
        capture ``begin_capture`` entered."""
        captured, self._captured = self._captured, None  # read once: a second call adds nothing
        self._end_capture()
        if not self.active:
            return loss
        if captured is None:
            raise MiraiError(
                "add_term was called outside the Mirai capture: call mirai.begin_capture() before the training "
                "forward (the patch does this), or run the forward inside `with mirai.capturing():`"
            )
        if self.config.source == "ema":
            # The copy runs in eval mode (no dropout, no label drop); LlamaGen's eval forward
            # reads the rotary table at input_pos, so give it every position.
            positions = torch.arange(self.config.prefix_tokens + z_indices.shape[1] - 1, device=z_indices.device)
            target = self.source(cond_idx=c_indices, idx=z_indices[:, :-1], input_pos=positions)
        else:
            target = self.source(z_indices)
        assert self.head is not None  # add_term returned early when off
        term = self.head(captured, target)
        self._logged.append(term.detach().item())
        return loss + term

    def _end_capture(self) -> None:
        if self._open is not None:
            self._open.close()  # removes the hook, also after a failed forward
            self._open = None

    # --------------------------------------------------------- trainer hooks

    def after_generator_step(self) -> None:
        """After the model's optimizer step: the heads' step (unscaled for fp16) and the EMA update."""
        self._step(self._model, self.scaler)

    def _step(self, model: nn.Module, scaler: Any) -> None:
        head = self.head
        if head is None:
            return
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        if scale != 1.0:
            for g in grads:
                g.div_(scale)
        if grads and not all(bool(torch.isfinite(g).all()) for g in grads):  # fp16 overflow: skip, as the scaler does
            head.skip_step()
        else:
            head.step()
        if self.config.source == "ema":
            self.source.update(model)

    def after_critic_step(self, train_generator: bool) -> None:
        """No critic in LlamaGen's trainer: nothing to do."""

    def log_values(self) -> dict[str, float]:
        """``foresight_loss`` (the mean term since the last call, when it ran) and
        ``foresight_weight`` (lambda now); empty when off."""
        values, self._logged = self._logged, []
        if self.head is None:
            return {}
        logged = {"foresight_loss": sum(values) / len(values)} if values else {}
        return {**logged, "foresight_weight": self.head.weight}

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"foresight": {"head": ..., "source": ...}}`` (the EMA copy for Mirai-E); empty when off."""
        if self.head is None:
            return {}
        state = {"head": self.head.training_state()}
        if self.config.source == "ema":
            state["source"] = self.source.state_dict()
        return {CHECKPOINT_KEY: state}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any], *, strict: bool = False) -> None:
        """Resume the heads, their optimizer, the schedule and the EMA source from ``checkpoint_state()``
        (also from the ``"mirai"`` entry versions before 0.2.0 wrote). Without an entry nothing
        happens unless ``strict``."""
        head = self.head
        if head is None:
            return
        entry = checkpoint_entry(checkpoint)
        if entry is None:
            if strict:
                keys = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
                raise MiraiError(f"checkpoint has no {CHECKPOINT_KEY!r} entry to resume Mirai from; keys: {keys}")
            return
        if not isinstance(entry, Mapping) or "head" not in entry:
            got = f"keys {sorted(entry)[:8]}" if isinstance(entry, Mapping) else type(entry).__name__
            raise MiraiError(f"the checkpoint's {CHECKPOINT_KEY!r} entry has no 'head' state ({got}): pass a "
                             f"checkpoint that holds what checkpoint_state() returned")
        source = entry.get("source") if self.config.source == "ema" else None
        if source is not None:
            self.source.check_state_dict(source)  # before the head loads: all or nothing
        head.load_training_state(entry["head"])
        if source is not None:
            self.source.load_state_dict(source)


def upstream_config(args: Any, model: Any, steps_per_epoch: int) -> ImageForesightConfig:
    """The ``ImageForesightConfig`` the glue trains with, from the ``--mirai*`` options (``--mirai E`` or
    ``I``), LlamaGen's optimizer options and the GPT (its class-token prefix); lambda steps down after
    ``--mirai-step-down`` of ``--epochs`` x ``steps_per_epoch`` steps: ``resolve_llamagen(...).foresight``."""
    config = resolve_llamagen(args, model=model, steps_per_epoch=steps_per_epoch).foresight
    assert isinstance(config, ImageForesightConfig)
    return config


class _DecodedImageEncoder:
    """Mirai-I on a code dataset: codes -> VQ decode -> encoder patch features on the token grid."""

    def __init__(self, vq: Any, encoder: FrozenImageEncoder, grid: int, width: int) -> None:
        self.vq, self.encoder, self.grid, self.width = vq, encoder, grid, width

    @torch.no_grad()
    def __call__(self, z_indices: Tensor) -> Tensor:
        b = z_indices.shape[0]
        channels = self.vq.config.codebook_embed_dim
        images = self.vq.decode_code(z_indices, [b, channels, self.grid, self.grid])  # (b 3 h w) in [-1, 1]
        images = (images.clamp(-1, 1) + 1) / 2
        mean = images.new_tensor([0.485, 0.456, 0.406])[:, None, None]
        std = images.new_tensor([0.229, 0.224, 0.225])[:, None, None]
        size = 224 * max(1, images.shape[-1] // 256)  # DINOv2's resolution, as the official script
        images = torch.nn.functional.interpolate((images - mean) / std, size=size, mode="bicubic")
        return self.encoder(images)


def _image_source(args: Any, grid: int, device: torch.device) -> _DecodedImageEncoder:
    import importlib

    state = torch.load(args.mirai_vq_ckpt, map_location="cpu", weights_only=False)
    if isinstance(state, nn.Module):  # a whole tokenizer module
        vq = state
    else:  # LlamaGen's tokenizer checkpoint: {"model": state_dict}
        vq = importlib.import_module("tokenizer.tokenizer_image.vq_model").VQ_models[args.mirai_vq_model]()
        vq.load_state_dict(state.get("model", state))
    vq = vq.to(device).eval().requires_grad_(False)
    if args.mirai_encoder.startswith("dinov2"):
        encoder = torch.hub.load("facebookresearch/dinov2", args.mirai_encoder)
        features = lambda m, x: m.forward_features(x)["x_norm_patchtokens"]
    else:
        encoder = torch.load(args.mirai_encoder, map_location="cpu", weights_only=False)
        features = None
    encoder = encoder.to(device).eval().requires_grad_(False)
    width = getattr(encoder, "embed_dim", None) or getattr(encoder, "width", None)
    if width is None:
        raise MiraiError("the Mirai-I encoder must say its feature width (an embed_dim or width attribute)")
    return _DecodedImageEncoder(vq, FrozenImageEncoder(encoder, grid=(grid, grid), features=features), grid, width)

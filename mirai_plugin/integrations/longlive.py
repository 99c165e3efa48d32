"""Glue for LongLive 2.0 DMD (``NVlabs/LongLive``, Wan2.2-TI2V-5B): what the patch lines call.

Legend: b batch, f latent frames, s tokens per frame, k segment (one generator block of
``num_frame_per_block`` frames), e encoder width.

The patch adds the same marked one-line calls as the Self-Forcing patch (see
``mirai_plugin.integrations.self_forcing``), with the same lifecycle names::

    self.foresight = LongLiveForesight(self, args)                   # end of DMD.__init__
    @with_foresight_capture                                          # on DMD.generator_loss
    dmd_loss = self.foresight.add_term(dmd_loss, dmd_log_dict,       # before generator_loss returns
                                       pred_image, conditional_dict)
    foresight_of(self.model).after_generator_step()                  # after generator_optimizer.step()
    foresight_of(self.model).after_critic_step(TRAIN_GENERATOR)      # after critic_optimizer.step(): replay
    wandb_loss_dict.update(foresight_of(self.model).log_values())    # next to the DMD losses
    state_dict.update(foresight_of(self.model).checkpoint_state())   # Trainer.save (LoRA and full)
    foresight_of(self.model).load_checkpoint_state(checkpoint)       # both resume paths

What LongLive adds over Self-Forcing, and what this module decides (docs/longlive.md has the reasons):

- The encoder is a choice (``foresight_encoder``): ``bidirectional`` (default, the paper's method), a
  frozen bidirectional Wan2.2-TI2V-5B ``WanModel`` loaded from ``foresight_encoder_ckpt`` and wrapped
  like the real score (``foresight_encoder_sharding``: ``fsdp`` or ``replicate``); or
  ``causal_real_score``, the trainer's real score, which LongLive builds causal (``all_causal: true``):
  the paper's weaker causal-encoder ablation.
- The encoder sees the DMD window (``pred_image``: the last ``slice_last_frames`` latents, whose first
  latent is a VAE decode/re-encode when the rollout is longer); the generator's grad-enabled blocks are
  exactly the window's blocks. Captured positions are rollout positions: they are shifted into the window.
- ``foresight_window_first_block``: ``as_dmd`` (default) leaves the window's first block unsupervised
  when LongLive's ``gradient_mask`` drops it from the DMD loss; ``supervise`` / ``mask`` always / never.
- ``foresight_scene_cut``: ``mask`` (default) gives no target across a scene cut (each shot is its own
  run of segments; the last segment of a shot keeps offset 0 only); ``keep`` ignores cuts.
- ``foresight_i2v_first_block``: ``supervise`` (default) or ``mask`` the block that holds I2V's clean
  conditioning latent.

With ``foresight_weight: 0`` (or no foresight keys) nothing is built and every call is a no-op. The
plug-in draws no numbers from the trainer's random streams (the head and the encoder are built under a
forked RNG), so LoRA initialisation and every later draw are the same with and without the term.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin import ForesightConfig, FrozenEncoder, HiddenRecord
from mirai_plugin.collectives import gather_ints
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import load_checkpoint
from mirai_plugin.integrations.resolve import LONGLIVE_ENCODERS as ENCODERS
from mirai_plugin.integrations.resolve import ResolvedRun, VideoRun, resolve_longlive
from mirai_plugin.integrations.self_forcing import (
    UpstreamForesight,
    foresight_of,
    model_device,
    wan_transformer,
    with_foresight_capture,
)
from mirai_plugin.keys import key_reader
from mirai_plugin.wrappers import strip_wrapper_prefixes, tokens_per_frame

__all__ = [
    "ENCODERS", "LongLiveForesight", "foresight_of", "longlive_config", "resolve_longlive", "with_foresight_capture",
]

CHECKPOINT_KEYS = ("generator", "model", "critic")  # where LongLive's own loaders look for weights


def longlive_config(args: Any) -> ForesightConfig:
    """The ``ForesightConfig`` the LongLive glue trains with: ``resolve_longlive(args).foresight``, the
    resolver that also checks the glue keys and what the trainer runs (``mirai-plugin config check``).

    LongLive's ``normalize_config`` flattens only its own sections, so foresight keys must be
    top-level (or in one of those sections); one in any other mapping is refused (it would be
    silently ignored).
    """
    config = resolve_longlive(args).foresight
    assert isinstance(config, ForesightConfig)
    return config


class LongLiveForesight(UpstreamForesight):
    """LongLive DMD (T2V and I2V, LoRA or full): the term on the DMD window of each rollout.

    Args:
        dmd: LongLive's ``DMD`` model (``generator``, ``real_score`` wrappers, ``args``).
        args: the normalised trainer config (top-level ``foresight_*`` keys).
    """

    def __init__(self, dmd: nn.Module, args: Any) -> None:
        resolved = resolve_longlive(args)
        self._args = args
        glue = resolved.glue
        self.encoder_choice = glue["foresight_encoder"]
        self.scene_cut = glue["foresight_scene_cut"]
        self.window_first_block = glue["foresight_window_first_block"]
        self.i2v_first_block = glue["foresight_i2v_first_block"]
        self._frozen: nn.Module | None = None
        self._terms: list[Tensor] = []
        if not resolved.enabled:
            super().__init__(dmd, resolved)
            return
        # Built under a forked RNG: the trainer's random streams (LoRA init, noise) stay what they
        # would be without the plug-in.
        with torch.random.fork_rng(devices=[]):
            if self.encoder_choice == "bidirectional":
                self._frozen = _bidirectional_encoder(dmd, args, resolved)
            super().__init__(dmd, resolved)

    # ----------------------------------------------------------- the term

    def add_term(self, loss: Tensor, log_dict: dict, video: Tensor, conditional_dict: dict) -> Tensor:
        """``loss`` plus the foresight term of the DMD window ``video`` (b f c h w)
        (unchanged when disabled or off by the schedule)."""
        head = self.head
        if head is None or not self.active:
            return loss
        records = self._take_records()
        if not records:
            raise MiraiError("no grad-enabled generator call was captured during the rollout: LongLive's "
                             "pipeline runs the window's blocks with gradients; check slice_last_frames")
        block = self.config.segment_frames
        s = tokens_per_frame(self._model.generator, *video.shape[-2:])
        window = video.shape[1]
        positions = [r.position for r in records]
        if any(p is None for p in positions):
            raise MiraiError("captured calls carry no current_start: the LongLive rollout passes one per block")
        at = {id(r): int(p) for r, p in zip(records, positions) if p is not None}  # rollout token offset of a call
        ends = [at[id(r)] // s + r.hidden.shape[1] // s for r in records]
        rollout = max(ends)  # rollout frames R (the last block always runs with gradients)
        start = rollout - window  # rollout frame of the window's first latent
        if start < 0:
            raise MiraiError(f"the DMD window has {window} frames but the rollout only {rollout}")
        prefix = (-start) % block  # window frames before the first block boundary
        segments = {}  # window segment -> its record, position relative to the segment grid
        for r in records:
            frame = at[id(r)] // s - start - prefix
            if frame < 0 or frame % block or r.hidden.shape[1] != block * s:
                raise MiraiError(
                    f"a grad-enabled generator call at rollout frame {at[id(r)] // s} with "
                    f"{r.hidden.shape[1] // s} frames does not fit the DMD window [{start}, {rollout}) in blocks "
                    f"of {block}: LongLive's independent_first_frame layout without I2V is not supported")
            segments[frame // block] = r
        count = (window - prefix) // block
        supervised = [k for k in sorted(segments) if k < count and not self._dropped(k, prefix, start, rollout,
                                                                                     conditional_dict)]
        if not supervised:
            return loss
        shots = self._shots(supervised, count, start + prefix, block, conditional_dict)
        targets = self._encode_shots(video.detach(), conditional_dict, shots, prefix, count)  # (b t e) per shot
        n = sum(len(members) for members, _ in shots)
        if self.scene_cut == "keep" or conditional_dict.get("scene_cut_mask") is None:
            ((members, (first, _)),), (target,) = shots, targets
            records = [HiddenRecord(segments[k].hidden, (k - first) * block * s, i, segments[k].version)
                       for i, k in enumerate(members)]
            total = head(records, target, tokens_per_frame=s)
        else:
            # Multi-shot: one head call per supervised segment, its target window cut at the shot's end. The
            # number of calls is then the same on every rank whatever the cuts (an FSDP / DDP head needs that).
            reach = max(self.config.offsets) + 1
            total = 0.0
            for (members, (first, last)), target in zip(shots, targets):
                for k in members:
                    lo, hi = (k - first) * block * s, min(k - first + reach, last - first) * block * s
                    record = HiddenRecord(segments[k].hidden, 0, 0, segments[k].version)
                    total = total + head([record], target[:, lo:hi], tokens_per_frame=s) / n
        log_dict["foresight_loss"] = total.detach()
        log_dict["foresight_segments"] = n  # supervised segments of this rollout's window
        log_dict["foresight_shots"] = len(shots)
        log_dict["foresight_rollout_frames"] = rollout
        self._terms.append(total.detach())  # one per micro-step under gradient accumulation
        return loss + total

    def log_values(self) -> dict[str, float]:
        """Foresight values to log next to the trainer's losses (cleared once read); ``foresight_loss`` is
        the mean over the update's micro-steps (LongLive's ``gradient_accumulation_steps``)."""
        if self._terms:
            self._logged["foresight_loss"] = torch.stack(self._terms).mean()
            self._terms.clear()
        return super().log_values()

    def after_critic_step(self, train_generator: bool) -> None:
        """On critic-only iterations: projector replay (``projector_every_step``)."""
        if self.head is not None and self.config.replay and not train_generator:
            replayed = self.head.replay()
            if replayed is not None:
                self._logged["replay_foresight_loss"] = replayed

    # ------------------------------------------------------------ helpers

    def _dropped(self, k: int, prefix: int, start: int, rollout: int, conditional_dict: dict) -> bool:
        """Whether window segment ``k`` is left out of the term."""
        block = self.config.segment_frames
        first_frame = prefix + k * block  # window frame
        if self.window_first_block == "mask" and k == 0:
            return True
        if self.window_first_block == "as_dmd" and first_frame < block and self._dmd_masks_first_block(rollout):
            return True
        holds_condition = start == 0 and first_frame == 0 and conditional_dict.get("initial_latent") is not None
        return holds_condition and self.i2v_first_block == "mask"

    def _dmd_masks_first_block(self, rollout: int) -> bool:
        """LongLive's ``gradient_mask`` drops the window's first block (not only its first frame) when the
        rollout length differs from ``min_num_training_frames`` and the first frame is not independent."""
        run = self.resolved.trainer if self.resolved is not None else None
        assert isinstance(run, VideoRun)
        return not run.independent_first_frame and rollout != run.min_frames

    def _shots(self, supervised: list[int], count: int, grid_start: int, block: int, conditional_dict: dict):
        """``[(supervised members, (first, last)), ...]``: one entry per shot under ``mask``, one in all
        under ``keep``. ``scene_cut_mask`` (LongLive: batch element 0's prompts) indexes rollout blocks."""
        cuts = conditional_dict.get("scene_cut_mask") if self.scene_cut == "mask" else None
        bounds = [0, count]
        if cuts is not None:
            first_block = grid_start // block  # rollout block of window segment 0
            bounds = sorted({0, count, *(j - first_block for j, cut in enumerate(cuts)
                                         if cut and j > 0 and 0 < j - first_block < count)})
        shots = []
        for first, last in itertools.pairwise(bounds):
            members = [k for k in supervised if first <= k < last]
            if members:
                shots.append((members, (members[0], last)))
        return shots

    def _encode_shots(self, video: Tensor, conditional_dict: dict, shots: list, prefix: int,
                      count: int) -> list[Tensor]:
        """The encoder's block output (b t e) on each shot's window frames, under ``no_grad``."""
        block = self.config.segment_frames
        spans = [(prefix + first * block, prefix + last * block) for _, (first, last) in shots]
        encoder = FrozenEncoder(self._encoder(), self.config.encoder_layer)
        if self.encoder_choice == "causal_real_score":
            # One call on the whole window: the causal model caches its block mask for the input length.
            hidden = encoder(video, conditional_dict)  # (b f*s e)
            s = hidden.shape[1] // video.shape[1]
            return [hidden[:, a * s : b * s] for a, b in spans]
        # Bidirectional: each shot on its own, with its own prompt (a WanModel takes one prompt per video).
        out = [encoder(video[:, a:b], {"prompt_embeds": _segment_prompt(conditional_dict["prompt_embeds"],
                                                                        video.shape[0], first, count)})
               for (a, b), (_, (first, _)) in zip(spans, shots)]
        # An FSDP-wrapped encoder gathers its weights in every call: every rank makes as many calls.
        for _ in range(int(gather_ints([len(spans)], video.device).max()) - len(spans)):
            encoder(video[:, spans[0][0] : spans[0][1]], {"prompt_embeds": _segment_prompt(
                conditional_dict["prompt_embeds"], video.shape[0], shots[0][1][0], count)})  # result unused
        return out

    def _encoder(self) -> Any:
        # Looked up on every call: the trainer replaces `real_score` by its FSDP wrapper.
        return self._model.real_score if self.encoder_choice == "causal_real_score" else self._frozen

    def _encoder_dim(self) -> int:
        return wan_transformer(self._encoder()).dim


# ----------------------------------------------------------------- helpers


def _segment_prompt(prompt_embeds: Tensor, batch: int, first: int, count: int) -> Tensor:
    """The prompt of window segment ``first`` from LongLive's block-wise ``prompt_embeds``
    ((b*n l c), the last n blocks' prompts after DMD's slicing; n = 1: one prompt for all)."""
    n = prompt_embeds.shape[0] // batch
    if n == 1:
        return prompt_embeds
    index = min(max(n - count + first, 0), n - 1)
    return prompt_embeds.unflatten(0, (batch, n))[:, index]  # (b l c)


def _bidirectional_encoder(dmd: nn.Module, args: Any, resolved: ResolvedRun) -> nn.Module:
    """Choice (a): a frozen bidirectional Wan2.2-TI2V-5B from ``foresight_encoder_ckpt`` (the resolver checked
    it is set and exists), wrapped like the real score (``foresight_encoder_sharding: fsdp``, the default) or
    replicated on every rank."""
    import importlib

    path = resolved.glue["foresight_encoder_ckpt"]
    state = load_checkpoint(path, what="foresight_encoder_ckpt")
    for key in CHECKPOINT_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    model_kwargs = dict(key_reader(args)("model_kwargs", {}) or {})
    wrapper_cls = importlib.import_module("utils.wan_5b_wrapper").WanDiffusionWrapper
    encoder = wrapper_cls(model_name=model_kwargs.get("model_name", "Wan2.2-TI2V-5B"),
                          timestep_shift=model_kwargs.get("timestep_shift", 5.0), is_causal=False)
    try:
        encoder.load_state_dict({strip_wrapper_prefixes(k): v for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise MiraiError(f"foresight_encoder_ckpt {path!r} is not a bidirectional {model_kwargs.get('model_name')} "
                         f"WanDiffusionWrapper state dict: {str(error)[:400]}") from None
    encoder.requires_grad_(False).eval()
    run = resolved.trainer
    assert isinstance(run, VideoRun)
    if resolved.glue["foresight_encoder_sharding"] == "fsdp":
        fsdp_wrap = importlib.import_module("utils.distributed").fsdp_wrap
        return fsdp_wrap(encoder, sharding_strategy=run.sharding_strategy, mixed_precision=run.mixed_precision,
                         wrap_strategy=key_reader(args)("real_score_fsdp_wrap_strategy", "size"))
    return encoder.to(device=model_device(dmd), dtype=getattr(dmd, "dtype", torch.float32))

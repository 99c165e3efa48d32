"""Glue for Rolling Forcing and Causal-Forcing's ``long_video/`` (one trainer): what the patch lines call.

Legend: b batch, u tokens of one generator call, n tokens per block, s tokens per frame, d student width.

docs/rolling-forcing.md is the design. A rolling rollout denoises a window of up to L blocks in one
generator call (``current_start`` is the window's first block); the grad-enabled calls do not overlap and
hold every block of the DMD window once. ``window_blocks`` splits each captured call into its blocks and
places them in the DMD window, the frames the encoder reads (``pred_image``): block k of the window is
paired with the encoder's targets at k and k + 1. A plain self-forcing rollout makes one-block calls and
goes through the same split. ``supervised_blocks`` keeps the blocks the term trains
(``foresight_window_blocks``, ``foresight_window_first_block``).

``RollingForcingForesight`` is the glue (the ``TrainerGlue`` contract), for both checkouts; the patches add the
Self-Forcing patch's marked lines (``mirai_plugin.integrations.self_forcing``), with this glue::

    self.foresight = RollingForcingForesight(self, args)          # end of DMD.__init__
    @with_foresight_capture                                        # on DMD.generator_loss
    dmd_loss = self.foresight.add_term(dmd_loss, dmd_log_dict, pred_image, conditional_dict)  # before it returns

    foresight_of(self.model).load_checkpoint_state(state_dict)     # after torch.load(config.generator_ckpt)
    state_dict.update(foresight_of(self.model).checkpoint_state())  # Trainer.save, on every rank
    foresight_of(self.model).after_generator_step()                # after generator_optimizer.step()
    foresight_of(self.model).after_critic_step(TRAIN_GENERATOR)    # after critic_optimizer.step(): replay
    for name, value in foresight_of(self.model).log_values().items():  # main process, after the critic's losses
        self.writer.add_scalar(name, value, self.step)

Per generator step every rank runs one encoder pass and, with a supervised block, one head call, in either
rollout mode; the critic step's rollout is not captured (replay uses the last generator step's pairs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.capture import CapturedHidden, HiddenRecord
from mirai_plugin.encoder import FrozenEncoder
from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.resolve import resolve_rolling_forcing
from mirai_plugin.integrations.self_forcing import (
    DMDForesight,
    UpstreamForesight,
    foresight_of,
    with_foresight_capture,
)
from mirai_plugin.wrappers import tokens_per_frame

__all__ = [
    "WINDOW_BLOCKS", "WINDOW_FIRST_BLOCK", "CallBlock", "RollingForcingForesight", "foresight_of",
    "resolve_rolling_forcing", "supervised_blocks", "window_blocks", "with_foresight_capture",
]

WINDOW_BLOCKS = ("all", "last", "noise_below")  # foresight_window_blocks: which blocks of a call are supervised
WINDOW_FIRST_BLOCK = ("as_dmd", "supervise", "mask")  # foresight_window_first_block


@dataclass(frozen=True)
class CallBlock:
    """One block of a captured grad-enabled generator call, placed in the DMD window.

    Attributes:
        segment: the block's index in the DMD window (its last ``window_frames`` frames), 0-based.
        rollout_block: the block's index in the rollout; ``rollout_block - segment`` blocks precede the
            window (the rollout is longer than the window).
        record: the block's ``(b n d)`` view of the call's capture, still attached to the graph, with the
            token position of the block in the window (``segment * n``): what the head reads.
        index_in_call: the block's place among the call's blocks (0: the call's first, oldest block).
        call_blocks: how many blocks the call holds (1 in a self-forcing rollout).
    """

    segment: int
    rollout_block: int
    record: HiddenRecord
    index_in_call: int
    call_blocks: int

    @property
    def last_in_call(self) -> bool:
        """No later block in the same call: the block saw no newer frames of its window."""
        return self.index_in_call == self.call_blocks - 1


def window_blocks(
    records: Sequence[HiddenRecord], *, tokens_per_frame: int, frames_per_block: int, window_frames: int
) -> list[CallBlock]:
    """The captured calls of one rollout split into blocks, one per block of the DMD window, in order.

    Each record is one grad-enabled call: ``(b u d)`` with ``current_start`` (tokens) as its position. Its
    j-th block of ``n = frames_per_block * tokens_per_frame`` tokens is rollout block
    ``position / n + j``. The rollout ends where the last call ends (a rollout's last block always runs
    with gradients); the window is its last ``window_frames`` frames. Blocks before the window (a call
    that straddles the window's start) are dropped; every block of the window must be captured once.

    Example:
        >>> import torch
        >>> call = torch.arange(6.0).reshape(1, 6, 1)  # (b u d): 3 blocks of 2 tokens, from block 1
        >>> blocks = window_blocks([HiddenRecord(call, 2, 0, call._version)],
        ...                        tokens_per_frame=1, frames_per_block=2, window_frames=4)
        >>> [(b.segment, b.record.position, b.record.hidden.flatten().tolist()) for b in blocks]
        [(0, 0, [2.0, 3.0]), (1, 2, [4.0, 5.0])]
    """
    s, f = tokens_per_frame, frames_per_block
    n = f * s
    if window_frames <= 0 or window_frames % f:
        raise MiraiError(f"the DMD window has {window_frames} frames, not a whole number of blocks of {f} frames")
    if not records:
        raise MiraiError("no grad-enabled generator call was captured during the rollout; the rollout runs the "
                         "blocks of the DMD window with gradients: check that generator_loss runs in capturing()")
    spans = []  # (first rollout block, blocks, record) per call
    for i, record in enumerate(records):
        h = record.hidden
        if record.position is None:
            raise MiraiError(f"captured call {i} carries no current_start: the rollout passes one to every block")
        if h.dim() != 3 or h.shape[1] == 0 or h.shape[1] % n:
            raise MiraiError(
                f"captured call {i} at token {record.position} has shape {tuple(h.shape)}: not (batch, tokens, "
                f"width) with whole blocks of {n} tokens ({f} frames x {s} tokens); check tokens_per_frame")
        if record.position % n:
            raise MiraiError(f"captured call {i} starts at token {record.position}, frame {record.position / s:g}: "
                             f"not a block boundary of {f} frames x {s} tokens")
        spans.append((record.position // n, h.shape[1] // n, record))
    rollout_blocks = max(first + count for first, count, _ in spans)
    first_block = rollout_blocks - window_frames // f  # rollout block of window segment 0
    if first_block < 0:
        raise MiraiError(f"the DMD window has {window_frames} frames but the captured rollout only "
                         f"{rollout_blocks * f}")
    placed: dict[int, CallBlock] = {}
    for first, count, record in spans:
        for j, view in enumerate(record.hidden.split(n, dim=1)):  # count x (b n d), views of the capture
            k = first + j - first_block
            if k < 0:
                continue  # before the window: no target, and DMD does not score it
            if k in placed:
                raise MiraiError(
                    f"window block {k} (rollout frames {(first + j) * f}..{(first + j + 1) * f - 1}) was "
                    f"captured by two grad-enabled calls; a rollout runs each block with gradients once")
            placed[k] = CallBlock(k, first + j, HiddenRecord(view, k * n, record.call_index, record.version), j, count)
    missing = sorted(set(range(window_frames // f)) - set(placed))
    if missing:
        raise MiraiError(f"window blocks {missing} of {window_frames // f} were not captured with gradients "
                         f"(rollout of {rollout_blocks * f} frames); every block of the DMD window needs one "
                         f"grad-enabled call")
    return [placed[k] for k in sorted(placed)]


def supervised_blocks(
    blocks: Sequence[CallBlock], *, rule: str = "all", first_block: str = "as_dmd",
    max_timestep: float | None = None, timesteps: Mapping[int, float] | None = None,
) -> list[CallBlock]:
    """The blocks the term supervises, from ``window_blocks``' split (docs/rolling-forcing.md, "Decisions").

    ``rule`` (``foresight_window_blocks``): ``all`` every block; ``last`` only each call's newest
    block; ``noise_below`` only blocks whose timestep in their grad call (``timesteps``, keyed by rollout
    block) is at most ``max_timestep``. ``first_block`` (``foresight_window_first_block``): ``as_dmd`` drops
    window block 0 when DMD's ``gradient_mask`` does (the rollout is longer than the window), ``supervise``
    keeps it, ``mask`` drops it.

    Example:
        >>> import torch
        >>> call = torch.zeros(1, 6, 1)  # (b u d): 3 blocks of 2 tokens, the whole rollout
        >>> blocks = window_blocks([HiddenRecord(call, 0, 0, call._version)],
        ...                        tokens_per_frame=1, frames_per_block=2, window_frames=6)
        >>> [b.segment for b in supervised_blocks(blocks, rule="last")]
        [2]
    """
    if rule not in WINDOW_BLOCKS:
        raise MiraiError(f"foresight_window_blocks={rule!r}; choose one of {', '.join(WINDOW_BLOCKS)}")
    if first_block not in WINDOW_FIRST_BLOCK:
        raise MiraiError(f"foresight_window_first_block={first_block!r}; choose one of "
                         f"{', '.join(WINDOW_FIRST_BLOCK)}")
    if rule == "noise_below" and (max_timestep is None or timesteps is None):
        raise MiraiError("foresight_window_blocks: noise_below needs foresight_window_max_timestep and the "
                         "timestep of each block's grad call")
    longer = any(b.rollout_block != b.segment for b in blocks)  # blocks precede the window
    kept = []
    for b in blocks:
        if b.segment == 0 and (first_block == "mask" or (first_block == "as_dmd" and longer)):
            continue
        if rule == "last" and not b.last_in_call:
            continue
        if rule == "noise_below":
            assert timesteps is not None and max_timestep is not None  # checked above
            if b.rollout_block not in timesteps:
                raise MiraiError(f"no timestep recorded for rollout block {b.rollout_block} (window block "
                                 f"{b.segment}); recorded: {sorted(timesteps)}")
            if timesteps[b.rollout_block] > max_timestep:
                continue
        kept.append(b)
    return kept


class RollingForcingForesight(DMDForesight):
    """Rolling Forcing / Causal-Forcing ``long_video/`` DMD: the term on the blocks of each rollout's grad calls.

    The encoder (the real score) and the replay on critic steps are Self-Forcing's (``DMDForesight``); the
    config reader, the split of window calls into blocks and the choice of supervised blocks are this one's.

    Args:
        dmd: the upstream ``DMD`` model (``generator``, ``real_score`` wrappers).
        args: the trainer's config; read by ``resolve_rolling_forcing`` (the ``foresight_*`` keys,
            ``foresight_window_blocks``, ``foresight_window_first_block``, ``foresight_window_max_timestep``).
        upstream: ``rolling-forcing`` or ``causal-forcing-long-video`` (the same trainer; the name is reported).
    """

    def __init__(self, dmd: Any, args: Any, *, upstream: str = "rolling-forcing") -> None:
        resolved = resolve_rolling_forcing(args, upstream=upstream)
        self.window_rule = resolved.glue["foresight_window_blocks"]
        self.window_first_block = resolved.glue["foresight_window_first_block"]
        self.max_timestep = resolved.glue["foresight_window_max_timestep"]
        self._call_timesteps: dict[int, Tensor] = {}  # current_start (tokens) -> (f) timesteps of a grad call
        UpstreamForesight.__init__(self, dmd, resolved)  # DMDForesight.__init__ would read it as Self-Forcing

    @contextlib.contextmanager
    def capturing(self) -> Iterator[CapturedHidden | None]:
        """The capture; under ``noise_below`` also each grad call's ``timestep`` (a pre-hook on the generator
        wrapper, removed on exit)."""
        with super().capturing() as captured:
            if captured is None or self.window_rule != "noise_below":
                yield captured
                return
            self._call_timesteps.clear()
            handle = self._model.generator.register_forward_pre_hook(self._record_timestep, with_kwargs=True)
            try:
                yield captured
            finally:
                handle.remove()

    def _record_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep, start = kwargs.get("timestep"), kwargs.get("current_start")
        if torch.is_grad_enabled() and isinstance(timestep, Tensor) and start is not None:
            self._call_timesteps[int(start)] = timestep.detach()[0].reshape(-1).float().cpu()  # (f), batch 0

    def add_term(self, loss: Tensor, log_dict: dict, video: Tensor, conditional_dict: dict) -> Tensor:
        """``loss`` plus the foresight term of the DMD window ``video`` (``pred_image``, b f c h w)
        (unchanged when disabled or off by the schedule)."""
        head = self.head
        if head is None or not self.active:
            return loss
        records = self._take_records()
        f = self.config.segment_frames
        s = tokens_per_frame(self._model.generator, *video.shape[-2:])
        blocks = window_blocks(records, tokens_per_frame=s, frames_per_block=f, window_frames=video.shape[1])
        kept = supervised_blocks(blocks, rule=self.window_rule, first_block=self.window_first_block,
                                 max_timestep=self.max_timestep,
                                 timesteps=self._block_timesteps(f * s, f) if self.window_rule == "noise_below"
                                 else None)
        # Every rank runs the encoder (an FSDP real score gathers its weights in the call), supervised or not.
        encoder = FrozenEncoder(self._encoder(), self.config.encoder_layer)
        target = encoder(video.detach(), conditional_dict)  # (b t e), stop-gradient target
        log_dict["foresight_segments"] = len(kept)
        log_dict["foresight_rollout_frames"] = (blocks[-1].rollout_block + 1) * f
        if not kept:  # last / noise_below on a rank without such a block: zero gradients (replicated head)
            # The same keys in every micro-step's dict: the trainer's merge_dict_list stacks them by key.
            log_dict["foresight_loss"] = torch.zeros((), device=loss.device)
            return loss
        term = head([b.record for b in kept], target, tokens_per_frame=s)
        log_dict["foresight_loss"] = term.detach()
        self._logged["foresight_loss"] = term.detach()
        return loss + term

    def _block_timesteps(self, n: int, f: int) -> dict[int, float]:
        """The timestep of each rollout block in its grad call, from the recorded calls (``noise_below``)."""
        timesteps = {}
        for start, levels in self._call_timesteps.items():
            for j in range(levels.numel() // f):
                timesteps[start // n + j] = float(levels[j * f])
        self._call_timesteps.clear()
        return timesteps

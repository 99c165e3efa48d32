"""Per-segment foresight targets from one encoder pass over the whole rollout.

Legend: b batch, f frames, s tokens per frame, K segments in the video,
k supervised segments, o offsets, n = segment_frames * s tokens per segment,
e encoder width.

Token j of segment k is paired with token j of segment k+d (token-aligned): a
segment's tokens are frame-major, so this pairs the same spatial position in the
same frame slot of the two segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mirai_plugin.config import FUSIONS
from mirai_plugin.errors import MiraiError


class SegmentTargets(NamedTuple):
    """Targets of the supervised segments.

    Attributes:
        target: ``mean``: ``(b k n e)``; ``none``: ``(b k o n e)``;
            ``frame_mean``: ``(b k o s e)``. Rows follow ``segments``; entries of
            invalid offsets are zero.
        valid: ``(k o)`` bool, offset ``offsets[o]`` of segment ``segments[i]`` lies
            inside the video.
        segments: ``(k,)`` indices of the supervised segments (at least one valid
            offset), ascending.
        offsets: the offset window.
    """

    target: Tensor
    valid: Tensor
    segments: Tensor
    offsets: tuple[int, ...]


def segment_count(tokens: int, *, segment_frames: int, tokens_per_frame: int, prefix_frames: int = 0) -> int:
    """Number of segments in a sequence of ``tokens`` tokens; clear errors when it does not divide."""
    if tokens_per_frame < 1 or tokens % tokens_per_frame:
        raise MiraiError(
            f"{tokens} encoder tokens are not a whole number of frames of {tokens_per_frame} tokens; "
            f"check tokens_per_frame (Wan 832x480: 1560) and that the encoder saw the whole rollout"
        )
    frames = tokens // tokens_per_frame - prefix_frames
    if frames <= 0 or frames % segment_frames:
        raise MiraiError(
            f"{frames} frames (after {prefix_frames} prefix frames) are not divisible by the segment size "
            f"{segment_frames}; use segment_frames that divides the rollout (21 frames: 3 or 1)"
        )
    return frames // segment_frames


class SegmentLayout(NamedTuple):
    """Where each supervised segment's targets are, without building them.

    Attributes:
        z: ``(b K n e)`` the encoder hidden states split into segments (a view).
        source: ``(k o)`` index in ``z`` of segment ``segments[i] + offsets[o]`` (clamped where invalid).
        valid: ``(k o)`` bool, that offset lies inside the video.
        segments: ``(k,)`` supervised segment indices.
        offsets: the offset window.
    """

    z: Tensor
    source: Tensor
    valid: Tensor
    segments: Tensor
    offsets: tuple[int, ...]


def segment_layout(
    encoder_hidden: Tensor,
    *,
    segment_frames: int,
    tokens_per_frame: int,
    offsets: Sequence[int] = (0, 1),
    segments: Sequence[int] | Tensor | None = None,
    prefix_frames: int = 0,
) -> SegmentLayout:
    """The segment view and the offset indices behind ``fuse_targets`` (see there for the arguments)."""
    if encoder_hidden.dim() != 3:
        raise MiraiError(f"encoder_hidden must be (batch, tokens, width), got shape {tuple(encoder_hidden.shape)}")
    offsets = tuple(offsets)
    if not offsets or any((not isinstance(d, int)) or d < 0 for d in offsets):
        raise MiraiError(f"offsets must be a non-empty sequence of ints >= 0, got {offsets!r}")
    b, t, e = encoder_hidden.shape
    num_segments = segment_count(
        t, segment_frames=segment_frames, tokens_per_frame=tokens_per_frame, prefix_frames=prefix_frames
    )
    n = segment_frames * tokens_per_frame
    z = encoder_hidden[:, prefix_frames * tokens_per_frame :].reshape(b, num_segments, n, e)  # (b K n e), a view

    device = encoder_hidden.device
    if segments is None:
        wanted = torch.arange(num_segments, device=device)
    else:
        wanted = torch.as_tensor(segments, dtype=torch.long, device=device).flatten()
        if wanted.numel() and (wanted.min() < 0 or wanted.max() >= num_segments):
            raise MiraiError(
                f"segments {wanted.tolist()} out of range: the encoder saw {num_segments} segments "
                f"(0..{num_segments - 1})"
            )
    offset_t = torch.tensor(offsets, device=device)
    valid = wanted[:, None] + offset_t[None, :] < num_segments  # (k o)
    supervised = valid.any(dim=1)
    wanted, valid = wanted[supervised], valid[supervised]
    source = (wanted[:, None] + offset_t[None, :]).clamp(max=num_segments - 1)  # (k o) segment index k+d
    return SegmentLayout(z, source, valid, wanted, offsets)


def fuse_targets(
    encoder_hidden: Tensor,
    *,
    segment_frames: int,
    tokens_per_frame: int,
    offsets: Sequence[int] = (0, 1),
    fusion: str = "mean",
    segments: Sequence[int] | Tensor | None = None,
    prefix_frames: int = 0,
) -> SegmentTargets:
    """Build the target of each supervised segment from the encoder's hidden states.

    Args:
        encoder_hidden: ``(b t e)`` with ``t = (prefix_frames + f) * s``.
        segment_frames: frames per segment.
        tokens_per_frame: ``s``.
        offsets: segment offsets ``d``; segment ``k`` uses ``k+d`` when ``k+d < K``.
        fusion: ``"mean"`` (average over valid offsets, the official Stage-3 target),
            ``"none"`` (one target per offset) or ``"frame_mean"`` (each target
            segment averaged over its frames to ``(s e)``, one per offset).
        segments: restrict to these segment indices (e.g. the captured ones).
        prefix_frames: leading frames of the encoder input that belong to no segment
            (an image-to-video context frame).

    Example:
        >>> import torch
        >>> z = torch.arange(6.).repeat_interleave(4).view(1, 24, 1)  # 6 frames, 4 tokens each
        >>> t = fuse_targets(z, segment_frames=2, tokens_per_frame=4, offsets=(0, 1))
        >>> t.segments.tolist(), t.target[0, :, 0, 0].tolist()  # frame 0 with 2, 2 with 4, 4 alone
        ([0, 1, 2], [1.0, 3.0, 4.0])
    """
    if fusion not in FUSIONS:
        raise MiraiError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    layout = segment_layout(
        encoder_hidden, segment_frames=segment_frames, tokens_per_frame=tokens_per_frame, offsets=offsets,
        segments=segments, prefix_frames=prefix_frames,
    )
    return materialise_targets(layout, fusion=fusion, segment_frames=segment_frames, tokens_per_frame=tokens_per_frame)


def materialise_targets(layout: SegmentLayout, *, fusion: str, segment_frames: int, tokens_per_frame: int) -> SegmentTargets:
    """The targets of a ``segment_layout`` as tensors (see ``fuse_targets``)."""
    z, source, valid = layout.z, layout.source, layout.valid
    if fusion == "mean":
        target = _mean_over_offsets(z, source, valid)  # (b k n e)
    elif fusion == "none":
        target = z[:, source] * valid[None, :, :, None, None]  # (b k o n e)
    else:
        b, num_segments, _, e = z.shape
        per_frame = z.view(b, num_segments, segment_frames, tokens_per_frame, e)
        frame_avg = per_frame.mean(dim=2, dtype=torch.float32).to(z.dtype)  # (b K s e)
        target = frame_avg[:, source] * valid[None, :, :, None, None]  # (b k o s e)
    return SegmentTargets(target, valid, layout.segments, layout.offsets)


def _mean_over_offsets(z: Tensor, source: Tensor, valid: Tensor) -> Tensor:
    """``(b k n e)`` mean of ``z[:, source[k, o]]`` over the valid offsets of each row."""
    if source.shape[1] == 1:
        return z[:, source[:, 0]]  # (b k n e): a single offset needs no averaging
    # Accumulate in float32 and round once, as torch.stack(...).mean(0) does.
    total = torch.zeros(z.shape[0], source.shape[0], *z.shape[2:], dtype=torch.float32, device=z.device)
    for o in range(source.shape[1]):
        rows = valid[:, o]
        if bool(rows.all()):
            total += z[:, source[:, o]]
        elif bool(rows.any()):
            total[:, rows] += z[:, source[rows, o]]
    count = valid.sum(dim=1).to(torch.float32)  # (k)
    return (total / count[None, :, None, None]).to(z.dtype)

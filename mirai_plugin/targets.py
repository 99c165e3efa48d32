"""Per-segment foresight targets from one encoder pass over the whole rollout.

Legend: b batch, f frames, s tokens per frame, K segments in the video,
k supervised segments, o offsets, n = segment_frames * s tokens per segment,
e encoder width.

Token j of segment k is paired with token j of segment k+d (token-aligned): a
segment's tokens are frame-major, so this pairs the same spatial position in the
same frame slot of the two segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mirai_plugin.checks import Rule, check, check_tensor, is_int
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


def check_segmenting(*, segment_frames: Any, tokens_per_frame: Any, prefix_frames: Any) -> None:
    """The segment sizes are ints in range (each named in the error)."""
    check("segment_frames", segment_frames, Rule("int", minimum=1, fix="3 chunk-wise, 1 frame-wise"))
    check("tokens_per_frame", tokens_per_frame, Rule("int", minimum=1, fix="Wan at 832x480 has 1560"))
    check("prefix_frames", prefix_frames, Rule("int", minimum=0, fix="0 without an image-to-video context frame"))


def segment_count(tokens: int, *, segment_frames: int, tokens_per_frame: int, prefix_frames: int = 0) -> int:
    """Number of segments in a sequence of ``tokens`` tokens; clear errors when it does not divide."""
    check_segmenting(segment_frames=segment_frames, tokens_per_frame=tokens_per_frame, prefix_frames=prefix_frames)
    if tokens % tokens_per_frame:
        raise MiraiError(
            f"{tokens} encoder tokens are not a whole number of frames of tokens_per_frame={tokens_per_frame} "
            f"tokens; check tokens_per_frame (Wan 832x480: 1560) and that the encoder saw the whole rollout"
        )
    frames = tokens // tokens_per_frame - prefix_frames
    if frames <= 0:
        raise MiraiError(
            f"prefix_frames={prefix_frames} leaves no frame to segment: the encoder saw {tokens // tokens_per_frame} "
            f"frames of tokens_per_frame={tokens_per_frame} tokens; "
            "prefix_frames counts only the leading context frames"
        )
    if frames % segment_frames:
        raise MiraiError(
            f"{frames} frames ({tokens} encoder tokens / tokens_per_frame={tokens_per_frame}, less "
            f"prefix_frames={prefix_frames}) are not divisible by segment_frames={segment_frames}; use a segment "
            f"size that divides the rollout (21 frames: 3 or 1)"
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
    check_tensor("encoder_hidden", encoder_hidden, dims=3, layout="(batch, tokens, width)")
    check_segmenting(segment_frames=segment_frames, tokens_per_frame=tokens_per_frame, prefix_frames=prefix_frames)
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Iterable):
        raise MiraiError(f"offsets must be a non-empty sequence of ints >= 0 such as (0, 1), got {offsets!r}")
    offsets = tuple(offsets)
    if not offsets or any(not is_int(d) or d < 0 for d in offsets):
        raise MiraiError(f"offsets must be a non-empty sequence of ints >= 0 such as (0, 1), got {offsets!r}")
    offsets = tuple(int(d) for d in offsets)
    repeated = sorted({d for d in offsets if offsets.count(d) > 1})
    if repeated:
        # A repeat would weigh its segment twice in the mean (and give two equal columns with "none").
        raise MiraiError(
            f"offsets {offsets} repeat {repeated}; give each offset once, e.g. {tuple(dict.fromkeys(offsets))}"
        )
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
        wanted = _segment_indices(segments).to(device)
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


def _segment_indices(segments: Any) -> Tensor:
    """``segments`` as a 1-d long tensor; integer values only (``0.5`` is not a segment)."""
    expected = "segment indices: ints, a sequence of ints or an integer tensor"
    if isinstance(segments, Tensor):
        if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
            raise MiraiError(f"segments must be {expected}, got a {segments.dtype} tensor")
        check_tensor("segments", segments)
        return segments.to(torch.long).flatten()
    if is_int(segments):
        return torch.tensor([int(segments)], dtype=torch.long)
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Iterable):
        raise MiraiError(f"segments must be {expected}, got {segments!r}")
    values = list(segments)
    if not all(is_int(v) for v in values):
        raise MiraiError(f"segments must be {expected}, got {values!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


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
        offsets: distinct segment offsets ``d``; segment ``k`` uses ``k+d`` when ``k+d < K``.
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
    check("fusion", fusion, Rule("choice", choices=FUSIONS))
    layout = segment_layout(
        encoder_hidden, segment_frames=segment_frames, tokens_per_frame=tokens_per_frame, offsets=offsets,
        segments=segments, prefix_frames=prefix_frames,
    )
    return materialise_targets(layout, fusion=fusion, segment_frames=segment_frames, tokens_per_frame=tokens_per_frame)


def materialise_targets(
    layout: SegmentLayout, *, fusion: str, segment_frames: int, tokens_per_frame: int
) -> SegmentTargets:
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

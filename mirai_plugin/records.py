"""Captured records -> segments: what the head reads from ``capture_hidden``, checked and split.

Legend: b batch, n tokens per segment, s tokens per frame, d student width.

One captured call may cover one segment or several (a teacher-forced forward over
the whole video); each becomes ``(b n d)`` views in video order with the index of the
segment they hold. The checks here are the ones that name a capture problem: in-place
edits after capture, a wrong width, calls that do not start at segment boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from mirai_plugin.capture import CapturedHidden, HiddenRecord
from mirai_plugin.checks import Rule, check, check_tensor
from mirai_plugin.errors import MiraiError
from mirai_plugin.targets import segment_count


def as_records(captured: Any) -> tuple[list[HiddenRecord], CapturedHidden | None]:
    """The records of what ``capture_hidden`` yielded, or of a list of ``(b n d)`` tensors (one per segment)."""
    if isinstance(captured, CapturedHidden):
        return captured.records, captured
    if isinstance(captured, Tensor) or not isinstance(captured, Sequence) or isinstance(captured, (str, bytes)):
        raise MiraiError(
            f"pass captured hidden states as what capture_hidden yielded, or a list of (b n d) tensors, "
            f"got {type(captured).__name__}"
        )
    records = []
    for i, item in enumerate(captured):
        if isinstance(item, HiddenRecord):
            records.append(item)
        elif isinstance(item, Tensor):
            records.append(HiddenRecord(item, None, i, item._version))
        else:
            raise MiraiError(f"captured item {i} is a {type(item).__name__}, expected a tensor or HiddenRecord")
    return records, None


def check_records(records: list[HiddenRecord], capture: CapturedHidden | None, *,
                  tokens_per_frame: Any, prefix_frames: Any) -> None:
    """Something was captured, and every input is a tensor or a number in range."""
    if not records:
        raise MiraiError(nothing_captured_message(capture))
    for i, record in enumerate(records):
        check_tensor(f"captured hidden state {i}", record.hidden, layout="(batch, tokens, width)")
    check(
        "tokens_per_frame", tokens_per_frame, Rule("int", minimum=1, none=True, fix="None infers it from the capture")
    )
    check("prefix_frames", prefix_frames, Rule("int", minimum=0, fix="0 without an image-to-video context frame"))


def infer_tokens_per_frame(records: list[HiddenRecord], segment_frames: int) -> int:
    """``s`` when each captured call covers one segment: ``n / segment_frames``."""
    first = records[0].hidden
    tokens = first.shape[1] if first.dim() == 3 else -1
    if tokens <= 0 or tokens % segment_frames:
        raise MiraiError(
            f"cannot infer tokens per frame: a captured call has {tokens} tokens, not divisible by "
            f"segment_frames={segment_frames}; pass tokens_per_frame="
        )
    return tokens // segment_frames


def split_into_segments(
    records: list[HiddenRecord], *, width: int, segment_frames: int, tokens_per_frame: int, prefix_frames: int
) -> tuple[list[Tensor], list[int]]:
    """One ``(b n d)`` view per segment in record order, and each one's segment index."""
    s = tokens_per_frame
    seg_tokens = segment_frames * s
    chunks: list[Tensor] = []
    segments: list[int] = []
    next_segment = 0
    for record in records:
        h = record.hidden
        if h._version != record.version:
            raise MiraiError(
                "a captured hidden state was modified in place after capture; "
                "use capture_hidden(..., clone=True) for this model"
            )
        if h.dim() != 3 or h.shape[-1] != width:
            raise MiraiError(
                f"captured hidden has shape {tuple(h.shape)}; expected (batch, tokens, {width}) "
                f"— the head was built with student_dim={width}; check student_layer and the width"
            )
        if h.shape[1] % seg_tokens:
            raise MiraiError(
                f"captured {h.shape[1]} tokens, not a whole number of segments of {seg_tokens} tokens "
                f"({segment_frames} frames x {s} tokens); check segment_frames and tokens_per_frame"
            )
        if record.position is None:
            first = next_segment
        else:
            if record.position % s:
                raise MiraiError(f"call position {record.position} is not at a frame boundary of {s} tokens")
            frame = record.position // s - prefix_frames
            if frame < 0 or frame % segment_frames:
                raise MiraiError(
                    f"call position {record.position} (frame {frame}) does not start a segment of "
                    f"{segment_frames} frames; check segment_frames and prefix_frames"
                )
            first = frame // segment_frames
        count = h.shape[1] // seg_tokens
        chunks.extend(h.split(seg_tokens, dim=1))  # count x (b n d), views
        segments.extend(range(first, first + count))
        next_segment = first + count
    if len(set(segments)) != len(segments):
        raise MiraiError(f"segments captured twice: {segments}; capture one grad-enabled call per segment")
    if len({c.shape[0] for c in chunks}) != 1:
        raise MiraiError(f"captured hidden states disagree on batch size: {[tuple(c.shape) for c in chunks]}")
    return chunks, segments


def check_encoder_hidden(encoder_hidden: Tensor, hidden: list[Tensor], segments: list[int], *, width: int,
                         segment_frames: int, tokens_per_frame: int, prefix_frames: int) -> int:
    """The encoder's ``(b t e)`` fits the captured segments; returns the segments it holds."""
    if encoder_hidden.dim() != 3 or encoder_hidden.shape[-1] != width:
        raise MiraiError(
            f"encoder hidden has shape {tuple(encoder_hidden.shape)}; expected (batch, tokens, {width}) "
            f"— the head was built with encoder_dim={width}"
        )
    if encoder_hidden.shape[0] != hidden[0].shape[0]:
        raise MiraiError(f"batch mismatch: captured hidden has batch {hidden[0].shape[0]}, "
                         f"encoder hidden {encoder_hidden.shape[0]}")
    num_segments = segment_count(encoder_hidden.shape[1], segment_frames=segment_frames,
                                 tokens_per_frame=tokens_per_frame, prefix_frames=prefix_frames)
    if max(segments) >= num_segments:
        raise MiraiError(
            f"captured segments {segments} but the encoder saw only {num_segments} segments; "
            f"run the encoder on the whole rollout the generator produced"
        )
    return num_segments


def check_attached(hidden: list[Tensor], capture: CapturedHidden | None) -> None:
    """With gradients enabled, some captured state must require grad: otherwise the term trains the
    head alone and nothing of it reaches the generator."""
    if any(h.requires_grad for h in hidden):
        return
    where = f" at {capture.location}" if capture is not None else ""
    raise MiraiError(
        f"none of the captured hidden states{where} requires grad, so the foresight term cannot reach the "
        f"generator (only the head would train): capture the block output as the generator computes it, without "
        f".detach() (check capture_hidden's select=) and with trainable generator parameters upstream of the block. "
        f"To evaluate the term, compute it under torch.no_grad(); to train the head alone on these states, pass "
        f"them as leaves that require grad: [h.detach().requires_grad_() for h in states]"
    )


def nothing_captured_message(capture: CapturedHidden | None) -> str:
    where = f" at {capture.location}" if capture is not None else ""
    skipped = capture.skipped_no_grad if capture is not None else 0
    if skipped:
        return (
            f"nothing captured{where}: the block ran {skipped} times, all with grad disabled — the generator "
            f"ran under torch.no_grad() (e.g. a critic step). Call the head only on generator steps, inside the "
            f"capture_hidden context's rollout with gradients enabled."
        )
    return (
        f"nothing captured{where}: the block was never called inside the capture_hidden context; run the "
        f"generator rollout inside `with capture_hidden(...)` and check student_layer"
    )

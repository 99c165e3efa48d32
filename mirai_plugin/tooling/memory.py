"""What the foresight term adds to memory per rank, by component.

Legend: b batch per rank, f frames, s tokens per frame, t = f s encoder tokens,
K segments, k supervised segments, o offsets, p valid (segment, offset) pairs,
n tokens per segment, d student width, e encoder width, F predictor FFN width,
h predictor heads, L predictor depth, P head parameters, N ranks, A gradient
accumulation micro-steps; cb bytes of the compute dtype (generator and encoder
tensors), pb bytes of the head's parameter dtype, hb of its compute dtype (its
activations: ``ForesightHead.predict`` casts its input to it; bfloat16 under
``compute_dtype="bfloat16"``); r segments of one group (``ForesightHead.plan``: all
k when they fit ``activation_budget_mib``, else as many as fit, recomputed in the
backward, and with each predictor block recomputed when one segment is over it).

On the GPU of every rank:

    head parameters, gradients       P pb each            (P/N each with FSDP)
    AdamW moments                    2 P pb               (2 P/N with FSDP)
    FSDP: one unsharded unit         2 U pb               (U: the largest unit, a predictor block or the head)
    captured student states          0                    (the generator's graph keeps them)
    encoder output                   b t e cb             (one per generator step, no activations: no_grad)
    predictor activations            b r n (L (14 d + 2 F) hb + 8 L d + L (4 hb + 8 + 4 h) + d hb) + 2 L d hb
                                     checkpointed blocks: b r n (L d hb + one block's share + d hb)
    prediction and its gradient      2 b r n e hb
    gradient to the generator        b k n d cb

In replay_device memory (CPU RAM by default):

    replay cache                     A (b k n (d + e) cb + k o)  (targets (b k n e) for fusion "mean",
                                                                  (b k o n e) "none", (b k o s e) "frame_mean")

``foresight_memory`` returns every row, with smaller ones (copies, loss buffers,
the replay step on critic steps) spelled out in ``ForesightMemory``. The
predictor's activations are what autograd saves for backward, counted tensor by
tensor from ``DiTPredictor``'s forward; exact against the CPU kernels
(``tests/test_memory.py``), an estimate on a GPU, whose fused attention and norm
kernels save the same tensors up to small statistics. Parameters are counted by
building the head on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.head import ForesightHead
from mirai_plugin.predictor import DiTPredictor
from mirai_plugin.tooling.flops import CycleShape

_FLOAT32 = 4  # bytes: statistics that norms and attention keep in float32 whatever the input dtype


def _row(label: str, when: str, *, gpu: bool = True) -> Any:
    return field(default=0, metadata={"label": label, "when": when, "gpu": gpu})


@dataclass(frozen=True)
class ForesightMemory:
    """Bytes the foresight term adds per rank, by component (see the module docstring).

    Rows marked GPU are on every rank's accelerator; ``replay_cache`` is on
    ``replay_device``. Use ``report()`` for a table, the properties for totals.
    """

    parameters: int = _row("head parameters", "always")
    gradients: int = _row("head gradients", "backward -> head.step()")
    optimizer_state: int = _row("AdamW moments (exp_avg, exp_avg_sq)", "always (after step 1)")
    unsharded_unit: int = _row("FSDP: largest unit unsharded (params + grads)", "forward / backward")
    gradient_averaging: int = _row("gradient averaging buffers (head.step, N > 1)", "head.step()")
    captured_states: int = _row("captured student states (references)", "generator step")
    stacked_hidden: int = _row("stacked captured states of one group, copy", "head forward / backward")
    hidden_gradient: int = _row("gradient to the generator (b k n d)", "backward")
    encoder_output: int = _row("encoder output (b t e)", "generator step")
    targets: int = _row("targets built (all; or one segment, for replay)", "head forward")
    loss_buffers: int = _row("loss buffers", "generator step")
    predictor_activations: int = _row("predictor activations (saved for backward)", "generator step")
    prediction: int = _row("prediction (b k n e)", "generator step")
    prediction_gradient: int = _row("prediction gradient", "backward")
    replay_step: int = _row("replay on critic steps (group copy + activations)", "critic step")
    replay_cache: int = _row("replay cache (A micro-steps)", "generator step -> next one", gpu=False)

    parameter_count: int = 0
    world_size: int = 1
    sharded: bool = False
    accumulation_steps: int = 1
    replay_device: str | None = "cpu"

    # ----------------------------------------------------------------- totals

    @property
    def replay_on_gpu(self) -> bool:
        return _on_gpu(self.replay_device)

    @property
    def persistent(self) -> int:
        """GPU bytes held between steps: parameters, AdamW moments (and the replay cache when on the GPU)."""
        return self.parameters + self.optimizer_state + (self.replay_cache if self.replay_on_gpu else 0)

    @property
    def generator_step_peak(self) -> int:
        """GPU bytes on a generator step, upper bound: every row of the step counted as alive at once."""
        return self.persistent + sum(
            getattr(self, name)
            for name in (
                "gradients", "unsharded_unit", "captured_states", "stacked_hidden", "hidden_gradient",
                "encoder_output", "targets",
                "loss_buffers", "predictor_activations", "prediction", "prediction_gradient",
            )
        )

    @property
    def optimizer_step_peak(self) -> int:
        return self.persistent + self.gradients + self.gradient_averaging

    @property
    def critic_step_peak(self) -> int:
        return self.persistent + (self.gradients + self.unsharded_unit + self.replay_step if self.replay_step else 0)

    @property
    def gpu_peak(self) -> int:
        """The most the term adds to a rank's GPU at any point of the cycle."""
        return max(self.generator_step_peak, self.optimizer_step_peak, self.critic_step_peak)

    @property
    def replay_device_bytes(self) -> int:
        """Bytes held on ``replay_device`` when it is not the GPU (CPU RAM per rank)."""
        return 0 if self.replay_on_gpu else self.replay_cache

    # ----------------------------------------------------------------- report

    def report(self) -> str:
        """A table of every row and the totals, in MiB."""
        replay_where = "GPU" if self.replay_on_gpu else str(self.replay_device)
        head = "sharded (FSDP)" if self.sharded else "replicated"
        title = (f"foresight memory per rank: {self.parameter_count / 1e6:.1f} M head parameters, {head} head, "
                 f"{self.world_size} rank(s), {self.accumulation_steps} accumulation step(s)")
        lines = [
            title,
            f"{'component':52s} {'where':6s} {'alive':26s} {'MiB':>10s}",
        ]
        for item in fields(self):
            if "label" not in item.metadata:
                continue
            where = "GPU" if item.metadata["gpu"] else replay_where
            lines.append(f"{item.metadata['label']:52s} {where:6s} {item.metadata['when']:26s} "
                         f"{_mib(getattr(self, item.name)):>10s}")
        lines += [
            f"{'GPU, held between steps':86s}{_mib(self.persistent):>10s}",
            f"{'GPU, generator step (upper bound)':86s}{_mib(self.generator_step_peak):>10s}",
            f"{'GPU, head.step()':86s}{_mib(self.optimizer_step_peak):>10s}",
            f"{'GPU, critic step (replay)':86s}{_mib(self.critic_step_peak):>10s}",
            f"{'GPU peak added per rank':86s}{_mib(self.gpu_peak):>10s}",
            f"{'replay device (' + replay_where + ') per rank':86s}{_mib(self.replay_device_bytes):>10s}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        rows = {item.name: getattr(self, item.name) for item in fields(self)}
        totals = ("persistent", "generator_step_peak", "optimizer_step_peak", "critic_step_peak", "gpu_peak",
                  "replay_device_bytes")
        return {**rows, **{name: getattr(self, name) for name in totals}}


def _on_gpu(device: str | None) -> bool:
    return device is None or torch.device(device).type != "cpu"  # None: kept where computed


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


# --------------------------------------------------------------------- the formula


def foresight_memory(
    config: ForesightConfig,
    *,
    student_dim: int,
    encoder_dim: int,
    frames: int,
    tokens_per_frame: int,
    batch_per_rank: int = 1,
    world_size: int = 1,
    sharded: bool = False,
    fsdp_units: str = "blocks",
    compute_dtype: torch.dtype = torch.bfloat16,
    head_dtype: torch.dtype = torch.float32,
    accumulation_steps: int = 1,
    encoder_frames: int | None = None,
) -> ForesightMemory:
    """Bytes the foresight term adds per rank, by component.

    Args:
        config: the ``ForesightConfig`` (predictor, offsets, fusion, replay settings).
        student_dim, encoder_dim: ``d`` and ``e`` (Wan-1.3B 1536, Wan-14B 5120).
        frames, tokens_per_frame: the rollout the encoder sees (21 latent frames x 1560 at 832x480).
        batch_per_rank: videos per rank per micro-step.
        world_size: ranks; a replicated head (plain, as the integration keeps it, or DDP)
            is whole on every rank, a sharded one (FSDP) holds ``1/N`` of parameters,
            gradients and AdamW state.
        sharded: the head under FSDP (``shard_head(head, "fsdp" | "fsdp2")``, FULL_SHARD).
        fsdp_units: ``"blocks"``, one FSDP unit per predictor block plus the rest (an
            auto-wrap policy on ``DiTBlock``, or ``fully_shard`` on each block); ``"head"``,
            the whole head as one unit (``shard_head`` without a policy), so all of it is
            gathered in forward and backward.
        compute_dtype: dtype of the captured generator states and the encoder output.
        head_dtype: the head's parameter dtype, also its compute dtype (``predict``
            casts its input to it); float32 as the integration builds it.
        accumulation_steps: micro-steps per generator step; the replay cache keeps all.
        encoder_frames: frames the encoder sees when they are more than the segments' ``frames`` (a DMD
            window that starts inside a block: the frames before its first block boundary are in no segment).

    Returns:
        a ``ForesightMemory``; all zero when the term is never on (``config.enabled`` false: no head is built).
    """
    _check_arguments(config, student_dim, encoder_dim, frames, tokens_per_frame, batch_per_rank, world_size,
                     sharded, fsdp_units, compute_dtype, head_dtype, accumulation_steps)
    if encoder_frames is not None and (not isinstance(encoder_frames, int) or encoder_frames < frames):
        raise MiraiError(f"encoder_frames must be an int >= frames ({frames}), got {encoder_frames!r}")
    context = {"world_size": world_size, "sharded": sharded, "accumulation_steps": accumulation_steps,
               "replay_device": config.replay_device}
    if not config.enabled:
        return ForesightMemory(**context)

    with torch.device("meta"):  # exact parameter count, no memory, no drift from the real head
        head = ForesightHead(config, student_dim, encoder_dim).to(head_dtype)
    b, d, e, s = batch_per_rank, student_dim, encoder_dim, tokens_per_frame
    cb, pb, hb = compute_dtype.itemsize, head_dtype.itemsize, head.compute_dtype.itemsize
    n = config.segment_frames * s
    shape = _segment_shape(config, frames)
    k, o, pairs = shape["supervised"], len(config.offsets), shape["pairs"]
    per_offset = config.predictor == "multi_mlp" or config.offset_conditioning
    fused = config.fusion == "mean" and config.loss == "cosine"  # ForesightHead's memory-lean loss

    # --- head state: parameters, gradients, AdamW moments
    count = sum(p.numel() for p in head.parameters())
    per_rank = math.ceil(count / world_size) if sharded else count
    largest_unit = max(_unit_sizes(head)) if fsdp_units == "blocks" else count
    state = {
        "parameter_count": count,
        "parameters": per_rank * pb,
        "gradients": per_rank * pb,
        "optimizer_state": 2 * per_rank * pb,
        # FSDP gathers one unit's parameters for its forward and backward and holds its full
        # gradient until the reduce-scatter; backward prefetch can add a second unit.
        "unsharded_unit": 2 * largest_unit * pb if sharded and world_size > 1 else 0,
        # head.step() averages a replicated head's gradients itself: one flat buffer plus new
        # per-parameter gradients while the old ones are still referenced (DDP would keep ~1x in buckets).
        "gradient_averaging": 2 * count * pb if not sharded and world_size > 1 else 0,
    }

    # --- one generator step (per micro-step): one group of segments alive at a time (ForesightHead.plan)
    plan = head.plan(k, batch=b, tokens=n)
    group = min(plan.size, k)
    target_row = {"mean": n, "none": o * n, "frame_mean": o * s}[config.fusion] * e  # elements per (b, k)
    if per_offset:  # one predictor pass per offset, on the segments whose offset is valid
        passes = [b * c for c in shape["valid_per_offset"] if c] if not plan.recompute else [b * group] * o
    else:
        passes = [b * group]
    predicted_rows = sum(passes)
    step = {
        "captured_states": 0,  # references to block outputs the generator's graph saves anyway
        "stacked_hidden": b * group * n * d * cb if cb != hb else 0,  # else it is block 0's input
        "hidden_gradient": b * k * n * d * cb,
        "encoder_output": b * (encoder_frames or frames) * s * e * cb,
        # The fused loss reads targets from the encoder output; replay caches them one segment at a time.
        "targets": (0 if fused else b * k * target_row * cb) + (b * target_row * cb if config.replay else 0),
        "loss_buffers": _loss_buffers(config, fused, b=b, k=group, o=o, n=n, s=s, e=e,
                                      pairs=pairs if not plan.recompute else group * o, cb=cb, hb=hb),
        "predictor_activations": sum(
            _predictor_activations(head, rows, n, hb, plan.checkpoint_blocks) for rows in passes),
        "prediction": predicted_rows * n * e * hb,
        "prediction_gradient": predicted_rows * n * e * hb,
    }

    # --- replay: the cache on replay_device, and one group at a time on the GPU on critic steps
    replay: dict[str, int] = {}
    if config.replay:
        one_step = b * k * n * d * cb + b * k * target_row * cb + k * o  # hidden, targets, validity (bool)
        replay["replay_cache"] = accumulation_steps * one_step
        # One backward per group of (video, segment) rows; replay_max_pairs replays a random
        # subset, so a group never holds more than that.
        units = min(b * k, config.replay_max_pairs or b * k)
        replay_plan = head.plan(units, batch=1, tokens=n)
        rows = min(config.replay_segments or replay_plan.size, units)
        group_pairs = min(pairs, rows * o) if per_offset else rows
        copies = rows * (n * d + target_row) * cb  # the group's rows, concatenated where the head is
        replay["replay_step"] = (
            copies
            + _predictor_activations(head, rows, n, hb, replay_plan.checkpoint_blocks) * (o if per_offset else 1)
            + 2 * rows * n * e * hb * (o if per_offset else 1)
            + _loss_buffers(config, fused, b=1, k=rows, o=o, n=n, s=s, e=e, pairs=group_pairs, cb=cb, hb=hb)
        )
    return ForesightMemory(**state, **step, **replay, **context)


def memory_for_cycle(cycle: CycleShape, config: ForesightConfig, **kwargs: Any) -> ForesightMemory:
    """``foresight_memory`` with the widths and video shape of a ``mirai_plugin.tooling.flops.CycleShape``.

    >>> from mirai_plugin.tooling.flops import CycleShape
    >>> memory = memory_for_cycle(CycleShape(), ForesightConfig())  # the official recipe
    >>> memory.parameter_count
    92877312
    """
    if cycle.segment_frames != config.segment_frames:
        raise MiraiError(
            f"the cycle has segments of {cycle.segment_frames} frames but the config {config.segment_frames}; "
            f"pass config.replace(segment_frames={cycle.segment_frames})"
        )
    window = cycle.frames if cycle.window_frames is None else min(cycle.window_frames, cycle.frames)
    whole = window // cycle.segment_frames * cycle.segment_frames  # the window's whole blocks: its segments
    return foresight_memory(
        config, student_dim=cycle.generator.dim, encoder_dim=cycle.target_model.dim, frames=whole or window,
        tokens_per_frame=cycle.tokens_per_frame, encoder_frames=window if whole and whole != window else None,
        **kwargs,
    )


# --------------------------------------------------------------------- the pieces


def _segment_shape(config: ForesightConfig, frames: int) -> dict[str, Any]:
    """K segments; supervised ones (any valid offset); valid pairs; valid segments per offset."""
    segments = frames // config.segment_frames
    valid_per_offset = [sum(1 for kk in range(segments) if kk + off < segments) for off in config.offsets]
    supervised = sum(1 for kk in range(segments) if any(kk + off < segments for off in config.offsets))
    if supervised == 0:
        raise MiraiError(
            f"no segment has a target: {segments} segment(s) and offsets {config.offsets}; "
            f"use more frames or smaller offsets"
        )
    return {"segments": segments, "supervised": supervised, "pairs": sum(valid_per_offset),
            "valid_per_offset": valid_per_offset}


def _unit_sizes(head: ForesightHead) -> list[int]:
    """Parameters per FSDP unit: each DiT block, and the root (projection, embedder, MLPs)."""
    blocks = list(head.predictor.blocks) if isinstance(head.predictor, DiTPredictor) else []
    in_blocks = sum(p.numel() for block in blocks for p in block.parameters())
    root = sum(p.numel() for p in head.parameters()) - in_blocks
    return [sum(p.numel() for p in block.parameters()) for block in blocks] + [root]


def _predictor_activations(head: ForesightHead, rows: int, n: int, hb: int, checkpoint_blocks: bool = False) -> int:
    """Bytes autograd saves when ``rows`` segments of ``n`` tokens go through the predictor and projection."""
    saved = head.predictor.saved_bytes(rows * n, hb, checkpoint_blocks=checkpoint_blocks)
    if head.project is not None:
        saved += rows * n * head.student_dim * hb  # the projection's input
    return saved


def _loss_buffers(config: ForesightConfig, fused: bool, *, b: int, k: int, o: int, n: int, s: int, e: int,
                  pairs: int, cb: int, hb: int) -> int:
    """What the loss keeps for backward, and its largest temporary, beyond the prediction and the targets."""
    if fused:
        return 2 * k * b * n * _FLOAT32  # per-token dot products and norm products, for the analytic backward
    per_offset = config.predictor == "multi_mlp" or config.offset_conditioning
    target_tokens = s if config.fusion == "frame_mean" else n
    if per_offset:  # one loss call per offset, on its valid segments
        target, pred, product = b * pairs * target_tokens * e, b * pairs * n * e, b * pairs * n * e
    else:
        offsets = 1 if config.fusion == "mean" else o
        target, pred, product = b * k * offsets * target_tokens * e, b * k * n * e, b * k * offsets * n * e
    saved = target * cb if per_offset else 0  # each offset's valid targets, indexed out (a copy)
    if cb != _FLOAT32:
        saved += target * _FLOAT32  # foresight_loss computes in float32: a float32 copy of the targets
    if hb != _FLOAT32:
        saved += pred * _FLOAT32  # ... and of the prediction
    # cosine: the (prediction x target) product, a temporary; mse also saves the difference
    return saved + product * _FLOAT32 * (2 if config.loss == "mse" else 1)


def _check_arguments(config, student_dim, encoder_dim, frames, tokens_per_frame, batch_per_rank, world_size,
                     sharded, fsdp_units, compute_dtype, head_dtype, accumulation_steps) -> None:
    if not isinstance(config, ForesightConfig):
        raise MiraiError(f"config must be a ForesightConfig, got {type(config).__name__}")
    for name, value in (("student_dim", student_dim), ("encoder_dim", encoder_dim), ("frames", frames),
                        ("tokens_per_frame", tokens_per_frame), ("batch_per_rank", batch_per_rank),
                        ("world_size", world_size), ("accumulation_steps", accumulation_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MiraiError(f"{name} must be a positive int, got {value!r}")
    if frames % config.segment_frames:
        raise MiraiError(
            f"{frames} frames are not a whole number of segments of {config.segment_frames} frames; "
            f"pass frames divisible by segment_frames (21 frames: 3 or 1)"
        )
    if not isinstance(sharded, bool):
        raise MiraiError(f"sharded must be True or False, got {sharded!r}")
    if fsdp_units not in ("blocks", "head"):
        raise MiraiError(f"fsdp_units must be 'blocks' (one unit per predictor block) or 'head', got {fsdp_units!r}")
    for name, dtype in (("compute_dtype", compute_dtype), ("head_dtype", head_dtype)):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MiraiError(f"{name} must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")

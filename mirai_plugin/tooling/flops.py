"""FLOP accounting of one DMD cycle with and without the foresight term.

Counts matrix multiplications (2 FLOPs per multiply-add), as
``torch.utils.flop_counter.FlopCounterMode`` does; norms, modulation, RoPE,
softmax and the patch/time/text embeddings are left out (well under 1 % here).
Formulas per transformer block, for ``q`` query tokens attending to ``k`` keys,
width ``d``, FFN width ``f``, ``t`` text tokens (see docs/performance.md):

    self-attention projections  8 q d^2           (q, k, v, o)
    self-attention              4 q k d           (scores and weighted sum)
    cross-attention             4 q d^2 + 4 t d^2 + 4 q t d
    FFN                         4 q d f

A backward pass costs twice its forward; activation checkpointing adds one
forward. One DMD cycle is one generator step and ``critic_ratio`` critic steps
(upstream ``dfake_gen_update_ratio``; every iteration has a critic step).

Rolling Forcing (``rolling_window_blocks`` L) draws a rolling or a self-forcing rollout per step
(``rolling_share``: 1/2); the rollout terms are the expectation over the two. A rolling rollout of B blocks
makes B + L - 1 window calls (``rolling_windows``) and as many one-block cache calls, every call attending
to at most ``attention_frames`` frames (its own included); one window in L runs with gradients, drawn per
rollout, among those that end inside the DMD window: the backward counts each such window with probability 1/L.

Precision: FLOPs do not depend on it, time does. The upstream trainers compute the
generator, the scores and the encoder in bfloat16 under ``mixed_precision: true``
and set ``allow_tf32``, so float32 matrix multiplications run as TF32, at half the
bfloat16 rate on A100 and H100 tensor cores (``TF32_RATE``). ``time_overhead``
weighs each term by the rate of the dtype it computes in: the trainer's, and the
head's own (``ForesightConfig.compute_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.head import ForesightHead
from mirai_plugin.integrations.resolve import ResolvedRun, VideoRun, model_shape


@dataclass(frozen=True)
class TransformerShape:
    dim: int
    depth: int
    ffn_dim: int
    text_tokens: int = 512
    cross_attention: bool = True


def transformer_shape(name: str, key: str = "model") -> TransformerShape:
    """The FLOP shape of a Wan model of the one table (``mirai_plugin.integrations.resolve.WAN_MODELS``)."""
    model = model_shape(name, key)
    return TransformerShape(dim=model.dim, depth=model.depth, ffn_dim=model.ffn_dim)


WAN_1_3B = transformer_shape("Wan2.1-T2V-1.3B")
WAN_14B = transformer_shape("Wan2.1-T2V-14B")
WAN_2_2_5B = transformer_shape("Wan2.2-TI2V-5B")  # LongLive 2.0
TF32_RATE = 0.5  # float32 matmuls as TF32, relative to bfloat16 (dense tensor-core peaks of A100 and H100)


def block_flops(shape: TransformerShape, queries: int, keys: int) -> int:
    """Forward FLOPs of one block (the formulas above)."""
    d, f, t = shape.dim, shape.ffn_dim, shape.text_tokens
    total = 8 * queries * d * d + 4 * queries * keys * d + 4 * queries * d * f
    if shape.cross_attention:
        total += 4 * queries * d * d + 4 * t * d * d + 4 * queries * t * d
    return total


def forward_flops(shape: TransformerShape, queries: int, keys: int, *, blocks: int | None = None) -> int:
    return (shape.depth if blocks is None else blocks) * block_flops(shape, queries, keys)


@dataclass(frozen=True)
class CycleShape:
    """What one DMD cycle runs (defaults: the official recipe at 832x480, 21 latent frames)."""

    generator: TransformerShape = WAN_1_3B
    real_score: TransformerShape = WAN_14B
    critic: TransformerShape = WAN_1_3B
    frames: int = 21
    tokens_per_frame: int = 1560  # (480/8/2) * (832/8/2)
    segment_frames: int = 3
    denoising_steps: int = 4
    critic_ratio: int = 5
    checkpointing: bool = True
    # LongLive: the DMD window (the last `slice_last_frames` of the rollout; None: the whole rollout),
    # the local attention window in frames (None: every earlier frame), LoRA on generator and critic
    # (base weights frozen: no weight gradients).
    window_frames: int | None = None
    attention_frames: int | None = None
    lora: bool = False
    encoder: TransformerShape | None = None  # the model giving the targets; None: the real score
    mixed_precision: bool = True  # generator, scores and encoder compute in bfloat16 (FSDP's param dtype)
    # Rolling Forcing: L, the blocks of a full rolling window (None: no rolling rollouts), and the share of
    # rollouts in rolling mode.
    rolling_window_blocks: int | None = None
    rolling_share: float = 0.0

    @property
    def target_model(self) -> TransformerShape:
        return self.real_score if self.encoder is None else self.encoder


def rolling_windows(blocks: int, steps: int) -> list[tuple[int, int]]:
    """``(first block, blocks)`` of each window call of a rolling rollout of ``blocks`` blocks, L = ``steps``:
    growing from one block to L, sliding by one, shrinking to one.

    >>> rolling_windows(3, 2)
    [(0, 1), (0, 2), (1, 2), (2, 1)]
    """
    return [(max(0, w - steps + 1), min(blocks - 1, w) - max(0, w - steps + 1) + 1) for w in range(blocks + steps - 1)]


def rolling_rollout(cycle: CycleShape) -> tuple[float, float]:
    """FLOPs of one rolling rollout of ``cycle.frames`` frames: every forward (window and cache calls), and the
    expected forward of its grad windows (each window that ends inside the DMD window, with probability 1/L)."""
    steps = cycle.rolling_window_blocks
    if steps is None:
        raise MiraiError("rolling_rollout needs cycle.rolling_window_blocks (L)")
    f, n = cycle.segment_frames, cycle.segment_frames * cycle.tokens_per_frame
    blocks = cycle.frames // f
    window = cycle.frames if cycle.window_frames is None else min(cycle.window_frames, cycle.frames)
    limit = None if cycle.attention_frames is None else cycle.attention_frames * cycle.tokens_per_frame

    def keys(end_block: int) -> int:  # the cached blocks before the call (anchor included) and its own
        return end_block * n if limit is None else min(end_block * n, max(limit, n))

    forward, grad = 0.0, 0.0
    for first, count in rolling_windows(blocks, steps):
        call = forward_flops(cycle.generator, count * n, keys(first + count))
        forward += call + forward_flops(cycle.generator, n, keys(first + 1))  # + the cache call on its first block
        if (first + count) * f > cycle.frames - window:
            grad += call / steps
    return forward, grad


def dmd_cycle(cycle: CycleShape, foresight: ForesightConfig | None = None) -> dict[str, Any]:
    """FLOPs of every term of one DMD cycle (and of the foresight extras when ``foresight`` is given)."""
    n = cycle.segment_frames * cycle.tokens_per_frame
    segments = cycle.frames // cycle.segment_frames
    window = cycle.frames if cycle.window_frames is None else min(cycle.window_frames, cycle.frames)
    video = window * cycle.tokens_per_frame  # what the scores (and the encoder) see
    limit = None if cycle.attention_frames is None else cycle.attention_frames * cycle.tokens_per_frame

    def keys(k: int) -> int:
        return (k + 1) * n if limit is None else min((k + 1) * n, max(limit, n))

    calls_per_segment = (cycle.denoising_steps + 1) / 2 + 1  # exit step uniform over the steps, plus the context pass
    rollout = sum(calls_per_segment * forward_flops(cycle.generator, n, keys(k)) for k in range(segments))
    first_grad = segments - window // cycle.segment_frames  # only the window's blocks run with gradients
    grad_calls = sum(forward_flops(cycle.generator, n, keys(k)) for k in range(first_grad, segments))
    if cycle.rolling_window_blocks is not None:  # the expectation over the two rollout modes
        rolling, rolling_grad = rolling_rollout(cycle)
        share = cycle.rolling_share
        rollout = share * rolling + (1 - share) * rollout
        grad_calls = share * rolling_grad + (1 - share) * grad_calls
    backward_factor = (3 if cycle.checkpointing else 2) - (1 if cycle.lora else 0)
    real = 2 * forward_flops(cycle.real_score, video, video)  # conditional and unconditional
    fake = forward_flops(cycle.critic, video, video)

    terms = {
        "generator rollout (generator step)": rollout,
        "generator backward": backward_factor * grad_calls,
        "real score forwards (cond + uncond)": real,
        "fake score forward (generator step)": fake,
        "generator rollouts (critic steps, no grad)": cycle.critic_ratio * rollout,
        "fake score forward + backward (critic steps)": cycle.critic_ratio * (1 + backward_factor) * fake,
    }
    baseline = sum(terms.values())
    extras: dict[str, float] = {}
    if foresight is not None and foresight.enabled:
        window_segments = window // cycle.segment_frames
        supervised = sum(1 for k in range(window_segments) if any(k + d < window_segments for d in foresight.offsets))
        rows = supervised * n
        d, e = cycle.generator.dim, cycle.target_model.dim
        predictor = 0
        if foresight.predictor == "dit":
            head = TransformerShape(dim=d, depth=foresight.predictor_depth, ffn_dim=int(d * foresight.ffn_ratio),
                                    cross_attention=False)
            per_offset = len(foresight.offsets) if foresight.offset_conditioning else 1
            predictor = per_offset * supervised * forward_flops(head, n, n)
        else:
            per_offset = len(foresight.offsets) if foresight.predictor == "multi_mlp" else 1
            predictor = per_offset * 4 * rows * d * int(d * foresight.ffn_ratio)
        projection = 2 * rows * d * e * (per_offset if d != e else 0)
        head_step = 3 * (predictor + projection)  # forward + backward
        # Over the activation budget the head recomputes (ForesightHead.plan): its groups once
        # more in the backward, and each predictor block once more when one segment is over it.
        with torch.device("meta"):
            plan = ForesightHead(foresight, d, e).plan(supervised, batch=1, tokens=n)
        generator_recompute = (predictor + projection) * plan.recompute + predictor * plan.checkpoint_blocks
        replays = cycle.critic_ratio - 1 if foresight.replay else 0
        extras = {
            "encoder forward to block l (one pass, t = 0)": forward_flops(
                cycle.target_model, video, video, blocks=foresight.encoder_layer + 1
            ),
            "predictor + projection forward and backward": head_step,
            "recomputation under the activation budget": generator_recompute,
            "projector replay (critic steps)": replays * head_step,
            "replay recomputation under the activation budget": replays * predictor * plan.checkpoint_blocks,
        }
    extra = sum(extras.values())
    trainer_rate = 1.0 if cycle.mixed_precision else TF32_RATE
    head_dtype = foresight.compute_dtype if foresight is not None else "float32"
    head_rate = 1.0 if head_dtype == "bfloat16" else TF32_RATE
    head_flops = sum(v for name, v in extras.items() if not name.startswith("encoder"))
    extra_time = (extra - head_flops) / trainer_rate + head_flops / head_rate
    return {
        "terms": terms,
        "baseline": baseline,
        "foresight_terms": extras,
        "foresight": extra,
        "overhead": extra / baseline,
        "precision": {"trainer": "bfloat16" if cycle.mixed_precision else "float32", "head_compute": head_dtype,
                      "tf32_rate": TF32_RATE},
        "time_overhead": extra_time / (baseline / trainer_rate),
    }


def precision_line(trainer: str, head_compute: str, *, why: str = "foresight_compute_dtype") -> str:
    """What a report assumes about precision, in one line."""
    if trainer == "bfloat16":
        first = "generator, scores and encoder in bfloat16 (mixed_precision: true)"
    else:
        first = "generator, scores and encoder in float32 (mixed_precision: false; TF32 matmuls)"
    head = "bfloat16" if head_compute == "bfloat16" else "float32 (TF32 matmuls)"
    return f"precision: {first}; head computes in {head} over float32 weights ({why})"


def cycle_for(resolved: ResolvedRun) -> CycleShape:
    """The DMD cycle a resolved trainer config runs (``mirai_plugin.integrations.resolve``)."""
    run = resolved.trainer
    if resolved.stage != "dmd" or not isinstance(run, VideoRun):
        raise MiraiError(f"flops and memory model a DMD cycle (generator and critic steps); a {resolved.upstream} "
                         f"({resolved.stage}) run has none: check its config with `mirai-plugin config check`")
    assert run.real_score is not None and run.critic is not None and run.frames is not None
    assert run.critic_ratio is not None and run.tokens_per_frame is not None
    return CycleShape(
        generator=transformer_shape(run.generator), real_score=transformer_shape(run.real_score),
        critic=transformer_shape(run.critic), encoder=transformer_shape(run.encoder), frames=run.frames,
        tokens_per_frame=run.tokens_per_frame, segment_frames=run.frames_per_block,
        denoising_steps=run.denoising_steps if run.denoising_steps is not None else CycleShape.denoising_steps,
        critic_ratio=run.critic_ratio, checkpointing=run.checkpointing, window_frames=run.window_frames,
        attention_frames=run.attention_frames, lora=run.lora, mixed_precision=run.mixed_precision,
        rolling_window_blocks=run.rolling_window_blocks, rolling_share=run.rolling_share,
    )


def report(result: dict[str, Any], *, why: str = "foresight_compute_dtype") -> str:
    precision = result["precision"]
    lines = [precision_line(precision["trainer"], precision["head_compute"], why=why), f"{'term':52s} {'TFLOP':>10s}"]
    for name, value in result["terms"].items():
        lines.append(f"{name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'baseline DMD cycle':52s} {result['baseline'] / 1e12:10.1f}")
    for name, value in result["foresight_terms"].items():
        lines.append(f"{'+ ' + name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'foresight overhead per cycle':52s} {100 * result['overhead']:9.1f}%")
    lines.append(f"{'foresight overhead per cycle, tensor-core time':52s} {100 * result['time_overhead']:9.1f}%  "
                 f"(float32 as TF32 at {precision['tf32_rate']:g}x the bfloat16 rate)")
    return "\n".join(lines)

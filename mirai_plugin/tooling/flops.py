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

    @property
    def target_model(self) -> TransformerShape:
        return self.real_score if self.encoder is None else self.encoder


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
    return {
        "terms": terms,
        "baseline": baseline,
        "foresight_terms": extras,
        "foresight": extra,
        "overhead": extra / baseline,
    }


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
        attention_frames=run.attention_frames, lora=run.lora,
    )


def report(result: dict[str, Any]) -> str:
    lines = [f"{'term':52s} {'TFLOP':>10s}"]
    for name, value in result["terms"].items():
        lines.append(f"{name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'baseline DMD cycle':52s} {result['baseline'] / 1e12:10.1f}")
    for name, value in result["foresight_terms"].items():
        lines.append(f"{'+ ' + name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'foresight overhead per cycle':52s} {100 * result['overhead']:9.1f}%")
    return "\n".join(lines)

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

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from mirai_plugin.checks import Rule, check, fail
from mirai_plugin.config import ForesightConfig
from mirai_plugin.head import ForesightHead
from mirai_plugin.keys import key_reader


@dataclass(frozen=True)
class TransformerShape:
    dim: int
    depth: int
    ffn_dim: int
    text_tokens: int = 512
    cross_attention: bool = True


WAN_1_3B = TransformerShape(dim=1536, depth=30, ffn_dim=8960)
WAN_14B = TransformerShape(dim=5120, depth=40, ffn_dim=13824)
WAN_2_2_5B = TransformerShape(dim=3072, depth=30, ffn_dim=14336)  # Wan2.2-TI2V-5B (LongLive 2.0)
WAN_BY_NAME = {"Wan2.1-T2V-1.3B": WAN_1_3B, "Wan2.1-T2V-14B": WAN_14B}


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
        d, e = cycle.generator.dim, cycle.real_score.dim
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
                cycle.real_score, video, video, blocks=foresight.encoder_layer + 1
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


LONGLIVE_SECTIONS = ("infra", "algorithm", "training", "data", "evaluation", "inference", "logging", "checkpoints",
                     "model_kwargs")


def flatten_longlive(args: Any) -> Any:
    """A LongLive 2.0 config (sections, ``model_kwargs.model_name: Wan2.2-TI2V-5B``) as the flat keys its
    ``normalize_config`` gives the trainer (sections' keys at the top, ``adapter`` kept); other configs
    are returned unchanged."""
    model_kwargs = args.get("model_kwargs") if hasattr(args, "get") else None
    if not hasattr(model_kwargs, "get") or "Wan2.2" not in str(model_kwargs.get("model_name", "")):
        return args
    flat = {key: value for key, value in args.items() if key not in LONGLIVE_SECTIONS}
    for section in LONGLIVE_SECTIONS:
        values = args.get(section)
        if hasattr(values, "items"):
            flat.update({key: value for key, value in values.items() if key not in flat or section != "model_kwargs"})
    flat["model_kwargs"] = model_kwargs
    flat["longlive"] = True
    return flat


def _longlive_cycle(args: dict, get: Any) -> CycleShape:
    """LongLive 2.0: Wan2.2-TI2V-5B for the generator, real and fake scores (and the bidirectional
    encoder), the rollout (`num_training_frames`), the DMD window (`slice_last_frames`), local attention
    (`local_attn_size`), `sampling_steps` denoising steps, LoRA without base weight gradients."""
    _, frames, _, height, width = args.get("image_or_video_shape", (1, 32, 48, 44, 80))
    rollout = get("num_training_frames", Rule("int", minimum=1), frames)
    window = get("slice_last_frames", Rule("int", minimum=-1), rollout)
    local = get("local_attn_size", Rule("int", minimum=-1), -1)
    return CycleShape(
        generator=WAN_2_2_5B, real_score=WAN_2_2_5B, critic=WAN_2_2_5B, frames=rollout,
        tokens_per_frame=(int(height) // 2) * (int(width) // 2),
        segment_frames=get("num_frame_per_block", Rule("int", minimum=1), 8),
        denoising_steps=get("sampling_steps", Rule("int", minimum=1), 4),
        critic_ratio=get("dfake_gen_update_ratio", Rule("int", minimum=1), 5),
        checkpointing=get("gradient_checkpointing", Rule("bool"), True),
        window_frames=None if window == -1 else window, attention_frames=None if local == -1 else local,
        lora=args.get("adapter") is not None,
    )


def cycle_from_upstream(args: Any) -> tuple[CycleShape, ForesightConfig]:
    """Shapes and foresight settings from an upstream (Self-Forcing / Causal-Forcing / LongLive 2.0) config."""
    args = flatten_longlive(args)
    foresight = ForesightConfig.from_upstream(args)  # refuses what is not a config first
    read = key_reader(args)

    def get(key: str, rule: Rule, default: Any = None) -> Any:
        value = read(key, None)
        return default if value is None else check(key, value, rule, coerce=True)

    if isinstance(args, dict) and args.get("longlive"):
        return _longlive_cycle(args, get), foresight
    cycle = CycleShape()
    shape = read("image_or_video_shape", None)
    if shape is not None:
        expected = "[batch, frames, channels, height, width]: five ints >= 1"
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable) or len(list(shape)) != 5:
            fail("image_or_video_shape", expected, shape)
        _, frames, _, height, width = (check("image_or_video_shape", v, Rule("int", minimum=1, what=expected),
                                             coerce=True) for v in shape)
        cycle = replace(cycle, frames=frames, tokens_per_frame=(height // 2) * (width // 2))
    real_name = get("real_name", Rule("choice", choices=tuple(WAN_BY_NAME)), "Wan2.1-T2V-1.3B")
    steps = read("denoising_step_list", None)
    if steps is not None and (isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable) or not list(steps)):
        fail("denoising_step_list", "a non-empty list of timesteps", steps)
    cycle = replace(
        cycle,
        real_score=WAN_BY_NAME[real_name],
        segment_frames=get("num_frame_per_block", Rule("int", minimum=1), 1),
        denoising_steps=len(list(steps)) if steps is not None else cycle.denoising_steps,
        critic_ratio=get("dfake_gen_update_ratio", Rule("int", minimum=1), cycle.critic_ratio),
        checkpointing=get("gradient_checkpointing", Rule("bool"), True),
    )
    return cycle, foresight


def report(result: dict[str, Any]) -> str:
    lines = [f"{'term':52s} {'TFLOP':>10s}"]
    for name, value in result["terms"].items():
        lines.append(f"{name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'baseline DMD cycle':52s} {result['baseline'] / 1e12:10.1f}")
    for name, value in result["foresight_terms"].items():
        lines.append(f"{'+ ' + name:52s} {value / 1e12:10.1f}")
    lines.append(f"{'foresight overhead per cycle':52s} {100 * result['overhead']:9.1f}%")
    return "\n".join(lines)

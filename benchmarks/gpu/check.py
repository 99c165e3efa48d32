"""The GPU check: memory and time of the head and the fused loss at the recipe's real shapes, in
float32 and bfloat16, and of a generator step of a Wan-1.3B-shaped causal transformer with and
without the foresight term; the head's precision under a bf16 trainer. Prints one table.

    bash benchmarks/gpu/check.sh            # one CUDA GPU, under 5 minutes
    bash benchmarks/gpu/check.sh --smoke    # any machine, reduced sizes (the tests run this on a CPU)

Needs torch, einops, safetensors, numpy and this working tree only: the models are random-weight
stand-ins shaped like Wan (no upstream import, no weights). Legend: b batch, k segments,
n tokens per segment, t tokens of the video, d student width, e encoder width.

Real shapes: 7 segments of 3 latent frames x 1,560 tokens (832x480), student Wan-1.3B (30
blocks, width 1,536, 12 heads, FFN 8,960), encoder Wan-14B (width 5,120, 40 heads, FFN 13,824)
up to block 20, the head's 3-block DiT predictor at width 1,536 with the projection to 5,120.
Memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the measured
call (its inputs included there); times are the median of 3 runs after a warm-up.

Precision rows (``precision_rows``): the head's forward and backward over one segment in one pass, at the
recipe's shapes, in float32 with TF32 (what a float32 head computes in under the upstream trainers, which
set ``allow_tf32``), in float32 without it, and in bfloat16 (``compute_dtype``), next to the official
projector in bf16 (``MiraiForesightDiTBlock`` and its projection from the Video-Mirai checkout, cast to
bf16 as the official model casts it; attention through SDPA), on the same inputs in the same run. The
official row needs ``MIRAI_VIDEO_MIRAI_DIR`` (check.sh unpacks it from ``../shared/upstreams`` when it
is there); without it the row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from head_memory import Meter  # noqa: E402

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden  # noqa: E402
from mirai_plugin.mean_target_cosine import mean_target_cosine  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    segments: int = 7
    segment_frames: int = 3
    tokens_per_frame: int = 1560
    student: tuple[int, int, int, int] = (30, 1536, 12, 8960)  # blocks, width, heads, FFN
    encoder: tuple[int, int, int, int] = (21, 5120, 40, 13824)  # blocks up to the target layer 20
    student_layer: int = 15
    encoder_layer: int = 20

    @property
    def n(self) -> int:
        return self.segment_frames * self.tokens_per_frame


SMOKE = Sizes(segments=3, tokens_per_frame=8, student=(4, 64, 4, 128), encoder=(3, 96, 4, 192), student_layer=1,
              encoder_layer=2)


# ----------------------------------------------------------------------------- stand-ins


class Block(nn.Module):
    """A Wan-shaped self-attention + FFN block (no text cross-attention, no modulation)."""

    def __init__(self, width: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, width))

    def forward(self, x: Tensor, segment_tokens: int | None) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b t (three h c) -> three b h t c", three=3, h=self.heads)
        if segment_tokens is None:  # bidirectional
            attn = F.scaled_dot_product_attention(q, k, v)  # (b h t c)
        else:  # block-causal: segment i attends to segments 0..i (what a KV-cache rollout computes)
            attn = torch.cat([
                F.scaled_dot_product_attention(q[:, :, i : i + segment_tokens], k[:, :, : i + segment_tokens],
                                               v[:, :, : i + segment_tokens])
                for i in range(0, x.shape[1], segment_tokens)
            ], dim=2)  # (b h t c)
        x = x + self.out(rearrange(attn, "b h t c -> b t (h c)"))
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    """Blocks over tokens; ``in_width`` adds an input embedding (the encoder reads the student's video)."""

    def __init__(self, blocks: int, width: int, heads: int, ffn: int, *, segment_tokens: int | None,
                 in_width: int | None = None) -> None:
        super().__init__()
        self.segment_tokens = segment_tokens
        self.embed = nn.Linear(in_width, width) if in_width is not None else nn.Identity()
        self.blocks = nn.ModuleList(Block(width, heads, ffn) for _ in range(blocks))
        self.gradient_checkpointing = segment_tokens is not None  # the student trains with it, as Self-Forcing does

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.segment_tokens, use_reentrant=False)
            else:
                x = block(x, self.segment_tokens)
        return x


# ----------------------------------------------------------------------------- measurements


def timed(device: torch.device, run, repeats: int = 3) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_above(meter: Meter, run, base: int | None = None) -> int:
    """Peak during ``run`` above ``base`` (default: what is allocated when it starts)."""
    before = meter.now() if base is None else base
    meter.reset_peak()
    run()
    return meter.peak() - before


def head_rows(sizes: Sizes, device: torch.device) -> list[tuple[str, str, float, str]]:
    """The head as benchmarks/head_memory.py measures it: above the inputs, its own state included."""
    d, e = sizes.student[1], sizes.encoder[1]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = [torch.randn(1, sizes.n, d, generator=g).to(device, torch.bfloat16).requires_grad_()
              for _ in range(sizes.segments)]
    z = torch.randn(1, sizes.segments * sizes.n, e, generator=g).to(device, torch.bfloat16)
    return [row for dtype in ("float32", "bfloat16") for row in _head_rows(sizes, device, hidden, z, dtype)]


def _head_rows(sizes: Sizes, device: torch.device, hidden: list[Tensor], z: Tensor, dtype: str) -> list:
    meter = Meter(device)
    inputs_only = meter.now()
    config = ForesightConfig(segment_frames=sizes.segment_frames, compute_dtype=dtype, num_heads=sizes.student[2])
    head = ForesightHead(config, hidden[0].shape[-1], z.shape[-1]).to(device)

    def generator_step() -> None:
        head(hidden, z).backward()
        head.step()
        for h in hidden:
            h.grad = None

    seconds = timed(device, generator_step)
    memory = peak_above(meter, generator_step, inputs_only)
    replay_seconds = timed(device, head.replay)
    replay_memory = peak_above(meter, head.replay, inputs_only)
    return [(f"head, generator step ({dtype})", "peak above inputs", memory / 2**20, "MiB"),
            (f"head, generator step ({dtype})", "time", seconds, "s"),
            (f"head, critic step ({dtype})", "peak above inputs", replay_memory / 2**20, "MiB"),
            (f"head, critic step ({dtype})", "time", replay_seconds, "s")]


def fused_rows(sizes: Sizes, device: torch.device) -> list[tuple[str, str, float, str]]:
    e, k = sizes.encoder[1], sizes.segments
    meter, rows = Meter(device), []
    source = torch.stack([torch.arange(k), (torch.arange(k) + 1).clamp(max=k - 1)], dim=1).to(device)  # (k o)
    valid = torch.stack([torch.ones(k, dtype=torch.bool), torch.arange(k) + 1 < k], dim=1).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        pred = torch.randn(1, k, sizes.n, e, device=device, dtype=dtype, requires_grad=True)
        z = torch.randn(1, k, sizes.n, e, device=device, dtype=dtype)

        def loss_step(pred=pred, z=z) -> None:
            mean_target_cosine(pred, z, source, valid).mean().backward()
            pred.grad = None

        seconds = timed(device, loss_step)
        memory = peak_above(meter, loss_step)
        name = str(dtype).removeprefix("torch.")
        rows += [(f"fused loss, forward + backward ({name})", "peak above inputs", memory / 2**20, "MiB"),
                 (f"fused loss, forward + backward ({name})", "time", seconds, "s")]
    return rows


def generator_rows(sizes: Sizes, device: torch.device) -> list[tuple[str, str, float, str]]:
    """One generator step (forward + backward) of the causal student, alone and with the term:
    capture at the student layer, the encoder up to its layer, the head, and its step."""
    student = Transformer(*sizes.student, segment_tokens=sizes.n).to(device, torch.bfloat16)
    d, e = sizes.student[1], sizes.encoder[1]
    encoder = Transformer(*sizes.encoder, segment_tokens=None, in_width=d).to(device, torch.bfloat16)
    encoder.requires_grad_(False)
    config = ForesightConfig(segment_frames=sizes.segment_frames, student_layer=sizes.student_layer,
                             encoder_layer=sizes.encoder_layer, num_heads=sizes.student[2])
    head = ForesightHead(config, d, e).to(device)
    frozen = FrozenEncoder(encoder, sizes.encoder_layer)
    x = torch.randn(1, sizes.segments * sizes.n, d, device=device, dtype=torch.bfloat16)
    meter = Meter(device)

    def baseline() -> None:
        student(x).float().square().mean().backward()
        student.zero_grad(set_to_none=True)

    def with_term() -> None:
        with capture_hidden(student, config.student_layer) as captured:
            video = student(x)
        term = head(captured, frozen(video.detach()), tokens_per_frame=sizes.tokens_per_frame)
        (video.float().square().mean() + term).backward()
        head.step()
        student.zero_grad(set_to_none=True)

    plain_seconds, term_seconds = timed(device, baseline), timed(device, with_term)
    plain_memory, term_memory = peak_above(meter, baseline), peak_above(meter, with_term)
    return [("generator step, Wan-1.3B-shaped", "peak above models", plain_memory / 2**20, "MiB"),
            ("generator step + foresight term", "peak above models", term_memory / 2**20, "MiB"),
            ("generator step", "time", plain_seconds, "s"),
            ("generator step + foresight term", "time", term_seconds, "s"),
            ("generator step + foresight term", "time ratio", term_seconds / plain_seconds, "x")]


@contextlib.contextmanager
def tf32(enabled: bool):
    """``allow_tf32`` as the upstream trainers set it (``enabled``), restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def precision_rows(sizes: Sizes, device: torch.device) -> list[tuple[str, str, float, str]]:
    """Forward and backward of one segment in one pass: our head in float32 (with and without TF32) and
    in bfloat16, the official projector in bf16; the same inputs."""
    d, e, heads = sizes.student[1], sizes.encoder[1], sizes.student[2]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, sizes.n, d, generator=g).to(device, torch.bfloat16).requires_grad_()  # (b n d)
    z = torch.randn(1, sizes.n, e, generator=g).to(device, torch.bfloat16)  # (b n e)
    rows = []
    for name, dtype, allow in (("float32, TF32", "float32", True), ("float32", "float32", False),
                               ("bfloat16", "bfloat16", False)):
        config = ForesightConfig(segment_frames=sizes.segment_frames, compute_dtype=dtype, num_heads=heads,
                                 activation_budget_mib=None, replay=False)
        head = ForesightHead(config, d, e).to(device)

        def step(head=head) -> None:
            head([hidden], z).backward()
            head.zero_grad(set_to_none=True)
            hidden.grad = None

        with tf32(allow):
            rows.append((f"head, one segment, one pass ({name})", "time", timed(device, step), "s"))
    official = official_projector(d, e, heads, device)
    if isinstance(official, str):
        rows.append((f"official projector, one segment (bf16): {official}", "time", float("nan"), "s"))
    else:
        def official_step() -> None:
            official(hidden, z).backward()
            hidden.grad = None

        rows.append(("official projector, one segment (bf16)", "time", timed(device, official_step), "s"))
    return rows


def official_projector(d: int, e: int, heads: int, device: torch.device):
    """The official projector's generator-step computation as a function of (hidden, target), or why not."""
    if not os.environ.get("MIRAI_VIDEO_MIRAI_DIR"):
        return "skipped, MIRAI_VIDEO_MIRAI_DIR not set"
    from integration_tests import upstream
    from integration_tests.checkouts import source

    up = upstream.import_upstream(source("video-mirai"))
    # As model/dmd.py builds it: the recipe's projector, cast to the trainer's dtype (bf16 weights).
    projector = up.MiraiForesightDiTBlock(dim=d, num_heads=heads, ffn_dim=4 * d, num_layers=3, max_delta=1,
                                          qk_norm=True, use_cross_attn=False, timestep_cond=False,
                                          gate_init_value=0.0, delta_cond=False).to(device, torch.bfloat16)
    dim_proj = torch.nn.Linear(d, e, bias=False).to(device, torch.bfloat16)
    pipeline = types.SimpleNamespace(foresight_projector_type="dit")
    loss = types.MethodType(up.SelfForcingTrainingPipeline._foresight_loss, pipeline)

    def run(hidden: Tensor, target: Tensor) -> Tensor:
        projected = dim_proj(projector(hidden, delta=0, timestep=None))  # (b n e)
        return loss(projected.view(-1, e), target.view(-1, e)) * 0.2
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced sizes on any device (CPU by default)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the reduced CPU check", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else Sizes()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    rows = (head_rows(sizes, device) + fused_rows(sizes, device) + generator_rows(sizes, device)
            + precision_rows(sizes, device))
    sized = "smoke sizes" if args.smoke else "real shapes"
    print(f"mirai-plugin GPU check on {name}, torch {torch.__version__}, {sized}")
    print(f"| {'measurement':58s} | {'quantity':18s} | {'value':>9s} | unit |")
    print(f"|{'-' * 60}|{'-' * 20}|{'-' * 11}|------|")
    for what, quantity, value, unit in rows:
        print(f"| {what:58s} | {quantity:18s} | {value:9.3f} | {unit:4s} |")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory the foresight head adds at the official recipe's real shapes, side by side with the
official Video-Mirai projector, next to the estimator (mirai_plugin.tooling.memory).

    eval "$(../shared/upstreams/unpack /tmp/up)" && python benchmarks/head_memory.py --segments 1 2 3

Shapes: one segment is 3 latent frames x 1,560 tokens = 4,680 tokens; student width 1,536
(Wan-1.3B), encoder width 5,120 (Wan-14B), a 3-block DiT predictor; batch 1, world size 1,
replicated head. Inputs: the captured student states (bf16, one (1 n d) leaf per segment, as
the generator's graph holds them) and the encoder output (bf16, (1 t e)).

The quantity (fixed): peak memory minus the memory right after the inputs are built, the
head's parameters, gradients and optimizer state included (one warm-up step first, on a
tiny input: the state does not depend on the token count). On a CPU the memory is the
process's resident set (peak: ``VmHWM`` after a reset through ``/proc/self/clear_refs``),
with glibc told to map every allocation of 1 MiB or more on its own
(``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set as freed CUDA
blocks leave ``max_memory_allocated`` (left in glibc's heap, they add 10-15 % of retained,
unused memory); on CUDA ``torch.cuda.max_memory_allocated``. Generator step: the term's forward and
backward. Critic step: projector replay on the pairs that step cached (and its optimizer
step). Every case runs in its own process, on one thread.

Cases:
- ``official``: ``MiraiForesightDiTBlock`` and the bias-free projection imported from the
  pinned checkout (``MIRAI_VIDEO_MIRAI_DIR``), each FSDP-wrapped with the official trainer's
  mixed-precision policy (bf16 compute over float32 weights) in a one-process group; its
  loss per segment, one backward for all segments; its own ``replay_foresight_loss`` (one
  pair per backward) on critic steps.
- ``ours``: ``ForesightHead(ForesightConfig())``, float32, the defaults.
- ``ours-bf16``: ``compute_dtype="bfloat16"``.
- ``ours-one-pass``: ``activation_budget_mib=None`` (all segments in one pass, activations kept).

On a CPU the replay cache (``replay_device="cpu"``) is in the resident set, so the estimator's
comparable numbers add it; on CUDA they leave it out. Results: JSON on stdout, and with
``--markdown`` a table (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
D, E, TOKENS_PER_FRAME, SEGMENT_FRAMES = 1536, 5120, 1560, 3
N = SEGMENT_FRAMES * TOKENS_PER_FRAME
CASES = {
    "official": None,
    "ours": {},
    "ours-bf16": {"compute_dtype": "bfloat16"},
    "ours-one-pass": {"activation_budget_mib": None},
}


# ----------------------------------------------------------------------------- measuring


class Meter:
    """Current and peak memory on a CPU (resident set) or a CUDA device (allocated)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _status("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status("VmHWM")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def inputs(segments: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(1, N, D, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(segments)]
    z = torch.randn(1, segments * N, E, generator=g).to(device, torch.bfloat16)
    return hidden, z


def tiny_inputs(device: torch.device):
    """Two segments of 12 tokens: a warm-up step that creates the optimizer state."""
    hidden = [torch.randn(1, 12, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    return hidden, torch.randn(1, 24, E, device=device, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- ours


def run_ours(changes: dict, segments: int, device: torch.device) -> dict:
    from mirai_plugin import ForesightConfig, ForesightHead

    meter = Meter(device)
    hidden, z = inputs(segments, device)
    base = meter.now()
    config = ForesightConfig(**changes)
    head = ForesightHead(config, D, E).to(device)
    warm_hidden, warm_z = tiny_inputs(device)
    head(warm_hidden, warm_z).backward()
    head.step()
    head.replay()
    head.clear_replay()
    del warm_hidden, warm_z

    meter.reset_peak()
    start = time.perf_counter()
    head(hidden, z).backward()
    generator = meter.peak() - base, time.perf_counter() - start
    head.step()
    meter.reset_peak()
    start = time.perf_counter()
    head.replay()
    critic = meter.peak() - base, time.perf_counter() - start
    return {"generator_step": generator[0], "critic_step": critic[0], "generator_s": generator[1],
            "critic_s": critic[1], "plan": head.plan(segments, batch=1, tokens=N).__dict__}


def estimate(changes: dict, segments: int, device: torch.device) -> dict:
    """The estimator's numbers for the quantity measured here."""
    from mirai_plugin import ForesightConfig
    from mirai_plugin.tooling.memory import foresight_memory

    memory = foresight_memory(ForesightConfig(**changes), student_dim=D, encoder_dim=E,
                              frames=segments * SEGMENT_FRAMES, tokens_per_frame=TOKENS_PER_FRAME)
    resident = memory.replay_device_bytes if device.type == "cpu" else 0  # the CPU replay cache is in the RSS
    return {"generator_step": memory.generator_step_peak - memory.encoder_output + resident,
            "critic_step": memory.critic_step_peak + resident}


# ----------------------------------------------------------------------------- official


def run_official(segments: int, device: torch.device, weight: float = 0.2) -> dict:
    import types

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    sys.path.insert(0, str(ROOT))
    from integration_tests import upstream
    from integration_tests.checkouts import source

    up = upstream.import_upstream(source("video-mirai"))
    upstream.ensure_process_group()
    meter = Meter(device)
    hidden, z = inputs(segments, device)
    base = meter.now()

    # As the official DMD model builds its projector and trainer wraps it (model/dmd.py, trainer/distillation.py).
    projector = up.MiraiForesightDiTBlock(dim=D, num_heads=D // 128, ffn_dim=4 * D, num_layers=3, max_delta=1,
                                          qk_norm=True, use_cross_attn=False, timestep_cond=False,
                                          gate_init_value=0.0, delta_cond=False)
    dim_proj = torch.nn.Linear(D, E, bias=False)
    policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                            cast_forward_inputs=False)
    wrap = dict(mixed_precision=policy, use_orig_params=True, device_id=device)
    projector = FullyShardedDataParallel(projector.to(device), **wrap)
    dim_proj = FullyShardedDataParallel(dim_proj.to(device), **wrap)
    params = [*projector.parameters(), *dim_proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01)
    pipeline = types.SimpleNamespace(mirai_projector=projector, foresight_dim_proj=dim_proj, max_replay_pairs=0,
                                     block_wise_using_frame_wise_foresight=False, foresight_projector_type="dit",
                                     foresight_weight=weight, cached_foresight_pairs=[])
    pipeline._foresight_loss = types.MethodType(up.SelfForcingTrainingPipeline._foresight_loss, pipeline)

    def generator_step(hidden, z):
        """The official rollout's foresight part: per segment, the mean target over offsets {0, 1}
        (cached for replay), the projector and its loss; one backward over all segments."""
        losses, count = [], len(hidden)
        for k, h in enumerate(hidden):
            targets = [z[:, j * h.shape[1] : (j + 1) * h.shape[1]] for j in (k, k + 1) if j < count]
            average = torch.stack(targets, dim=0).mean(dim=0)
            pipeline.cached_foresight_pairs.append({"student_hidden": h.detach().cpu(),
                                                    "teacher_hidden": average.detach().cpu(), "delta": 0,
                                                    "timestep": None})
            projected = dim_proj(projector(h, delta=0, timestep=None))
            losses.append(pipeline._foresight_loss(projected.view(-1, E), average.view(-1, E)))
        (torch.stack(losses).mean() * weight).backward()

    def optimizer_step():
        projector.clip_grad_norm_(10.0)
        dim_proj.clip_grad_norm_(10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def critic_step():
        optimizer.zero_grad(set_to_none=True)
        up.SelfForcingTrainingPipeline.replay_foresight_loss(pipeline)
        optimizer_step()

    warm_hidden, warm_z = tiny_inputs(device)
    generator_step(warm_hidden, warm_z)
    optimizer_step()
    critic_step()
    pipeline.cached_foresight_pairs = []
    del warm_hidden, warm_z

    meter.reset_peak()
    start = time.perf_counter()
    generator_step(hidden, z)
    generator = meter.peak() - base, time.perf_counter() - start
    optimizer_step()
    meter.reset_peak()
    start = time.perf_counter()
    critic_step()
    critic = meter.peak() - base, time.perf_counter() - start
    return {"generator_step": generator[0], "critic_step": critic[0], "generator_s": generator[1],
            "critic_s": critic[1]}


# ----------------------------------------------------------------------------- driver


def one_case(case: str, segments: int, device: str, tokens_per_frame: int) -> dict:
    global TOKENS_PER_FRAME, N
    TOKENS_PER_FRAME, N = tokens_per_frame, SEGMENT_FRAMES * tokens_per_frame
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    if case == "official":
        return {"measured": run_official(segments, dev)}
    return {"measured": run_ours(CASES[case], segments, dev), "estimated": estimate(CASES[case], segments, dev),
            "estimated_7": estimate(CASES[case], 7, dev)}


def linear_fit(points: dict[int, float], at: int) -> float:
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return ys[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + slope * (at - mx)


def markdown(results: dict, segments: list[int]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = ["| case | step | " + " | ".join(f"{k} seg. measured (GiB)" for k in segments)
             + " | 7 seg. (linear fit) | estimator, 7 seg. |", "|---" * (4 + len(segments)) + "|"]
    for case, by_k in results.items():
        for step in ("generator_step", "critic_step"):
            measured = {k: by_k[k]["measured"][step] for k in segments if k in by_k}
            estimated = None
            if "estimated" in next(iter(by_k.values())):
                estimated = by_k[segments[0]]["estimated_7"][step]
            lines.append(f"| {case} | {step.replace('_', ' ')} | " + " | ".join(gib(measured[k]) for k in measured)
                         + f" | {gib(linear_fit(measured, 7))} | {gib(estimated) if estimated else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (memory is per process)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--tokens-per-frame", type=int, default=TOKENS_PER_FRAME,
                        help="1,560 is the recipe (832x480); smaller only to check the script quickly")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "SEGMENTS"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one[0], int(args.one[1]), args.device, args.tokens_per_frame)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}

    def run(case: str, k: int) -> dict:
        done = subprocess.run([sys.executable, __file__, "--one", case, str(k), "--device", args.device,
                               "--tokens-per-frame", str(args.tokens_per_frame)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{case} x {k} segments failed:\n{done.stderr[-4000:]}")
        result = {**json.loads(done.stdout.strip().splitlines()[-1]), "device": args.device}
        measured = result["measured"]
        print(f"{case:14s} {k} seg.: generator step {measured['generator_step'] / 2**30:6.2f} GiB "
              f"({measured['generator_s']:.0f} s), critic step {measured['critic_step'] / 2**30:6.2f} GiB "
              f"({measured['critic_s']:.0f} s)"
              + ("" if "estimated" not in result else
                 f"; estimator {result['estimated']['generator_step'] / 2**30:.2f} / "
                 f"{result['estimated']['critic_step'] / 2**30:.2f} GiB"), file=sys.stderr, flush=True)
        return result

    jobs = [(case, k) for case in args.cases for k in args.segments]
    with ThreadPoolExecutor(args.jobs) as pool:  # each case is its own process, one thread each
        done = list(pool.map(lambda job: run(*job), jobs))
    results: dict = {}
    for (case, k), result in zip(jobs, done):
        results.setdefault(case, {})[k] = result
    print(json.dumps(results, indent=1))
    if args.markdown:
        print(markdown(results, args.segments))


if __name__ == "__main__":
    main()

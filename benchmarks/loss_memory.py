"""Peak extra memory of the fused-target cosine loss (forward + backward) at the real scale, on CPU.

    python benchmarks/loss_memory.py

B = 1, 21 frames x 1560 tokens (7 segments of 4680), encoder width 5120, offsets {0, 1}
fused by mean: the package's loss (mirai_plugin.mean_target_cosine) against a straightforward
stack-mean-cosine, each in a fresh process, float32 and bfloat16 inputs. Extra memory
= peak RSS minus RSS once the encoder output and the predictions exist; the unit is one
target tensor (7 x 4680 x 5120 in the input dtype). Target: at most 1.5.
"""

import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

SEGMENTS, TOKENS, WIDTH = 7, 3 * 1560, 5120


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def straightforward(pred, z):
    targets = torch.stack([
        torch.stack([z[:, k + d] for d in (0, 1) if k + d < SEGMENTS]).mean(0) for k in range(SEGMENTS)
    ], dim=1)  # (b k n e)
    return -F.cosine_similarity(pred.float(), targets.float(), dim=-1).mean()


def run(kind: str, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    z = torch.randn(1, SEGMENTS, TOKENS, WIDTH, dtype=dtype)
    pred = torch.randn(1, SEGMENTS, TOKENS, WIDTH, dtype=dtype, requires_grad=True)
    if kind == "fused":
        from mirai_plugin.mean_target_cosine import mean_target_cosine

        source = (torch.arange(SEGMENTS)[:, None] + torch.tensor([0, 1])).clamp(max=SEGMENTS - 1)
        valid = torch.arange(SEGMENTS)[:, None] + torch.tensor([0, 1]) < SEGMENTS
        loss_fn = lambda: mean_target_cosine(pred, z, source, valid).mean()
    else:
        loss_fn = lambda: straightforward(pred, z)
    before = rss_bytes()
    loss = loss_fn()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    target = SEGMENTS * TOKENS * WIDTH * z.element_size()
    return {"loss": loss.item(), "extra_bytes": peak - before, "target_bytes": target,
            "extra_in_targets": round((peak - before) / target, 2), "grad": pred.grad[0, 3, 7, :4].float().tolist()}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(run(sys.argv[1], sys.argv[2])))
        return
    rows = {}
    for dtype in ("float32", "bfloat16"):
        results = {}
        for kind in ("straightforward", "fused"):
            out = subprocess.run([sys.executable, __file__, kind, dtype], capture_output=True, text=True, check=True)
            results[kind] = json.loads(out.stdout)
        rows[dtype] = {
            kind: {"extra_MiB": round(r["extra_bytes"] / 2**20), "extra_in_targets": r["extra_in_targets"]}
            for kind, r in results.items()
        }
        rows[dtype]["loss_difference"] = abs(results["fused"]["loss"] - results["straightforward"]["loss"])
        rows[dtype]["one_target_MiB"] = round(results["fused"]["target_bytes"] / 2**20)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

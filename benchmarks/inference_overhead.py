"""Inference overhead: a KV-cache rollout with mirai_plugin imported (a head built, not capturing)
and after a training step with capture, against a clean process that never imports it.

    python benchmarks/inference_overhead.py

Two Wan-shaped causal generators defined here with torch only (tiny: width 128,
4 blocks; small: width 512, 8 blocks; 7 segments of 3 frames x 64 tokens, cross-
attention to 64 text tokens). Each case runs in its own process; it reports the
ratio of median rollout times to the clean process and whether the outputs are
bit-identical.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"tiny": (128, 4), "small": (512, 8)}
SEGMENTS, TOKENS, TEXT, REPEATS = 7, 3 * 64, 64, 7


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.cq, self.ckv, self.cout = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def split(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, text, *, cache, current_start=0, write=False):
        q, k, v = (self.split(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        keys, values = torch.cat([c[0] for c in cache] + [k], 2), torch.cat([c[1] for c in cache] + [v], 2)
        if write:
            cache.append((k, v))
        x = x + self.out(F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).flatten(2))
        ck, cv = (self.split(t) for t in self.ckv(text).chunk(2, dim=-1))
        cq = self.split(self.cq(self.norm2(x)))
        x = x + self.cout(F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).flatten(2))
        return x + self.ffn(self.norm3(x))


class CausalGenerator(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(64, dim), nn.Linear(dim, 64)
        self.blocks = nn.ModuleList(Block(dim, dim // 64) for _ in range(depth))

    def forward(self, x, text, caches, index, write=False):
        h = self.embed(x)
        for block, cache in zip(self.blocks, caches):
            h = block(h, text, cache=cache, current_start=index * TOKENS, write=write)
        return self.head(h)


@torch.no_grad()
def rollout(model: CausalGenerator, noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    caches = [[] for _ in model.blocks]
    out = []
    for k in range(SEGMENTS):
        x = noise[:, k]
        for _ in range(2):  # two denoising steps
            x = model(x, text, caches, k)
        out.append(x)
        model(x, text, caches, k, write=True)  # context pass
    return torch.stack(out, 1)


def run_case(size: str, case: str, out: Path) -> None:
    torch.manual_seed(0)
    dim, depth = SIZES[size]
    model = CausalGenerator(dim, depth).eval()
    noise, text = torch.randn(1, SEGMENTS, TOKENS, 64), torch.randn(1, TEXT, dim)
    if case != "clean":
        from mirai_plugin import ForesightConfig, ForesightHead, capture_hidden

        head = ForesightHead(ForesightConfig(num_heads=2, segment_frames=3), dim, dim)
        if case == "after_capture":  # a training rollout with capture and a backward, then inference
            model.train()
            with capture_hidden(model, depth // 2) as captured:
                caches = [[] for _ in model.blocks]
                hidden = [model(noise[:, k], text, caches, k) for k in range(2)]
            term = head([r.hidden for r in captured], torch.randn(1, 2 * TOKENS, dim))
            (sum(h.mean() for h in hidden) + term).backward()
            model.eval()
    rollout(model, noise, text)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        video = rollout(model, noise, text)
        times.append(time.perf_counter() - start)
    torch.save({"video": video, "seconds": statistics.median(times),
                "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())}, out)


def main() -> None:
    if len(sys.argv) == 4:
        run_case(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
        return
    folder = Path(tempfile.mkdtemp(prefix="mirai-inference-"))
    rows = {}
    for size in SIZES:
        results = {}
        for case in ("clean", "imported", "after_capture"):
            path = folder / f"{size}-{case}.pt"
            subprocess.run([sys.executable, __file__, size, case, str(path)], check=True)
            results[case] = torch.load(path)
        clean = results["clean"]
        for case in ("imported", "after_capture"):
            r = results[case]
            rows[f"{size}/{case}"] = {
                "clean_ms": round(1e3 * clean["seconds"], 2), "ms": round(1e3 * r["seconds"], 2),
                "ratio": round(r["seconds"] / clean["seconds"], 3),
                "bit_identical": bool(torch.equal(r["video"], clean["video"])), "hooks_left": r["hooks"],
            }
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

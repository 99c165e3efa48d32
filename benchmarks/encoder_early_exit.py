"""Encoder early exit: time to the output of block l of L against a full forward.

    python benchmarks/encoder_early_exit.py

A bidirectional transformer (benchmarks/models.py, width 384, 8 blocks,
2 clips of 12 frames x 64 tokens) runs at timestep 0 under no_grad; FrozenEncoder
stops it after block l. Target: time within 10 % of (l + 1) / L of the full forward.
"""

import statistics
import time

import torch
from models import VideoTransformer

from mirai_plugin import FrozenEncoder

DEPTH, REPEATS = 8, 9


def median_seconds(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    teacher = VideoTransformer(dim=384, depth=DEPTH, heads=6, size=32, frames=12).eval().requires_grad_(False)
    video, t = torch.rand(2, 12, 3, 32, 32), torch.zeros(2)
    with torch.no_grad():
        full = median_seconds(lambda: teacher(video, t))
    print(f"full forward: {full * 1e3:.1f} ms")
    print(f"{'layer':>5s} {'ms':>8s} {'ratio':>7s} {'(l+1)/L':>8s} {'excess':>7s}")
    for layer in (1, 3, 5, 7):
        encoder = FrozenEncoder(teacher, layer)
        seconds = median_seconds(lambda encoder=encoder: encoder(video, t))
        ideal = (layer + 1) / DEPTH
        print(f"{layer:5d} {seconds * 1e3:8.1f} {seconds / full:7.3f} {ideal:8.3f} {seconds / full / ideal - 1:+7.1%}")


if __name__ == "__main__":
    main()

"""How far bfloat16 compute (``compute_dtype="bfloat16"``) moves the term, its gradients and one head update
from float32.

    python benchmarks/bf16_difference.py                       # the recipe's widths (docs/performance.md)
    python benchmarks/bf16_difference.py --sizes integration   # the integration tests' tiny head and rollout

``recipe``: the recipe's head (width 1,536 -> 5,120, 3 DiT blocks) with live modulations (a trained head,
not the identity start), 3 segments of 3 frames x 130 tokens (the attention is within a segment, so the
per-token error does not depend on the frame size).

``integration``: the head of the real-trainer tests (``integration_tests/test_precision.py``): width
64 -> 96, 4 heads, 3 DiT blocks, 7 segments of 3 frames x 16 tokens, from the identity start the official
projector starts from, its weights rounded to bfloat16 (the official trainer keeps its projector in the
trainer's dtype). Those tests compare the official trainer's bfloat16 projector with the patched trainer's
head within ``TOLERANCE_FACTOR`` times these numbers.

Both: bf16 captured states and encoder output, as the trainer hands them over; the same weights in both
dtypes; one thread. Printed: the term in both dtypes and their difference, the relative L2 difference of
the head's gradient and of the gradient sent to the generator, and of one AdamW step of the recipe (lr 2e-6,
betas (0, 0.999), weight decay 0.01, clipping at 10) measured on bfloat16 weights (``update_bf16``: the step
as weights kept in bfloat16 show it).
"""

from __future__ import annotations

import argparse

import torch

from mirai_plugin import ForesightConfig, ForesightHead

SIZES = {
    # width, encoder width, heads, tokens per frame, segments, live modulations
    "recipe": dict(d=1536, e=5120, heads=None, tpf=130, segments=3, live=True),
    "integration": dict(d=64, e=96, heads=4, tpf=16, segments=7, live=False),
}
TOLERANCE_FACTOR = 4  # two bfloat16 computations each this far from float32, on other data: 2 x 2


def measure(d: int, e: int, heads: int | None, tpf: int, segments: int, live: bool, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    n = 3 * tpf
    config = ForesightConfig(num_heads=heads, weight_decay=0.01)
    full = ForesightHead(config, d, e)
    with torch.no_grad():
        if live:  # live gates: a trained head, not the identity start
            for p in full.parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.05)
        else:  # weights as a bfloat16 projector holds them
            for p in full.parameters():
                p.copy_(p.bfloat16().float())
    half = ForesightHead(config.replace(compute_dtype="bfloat16"), d, e)
    half.load_state_dict(full.state_dict())
    start = {k: v.clone() for k, v in full.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    hidden = [torch.randn(1, n, d, generator=g).bfloat16().requires_grad_() for _ in range(segments)]
    z = torch.randn(1, segments * n, e, generator=g).bfloat16()
    out = {}
    for name, head in (("float32", full), ("bfloat16", half)):
        term = head(hidden, z)
        term.backward()
        head_grad = torch.cat([p.grad.flatten() for p in head.parameters()])
        generator_grad = torch.cat([h.grad.float().flatten() for h in hidden])
        head.step()  # clip, AdamW, zero
        update = torch.cat([(v - start[k]).flatten() for k, v in head.state_dict().items()])
        update_bf16 = torch.cat([(v.bfloat16().float() - start[k]).flatten() for k, v in head.state_dict().items()])
        out[name] = (term.item(), head_grad, generator_grad, update, update_bf16)
        for h in hidden:
            h.grad = None
    a, b = out["float32"], out["bfloat16"]

    def relative(x: torch.Tensor, y: torch.Tensor) -> float:
        return ((x - y).norm() / y.norm()).item()

    return {"term_float32": a[0], "term_bfloat16": b[0], "term_abs": abs(a[0] - b[0]),
            "head_gradient": relative(b[1], a[1]), "generator_gradient": relative(b[2], a[2]),
            "update": relative(b[3], a[3]), "update_bf16": relative(b[4], a[4])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="recipe")
    parser.add_argument("--seeds", type=int, default=1, help="repeat on this many seeds, print each and the largest")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(**SIZES[args.sizes], seed=seed) for seed in range(args.seeds)]
    for seed, r in enumerate(rows):
        print(f"seed {seed}: term float32 {r['term_float32']:.6f} bfloat16 {r['term_bfloat16']:.6f} abs diff "
              f"{r['term_abs']:.2e}; relative L2: head gradient {r['head_gradient']:.2e}, generator gradient "
              f"{r['generator_gradient']:.2e}, one AdamW step {r['update']:.2e} ({r['update_bf16']:.2e} on "
              f"bfloat16 weights)")
    if len(rows) > 1:
        print("largest: " + ", ".join(f"{key} {max(r[key] for r in rows):.2e}" for key in
                                      ("term_abs", "head_gradient", "generator_gradient", "update", "update_bf16")))


if __name__ == "__main__":
    main()

"""How far bfloat16 compute (``compute_dtype="bfloat16"``) moves the term and its gradients from float32.

    python benchmarks/bf16_difference.py

The recipe's head (width 1,536 -> 5,120, 3 DiT blocks) with live modulations (a trained head,
not the identity start), the same weights in both dtypes; 3 segments of 3 frames x 130 tokens
(the attention is within a segment, so the per-token error does not depend on the frame size);
bf16 captured states and encoder output, as the trainer hands them over. One thread.
"""

import torch

from mirai_plugin import ForesightConfig, ForesightHead

torch.manual_seed(0)
torch.set_num_threads(1)
d, e, tpf, segs = 1536, 5120, 130, 3
n = 3 * tpf
full = ForesightHead(ForesightConfig(), d, e)
with torch.no_grad():  # live gates: a trained head, not the identity start
    for p in full.parameters():
        if p.dim() == 1:
            p.normal_(0, 0.05)
half = ForesightHead(ForesightConfig(compute_dtype="bfloat16"), d, e)
half.load_state_dict(full.state_dict())
g = torch.Generator().manual_seed(1)
hidden = [torch.randn(1, n, d, generator=g).bfloat16().requires_grad_() for _ in range(segs)]
z = torch.randn(1, segs * n, e, generator=g).bfloat16()
out = {}
for name, head in (("float32", full), ("bfloat16", half)):
    term = head(hidden, z)
    term.backward()
    out[name] = (term.item(), torch.cat([p.grad.flatten() for p in head.parameters()]),
                 torch.cat([h.grad.float().flatten() for h in hidden]))
    for h in hidden:
        h.grad = None
a, b = out["float32"], out["bfloat16"]


def relative(x, y):
    return ((x - y).norm() / y.norm()).item()


print(f"term float32 {a[0]:.6f} bfloat16 {b[0]:.6f} abs diff {abs(a[0] - b[0]):.2e}; head gradient rel. L2 "
      f"{relative(b[1], a[1]):.2e}; generator gradient rel. L2 {relative(b[2], a[2]):.2e}")

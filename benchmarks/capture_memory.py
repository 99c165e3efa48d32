"""Capture memory: what a training rollout keeps alive through capture_hidden.

    python benchmarks/capture_memory.py

A causal student (benchmarks/models.py, width 256) rolls out 4 segments as in Self-Forcing
training (no-grad denoising calls, one grad-enabled exit call, a no-grad context
pass per segment). Expected: one retained tensor per segment (the grad-enabled
call's block output, which the generator's own graph keeps anyway), none from
no-grad calls.
"""

import torch
from models import CausalVideoTransformer, rollout

from mirai_plugin import capture_hidden


def main() -> None:
    torch.manual_seed(0)
    student = CausalVideoTransformer(dim=256, depth=4, heads=4, size=16, frames=12)
    first = torch.rand(2, 3, 3, 16, 16)
    for exit_index in (0, 1):
        with capture_hidden(student, 1) as captured:
            video = rollout(student, first, 3, exit_index=exit_index, g=torch.Generator().manual_seed(0))
            records = list(captured)
            retained = sum(r.hidden.numel() * r.hidden.element_size() for r in records)
            print(f"exit step {exit_index}: {len(records)} retained tensors for 3 generated segments, "
                  f"{captured.skipped_no_grad} no-grad calls seen and not kept, {retained / 2**10:.0f} KiB retained, "
                  f"all attached to the graph: {all(r.hidden.grad_fn is not None for r in records)}")
        video.mean().backward()
        student.zero_grad()


if __name__ == "__main__":
    main()

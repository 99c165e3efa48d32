"""Memory the foresight term adds per rank, for the official recipe.

    python benchmarks/scaling_memory.py            # tables (any machine)
    python benchmarks/scaling_memory.py --measure  # also a small real run's peak (needs CUDA)

The official recipe: Wan2.1-T2V-1.3B student (d 1536), Wan-14B encoder (e 5120),
832x480 -> 21 latent frames x 1560 tokens, segments of 3 frames, batch 1 per
rank, bfloat16 generator and encoder, float32 head (as the integration builds it).
Tables: 1 and 8 GPUs, replicated vs sharded (FSDP) head, 1 and 8 accumulation
micro-steps. The numbers come from ``mirai_plugin.tooling.memory`` (the same code as
``mirai-plugin memory``), whose rows are checked against real tensors in
tests/test_memory.py.
"""

import argparse

import torch

from mirai_plugin import ForesightConfig, ForesightHead
from mirai_plugin.tooling.flops import CycleShape
from mirai_plugin.tooling.memory import foresight_memory, memory_for_cycle

GIB = 2**30


def tables() -> None:
    recipe = memory_for_cycle(CycleShape(), ForesightConfig(), world_size=8, accumulation_steps=8)
    print("Official recipe, 8 GPUs x 8 accumulation steps, replicated head (mirai-plugin memory --world-size 8 "
          "--accumulation 8):\n")
    print(recipe.report())
    print("\nSummary per rank, GiB:\n")
    print("| GPUs | head | accumulation | head state (params + grads + AdamW) | FSDP unit / grad averaging "
          "| GPU, generator step | GPU, critic step (replay) | GPU peak | CPU (replay cache) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for world in (1, 8):
        for sharded in (False, True):
            for steps in (1, 8):
                m = memory_for_cycle(CycleShape(), ForesightConfig(), world_size=world, sharded=sharded,
                                     accumulation_steps=steps)
                cells = (m.parameters + m.gradients + m.optimizer_state, m.unsharded_unit + m.gradient_averaging,
                         m.generator_step_peak, m.critic_step_peak, m.gpu_peak, m.replay_device_bytes)
                print(f"| {world} | {'sharded' if sharded else 'replicated'} | {steps} | "
                      + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")


def measure() -> None:
    """Peak GPU memory of one generator step of a small head, against the formula's upper bound."""
    if not torch.cuda.is_available():
        print("\nno CUDA device: measurement skipped (on a CPU the rows are checked against the tensors autograd "
              "saves and the head keeps, in tests/test_memory.py)")
        return
    device = torch.device("cuda")
    config = ForesightConfig(predictor_depth=3, segment_frames=3)
    d, e, frames, s, b = 512, 1024, 12, 256, 1
    head = ForesightHead(config, d, e).to(device)
    memory = foresight_memory(config, student_dim=d, encoder_dim=e, frames=frames, tokens_per_frame=s,
                              batch_per_rank=b)
    n = config.segment_frames * s
    hidden = [torch.randn(b, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
              for _ in range(frames // config.segment_frames)]
    z = torch.randn(b, frames * s, e, device=device, dtype=torch.bfloat16)

    def generator_step():
        head(hidden, z).backward()

    generator_step()
    head.step()  # AdamW state now exists, as in every later step
    for h in hidden:
        h.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # head parameters, AdamW moments, captured states, encoder output
    torch.cuda.reset_peak_memory_stats()
    generator_step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - baseline
    input_grads = sum(h.numel() * h.element_size() for h in hidden)  # the generator's, not the term's
    counted = memory.generator_step_peak - memory.persistent - memory.encoder_output
    print(f"\nsmall run on {torch.cuda.get_device_name()}: d {d}, e {e}, {frames} frames x {s} tokens, batch {b}")
    print(f"measured peak above the held state: {measured / 2**20:.1f} MiB "
          f"(of which {input_grads / 2**20:.1f} MiB are the captured states' gradients, the generator's own)")
    print(f"formula, generator step, upper bound: {counted / 2**20:.1f} MiB "
          f"(activations {memory.predictor_activations / 2**20:.1f} MiB)  measured / formula: "
          f"{(measured - input_grads) / counted:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also measure a small real run (CUDA)")
    args = parser.parse_args()
    tables()
    if args.measure:
        measure()


if __name__ == "__main__":
    main()

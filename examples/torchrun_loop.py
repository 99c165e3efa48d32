"""The plain loop on N processes: a sharded generator and head, gradient accumulation,
the Mirai weight step-down, replay, and a checkpoint that resumes exactly.

    torchrun --nproc_per_node 2 examples/torchrun_loop.py --strategy fsdp --steps 8
    torchrun --nproc_per_node 2 examples/torchrun_loop.py --steps 4 --save run.pt
    torchrun --nproc_per_node 2 examples/torchrun_loop.py --steps 4 --resume run.pt   # = steps 5..8 of one run

Uses NCCL and one GPU per process when CUDA is available, gloo on the CPU otherwise.
"""

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
from plain_loop import ENCODER_WIDTH, FRAMES_PER_SEGMENT, SEGMENT_TOKENS, SEGMENTS, WIDTH, Block, Transformer, generate
from torch import nn

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden
from mirai_plugin.distributed import shard_head

TOTAL_STEPS = 8


def wrap(module: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The generator under the same strategy as the head (any mix works)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in module.blocks:
            fully_shard(block)
        return fully_shard(module)
    return module


def head_kwargs(strategy: str, device: torch.device) -> dict:
    if strategy == "ddp" and device.type == "cuda":
        return {"device_ids": [device.index]}
    if strategy == "fsdp":
        return {"device_id": device}
    return {}


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["replicate", "ddp", "fsdp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=TOTAL_STEPS)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--save", help="checkpoint to write at the end (rank 0)")
    parser.add_argument("--resume", help="checkpoint to start from")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    train(args, device)
    gc.collect()  # wrappers hold the process group: release them before destroying it
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    generator = Transformer(WIDTH, 6).to(device)
    encoder_model = Transformer(ENCODER_WIDTH, 8).requires_grad_(False).to(device)
    to_encoder = nn.Linear(WIDTH, ENCODER_WIDTH).requires_grad_(False).to(device)
    generator_strategy = "ddp" if args.strategy == "replicate" else args.strategy
    generator = wrap(generator, generator_strategy, device)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-3)

    # Mirai's schedule: lambda 2 until half-way, then 1.
    cfg = ForesightConfig(
        student_layer=3, encoder_layer=4, num_heads=4, segment_frames=FRAMES_PER_SEGMENT,
        weight=2.0, weight_changes=((TOTAL_STEPS // 2, 1.0),), replay_max_pairs=4,
    )  # fmt: skip
    head = ForesightHead(cfg, student_dim=WIDTH, encoder_dim=ENCODER_WIDTH).to(device)
    shard_head(head, args.strategy, **head_kwargs(args.strategy, device))
    encoder = FrozenEncoder(encoder_model, cfg.encoder_layer)

    start = 0
    if args.resume:
        saved = torch.load(args.resume, map_location="cpu", weights_only=True)  # every rank reads it
        load_full_state(generator, optimizer, saved["generator"], saved["optimizer"])
        head.load_training_state(saved["foresight"])
        start = head.steps_taken

    for step in range(start, start + args.steps):
        for micro in range(args.accumulation):
            last = micro == args.accumulation - 1
            # Synchronise gradients on the last micro-step only.
            skip_sync = not last and hasattr(generator, "no_sync")
            with generator.no_sync() if skip_sync else contextlib.nullcontext(), (
                head.no_sync() if not last else contextlib.nullcontext()
            ):
                data = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)  # this rank's shard
                noise = torch.randn(1, SEGMENTS * SEGMENT_TOKENS, WIDTH, generator=data).to(device)
                with capture_hidden(generator, cfg.student_layer) as captured:
                    video = generate(generator, noise)
                loss = video.square().mean()
                foresight = head(captured, encoder(to_encoder(video.detach())))
                ((loss + foresight) / args.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        head.step()
        replayed = head.replay()  # stands in for a critic step
        foresight = foresight.detach().clone()
        dist.all_reduce(foresight)
        if rank == 0:
            print(
                f"step {step + 1}  weight {cfg.weight_at(step):.1f}  foresight {foresight.item() / world_size:+.6f}"
                f"  replay {replayed.item():+.6f}",
                flush=True,
            )

    if args.save:
        model_state, optim_state = full_state(generator, optimizer)
        foresight_state = head.training_state()
        if rank == 0:
            torch.save({"generator": model_state, "optimizer": optim_state, "foresight": foresight_state}, args.save)


if __name__ == "__main__":
    main()

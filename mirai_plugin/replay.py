"""The replay cache: the (hidden, target) pairs of the last generator step, kept detached for
projector-only updates on critic steps.

Legend: b batch, k supervised segments, o offsets, n tokens per segment, d student width,
e encoder width, s tokens per frame.

Pairs are copied to ``config.replay_device`` one segment at a time, so no full-size copy
exists where they were computed. A step's pairs stay until the head steps (``close``); the
next forward then starts a new cache. Sampling ``replay_max_pairs`` uses a generator seeded
per rank, saved with the head's training state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mirai_plugin.checks import check_device_available
from mirai_plugin.collectives import gather_ints, world
from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.optimizer import HeadOptimizer
from mirai_plugin.segmented import GroupPlan, SegmentGroup
from mirai_plugin.targets import SegmentLayout, materialise_targets


@dataclass
class ReplayBatch:
    """Detached inputs of one foresight forward."""

    hidden: Tensor  # (b k n d)
    target: Tensor  # (b k n e) | (b k o n e) | (b k o s e)
    valid: Tensor  # (k o)
    weight: float  # the term's weight when these pairs were made


class ReplayCache:
    """The cached pairs, the cache's open/closed state and the replay-sampling RNG."""

    def __init__(self, config: ForesightConfig) -> None:
        self.config = config
        self.batches: list[ReplayBatch] = []
        self.closed = False
        self._generator: torch.Generator | None = None

    def add(self, hidden: list[Tensor], layout: SegmentLayout, s: int, weight: float) -> None:
        """Cache one forward's pairs (a closed cache is emptied first)."""
        if self.closed:
            self.clear()
        cfg = self.config
        if cfg.replay_device is not None:
            check_device_available("replay_device", cfg.replay_device)  # parsed with the config, checked at first use
        device = cfg.replay_device if cfg.replay_device is not None else hidden[0].device
        cached_hidden = torch.empty((hidden[0].shape[0], len(hidden), *hidden[0].shape[1:]),
                                    dtype=hidden[0].dtype, device=device)  # (b k n d)
        cached_target = None
        for i, h in enumerate(hidden):
            cached_hidden[:, i].copy_(h.detach())
            one = layout._replace(source=layout.source[i : i + 1], valid=layout.valid[i : i + 1],
                                  segments=layout.segments[i : i + 1])
            target = materialise_targets(one, fusion=cfg.fusion, segment_frames=cfg.segment_frames,
                                         tokens_per_frame=s).target  # (b 1 ...)
            if cached_target is None:
                cached_target = torch.empty((target.shape[0], len(hidden), *target.shape[2:]), dtype=target.dtype,
                                            device=device)  # (b k ...)
            cached_target[:, i].copy_(target[:, 0])
        assert cached_target is not None  # hidden is never empty: the head checks it
        self.batches.append(ReplayBatch(cached_hidden, cached_target, layout.valid.detach().cpu(), weight))

    def close(self) -> None:
        """The step is over: the next ``add`` starts a new cache."""
        self.closed = True

    def clear(self) -> None:
        self.batches.clear()
        self.closed = False

    @property
    def pairs(self) -> int:
        """Cached (hidden, target) pairs: segments, or valid segment/offset pairs."""
        return sum(self.pairs_in(batch, range(batch.valid.shape[0])) for batch in self.batches)

    def pairs_in(self, batch: ReplayBatch, segments: Sequence[int] | Tensor) -> int:
        if self.config.fusion == "mean":
            return len(segments)
        return int(batch.valid[torch.as_tensor(segments, dtype=torch.long)].sum())

    def units(self) -> list[tuple[int, int]]:
        """The ``(batch, segment)`` units to replay: all of them, or ``replay_max_pairs`` drawn at random."""
        units = [(b, i) for b, batch in enumerate(self.batches) for i in range(batch.valid.shape[0])]
        cap = self.config.replay_max_pairs
        if cap is not None and len(units) > cap:
            pick = torch.randperm(len(units), generator=self.rng())[:cap].sort().values
            units = [units[j] for j in pick.tolist()]
        return units

    def group(self, units: list[tuple[int, int]], device: torch.device, *, checkpoint_blocks: bool,
              mean_targets: bool) -> tuple[SegmentGroup, Tensor]:
        """The group of cached pairs and each row's weight (weight / videos in its micro-batch).

        One row per (video, segment): micro-steps may differ in batch size. Each row is
        weighted ``weight / b`` so a segment's pair still averages over its videos.
        """
        hidden, target, valid, row_weight = [], [], [], []
        for b, i in units:
            batch = self.batches[b]
            videos = batch.hidden.shape[0]
            hidden.append(batch.hidden[:, i])  # (b n d)
            target.append(batch.target[:, i])  # (b ...)
            valid.append(batch.valid[i].expand(videos, -1))  # (b o)
            row_weight.append(torch.full((videos,), batch.weight / videos))
        first = self.batches[units[0][0]]
        hidden_rows = torch.cat(hidden)[None].to(device)  # (1 rows n d)
        target_rows = torch.cat(target)[None].to(device)  # (1 rows ...)
        valid_rows = torch.cat(valid).to(device)  # (rows o)
        s = first.hidden.shape[2] // self.config.segment_frames
        if mean_targets:  # the offset-mean loss over already-fused targets: each row is its own source
            rows = valid_rows.shape[0]
            group = SegmentGroup(hidden_rows, torch.ones(rows, 1, dtype=torch.bool, device=device), s,
                                 checkpoint_blocks=checkpoint_blocks, z=target_rows,
                                 source=torch.arange(rows, device=device)[:, None])
        else:
            group = SegmentGroup(hidden_rows, valid_rows, s, checkpoint_blocks=checkpoint_blocks, target=target_rows)
        return group, torch.cat(row_weight).to(device)  # (rows)

    def replay(self, optimization: HeadOptimizer, plan: Callable[..., GroupPlan], device: torch.device, *,
               mean_targets: bool, step: bool) -> Tensor | None:
        """Backpropagate the cached pairs through ``optimization.call`` and, with ``step``, zero
        before and step after (see ``ForesightHead.replay``). This rank's weighted loss, or
        ``None`` when nothing is cached; closes the cache."""
        drawn_from = self.rng().get_state()
        units = self.units()
        # Replay rows are one (video, segment) each.
        grouping = plan(len(units), batch=1, tokens=self.batches[units[0][0]].hidden.shape[2]) if units else None
        size = self.config.replay_segments or (grouping.size if grouping else 1)
        groups = [units[j : j + size] for j in range(0, len(units), size)]
        local_pairs = sum(self.pairs_in(self.batches[b], [i]) for b, i in units)
        # Gradients not yet stepped (a generator step's backward, or replay(step=False)): zeroing would lose them.
        waiting = step and any(p.grad is not None for p in optimization.parameters())
        _rank, world_size = world()
        total_pairs, any_waiting = local_pairs, waiting
        strategy = optimization.strategy
        if world_size > 1:
            counts = gather_ints([local_pairs, len(groups), waiting], device)  # (world 3)
            total_pairs, any_waiting = int(counts[:, 0].sum()), bool(counts[:, 2].any())
        if any_waiting and total_pairs:  # every rank raises; the cache and its draw stay for after head.step()
            self.rng().set_state(drawn_from)
            raise MiraiError(
                "head.replay() would discard the head's gradients that have not been stepped (from the generator "
                "step's backward, or replay(step=False)): call head.step() after the generator's backward and "
                "before head.replay(); head.replay(step=False) adds the replay gradients to them instead"
            )
        if world_size > 1:
            if total_pairs and strategy != "replicate" and bool((counts[:, 1] != counts[0, 1]).any()):
                self.close()
                raise MiraiError(
                    f"replay needs the same number of backwards on every rank under {strategy!r}, got "
                    f"{counts[:, 1].tolist()}: give every rank the same number of segments per step (or set "
                    f"replay_max_pairs to at most that number), or use the replicated head"
                )
        self.close()
        if total_pairs == 0:
            return None
        if step:
            optimization.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        checkpoint_blocks = bool(grouping and grouping.checkpoint_blocks)
        for group_units in groups:
            group, row_weight = self.group(group_units, device, checkpoint_blocks=checkpoint_blocks,
                                           mean_targets=mean_targets)
            per_item = optimization.call(group)  # (rows) | (rows o)
            if self.config.fusion != "mean":
                per_item = torch.where(group.valid, per_item, 0.0)
                row_weight = row_weight[:, None]
            weighted_sum = (per_item * row_weight).sum()
            # Replicated / DDP gradients are averaged over ranks afterwards, hence world_size.
            (weighted_sum * (world_size / total_pairs)).backward()
            total = total + weighted_sum.detach()
        if step:
            optimization.clip_and_step()
        return total / local_pairs if local_pairs else None

    # ------------------------------------------------------------------ RNG

    def rng(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.config.replay_seed + world()[0])
        return self._generator

    def rng_states(self, device: torch.device) -> Tensor:
        """``(world S)``: every rank's sampling state (a collective with several ranks)."""
        local = self.rng().get_state()  # uint8 (S)
        _rank, world_size = world()
        if world_size == 1:
            return local[None].clone()
        out = [torch.empty_like(local, device=device) for _ in range(world_size)]  # NCCL gathers device tensors
        dist.all_gather(out, local.to(device))
        return torch.stack(out).cpu()  # (world S)

    def load_rng_states(self, states: Tensor | None, device: torch.device) -> None:
        """Restore this rank's row of ``states`` (rank 0's, broadcast, checked by ``rng_problems``);
        a different world size restarts."""
        rank, world_size = world()
        size = self.rng().get_state().numel()
        count = torch.tensor([states.shape[0] if states is not None else 0], device=device)
        if world_size > 1:
            dist.broadcast(count, src=0)
        saved_ranks = int(count.item())
        if saved_ranks != world_size:
            if rank == 0 and saved_ranks:
                warnings.warn(
                    f"training state has replay RNG states of {saved_ranks} ranks, this run has {world_size}: "
                    f"replay sampling restarts from replay_seed (only replay_max_pairs sampling is affected)",
                    stacklevel=4,
                )
            self._generator = None
            return
        if states is not None:
            rows = states.to(device)
        else:
            rows = torch.empty(world_size, size, dtype=torch.uint8, device=device)
        if world_size > 1:
            dist.broadcast(rows, src=0)
        self.rng().set_state(rows[rank].cpu().clone())  # its own storage: set_state reads from offset 0


def rng_problems(states: object) -> str:
    """What keeps ``states`` (``rng_states()``, or ``None``) from loading ("" when nothing): every
    row must be a state ``torch.Generator.set_state`` takes, tried on a scratch generator."""
    if states is None:
        return ""
    size = torch.Generator().get_state().numel()
    if not isinstance(states, Tensor) or states.is_meta or states.dtype != torch.uint8 or states.shape[1:] != (size,):
        got = f"{states.dtype} {tuple(states.shape)}" if isinstance(states, Tensor) else type(states).__name__
        return f"must be a uint8 tensor (ranks, {size}), got {got}"
    for rank, row in enumerate(states):
        try:
            torch.Generator().set_state(row.cpu().clone())
        except RuntimeError as error:
            return f"row {rank} is not a generator state ({error})"
    return ""

"""ForesightHead: the trainable predictor, the foresight term and projector replay.

Legend: b batch, k supervised segments, o offsets, n tokens per segment,
s tokens per frame, f frames per segment, d student width, e encoder width.

Data flow of one generator step::

    captured h_k (b n d), attached  ->  predictor  ->  projection  ->  (b k n e)
    encoder z (b t e), no grad      ->  segment layout (targets)    ->  y_k
    loss = weight * mean over segments (or valid segment/offset pairs) of foresight_loss

The predictor runs on groups of segments (``plan``): all of them in one pass when
their activations fit ``config.activation_budget_mib``, else groups recomputed in
the backward through one autograd node (``mirai_plugin.segmented``), so one group's
activations are alive at a time. Replay uses the same groups.

The head owns its parameters, its optimizer and the replay cache; nothing is
added to the generator, so generator checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from mirai_plugin.capture import CapturedHidden, HiddenRecord
from mirai_plugin.checks import Rule, check, check_device_available, check_tensor, parse_device
from mirai_plugin.config import ForesightConfig, check_field_names
from mirai_plugin.distributed import average_gradients, gather_ints, gather_messages, world
from mirai_plugin.errors import MiraiError
from mirai_plugin.files import load_checkpoint, read_safetensors, state_problems
from mirai_plugin.fused import fused_mean_cosine
from mirai_plugin.loss import foresight_loss
from mirai_plugin.predictor import MLP, DiTPredictor, MultiMLP
from mirai_plugin.segmented import GroupedLosses, GroupPlan, groups_of, plan_groups
from mirai_plugin.targets import SegmentLayout, SegmentTargets, materialise_targets, segment_count, segment_layout


@dataclass
class _ReplayBatch:
    """Detached inputs of one foresight forward, kept for projector replay."""

    hidden: Tensor  # (b k n d)
    target: Tensor  # (b k n e) | (b k o n e) | (b k o s e)
    valid: Tensor  # (k o)
    weight: float  # the term's weight when these pairs were made


@dataclass
class _Group:
    """Segments whose losses run in one forward; passed through ``forward`` so a DDP/FSDP
    wrapper sees the call. Targets are either materialised (``target``) or read from the
    encoder's segments (``z`` with ``source``: the fused mean-cosine loss)."""

    hidden: Tensor  # (b r n d)
    valid: Tensor  # (r o)
    tokens_per_frame: int
    checkpoint_blocks: bool = False
    target: Tensor | None = None  # (b r ...)
    z: Tensor | None = None  # (b K n e)
    source: Tensor | None = None  # (r o)


class ForesightHead(nn.Module):
    """Predictor + projection that turn captured student states into the foresight term.

    Args:
        config: a ``ForesightConfig``.
        student_dim: width of the captured generator hidden states (Wan-1.3B: 1536).
        encoder_dim: width of the encoder hidden states (Wan-14B: 5120).

    Example:
        >>> import torch
        >>> from mirai_plugin import ForesightConfig, ForesightHead
        >>> cfg = ForesightConfig(num_heads=2, segment_frames=1, predictor_depth=1)
        >>> head = ForesightHead(cfg, student_dim=16, encoder_dim=24)
        >>> hidden = [torch.randn(1, 4, 16, requires_grad=True) for _ in range(3)]  # 3 segments, 4 tokens
        >>> z = torch.randn(1, 12, 24)                                              # encoder view, 3 frames
        >>> loss = head(hidden, z)
        >>> loss.shape, bool(-0.2 <= loss <= 0.2)
        (torch.Size([]), True)
    """

    def __init__(self, config: ForesightConfig, student_dim: int, encoder_dim: int) -> None:
        super().__init__()
        if not isinstance(config, ForesightConfig):
            raise MiraiError(f"config must be a ForesightConfig, got {type(config).__name__}")
        for name, value in (("student_dim", student_dim), ("encoder_dim", encoder_dim)):
            check(name, value, Rule("int", minimum=1, what="a positive int (a hidden-state width)"))
        self.config = config
        self.student_dim = student_dim
        self.encoder_dim = encoder_dim

        ffn_dim = max(1, int(round(student_dim * config.ffn_ratio)))
        if config.predictor == "dit":
            num_heads = config.num_heads or max(1, student_dim // 128)
            if student_dim % num_heads:
                raise MiraiError(
                    f"student width {student_dim} is not divisible by num_heads={num_heads}; "
                    f"set ForesightConfig(num_heads=...) to a divisor (the generator's own head count)"
                )
            self.predictor = DiTPredictor(
                student_dim,
                depth=config.predictor_depth,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                offset_conditioning=config.offset_conditioning,
                max_offset=config.max_offset,
            )
        elif config.predictor == "mlp":
            self.predictor = MLP(student_dim, ffn_dim)
        else:
            self.predictor = MultiMLP(student_dim, ffn_dim, config.offsets)
        # Bias-free projection to the encoder width, only when the widths differ.
        self.project = nn.Linear(student_dim, encoder_dim, bias=False) if student_dim != encoder_dim else None

        # Plain attributes, not modules or buffers: they never enter state_dict().
        self._per_offset = config.predictor == "multi_mlp" or config.offset_conditioning
        self._fused = config.fusion == "mean" and config.loss == "cosine"
        self._replay: list[_ReplayBatch] = []
        self._replay_closed = False
        self._replay_generator: torch.Generator | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._strategy = "replicate"  # see mirai_plugin.distributed.shard_head
        self._wrapper_ref: tuple[nn.Module, ...] = ()  # DDP/FSDP1 wrapper, held outside the module tree
        self.steps_taken = 0  # head.step() calls: the position in the weight schedule

    # ------------------------------------------------------------- schedule

    @property
    def weight(self) -> float:
        """The term's weight at the current step (``config.weight_at(steps_taken)``)."""
        return self.config.weight_at(self.steps_taken)

    @property
    def active(self) -> bool:
        """Whether the term counts at this step; when not, skip the encoder (the head returns 0)."""
        return self.weight > 0

    @property
    def _wrapper(self) -> nn.Module | None:
        return self._wrapper_ref[0] if self._wrapper_ref else None

    # ------------------------------------------------------------- the term

    def forward(
        self,
        captured: CapturedHidden | Sequence[HiddenRecord] | Sequence[Tensor],
        encoder_hidden: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The weighted foresight term for one rollout (see ``term`` for the arguments).

        Under a DDP/FSDP1 wrapper (``shard_head``) every predictor call goes through the
        wrapper, so parameters are gathered and gradients synchronised as the wrapper does.
        """
        if isinstance(captured, _Group):  # a group of segments, called through the wrapper
            return self._group_losses(captured)
        if not self.active:
            return self._inactive(captured, kwargs.get("return_breakdown", False))
        return self.term(captured, encoder_hidden, **kwargs)

    def term(
        self,
        captured: CapturedHidden | Sequence[HiddenRecord] | Sequence[Tensor],
        encoder_hidden: Tensor,
        *,
        tokens_per_frame: int | None = None,
        prefix_frames: int = 0,
        return_breakdown: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The weighted foresight term for one rollout; call the head, not this method.

        Args:
            captured: what ``capture_hidden`` yielded (cleared after reading), or a list
                of ``(b n d)`` tensors, one per segment in video order.
            encoder_hidden: ``(b t e)`` from ``FrozenEncoder`` on the detached rollout.
            tokens_per_frame: ``s``; by default each captured call is taken to cover
                one segment, so ``s = n / segment_frames``.
            prefix_frames: leading encoder frames outside any segment (i2v context).
            return_breakdown: also return a dict with the unweighted loss, the
                supervised segment indices and the per-segment (or per-pair) losses.

        Returns:
            ``weight * loss`` as a 0-dim float32 tensor (and the breakdown), with
            ``weight`` the schedule's value at this step (``head.weight``).
        """
        records, capture = _as_records(captured)
        cfg = self.config
        if encoder_hidden is None:
            raise MiraiError("the head needs the encoder hidden states: head(captured, encoder(video.detach(), ...))")
        if not records:
            raise MiraiError(_nothing_captured_message(capture))
        _check_term_inputs(self, records, encoder_hidden, tokens_per_frame, prefix_frames)

        segment_tokens_first = records[0].hidden.shape[1] if records[0].hidden.dim() == 3 else -1
        s = tokens_per_frame or _infer_tokens_per_frame(segment_tokens_first, cfg.segment_frames)
        seg_tokens = cfg.segment_frames * s
        hidden, segments = self._segments_from_records(records, seg_tokens, s, prefix_frames)
        if capture is not None:
            capture.clear()

        if encoder_hidden.dim() != 3 or encoder_hidden.shape[-1] != self.encoder_dim:
            raise MiraiError(
                f"encoder hidden has shape {tuple(encoder_hidden.shape)}; expected (batch, tokens, {self.encoder_dim}) "
                f"— the head was built with encoder_dim={self.encoder_dim}"
            )
        if encoder_hidden.shape[0] != hidden[0].shape[0]:
            raise MiraiError(
                f"batch mismatch: captured hidden has batch {hidden[0].shape[0]}, "
                f"encoder hidden {encoder_hidden.shape[0]}"
            )
        num_segments = segment_count(
            encoder_hidden.shape[1], segment_frames=cfg.segment_frames, tokens_per_frame=s, prefix_frames=prefix_frames
        )
        if max(segments) >= num_segments:
            raise MiraiError(
                f"captured segments {segments} but the encoder saw only {num_segments} segments; "
                f"run the encoder on the whole rollout the generator produced"
            )

        layout = segment_layout(
            encoder_hidden,
            segment_frames=cfg.segment_frames,
            tokens_per_frame=s,
            offsets=cfg.offsets,
            segments=segments,
            prefix_frames=prefix_frames,
        )
        if layout.segments.numel() == 0:
            raise MiraiError(
                f"no captured segment has a target: captured {segments}, encoder has {num_segments} segments "
                f"and offsets {cfg.offsets} all point past the end"
            )
        supervised = set(layout.segments.tolist())
        hidden = [h for h, segment in zip(hidden, segments) if segment in supervised]  # k x (b n d)

        # The official recipe's loss reads each segment's target from the encoder output (fused.py);
        # the other losses get materialised targets.
        targets = None if self._fused else materialise_targets(
            layout, fusion=cfg.fusion, segment_frames=cfg.segment_frames, tokens_per_frame=s)
        b, n = hidden[0].shape[0], hidden[0].shape[1]
        plan = self.plan(len(hidden), batch=b, tokens=n)

        def run(rows: range, group_hidden: Sequence[Tensor]) -> Tensor:
            item = _Group(
                torch.stack(list(group_hidden), dim=1), layout.valid[rows.start : rows.stop], s,  # (b r n d)
                checkpoint_blocks=plan.checkpoint_blocks,
                target=None if targets is None else targets.target[:, rows.start : rows.stop],
                z=layout.z if targets is None else None,
                source=layout.source[rows.start : rows.stop] if targets is None else None,
            )
            return self._through_wrapper(item)  # (r) | (r o)

        groups = groups_of(len(hidden), plan.size)
        if plan.recompute and torch.is_grad_enabled():
            anchor = torch.zeros((), requires_grad=True)
            per_item = GroupedLosses.apply(run, groups, anchor, *hidden)  # (k) | (k o)
        else:
            per_item = torch.cat([run(rows, hidden[rows.start : rows.stop]) for rows in groups])  # (k) | (k o)
        loss = per_item.mean() if cfg.fusion == "mean" else per_item[layout.valid].mean()
        if cfg.check_finite:
            self._check_finite(loss, hidden, layout, per_item)

        weight = self.weight
        if cfg.replay and self.training and torch.is_grad_enabled():
            self._cache_for_replay(hidden, layout, s, weight)

        weighted = loss * weight
        if not return_breakdown:
            return weighted
        return weighted, {
            "foresight_loss": weighted.detach(),
            "foresight_loss_unweighted": loss.detach(),
            "segments": layout.segments.tolist(),
            "per_segment": per_item.detach(),
        }

    def plan(self, segments: int, *, batch: int, tokens: int) -> GroupPlan:
        """How ``segments`` segments of ``batch`` x ``tokens`` go through the predictor under
        ``config.activation_budget_mib``: all in one pass when they fit, else in groups
        recomputed in the backward (see ``mirai_plugin.segmented``)."""
        budget = self.config.activation_budget_mib
        budget_bytes = None if budget is None else int(budget * 2**20)
        return plan_groups(segments, self.segment_bytes(batch, tokens),
                           self.segment_bytes(batch, tokens, checkpoint_blocks=True), budget_bytes)

    def segment_bytes(self, batch: int, tokens: int, *, checkpoint_blocks: bool = False) -> int:
        """What one segment keeps alive in its backward: the predictor's saved activations,
        the projection's input, the prediction and its gradient."""
        itemsize = self.compute_dtype.itemsize
        rows_tokens = batch * tokens
        saved = self.predictor.saved_bytes(rows_tokens, itemsize, checkpoint_blocks=checkpoint_blocks)
        if self.project is not None:
            saved += rows_tokens * self.student_dim * itemsize
        return saved + 2 * rows_tokens * self.encoder_dim * itemsize

    @property
    def compute_dtype(self) -> torch.dtype:
        """The predictor's compute dtype: bfloat16 under ``config.compute_dtype="bfloat16"``
        (autocast over float32 weights), else the parameters' dtype."""
        if self.config.compute_dtype == "bfloat16":
            return torch.bfloat16
        return next(self.parameters()).dtype

    def _inactive(self, captured: Any, return_breakdown: bool) -> Tensor | tuple[Tensor, dict[str, Any]]:
        # Off by the schedule: nothing runs, the graph references are dropped.
        if isinstance(captured, CapturedHidden):
            captured.clear()
        device = next(self.parameters()).device
        zero = torch.zeros((), device=device)
        if not return_breakdown:
            return zero
        return zero, {"foresight_loss": zero, "foresight_loss_unweighted": zero, "segments": [], "per_segment": zero[None][:0]}

    def predict(self, hidden: Tensor, offset: int | None = None, *, checkpoint_blocks: bool = False) -> Tensor:
        """Predictor then projection: ``(B n d)`` -> ``(B n e)``; each row is one segment."""
        check_tensor("hidden", hidden, dims=3, layout=f"(rows, tokens, {self.student_dim})")
        dtype = self.compute_dtype
        if dtype == next(self.parameters()).dtype:
            x = self.predictor(hidden.to(dtype), offset, checkpoint_blocks=checkpoint_blocks)  # (B n d)
            return self.project(x) if self.project is not None else x  # (B n e)
        with torch.autocast(hidden.device.type, dtype=dtype):  # bfloat16 compute, float32 weights
            x = self.predictor(hidden.to(dtype), offset, checkpoint_blocks=checkpoint_blocks)  # (B n d)
            return self.project(x) if self.project is not None else x  # (B n e)

    def _group_losses(self, group: _Group) -> Tensor:
        """Per-segment ``(r)`` or per-pair ``(r o)`` losses of one group."""
        if group.z is not None:  # fused mean-cosine: targets read from the encoder's segments
            b, r, n, _ = group.hidden.shape
            rows = rearrange(group.hidden, "b r n d -> (b r) n d")
            pred = self.predict(rows, checkpoint_blocks=group.checkpoint_blocks).view(b, r, n, -1)  # (b r n e)
            return fused_mean_cosine(pred, group.z, group.source, group.valid)  # (r)
        targets = SegmentTargets(group.target, group.valid, torch.arange(group.valid.shape[0]), self.config.offsets)
        return self._losses(group.hidden, targets, group.tokens_per_frame, group.checkpoint_blocks)

    def _losses(self, hidden: Tensor, targets: SegmentTargets, s: int, checkpoint_blocks: bool = False) -> Tensor:
        cfg = self.config
        b, k, n, _ = hidden.shape
        rows = rearrange(hidden, "b k n d -> (b k) n d")
        if cfg.fusion == "mean":
            pred = self.predict(rows, checkpoint_blocks=checkpoint_blocks).view(b, k, n, -1)  # (b k n e)
            return foresight_loss(pred, targets.target, kind=cfg.loss, keep_dims=(1,))  # (k)

        if not self._per_offset:
            pred = self.predict(rows, checkpoint_blocks=checkpoint_blocks).view(b, k, 1, n, -1)  # (b k 1 n e)
            return self._pair_loss(pred, targets.target, s)  # (k o)

        columns = []
        for o, offset in enumerate(cfg.offsets):
            valid = targets.valid[:, o].to(hidden.device)
            column = torch.zeros(k, device=hidden.device)
            if bool(valid.any()):
                pred = self.predict(rearrange(hidden[:, valid], "b k n d -> (b k) n d"), offset,
                                    checkpoint_blocks=checkpoint_blocks)
                pred = pred.view(b, -1, 1, n, pred.shape[-1])  # (b k' 1 n e)
                losses = self._pair_loss(pred, targets.target[:, valid, o : o + 1], s)[:, 0]  # (k')
                column = column.index_put((valid.nonzero()[:, 0],), losses)
            columns.append(column)
        return torch.stack(columns, dim=1)  # (k o)

    def _pair_loss(self, pred: Tensor, target: Tensor, s: int) -> Tensor:
        """``(b k 1 n e)`` against ``(b k o n e)`` or ``(b k o s e)`` -> ``(k o)``."""
        if self.config.fusion == "frame_mean":
            pred = pred.unflatten(3, (-1, s))  # (b k 1 f s e)
            target = target.unsqueeze(3)  # (b k o 1 s e): one frame-averaged target for every frame
        return foresight_loss(pred, target, kind=self.config.loss, keep_dims=(1, 2))

    def _segments_from_records(
        self, records: list[HiddenRecord], seg_tokens: int, s: int, prefix_frames: int
    ) -> tuple[list[Tensor], list[int]]:
        """Split records into segments: one ``(b n d)`` view per segment in record order, and its index."""
        chunks, segments = [], []
        next_segment = 0
        for record in records:
            h = record.hidden
            if h._version != record.version:
                raise MiraiError(
                    "a captured hidden state was modified in place after capture; "
                    "use capture_hidden(..., clone=True) for this model"
                )
            if h.dim() != 3 or h.shape[-1] != self.student_dim:
                raise MiraiError(
                    f"captured hidden has shape {tuple(h.shape)}; expected (batch, tokens, {self.student_dim}) "
                    f"— the head was built with student_dim={self.student_dim}; check student_layer and the width"
                )
            if h.shape[1] % seg_tokens:
                raise MiraiError(
                    f"captured {h.shape[1]} tokens, not a whole number of segments of {seg_tokens} tokens "
                    f"({self.config.segment_frames} frames x {s} tokens); check segment_frames and tokens_per_frame"
                )
            if record.position is None:
                first = next_segment
            else:
                if record.position % s:
                    raise MiraiError(f"call position {record.position} is not at a frame boundary of {s} tokens")
                frame = record.position // s - prefix_frames
                if frame < 0 or frame % self.config.segment_frames:
                    raise MiraiError(
                        f"call position {record.position} (frame {frame}) does not start a segment of "
                        f"{self.config.segment_frames} frames; check segment_frames and prefix_frames"
                    )
                first = frame // self.config.segment_frames
            count = h.shape[1] // seg_tokens
            chunks.extend(h.split(seg_tokens, dim=1))  # count x (b n d), views
            segments.extend(range(first, first + count))
            next_segment = first + count
        if len(set(segments)) != len(segments):
            raise MiraiError(f"segments captured twice: {segments}; capture one grad-enabled call per segment")
        if len({c.shape[0] for c in chunks}) != 1:
            raise MiraiError(f"captured hidden states disagree on batch size: {[tuple(c.shape) for c in chunks]}")
        return chunks, segments

    def _check_finite(self, loss: Tensor, hidden: list[Tensor], layout: SegmentLayout, per_item: Tensor) -> None:
        """Raise on NaN/inf, naming the segments; with several ranks every rank raises together
        (naming the rank), so none is left waiting in a collective."""
        problem = None if bool(torch.isfinite(loss)) else self._diagnose_nonfinite(hidden, layout, per_item)
        rank, world_size = world()
        if world_size == 1:
            if problem is not None:
                raise MiraiError(f"foresight loss is not finite: {problem}")
            return
        if not bool(gather_ints([problem is not None], loss.device).any()):
            return
        reports = [f"rank {r}: {m}" for r, m in enumerate(gather_messages(problem)) if m is not None]
        raise MiraiError(f"foresight loss is not finite on {len(reports)} of {world_size} ranks — " + "; ".join(reports))

    def _diagnose_nonfinite(self, hidden: list[Tensor], layout: SegmentLayout, per_item: Tensor) -> str:
        segs = layout.segments.tolist()
        finite_z = torch.isfinite(layout.z).flatten(2).all(dim=2).all(dim=0)  # (K)
        bad_target = [segs[i] for i in range(len(segs)) if not bool(finite_z[layout.source[i][layout.valid[i]]].all())]
        bad_hidden = [segs[i] for i in range(len(segs)) if not bool(torch.isfinite(hidden[i]).all())]
        if bad_target:
            return f"encoder targets contain NaN/inf at segments {bad_target}"
        if bad_hidden:
            return f"captured generator hidden states contain NaN/inf at segments {bad_hidden}"
        return (
            f"the predictor output is NaN/inf (per-segment losses {per_item.detach().tolist()}); "
            f"lower lr, check max_grad_norm, or the head's dtype"
        )

    # --------------------------------------------------------------- replay

    def _cache_for_replay(self, hidden: list[Tensor], layout: SegmentLayout, s: int, weight: float) -> None:
        """Copy the step's pairs to ``replay_device`` one segment at a time (no full-size copy where
        they were computed)."""
        if self._replay_closed:
            self._replay.clear()
            self._replay_closed = False
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
        self._replay.append(_ReplayBatch(cached_hidden, cached_target, layout.valid.detach().cpu(), weight))

    @property
    def replay_pairs(self) -> int:
        """Number of cached (hidden, target) pairs: segments, or valid segment/offset pairs."""
        return sum(self._pairs_in(batch, range(batch.valid.shape[0])) for batch in self._replay)

    def _pairs_in(self, batch: _ReplayBatch, segments: Sequence[int] | Tensor) -> int:
        if self.config.fusion == "mean":
            return len(segments)
        return int(batch.valid[torch.as_tensor(segments, dtype=torch.long)].sum())

    def clear_replay(self) -> None:
        """Drop the cached replay pairs."""
        self._replay.clear()
        self._replay_closed = False

    def replay(self, *, step: bool = True) -> Tensor | None:
        """Projector-only update on the pairs of the last generator step (critic steps).

        ``config.replay_segments`` segments go through each backward (``None``: as many as
        ``config.activation_budget_mib`` allows; 1: one backward per segment, as the official
        trainer does), weighted so the summed gradient is ``weight * mean over pairs`` either way;
        ``config.replay_max_pairs`` replays a random subset. With several ranks each
        replays its own pairs and the update uses the mean over all ranks' pairs (every
        rank must call ``replay``, also one with nothing cached).
        With ``step`` the head's optimizer is zeroed before, then clipped and stepped.

        Returns:
            this rank's weighted replay loss (detached), or ``None`` when nothing is cached.
        """
        device = next(self.parameters()).device
        groups, checkpoint_blocks = self._replay_groups()  # [[(batch, segment)...]] in backward order
        local_pairs = sum(self._pairs_in(self._replay[b], [i]) for group in groups for b, i in group)
        rank, world_size = world()
        total_pairs = local_pairs
        if world_size > 1:
            counts = gather_ints([local_pairs, len(groups)], device)  # (world 2)
            total_pairs = int(counts[:, 0].sum())
            if total_pairs and self._strategy != "replicate" and bool((counts[:, 1] != counts[0, 1]).any()):
                self._replay_closed = True
                raise MiraiError(
                    f"replay needs the same number of backwards on every rank under {self._strategy!r}, got "
                    f"{counts[:, 1].tolist()}: give every rank the same number of segments per step (or set "
                    f"replay_max_pairs to at most that number), or use the replicated head"
                )
        if total_pairs == 0:
            self._replay_closed = True
            return None

        if step:
            self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for units in groups:
            group, row_weight = self._replay_group(units, device, checkpoint_blocks)
            per_item = self._through_wrapper(group)  # (rows) | (rows o)
            if self.config.fusion != "mean":
                per_item = torch.where(group.valid, per_item, 0.0)
                row_weight = row_weight[:, None]
            weighted_sum = (per_item * row_weight).sum()
            # Replicated / DDP gradients are averaged over ranks afterwards, hence world_size.
            (weighted_sum * (world_size / total_pairs)).backward()
            total = total + weighted_sum.detach()
        if step:
            self._clip_and_step()
        self._replay_closed = True
        return total / local_pairs if local_pairs else None

    def _replay_groups(self) -> tuple[list[list[tuple[int, int]]], bool]:
        """The cached segments to replay, as ``(batch, segment)`` units in groups (of
        ``replay_segments``, or planned from the budget), and whether the predictor blocks are
        checkpointed. Grouping ignores micro-step boundaries, so every rank with as many units
        runs as many backwards (DDP/FSDP need that)."""
        units = [(b, i) for b, batch in enumerate(self._replay) for i in range(batch.valid.shape[0])]
        cap = self.config.replay_max_pairs
        if cap is not None and len(units) > cap:
            pick = torch.randperm(len(units), generator=self._replay_rng())[:cap].sort().values
            units = [units[j] for j in pick.tolist()]
        if not units:
            return [], False
        # Replay rows are one (video, segment) each.
        plan = self.plan(len(units), batch=1, tokens=self._replay[units[0][0]].hidden.shape[2])
        size = self.config.replay_segments or plan.size
        return [units[j : j + size] for j in range(0, len(units), size)], plan.checkpoint_blocks

    def _replay_group(self, units: list[tuple[int, int]], device: torch.device,
                      checkpoint_blocks: bool) -> tuple[_Group, Tensor]:
        """The group of cached pairs and each row's weight (weight / videos in its micro-batch)."""
        # One row per (video, segment): micro-steps may differ in batch size. Each row is
        # weighted weight / b so a segment's pair still averages over its videos.
        hidden, target, valid, row_weight = [], [], [], []
        for b, i in units:
            batch = self._replay[b]
            videos = batch.hidden.shape[0]
            hidden.append(batch.hidden[:, i])  # (b n d)
            target.append(batch.target[:, i])  # (b ...)
            valid.append(batch.valid[i].expand(videos, -1))  # (b o)
            row_weight.append(torch.full((videos,), batch.weight / videos))
        first = self._replay[units[0][0]]
        hidden_rows = torch.cat(hidden)[None].to(device)  # (1 rows n d)
        target_rows = torch.cat(target)[None].to(device)  # (1 rows ...)
        valid_rows = torch.cat(valid).to(device)  # (rows o)
        s = first.hidden.shape[2] // self.config.segment_frames
        if self._fused:  # the fused loss over already-fused targets: each row is its own source
            rows = valid_rows.shape[0]
            group = _Group(hidden_rows, torch.ones(rows, 1, dtype=torch.bool, device=device), s,
                           checkpoint_blocks=checkpoint_blocks, z=target_rows,
                           source=torch.arange(rows, device=device)[:, None])
        else:
            group = _Group(hidden_rows, valid_rows, s, checkpoint_blocks=checkpoint_blocks, target=target_rows)
        return group, torch.cat(row_weight).to(device)  # (rows)

    def _through_wrapper(self, item: _Group) -> Tensor:
        return (self._wrapper or self)(item)

    def _replay_rng(self) -> torch.Generator:
        if self._replay_generator is None:
            self._replay_generator = torch.Generator().manual_seed(self.config.replay_seed + world()[0])
        return self._replay_generator

    # ------------------------------------------------------------ optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The head's own AdamW (``config.lr``, ``betas``, ``weight_decay``), made on first use
        over the parameters of the head (or of its FSDP1 wrapper)."""
        if self._optimizer is None:
            cfg = self.config
            params = (self._wrapper or self).parameters()
            self._optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return self._optimizer

    def step(self) -> Tensor | None:
        """After the generator's backward: clip, step and zero the head's optimizer.

        Advances the weight schedule by one step and marks the replay cache complete:
        the next forward starts a new one. Returns the gradient norm before clipping
        (``None`` without clipping).
        """
        norm = self._clip_and_step()
        self.steps_taken += 1
        self._replay_closed = True
        return norm

    def _clip_and_step(self) -> Tensor | None:
        params = [p for p in (self._wrapper or self).parameters() if p.requires_grad]
        if self._strategy == "replicate":
            average_gradients(params)
        norm = None
        if self.config.max_grad_norm is not None:
            if self._strategy == "fsdp":
                norm = self._wrapper.clip_grad_norm_(self.config.max_grad_norm)  # global norm over shards
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """For gradient-accumulation micro-steps before the last: skip the gradient
        synchronisation of a DDP/FSDP head (a replicated head averages only in ``step``)."""
        if self._strategy in ("ddp", "fsdp"):
            with self._wrapper.no_sync():
                yield
        elif self._strategy == "fsdp2":
            self.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.set_requires_gradient_sync(True)
        else:
            yield

    # ------------------------------------------------------ training state

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume the head exactly: weights, optimizer state, the
        schedule position and every rank's replay-sampling RNG.

        Weights and optimizer state are full (unsharded, CPU) under every strategy, so a
        state written under FSDP loads into a replicated head and back. With a process
        group this is a collective (call it on every rank); rank 0 always receives the
        tensors (on GPUs only rank 0 does), so save rank 0's dict. The replay cache is
        not included: resume at a generator step.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        module = self._wrapper if self._strategy == "fsdp" else self  # DDP: the inner head (no "module." keys)
        # Offloading gathers to rank 0's CPU; for a head already on the CPU, FSDP1's offload
        # frees the storage it is reading from, so CPU heads gather in place on every rank.
        on_accelerator = next(self.parameters()).device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=world()[1] > 1 and on_accelerator)
        head_state = _to_cpu(get_model_state_dict(module, options=options))
        # An optimizer that has not stepped has no state; reading it through
        # get_optimizer_state_dict would take a zero step and change its step count.
        stepped = self._optimizer is not None and bool(self._optimizer.state)
        optimizer_state = _to_cpu(get_optimizer_state_dict(module, self._optimizer, options=options)) if stepped else None
        return {
            "format": "mirai_plugin.ForesightHead.training_state",
            "head": head_state,
            "optimizer": optimizer_state,
            "steps_taken": self.steps_taken,
            "replay_rng": self._gather_rng_states(),
            "config": self.config.to_dict(),
            "student_dim": self.student_dim,
            "encoder_dim": self.encoder_dim,
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Resume from ``training_state()``. With a process group call it on every rank;
        rank 0's dict is used (other ranks may pass ``{}``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        rank, world_size = world()
        device = next(self.parameters()).device
        if rank == 0:
            _check_training_state(self, state)  # before anything is loaded: a bad state changes nothing
        # Rank 0 decides; the others follow (they may hold an empty dict).
        header = [int(state.get("optimizer") is not None), int(state.get("steps_taken", 0))] if rank == 0 else [0, 0]
        header_t = torch.tensor(header, dtype=torch.int64, device=device)
        if world_size > 1:
            dist.broadcast(header_t, src=0)
        has_optimizer, steps_taken = header_t.tolist()

        module = self._wrapper if self._strategy == "fsdp" else self  # DDP: the inner head (no "module." keys)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size > 1)
        # The loaders write sharded tensors back into the dicts they are given: hand them copies.
        set_model_state_dict(module, _copy_containers(state.get("head", {})), options=options)
        if has_optimizer:
            optimizer_state = _copy_containers(state.get("optimizer", {}))
            set_optimizer_state_dict(module, self.optimizer, optimizer_state, options=options)
        self.steps_taken = steps_taken
        self._load_rng_states(state.get("replay_rng") if rank == 0 else None, device)
        self._replay.clear()
        self._replay_closed = False

    def _gather_rng_states(self) -> Tensor:
        local = self._replay_rng().get_state()  # uint8 (S)
        rank, world_size = world()
        if world_size == 1:
            return local[None].clone()
        device = next(self.parameters()).device  # NCCL gathers device tensors
        out = [torch.empty_like(local, device=device) for _ in range(world_size)]
        dist.all_gather(out, local.to(device))
        return torch.stack(out).cpu()  # (world S)

    def _load_rng_states(self, states: Tensor | None, device: torch.device) -> None:
        rank, world_size = world()
        size = self._replay_rng().get_state().numel()
        count = torch.tensor([states.shape[0] if states is not None else 0], device=device)
        if world_size > 1:
            dist.broadcast(count, src=0)
        saved_ranks = int(count.item())
        if saved_ranks != world_size:
            if rank == 0 and saved_ranks:
                warnings.warn(
                    f"training state has replay RNG states of {saved_ranks} ranks, this run has {world_size}: "
                    f"replay sampling restarts from replay_seed (only replay_max_pairs sampling is affected)",
                    stacklevel=3,
                )
            self._replay_generator = None
            return
        rows = states.to(device) if states is not None else torch.empty(world_size, size, dtype=torch.uint8, device=device)
        if world_size > 1:
            dist.broadcast(rows, src=0)
        self._replay_rng().set_state(rows[rank].cpu().clone())  # its own storage: set_state reads from offset 0

    # ------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike) -> None:
        """Write the head's weights and settings to a ``.safetensors`` file."""
        from safetensors.torch import save_file

        if not isinstance(path, (str, os.PathLike)):
            raise MiraiError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata=self._metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ForesightHead:
        """Rebuild a head written by ``save`` (settings included)."""
        device = parse_device("device", device)
        check_device_available("device", device)
        tensors, meta = read_safetensors(path, what="ForesightHead.load:")  # one error naming the file
        name = os.fspath(path)
        if "config" not in meta:
            raise MiraiError(f"{name} was not written by ForesightHead.save (no config in its metadata)")
        try:
            config = ForesightConfig.from_json(meta["config"])
            dims = int(meta["student_dim"]), int(meta["encoder_dim"])
        except (MiraiError, KeyError, ValueError) as error:
            raise MiraiError(f"{name}: its metadata is not what ForesightHead.save writes ({error})") from None
        head = cls(config, *dims)
        problems = state_problems(head.state_dict(), tensors)
        if problems:
            raise MiraiError(f"{name} does not fit the head its metadata describes: {problems}")
        head.load_state_dict(tensors, strict=True)
        return head.to(device)

    def _metadata(self) -> dict[str, str]:
        from mirai_plugin import __version__

        return {
            "format": "mirai_plugin.ForesightHead",
            "version": __version__,
            "config": self.config.to_json(),
            "student_dim": str(self.student_dim),
            "encoder_dim": str(self.encoder_dim),
        }

    @classmethod
    def load_official(
        cls,
        source: str | os.PathLike | Mapping[str, Any],
        *,
        config: ForesightConfig | None = None,
        dim_proj: Mapping[str, Tensor] | None = None,
    ) -> ForesightHead:
        """Build a head from the projector written by the official Video-Mirai trainer.

        ``source`` is the official checkpoint (a path to its ``model.pt`` or the loaded
        dict with ``"mirai_projector"`` and ``"foresight_dim_proj"``), or the projector
        state dict itself (then pass the projection's as ``dim_proj``). Depth, width,
        heads and FFN width are read from the tensors; ``config`` supplies the rest
        (default: the official recipe) and must agree with them.

        Example:
            >>> head = ForesightHead.load_official("checkpoint_model_000100/model.pt")  # doctest: +SKIP
        """
        from mirai_plugin.official import official_to_head_state

        where = "load_official"
        if isinstance(source, (str, os.PathLike)):
            where = os.fspath(source)
            source = load_checkpoint(source, what="official checkpoint")
        if not isinstance(source, Mapping):
            raise MiraiError(
                f"load_official needs a checkpoint path or a state dict, got {type(source).__name__}"
                + (f" (read from {where})" if where != "load_official" else "")
            )
        if config is not None and not isinstance(config, ForesightConfig):
            raise MiraiError(f"config must be a ForesightConfig or None, got {type(config).__name__}")
        if "mirai_projector" in source:
            projector_sd, dim_proj = source["mirai_projector"], source.get("foresight_dim_proj", dim_proj)
        else:
            projector_sd = source
        try:
            config, student_dim, encoder_dim, state = official_to_head_state(projector_sd, dim_proj, config)
        except MiraiError as error:
            raise MiraiError(f"{where}: {error}") from None  # the same error, naming the file
        head = cls(config, student_dim, encoder_dim)
        expected = head.state_dict()
        problems = state_problems(expected, state)
        if problems:
            raise MiraiError(f"{where}: official projector does not fit the head: {problems}")
        head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
        return head

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"student_dim={self.student_dim}, encoder_dim={self.encoder_dim}, predictor={cfg.predictor!r}, "
            f"offsets={cfg.offsets}, fusion={cfg.fusion!r}, weight={cfg.weight}"
        )


def _to_cpu(value: Any) -> Any:
    """Plain CPU tensors all the way down (FSDP2 may hand back DTensors)."""
    if isinstance(value, Tensor):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _copy_containers(value: Any) -> Any:
    """New dicts and lists, the same tensors."""
    if isinstance(value, dict):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    return value


def _infer_tokens_per_frame(tokens: int, segment_frames: int) -> int:
    if tokens <= 0 or tokens % segment_frames:
        raise MiraiError(
            f"cannot infer tokens per frame: a captured call has {tokens} tokens, not divisible by "
            f"segment_frames={segment_frames}; pass tokens_per_frame="
        )
    return tokens // segment_frames


def _as_records(captured: Any) -> tuple[list[HiddenRecord], CapturedHidden | None]:
    if isinstance(captured, CapturedHidden):
        return captured.records, captured
    if isinstance(captured, Tensor) or not isinstance(captured, Sequence) or isinstance(captured, (str, bytes)):
        raise MiraiError(
            f"pass captured hidden states as what capture_hidden yielded, or a list of (b n d) tensors, "
            f"got {type(captured).__name__}"
        )
    records = []
    for i, item in enumerate(captured):
        if isinstance(item, HiddenRecord):
            records.append(item)
        elif isinstance(item, Tensor):
            records.append(HiddenRecord(item, None, i, item._version))
        else:
            raise MiraiError(f"captured item {i} is a {type(item).__name__}, expected a tensor or HiddenRecord")
    return records, None


def _nothing_captured_message(capture: CapturedHidden | None) -> str:
    where = f" at {capture.location}" if capture is not None else ""
    skipped = capture.skipped_no_grad if capture is not None else 0
    if skipped:
        return (
            f"nothing captured{where}: the block ran {skipped} times, all with grad disabled — the generator "
            f"ran under torch.no_grad() (e.g. a critic step). Call the head only on generator steps, inside the "
            f"capture_hidden context's rollout with gradients enabled."
        )
    return (
        f"nothing captured{where}: the block was never called inside the capture_hidden context; run the "
        f"generator rollout inside `with capture_hidden(...)` and check student_layer"
    )


def _check_term_inputs(
    head: ForesightHead, records: list[HiddenRecord], encoder_hidden: Any, tokens_per_frame: Any, prefix_frames: Any
) -> None:
    """Types, ranges and devices of ``term``'s inputs, each named."""
    param = next(head.parameters())
    if param.device.type == "meta":
        raise MiraiError(
            "the head's parameters are on the meta device (shapes without values); materialise it first: "
            "head.to_empty(device=...), then load its weights (ForesightHead.load or load_training_state)"
        )
    check_tensor("encoder_hidden", encoder_hidden, layout="(batch, tokens, width)")
    for i, record in enumerate(records):
        check_tensor(f"captured hidden state {i}", record.hidden, layout="(batch, tokens, width)")
    check("tokens_per_frame", tokens_per_frame, Rule("int", minimum=1, none=True, fix="None infers it from the capture"))
    check("prefix_frames", prefix_frames, Rule("int", minimum=0, fix="0 without an image-to-video context frame"))


# Settings that decide the head's parameters (and what they compute).
_ARCHITECTURE = ("predictor", "predictor_depth", "ffn_ratio", "offset_conditioning")


def _check_training_state(head: ForesightHead, state: Any) -> None:
    """``state`` is a training state of a head like this one (checked before anything loads)."""
    if not isinstance(state, Mapping) or state.get("format") != "mirai_plugin.ForesightHead.training_state":
        got = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {sorted(state)[:6]}"
        raise MiraiError(
            f"not a head training state (got {got}): pass what ForesightHead.training_state() returned "
            f"(from a file: torch.load(path, weights_only=True))"
        )
    widths = (state.get("student_dim"), state.get("encoder_dim"))
    if widths != (head.student_dim, head.encoder_dim):
        raise MiraiError(
            f"training state is for widths {widths[0]}->{widths[1]}, this head is {head.student_dim}->"
            f"{head.encoder_dim}; build the head with the widths the state was saved with"
        )
    if not isinstance(state.get("head"), Mapping):
        raise MiraiError(f"training state has no 'head' weights (keys {sorted(state)}); it is incomplete")
    check("training state steps_taken", state.get("steps_taken", 0), Rule("int", minimum=0))
    if isinstance(state.get("config"), Mapping):
        check_field_names(ForesightConfig, state["config"], "training state config")
        saved = ForesightConfig(**state["config"])
        names = list(_ARCHITECTURE)
        if saved.predictor == "multi_mlp" or saved.offset_conditioning:
            names.append("offsets")  # one MLP per offset, or the offset embedder's size
        mine, theirs = head.config, saved
        resolved = [("num_heads", _heads(head, mine), _heads(head, theirs))] if mine.predictor == "dit" else []
        differ = [(n, getattr(mine, n), getattr(theirs, n)) for n in names] + resolved
        differ = [(n, a, b) for n, a, b in differ if a != b]
        if differ:
            raise MiraiError(
                "training state is for a different head: "
                + ", ".join(f"{n}={b!r} (this head: {a!r})" for n, a, b in differ)
                + "; build the head with the saved settings: ForesightConfig(**state['config'])"
            )
    if head._strategy in ("replicate", "ddp"):  # the head's own state_dict has the saved names
        problems = state_problems(head.state_dict(), state["head"])
        if problems:
            raise MiraiError(f"training state does not fit this head: {problems}")


def _heads(head: ForesightHead, config: ForesightConfig) -> int:
    return config.num_heads or max(1, head.student_dim // 128)

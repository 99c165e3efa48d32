"""ForesightHead: the trainable predictor, the foresight term and projector replay.

Legend (docs/design.md): b batch, k supervised segments, o offsets, n tokens per segment,
s tokens per frame, t tokens of the video, d student width, e encoder width.

Data flow of one generator step::

    captured h_k (b n d), attached  ->  records -> segments  ->  predictor -> projection  (b k n e)
    encoder z (b t e), no grad      ->  segment layout (targets)                        y_k
    loss = weight * mean over segments (or valid segment/offset pairs) of foresight_loss

The head is a facade over small parts: ``records`` (captured records -> segments),
``segmented`` (groups of segments under ``config.activation_budget_mib``, recomputed in the
backward), ``group_loss`` (predictor -> loss), ``replay`` (the replay cache), ``optimizer``
(its AdamW and data-parallel wrapper) and ``checkpoint`` (training state and files). It owns
its parameters; nothing is added to the generator, so generator checkpoints are unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin import checkpoint
from mirai_plugin.capture import CapturedHidden, HiddenRecord
from mirai_plugin.checks import Rule, check, check_tensor
from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.group_loss import check_finite, group_losses
from mirai_plugin.official.projector import head_from_official
from mirai_plugin.optimizer import HeadOptimizer
from mirai_plugin.predictor import MLP, DiTPredictor, MultiMLP, build_predictor
from mirai_plugin.records import (
    as_records,
    check_attached,
    check_encoder_hidden,
    check_records,
    infer_tokens_per_frame,
    split_into_segments,
)
from mirai_plugin.replay import ReplayCache
from mirai_plugin.segmented import GroupedLosses, GroupPlan, Recompute, SegmentGroup, groups_of, plan_groups
from mirai_plugin.targets import materialise_targets, segment_layout

Captured = CapturedHidden | Sequence[HiddenRecord] | Sequence[Tensor]


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
        >>> loss.backward()                     # the gradient reaches the captured states
        >>> loss.shape, hidden[0].grad.shape
        (torch.Size([]), torch.Size([1, 4, 16]))
    """

    predictor: DiTPredictor | MLP | MultiMLP
    project: nn.Linear | None

    def __init__(self, config: ForesightConfig, student_dim: int, encoder_dim: int) -> None:
        super().__init__()
        if not isinstance(config, ForesightConfig):
            raise MiraiError(f"config must be a ForesightConfig, got {type(config).__name__}")
        for name, value in (("student_dim", student_dim), ("encoder_dim", encoder_dim)):
            check(name, value, Rule("int", minimum=1, what="a positive int (a hidden-state width)"))
        self.config = config
        self.student_dim = student_dim
        self.encoder_dim = encoder_dim
        self.predictor = build_predictor(config, student_dim)
        # Bias-free projection to the encoder width, only when the widths differ.
        self.project = nn.Linear(student_dim, encoder_dim, bias=False) if student_dim != encoder_dim else None
        # Plain attributes, not modules or buffers: they never enter state_dict().
        self.optimization = HeadOptimizer(self, self._make_optimizer, config.max_grad_norm)
        self.replay_cache = ReplayCache(config)
        self.steps_taken = 0  # head.step() calls: the position in the weight schedule

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    @property
    def weight(self) -> float:
        """The term's weight at the current step (``config.weight_at(steps_taken)``)."""
        return self.config.weight_at(self.steps_taken)

    @property
    def active(self) -> bool:
        """Whether the term counts at this step; when not, skip the encoder (the head returns 0)."""
        return self.weight > 0

    # ------------------------------------------------------------- the term

    def forward(
        self,
        captured: Captured | SegmentGroup,
        encoder_hidden: Tensor | None = None,
        *,
        tokens_per_frame: int | None = None,
        prefix_frames: int = 0,
        return_breakdown: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The weighted foresight term for one rollout.

        Args:
            captured: what ``capture_hidden`` yielded (cleared once the term is built; a call
                that fails a check leaves it for the corrected call), or a list of ``(b n d)``
                tensors, one per segment in video order. With gradients enabled, some of them
                must require grad, else nothing would reach the generator (``MiraiError``).
                (A ``SegmentGroup`` is the head calling itself through its DDP/FSDP wrapper.)
            encoder_hidden: ``(b t e)`` from ``FrozenEncoder`` on the detached rollout.
            tokens_per_frame: ``s``; by default each captured call is taken to cover
                one segment, so ``s = n / segment_frames``.
            prefix_frames: leading encoder frames outside any segment (i2v context).
            return_breakdown: also return a dict with the unweighted loss, the
                supervised segment indices and the per-segment (or per-pair) losses.

        Returns:
            ``weight * loss`` as a 0-dim float32 tensor (and the breakdown), with
            ``weight`` the schedule's value at this step (``head.weight``); 0 when the
            schedule has the term off (nothing runs).
        """
        if isinstance(captured, SegmentGroup):  # one group, called through the wrapper
            return group_losses(captured, self.predict, self.config)
        if not self.active:
            return self._inactive(captured, return_breakdown)
        return self._term(captured, encoder_hidden, tokens_per_frame, prefix_frames, return_breakdown)

    def _term(self, captured: Captured, encoder_hidden: Tensor | None, tokens_per_frame: int | None,
              prefix_frames: int, return_breakdown: bool) -> Tensor | tuple[Tensor, dict[str, Any]]:
        records, capture = as_records(captured)
        cfg = self.config
        if encoder_hidden is None:
            raise MiraiError("the head needs the encoder hidden states: head(captured, encoder(video.detach(), ...))")
        check_records(records, capture, tokens_per_frame=tokens_per_frame, prefix_frames=prefix_frames)
        if next(self.parameters()).device.type == "meta":
            raise MiraiError(
                "the head's parameters are on the meta device (shapes without values); materialise it first: "
                "head.to_empty(device=...), then load its weights (ForesightHead.load or load_training_state)"
            )
        check_tensor("encoder_hidden", encoder_hidden, layout="(batch, tokens, width)")
        s = tokens_per_frame or infer_tokens_per_frame(records, cfg.segment_frames)
        hidden, segments = split_into_segments(records, width=self.student_dim, segment_frames=cfg.segment_frames,
                                               tokens_per_frame=s, prefix_frames=prefix_frames)
        num_segments = check_encoder_hidden(encoder_hidden, hidden, segments, width=self.encoder_dim,
                                            segment_frames=cfg.segment_frames, tokens_per_frame=s,
                                            prefix_frames=prefix_frames)
        layout = segment_layout(encoder_hidden, segment_frames=cfg.segment_frames, tokens_per_frame=s,
                                offsets=cfg.offsets, segments=segments, prefix_frames=prefix_frames)
        if layout.segments.numel() == 0:
            raise MiraiError(
                f"no captured segment has a target: captured {segments}, encoder has {num_segments} segments "
                f"and offsets {cfg.offsets} all point past the end"
            )
        supervised = set(layout.segments.tolist())
        hidden = [h for h, segment in zip(hidden, segments) if segment in supervised]  # k x (b n d)
        if torch.is_grad_enabled():
            check_attached(hidden, capture)

        # The recipe's loss (mean fusion, cosine) reads each segment's target from the encoder
        # output (mean_target_cosine); the other losses get materialised targets.
        mean_targets = self._mean_targets
        targets = None if mean_targets else materialise_targets(
            layout, fusion=cfg.fusion, segment_frames=cfg.segment_frames, tokens_per_frame=s)
        plan = self.plan(len(hidden), batch=hidden[0].shape[0], tokens=hidden[0].shape[1])

        def run(rows: range, group_hidden: Sequence[Tensor]) -> Tensor:
            group = SegmentGroup(
                torch.stack(list(group_hidden), dim=1), layout.valid[rows.start : rows.stop], s,  # (b r n d)
                checkpoint_blocks=plan.checkpoint_blocks,
                target=None if targets is None else targets.target[:, rows.start : rows.stop],
                z=layout.z if targets is None else None,
                source=layout.source[rows.start : rows.stop] if targets is None else None,
            )
            return self.optimization.call(group)  # (r) | (r o)

        groups = groups_of(len(hidden), plan.size)
        if plan.recompute and torch.is_grad_enabled():
            optimization = self.optimization
            params = optimization.trainable()
            how = Recompute(len(hidden), cfg.activation_budget_mib, sharded=optimization.sharded,
                            stand_in=lambda aliases: optimization.standing_in(params, aliases))
            # FSDP accumulates a sharded head's gradients in its own hooks: the node gets an anchor instead.
            inputs = [torch.zeros((), requires_grad=True)] if how.sharded else params
            per_item = GroupedLosses.apply(run, groups, how, *hidden, *inputs)  # (k) | (k o)
        else:
            per_item = torch.cat([run(rows, hidden[rows.start : rows.stop]) for rows in groups])  # (k) | (k o)
        loss = per_item.mean() if cfg.fusion == "mean" else per_item[layout.valid].mean()
        if cfg.check_finite:
            check_finite(loss, hidden, layout, per_item)

        weight = self.weight
        if cfg.replay and self.training and torch.is_grad_enabled():
            self.replay_cache.add(hidden, layout, s, weight)
        weighted = loss * weight
        if capture is not None:  # read: drop the graph references (kept on a failed check, for the retry)
            capture.clear()
        if not return_breakdown:
            return weighted
        return weighted, {"foresight_loss": weighted.detach(), "foresight_loss_unweighted": loss.detach(),
                          "segments": layout.segments.tolist(), "per_segment": per_item.detach()}

    @property
    def _mean_targets(self) -> bool:
        return self.config.fusion == "mean" and self.config.loss == "cosine"

    def _inactive(self, captured: Any, return_breakdown: bool) -> Tensor | tuple[Tensor, dict[str, Any]]:
        # Off by the schedule: nothing runs, the graph references are dropped.
        if isinstance(captured, CapturedHidden):
            captured.clear()
        zero = torch.zeros((), device=next(self.parameters()).device)
        if not return_breakdown:
            return zero
        return zero, {"foresight_loss": zero, "foresight_loss_unweighted": zero, "segments": [],
                      "per_segment": zero[None][:0]}

    def plan(self, segments: int, *, batch: int, tokens: int) -> GroupPlan:
        """How ``segments`` segments of ``batch`` x ``tokens`` go through the predictor under
        ``config.activation_budget_mib`` (see ``mirai_plugin.segmented``)."""
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
        """bfloat16 under ``config.compute_dtype="bfloat16"`` (autocast over float32 weights),
        else the parameters' dtype."""
        if self.config.compute_dtype == "bfloat16":
            return torch.bfloat16
        return next(self.parameters()).dtype

    def predict(self, hidden: Tensor, offset: int | None = None, *, checkpoint_blocks: bool = False) -> Tensor:
        """Predictor then projection: ``(B n d)`` -> ``(B n e)``; each row is one segment."""
        check_tensor("hidden", hidden, dims=3, layout=f"(rows, tokens, {self.student_dim})")
        dtype = self.compute_dtype
        autocast = dtype != next(self.parameters()).dtype  # bfloat16 compute, float32 weights
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=autocast):
            x = self.predictor(hidden.to(dtype), offset, checkpoint_blocks=checkpoint_blocks)  # (B n d)
            return self.project(x) if self.project is not None else x  # (B n e)

    # --------------------------------------------------------------- replay

    @property
    def replay_pairs(self) -> int:
        """Number of cached (hidden, target) pairs: segments, or valid segment/offset pairs."""
        return self.replay_cache.pairs

    def clear_replay(self) -> None:
        """Drop the cached replay pairs."""
        self.replay_cache.clear()

    def replay(self, *, step: bool = True) -> Tensor | None:
        """Projector-only update on the pairs of the last generator step (critic steps).

        ``config.replay_segments`` segments go through each backward (``None``: as many as
        ``config.activation_budget_mib`` allows; 1: one backward per segment, as the official
        trainer does), weighted so the summed gradient is ``weight * mean over pairs`` either way;
        ``config.replay_max_pairs`` replays a random subset. With several ranks each
        replays its own pairs and the update uses the mean over all ranks' pairs (every
        rank must call ``replay``, also one with nothing cached).
        With ``step`` the head's optimizer is zeroed before, then clipped and stepped; gradients
        not yet stepped (``replay`` before ``head.step()``) raise ``MiraiError`` instead of being
        zeroed, and the cache stays for the replay after ``head.step()``.

        Returns:
            this rank's weighted replay loss (detached), or ``None`` when nothing is cached.
        """
        return self.replay_cache.replay(self.optimization, self.plan, next(self.parameters()).device,
                                        mean_targets=self._mean_targets, step=step)

    # ------------------------------------------------------------ optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The head's own AdamW (``config.lr``, ``betas``, ``weight_decay``), made on first use
        over the parameters of the head (or of its FSDP1 wrapper)."""
        return self.optimization.optimizer

    def step(self) -> Tensor | None:
        """After the generator's backward: clip, step and zero the head's optimizer.

        Advances the weight schedule by one step and marks the replay cache complete:
        the next forward starts a new one. Returns the gradient norm before clipping
        (``None`` without clipping).
        """
        norm = self.optimization.clip_and_step()
        self.steps_taken += 1
        self.replay_cache.close()
        return norm

    def no_sync(self) -> AbstractContextManager[None]:
        """For gradient-accumulation micro-steps before the last: skip the gradient
        synchronisation of a DDP/FSDP head (a replicated head averages only in ``step``)."""
        return self.optimization.no_sync()

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
        return checkpoint.head_training_state(self)

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Resume from ``training_state()``. With a process group call it on every rank;
        rank 0's dict is used (other ranks may pass ``{}``)."""
        checkpoint.load_head_training_state(self, state)

    # ------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike) -> None:
        """Write the head's weights and settings to a ``.safetensors`` file (``training_state``
        holds what resuming needs)."""
        checkpoint.save_weights(self, path, config=self.config, student_dim=self.student_dim,
                                encoder_dim=self.encoder_dim)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ForesightHead:
        """Rebuild a head written by ``save`` (settings included)."""
        return checkpoint.load_weights(cls, path, device=device)

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
        return head_from_official(cls, source, config=config, dim_proj=dim_proj)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"student_dim={self.student_dim}, encoder_dim={self.encoder_dim}, predictor={cfg.predictor!r}, "
            f"offsets={cfg.offsets}, fusion={cfg.fusion!r}, weight={cfg.weight}"
        )

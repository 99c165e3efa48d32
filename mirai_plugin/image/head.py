"""The image foresight term: one projection head per grid offset, cosine alignment.

Legend: b batch, P prefix (condition) tokens, T = P + n sequence positions of the
student, n student token positions, d student width, z target width.

Data flow of one training step::

    captured h (b T d), attached  ->  head k: MLP_k(h at t)           (b pairs z)
    target (EMA hidden (b T z) or encoder patches (b H*W z)), no grad  ->  target at q = t + offset_k
    term = weight * sum_k head_weight_k * mean over (batch, pairs) of foresight_loss

The heads own their parameters and their AdamW; nothing is added to the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.capture import CapturedHidden, HiddenRecord
from mirai_plugin.checkpoint import check_everywhere, check_state, gather_state, restore_state
from mirai_plugin.checks import Rule, check, check_tensor
from mirai_plugin.collectives import log_once
from mirai_plugin.errors import MiraiError
from mirai_plugin.image.config import ImageForesightConfig
from mirai_plugin.image.grid import grid_pairs
from mirai_plugin.image.sources import grid_shape
from mirai_plugin.loss import foresight_loss
from mirai_plugin.optimizer import HeadOptimizer

TRAINING_STATE_FORMAT = "mirai_plugin.TokenForesightHead.training_state"


def projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """Three linear layers with SiLU between them (the official head's shape)."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
    )


class TokenForesightHead(nn.Module):
    """Per-offset projection heads that turn a token AR model's hidden states into the
    Mirai term.

    Args:
        config: an ``ImageForesightConfig``.
        student_dim: width of the captured hidden states (GPT-B: 768).
        encoder_dim: width of the targets (the model's own width for Mirai-E, the
            encoder's for Mirai-I: DINOv2-B 768).
        grid: the token grid ``(H, W)``.

    Example:
        >>> import torch
        >>> cfg = ImageForesightConfig(source="ema", projector_dim=16)
        >>> head = TokenForesightHead(cfg, student_dim=8, encoder_dim=8, grid=(4, 4))
        >>> hidden = torch.randn(2, 16, 8, requires_grad=True)  # class token + 15 image tokens
        >>> target = torch.randn(2, 16, 8)                      # the EMA copy's view of the same sequence
        >>> term = head(hidden, target)
        >>> term.backward()                     # the gradient reaches the captured states
        >>> term.shape, hidden.grad.shape
        (torch.Size([]), torch.Size([2, 16, 8]))
    """

    def __init__(self, config: ImageForesightConfig, student_dim: int, encoder_dim: int | None = None,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if encoder_dim is None or grid is None:
            raise MiraiError("TokenForesightHead needs (config, student_dim, encoder_dim, grid)")
        if not isinstance(config, ImageForesightConfig):
            raise MiraiError(f"config must be an ImageForesightConfig, got {type(config).__name__}")
        for name, value in (("student_dim", student_dim), ("encoder_dim", encoder_dim)):
            check(name, value, Rule("int", minimum=1, what="a positive int (a feature width)"))
        grid = grid_shape("grid", grid)
        never = [offset for offset in config.offsets if not _can_pair(offset, grid, config.border)]
        if never:
            raise MiraiError(
                f"offsets {never} have no target on the {grid[0]}x{grid[1]} token grid with border={config.border!r}: "
                f"their heads would never get a pair; use fewer neighbours (K={config.neighbours}) or a larger grid"
            )
        self.config = config
        self.student_dim, self.encoder_dim, self.grid = int(student_dim), int(encoder_dim), grid
        self.projectors = nn.ModuleList(
            projector(student_dim, config.projector_dim, encoder_dim) for _ in config.offsets
        )
        for module in self.projectors.modules():
            if isinstance(module, nn.Linear):  # LlamaGen's initialisation of its linear layers
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.optimization = HeadOptimizer(self, self._make_optimizer, config.max_grad_norm)
        self.steps_taken = 0

    @property
    def weight(self) -> float:
        return self.config.weight_at(self.steps_taken)

    @property
    def active(self) -> bool:
        """Whether the term counts at this step (off during Mirai-E's warm-up, say): when
        not, skip the target (the head returns 0)."""
        return self.weight > 0

    def forward(
        self,
        captured: CapturedHidden | Sequence[HiddenRecord] | Tensor,
        target: Tensor | None,
        *,
        return_breakdown: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The weighted term for one batch.

        Args:
            captured: what ``capture_hidden(model, layer, blocks="layers")`` yielded over
                one training forward, or the ``(b T d)`` hidden states.
            target: ``EMASource`` output ``(b T' z)`` (same prefix) for ``source="ema"``,
                ``FrozenImageEncoder`` output ``(b H*W z)`` for ``source="encoder"``.
            return_breakdown: also return the unweighted loss of each head.
        """
        hidden = _hidden_of(captured)
        if not self.active:
            device = next(self.parameters()).device
            zero = torch.zeros((), device=device)
            return (zero, {"head_losses": [], "offsets": []}) if return_breakdown else zero
        cfg = self.config
        check_tensor("captured hidden", hidden, layout="(batch, positions, width)")
        check_tensor("target", target, layout=f"(batch, positions, {self.encoder_dim})")
        assert target is not None  # check_tensor refuses None
        if target.dim() != 3 or target.shape[-1] != self.encoder_dim:
            raise MiraiError(f"target must be (batch, positions, {self.encoder_dim}), got {tuple(target.shape)}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.student_dim:
            raise MiraiError(
                f"captured hidden has shape {tuple(hidden.shape)}; expected (batch, positions, {self.student_dim}) "
                f"— check student_layer and student_dim"
            )
        if hidden.shape[0] != target.shape[0]:
            raise MiraiError(f"batch mismatch: hidden {hidden.shape[0]}, target {target.shape[0]}")
        prefix = cfg.prefix_tokens
        target_prefix = prefix if cfg.source == "ema" else 0
        student_tokens = hidden.shape[1] - prefix
        target_tokens = target.shape[1] - target_prefix
        self._check_positions(student_tokens, target_tokens, tuple(hidden.shape), tuple(target.shape))

        dtype = next(self.parameters()).dtype
        losses, paired = [], []
        for k, offset in enumerate(cfg.offsets):
            t, q = grid_pairs(
                offset, self.grid, student_tokens=student_tokens, target_tokens=target_tokens, border=cfg.border
            )
            paired.append(t.numel() > 0)
            if not paired[-1]:  # no grid pair at these positions: the head sits this batch out
                losses.append(hidden.new_zeros((), dtype=torch.float32))
                continue
            rows, goals = t + prefix, q + target_prefix
            if cfg.align_prefix:  # the condition tokens align with the target's own
                rows = torch.cat([torch.arange(prefix), rows])
                goals = torch.cat([torch.arange(prefix), goals])
            pred = self.projectors[k](hidden[:, rows.to(hidden.device)].to(dtype))  # (b pairs z)
            losses.append(foresight_loss(pred, target[:, goals.to(target.device)], kind=cfg.loss))
        head_losses = torch.stack(losses)  # (K)
        unpaired = [offset for offset, ok in zip(cfg.offsets, paired) if not ok]
        paired_weight = sum(w for w, ok in zip(cfg.head_weights, paired) if ok)
        if paired_weight == 0:
            raise MiraiError(
                f"no head with a non-zero weight has a target pair ({student_tokens} student and {target_tokens} "
                f"target positions on the {self.grid[0]}x{self.grid[1]} grid, unpaired offsets {unpaired}); "
                f"capture the whole teacher-forced sequence"
            )
        if unpaired:
            log_once(
                f"image foresight: offsets {unpaired} have no target pair at {student_tokens} positions on the "
                f"{self.grid[0]}x{self.grid[1]} grid; their heads are left out of the average"
            )
        # Heads without a pair are left out of the average: the others share their weight (K heads of
        # weight 1/K: the mean over the heads that have pairs). The breakdown names them.
        scale = sum(cfg.head_weights) / paired_weight
        weights = torch.tensor([w * scale if ok else 0.0 for w, ok in zip(cfg.head_weights, paired)],
                               device=head_losses.device)
        term = self.weight * (weights * head_losses).sum()
        if cfg.check_finite and not bool(torch.isfinite(term)):
            bad = [cfg.offsets[k] for k in range(len(losses)) if not bool(torch.isfinite(head_losses[k]))]
            where = "targets" if not bool(torch.isfinite(target).all()) else (
                "captured hidden states" if not bool(torch.isfinite(hidden).all()) else "projector outputs"
            )
            raise MiraiError(f"image foresight term is not finite at offsets {bad}: NaN/inf in the {where}")
        if not return_breakdown:
            return term
        return term, {"head_losses": head_losses.detach(), "offsets": list(cfg.offsets), "unpaired_offsets": unpaired}

    def _check_positions(self, student_tokens: int, target_tokens: int, hidden: tuple, target: tuple) -> None:
        """The hidden states cover the image and the target lines up with them (nothing aligns partially)."""
        cfg, tokens = self.config, self.grid[0] * self.grid[1]
        if student_tokens not in (tokens - 1, tokens):
            raise MiraiError(
                f"captured hidden {hidden} has {student_tokens} token positions after {cfg.prefix_tokens} prefix "
                f"token(s); a teacher-forced forward over the {self.grid[0]}x{self.grid[1]} grid has {tokens - 1} "
                f"(or {tokens}): capture the whole sequence, and check grid and prefix_tokens"
            )
        if cfg.source == "encoder" and target_tokens != tokens:
            raise MiraiError(
                f"Mirai-I target {target} has {target_tokens} positions, the {self.grid[0]}x{self.grid[1]} token "
                f"grid has {tokens}: the encoder's patches must cover the whole grid (FrozenImageEncoder resizes "
                f"them to it), or only part of the image would be aligned"
            )
        if cfg.source == "ema" and target_tokens != student_tokens:
            raise MiraiError(
                f"Mirai-E target {target} and captured hidden {hidden} differ in positions: the EMA copy must run "
                f"on the model's own inputs (same prefix and tokens)"
            )

    # ------------------------------------------------------------ optimizer

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        # Matrices decay, biases do not (as LlamaGen's optimizer).
        cfg = self.config
        params = [p for p in params if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The heads' AdamW; matrices decay, biases do not (as LlamaGen's optimizer)."""
        return self.optimization.optimizer

    def step(self) -> Tensor | None:
        """After the model's backward: average over ranks, clip, step, zero; advance the schedule."""
        norm = self.optimization.clip_and_step()
        self.steps_taken += 1
        return norm

    def skip_step(self) -> None:
        """A step the trainer skipped (an fp16 overflow, say): drop the gradients, advance the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1

    # ------------------------------------------------------ training state

    def training_state(self) -> dict[str, Any]:
        """Weights, optimizer state and schedule position, to resume exactly."""
        weights, optimizer_state = gather_state(self.optimization)
        return {
            "format": TRAINING_STATE_FORMAT,
            "head": weights,
            "optimizer": optimizer_state,
            "steps_taken": self.steps_taken,
            "config": self.config.to_json(),
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Resume from ``training_state()``; a state that does not fit changes nothing (its weights,
        optimizer state and schedule position are all checked before any loads)."""
        check_everywhere(lambda: self._check_training_state(state), rank0_decides=False)
        saved = state.get("config")
        restore_state(self.optimization, state["head"], state.get("optimizer"), what="training state",
                      target="this image head", fix=f"; it was saved with {saved}" if isinstance(saved, str) else "")
        self.steps_taken = int(state["steps_taken"])

    def _check_training_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("format") != TRAINING_STATE_FORMAT:
            got = type(state).__name__ if not isinstance(state, Mapping) else f"a dict with keys {sorted(state)[:6]}"
            raise MiraiError(
                f"not an image head training state (got {got}): pass what TokenForesightHead.training_state() "
                f"returned (from a file: torch.load(path, weights_only=True))"
            )
        check("training state steps_taken", state.get("steps_taken"), Rule("int", minimum=0))
        saved = state.get("config")
        check_state(self.optimization, state.get("head"), state.get("optimizer"), what="training state",
                    target="this image head", fix=f"; it was saved with {saved}" if isinstance(saved, str) else "")

    def save_training_state(self, path: str | os.PathLike) -> None:
        """The training state as a ``torch.save`` file."""
        torch.save(self.training_state(), os.fspath(path))

    def extra_repr(self) -> str:
        cfg = self.config
        return f"source={cfg.source!r}, offsets={cfg.offsets}, grid={self.grid}, weight={cfg.weight}"


def _hidden_of(captured: Any) -> Tensor:
    if isinstance(captured, Tensor):
        return captured
    if not isinstance(captured, (CapturedHidden, Sequence)) or isinstance(captured, (str, bytes)):
        raise MiraiError(
            f"captured must be what capture_hidden yielded or the (batch, positions, width) hidden states, "
            f"got {type(captured).__name__}"
        )
    records = captured.records if isinstance(captured, CapturedHidden) else list(captured)
    if len(records) != 1:
        raise MiraiError(
            f"expected one captured training forward, got {len(records)}: capture one teacher-forced forward "
            f"of the whole sequence (not KV-cache sampling)"
        )
    record = records[0]
    hidden = record.hidden if isinstance(record, HiddenRecord) else record
    if isinstance(captured, CapturedHidden):
        captured.clear()
    return hidden


def _can_pair(offset: tuple[int, int], grid: tuple[int, int], border: str) -> bool:
    """Whether ``offset`` pairs some token with a later one on the grid (at the full grid)."""
    tokens = grid[0] * grid[1]
    t, _ = grid_pairs(offset, grid, student_tokens=tokens, target_tokens=tokens, border=border)
    return t.numel() > 0

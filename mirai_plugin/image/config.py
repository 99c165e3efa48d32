"""Settings of the image (token-grid) foresight term: Mirai on raster AR generators."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from mirai_plugin.config import check_schedule, normalise_changes, scheduled_weight
from mirai_plugin.errors import MiraiError
from mirai_plugin.image.grid import BORDERS, ORDERS, grid_offsets

SOURCES = ("ema", "encoder")


@dataclass(frozen=True, kw_only=True)
class ImageForesightConfig:
    """Mirai on a raster-order token AR model (LlamaGen). Every field is keyword-only.

    Args:
        source: ``"ema"`` (Mirai-E: an EMA copy of the model's first layers, causal,
            K neighbours, one head per offset) or ``"encoder"`` (Mirai-I: a frozen
            bidirectional image encoder, K=1 at the input token's own patch, one head).
        student_layer: 0-based block whose output is aligned (7: the output of the
            first 8 of GPT-B's 12 layers, the paper's internal-layer injection; the
            last block is output-layer injection, the ablation).
        neighbours: K; ``None``: 3 for ``"ema"``, 1 for ``"encoder"``.
        offsets: explicit ``((dy, dx), ...)`` instead of ``neighbours`` / ``order``.
        order: ``"grid"`` (K nearest future grid neighbours) or ``"raster"`` (the next
            K tokens in raster order).
        border: ``"raster"`` (shift in the flattened sequence, as the official code) or
            ``"drop"`` (only neighbours on the grid); see ``mirai_plugin.image.grid``.
        prefix_tokens: condition tokens before the image tokens (LlamaGen c2i: 1).
        align_prefix: also align the prefix positions with the target's (the official
            Mirai-E does, for its class token); ``None``: true for ``"ema"`` only.
        projector_dim: hidden width of each head's 3-layer MLP.
        weight: lambda. Mirai: 2, then 1 from half training
            (``weight=2.0, weight_changes=((total_steps // 2, 1.0),)``).
        head_weights: factor of each head's loss; ``None``: ``1 / K`` each, so
            ``weight`` multiplies the mean over heads.
        weight_start, weight_ramp, weight_changes, weight_stop: the schedule, as in
            ``ForesightConfig`` (``weight_start`` is Mirai-E's warm-up before the EMA
            targets are used).
        ema_decay: decay of the EMA source (official 0.9999).
        loss: ``"cosine"`` or ``"mse"``.
        lr, betas, weight_decay, max_grad_norm: the heads' own AdamW and clipping
            (LlamaGen's defaults).
        check_finite: raise, naming the head, when the term is NaN/inf.

    Example:
        >>> cfg = ImageForesightConfig(source="ema")
        >>> cfg.offsets, cfg.student_layer
        (((0, 0), (0, 1), (1, 0)), 7)
        >>> ImageForesightConfig(source="encoder").offsets
        ((0, 0),)
    """

    source: str = "ema"
    student_layer: int = 7
    neighbours: int | None = None
    offsets: tuple[tuple[int, int], ...] | None = None
    order: str = "grid"
    border: str = "raster"
    prefix_tokens: int = 1
    align_prefix: bool | None = None
    projector_dim: int = 2048
    weight: float = 2.0
    head_weights: tuple[float, ...] | None = None
    weight_start: int = 0
    weight_ramp: int = 0
    weight_changes: tuple[tuple[int, float], ...] = ()
    weight_stop: int | None = None
    ema_decay: float = 0.9999
    loss: str = "cosine"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 5e-2
    max_grad_norm: float | None = 1.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        _check(self.source in SOURCES, f"source must be one of {SOURCES}, got {self.source!r}")
        _check(self.order in ORDERS, f"order must be one of {ORDERS}, got {self.order!r}")
        _check(self.border in BORDERS, f"border must be one of {BORDERS}, got {self.border!r}")
        if self.offsets is None:
            k = self.neighbours if self.neighbours is not None else (3 if self.source == "ema" else 1)
            set_("offsets", grid_offsets(k, self.order))
        else:
            offsets = tuple(tuple(int(v) for v in o) for o in self.offsets)
            _check(
                bool(offsets) and all(len(o) == 2 and o[0] >= 0 for o in offsets) and len(set(offsets)) == len(offsets),
                f"offsets must be distinct (dy, dx) pairs with dy >= 0, got {self.offsets!r}",
            )
            set_("offsets", offsets)
        set_("neighbours", len(self.offsets))
        if self.align_prefix is None:
            set_("align_prefix", self.source == "ema")
        if self.head_weights is None:
            set_("head_weights", tuple(1.0 / self.neighbours for _ in self.offsets))
        else:
            set_("head_weights", tuple(float(w) for w in self.head_weights))
            _check(
                len(self.head_weights) == self.neighbours and all(w >= 0 for w in self.head_weights),
                f"head_weights needs one factor >= 0 per offset ({self.neighbours}), got {self.head_weights!r}",
            )
        set_("betas", tuple(float(b) for b in self.betas))
        set_("weight_changes", normalise_changes(self.weight_changes))
        _check(
            isinstance(self.student_layer, int) and self.student_layer >= 0,
            f"student_layer must be a 0-based block index, got {self.student_layer!r}",
        )
        _check(
            isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 0,
            f"prefix_tokens must be an int >= 0, got {self.prefix_tokens!r}",
        )
        _check(self.projector_dim >= 1, f"projector_dim must be >= 1, got {self.projector_dim!r}")
        _check(
            isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0,
            f"weight must be a finite number >= 0, got {self.weight!r}",
        )
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        _check(self.loss in ("cosine", "mse"), f"loss must be 'cosine' or 'mse', got {self.loss!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}",
        )
        check_schedule(self)

    @classmethod
    def mirai(cls, source: str, total_steps: int, **changes: Any) -> ImageForesightConfig:
        """The paper's recipe: lambda 2, stepped down to 1 at half of ``total_steps``.

        >>> ImageForesightConfig.mirai("ema", 1000).weight_changes
        ((500, 1.0),)
        """
        return cls(source=source, weight=2.0, weight_changes=((total_steps // 2, 1.0),), **changes)

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or any(w > 0 for _, w in self.weight_changes)

    def weight_at(self, step: int) -> float:
        """lambda at optimizer step ``step``."""
        return scheduled_weight(self, step)

    def replace(self, **changes: Any) -> ImageForesightConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageForesightConfig:
        return cls(**json.loads(text))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiraiError(message)

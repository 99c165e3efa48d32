"""Settings of the image (token-grid) foresight term: Mirai on raster AR generators."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mirai_plugin.checks import Rule, check, fail, is_int, is_number, normalise_betas
from mirai_plugin.errors import MiraiError
from mirai_plugin.image.grid import BORDERS, ORDERS, grid_offsets
from mirai_plugin.schedule import WeightSchedule

SOURCES = ("ema", "encoder")
_RULES = {
    "source": Rule("choice", choices=SOURCES, fix="'ema' is Mirai-E, 'encoder' is Mirai-I"),
    "student_layer": Rule("int", minimum=0, what="a 0-based block index >= 0"),
    "neighbours": Rule("int", minimum=1, none=True, what="K, an int >= 1"),
    "order": Rule("choice", choices=ORDERS),
    "border": Rule("choice", choices=BORDERS),
    "prefix_tokens": Rule("int", minimum=0, fix="LlamaGen c2i has 1 class token"),
    "align_prefix": Rule("bool", none=True),
    "projector_dim": Rule("int", minimum=1),
    "weight": Rule("number", minimum=0, fix="use 0 to disable the term"),
    "ema_decay": Rule("number", minimum=0, below=1, fix="the official recipe uses 0.9999"),
    "loss": Rule("choice", choices=("cosine", "mse")),
    "lr": Rule("number", above=0),
    "weight_decay": Rule("number", minimum=0),
    "max_grad_norm": Rule("number", above=0, none=True, fix="None disables clipping"),
    "check_finite": Rule("bool"),
}


@dataclass(frozen=True, kw_only=True)
class ImageForesightConfig(WeightSchedule):
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
    # None on input means "derive it"; __post_init__ always sets these four, hence their types.
    neighbours: int = None  # type: ignore[assignment]
    offsets: tuple[tuple[int, int], ...] = None  # type: ignore[assignment]
    order: str = "grid"
    border: str = "raster"
    prefix_tokens: int = 1
    align_prefix: bool = None  # type: ignore[assignment]
    projector_dim: int = 2048
    weight: float = 2.0
    head_weights: tuple[float, ...] = None  # type: ignore[assignment]
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
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        for name, rule in _RULES.items():
            set_(name, check(name, getattr(self, name), rule))
        if self.offsets is None:
            k = self.neighbours if self.neighbours is not None else (3 if self.source == "ema" else 1)
            set_("offsets", grid_offsets(k, self.order))
        else:
            offsets = _grid_offsets(self.offsets)
            if self.neighbours is not None and self.neighbours != len(offsets):
                raise MiraiError(
                    f"neighbours={self.neighbours} disagrees with the {len(offsets)} offsets given; pass only "
                    f"offsets (neighbours follows from them) or only neighbours"
                )
            set_("offsets", offsets)
        set_("neighbours", len(self.offsets))
        if self.align_prefix is None:
            set_("align_prefix", self.source == "ema")
        if self.head_weights is None:
            set_("head_weights", tuple(1.0 / self.neighbours for _ in self.offsets))
        else:
            expected = f"one finite factor >= 0 per offset ({self.neighbours}), not all 0"
            weights = self.head_weights
            if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
                fail("head_weights", expected, weights)
            weights = tuple(weights)
            if (
                len(weights) != self.neighbours
                or not all(is_number(w) and 0 <= w < math.inf for w in weights)
                or not any(w > 0 for w in weights)
            ):
                fail("head_weights", expected, self.head_weights, "None gives 1/K each; weight=0 turns the term off")
            set_("head_weights", tuple(float(w) for w in weights))
        set_("betas", normalise_betas(self.betas))
        super().__post_init__()  # the schedule

    @classmethod
    def mirai(cls, source: str, total_steps: int, **changes: Any) -> ImageForesightConfig:
        """The paper's recipe: lambda 2, stepped down to 1 at half of ``total_steps``.

        >>> ImageForesightConfig.mirai("ema", 1000).weight_changes
        ((500, 1.0),)
        """
        total_steps = check("total_steps", total_steps, Rule("int", minimum=2, what="an int >= 2 (optimizer steps)"))
        return cls(source=source, weight=2.0, weight_changes=((total_steps // 2, 1.0),), **changes)


def _grid_offsets(offsets: Any) -> tuple[tuple[int, int], ...]:
    expected = "distinct (dy, dx) pairs of ints pointing at later tokens (dy >= 0, and dx >= 0 when dy == 0)"
    if isinstance(offsets, (str, bytes, Mapping)) or not isinstance(offsets, Iterable):
        fail("offsets", expected, offsets)
    pairs = []
    for offset in offsets:
        if isinstance(offset, (str, bytes, Mapping)) or not isinstance(offset, Iterable):
            fail("offsets", expected, offsets)
        try:
            pair = tuple(offset)
        except TypeError:  # a 0-d tensor says it is iterable
            fail("offsets", expected, offsets)
        if len(pair) != 2 or not all(is_int(v) for v in pair) or pair[0] < 0 or (pair[0] == 0 and pair[1] < 0):
            fail("offsets", expected, offsets)
        pairs.append((int(pair[0]), int(pair[1])))
    if not pairs or len(set(pairs)) != len(pairs):
        fail("offsets", expected, offsets)
    return tuple(pairs)

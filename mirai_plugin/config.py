"""What the foresight term is: one typed, validated configuration.

Defaults are the official Video-Mirai Stage-3 recipe (chunk-wise DMD on Wan 2.1):
student block 15 of 30, encoder block 20 of 40, offsets {0, 1} fused by mean,
a 3-block DiT predictor, negative-cosine loss with weight 0.2, and projector
replay on critic steps with its own AdamW (lr 2e-6, betas (0, 0.999)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirai_plugin.errors import MiraiError

FUSIONS = ("mean", "none", "frame_mean")
PREDICTORS = ("dit", "mlp", "multi_mlp")
LOSSES = ("cosine", "mse")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Official `foresight_projector_type` values and what they mean here.
_UPSTREAM_PREDICTORS = {
    "dit": ("dit", False),
    "dit_adaln": ("dit", True),
    "mlp": ("mlp", False),
    "simple": ("mlp", False),
    "multi_mlp": ("multi_mlp", False),
}

# Official keys that select behaviour this package does not implement. Reading a
# config that turns one on must fail loudly instead of training something else.
_UNSUPPORTED_UPSTREAM = {
    "foresight_virtual_blocks": False,
    "foresight_spatial_offset": False,
    "foresight_online_mean_pool": False,
    "block_wise_using_frame_wise_foresight": False,
}


@dataclass(frozen=True, kw_only=True)
class ForesightConfig:
    """Settings of the foresight term. Every field is keyword-only.

    Args:
        weight: lambda, the factor on the foresight loss added to the generator loss.
            0 disables the term.
        student_layer: 0-based index of the generator block whose output is captured.
        encoder_layer: 0-based index of the frozen encoder block whose output is the target.
        offsets: segment offsets of the target window; segment k is paired with k+d.
        fusion: ``"mean"`` averages the encoder features of all valid offsets into one
            target (official Stage 3); ``"none"`` keeps one target and one loss per
            offset; ``"frame_mean"`` averages each target segment over its frames
            (Stage-2 per-frame averaging, see docs/design.md).
        predictor: ``"dit"``, ``"mlp"`` or ``"multi_mlp"`` (one MLP per offset).
        predictor_depth: number of DiT blocks.
        ffn_ratio: FFN width of the predictor as a multiple of the student width.
        num_heads: attention heads of the DiT predictor; ``None`` uses a head width of
            128 as Wan does (12 heads for the 1536-wide Wan-1.3B).
        offset_conditioning: condition the DiT's AdaLN on the offset (DiT-AdaLN,
            one prediction per offset; needs per-offset targets).
        loss: ``"cosine"`` (official negative cosine) or ``"mse"``.
        segment_frames: latent frames per segment (3 chunk-wise, 1 frame-wise).
        lr, betas, weight_decay: the predictor's own AdamW.
        max_grad_norm: clip norm for the predictor's gradients (the generator's, 10.0).
        replay: keep the last generator step's (hidden, target) pairs and update the
            predictor on them at critic steps (official ``projector_every_step``).
        replay_device: where replay pairs are kept (``"cpu"`` as upstream, or ``None``
            to keep them where they were computed).
        replay_segments: cached segments per replay backward; ``None`` (default) takes as
            many as ``activation_budget_mib`` allows, ``1`` runs one segment at a time as the
            official trainer does. The gradient is the same.
        replay_max_pairs: replay at most this many cached segments, drawn at random
            without replacement on each replay (official ``max_replay_pairs``); ``None``
            replays all of them.
        replay_seed: seed of the head's own replay-sampling generator (rank ``r`` uses
            ``replay_seed + r``); its state is part of ``ForesightHead.training_state()``.
        weight_start: generator step at which the term turns on (0 before it).
        weight_ramp: steps of a linear ramp from ``weight / weight_ramp`` up to the weight,
            starting at ``weight_start``.
        weight_changes: ``((step, weight), ...)``: from ``step`` on, the weight is ``weight``
            (Mirai's 2 -> 1 at half training: ``weight=2.0, weight_changes=((T // 2, 1.0),)``).
        weight_stop: generator step from which the term is off again (``None``: never).
        check_finite: raise, naming the segment (and the rank), when the loss is NaN/inf.
        activation_budget_mib: the most predictor activations (MiB, with the prediction
            and its gradient) kept for backward at once. Segments that fit go through the
            predictor in one pass; beyond it they go in groups recomputed in the backward,
            and a segment larger than the budget also recomputes each predictor block.
            The gradients are the same; ``None``: no bound (always one pass).
        compute_dtype: ``"float32"`` (default) or ``"bfloat16"``: the predictor computes
            under bfloat16 autocast over its float32 weights; the loss stays float32.

    Example:
        >>> from mirai_plugin import ForesightConfig
        >>> cfg = ForesightConfig()
        >>> cfg.offsets, cfg.fusion, cfg.weight
        ((0, 1), 'mean', 0.2)
        >>> ForesightConfig(offsets=[0, 1, 2]).offsets
        (0, 1, 2)
    """

    weight: float = 0.2
    student_layer: int = 15
    encoder_layer: int = 20
    offsets: tuple[int, ...] = (0, 1)
    fusion: str = "mean"
    predictor: str = "dit"
    predictor_depth: int = 3
    ffn_ratio: float = 4
    num_heads: int | None = None
    offset_conditioning: bool = False
    loss: str = "cosine"
    segment_frames: int = 3
    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    max_grad_norm: float | None = 10.0
    replay: bool = True
    replay_device: str | None = "cpu"
    replay_segments: int | None = None
    replay_max_pairs: int | None = None
    replay_seed: int = 0
    weight_start: int = 0
    weight_ramp: int = 0
    weight_changes: tuple[tuple[int, float], ...] = ()
    weight_stop: int | None = None
    check_finite: bool = True
    activation_budget_mib: float | None = 1024
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        set_("offsets", _normalise_offsets(self.offsets))
        set_("betas", tuple(float(b) for b in self.betas))
        set_("weight_changes", normalise_changes(self.weight_changes))

        _check(
            isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0,
            f"weight must be a finite number >= 0, got {self.weight!r}; use 0 to disable the foresight term",
        )
        for name in ("student_layer", "encoder_layer"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{name} must be a 0-based block index >= 0, got {value!r}",
            )
        _check(self.fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        _check(self.predictor in PREDICTORS, f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(
            isinstance(self.predictor_depth, int) and self.predictor_depth >= 1,
            f"predictor_depth must be an int >= 1, got {self.predictor_depth!r}",
        )
        _check(self.ffn_ratio > 0, f"ffn_ratio must be > 0, got {self.ffn_ratio!r}")
        _check(
            self.num_heads is None or (isinstance(self.num_heads, int) and self.num_heads >= 1),
            f"num_heads must be None or an int >= 1, got {self.num_heads!r}",
        )
        _check(
            isinstance(self.segment_frames, int) and self.segment_frames >= 1,
            f"segment_frames must be an int >= 1 (3 chunk-wise, 1 frame-wise), got {self.segment_frames!r}",
        )
        _check(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas!r}",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(
            self.replay_segments is None or (isinstance(self.replay_segments, int) and self.replay_segments >= 1),
            f"replay_segments must be None (from activation_budget_mib) or an int >= 1, got {self.replay_segments!r}",
        )
        budget = self.activation_budget_mib
        _check(
            budget is None or (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                               and math.isfinite(budget) and budget > 0),
            f"activation_budget_mib must be a number of MiB > 0, or None (no bound), got {budget!r}",
        )
        _check(
            self.compute_dtype in COMPUTE_DTYPES,
            f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}",
        )
        _check(
            self.replay_max_pairs is None or (isinstance(self.replay_max_pairs, int) and self.replay_max_pairs >= 1),
            f"replay_max_pairs must be None (replay all) or an int >= 1, got {self.replay_max_pairs!r}",
        )
        _check(isinstance(self.replay_seed, int), f"replay_seed must be an int, got {self.replay_seed!r}")
        check_schedule(self)
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}",
        )

        # Cross-field rules.
        per_offset = self.fusion != "mean"
        if self.predictor == "multi_mlp":
            _check(
                per_offset,
                "predictor='multi_mlp' has one head per offset and needs one target per offset: "
                "pass fusion='none' (or 'frame_mean'), or use predictor='mlp' with fusion='mean'",
            )
        if self.offset_conditioning:
            _check(
                self.predictor == "dit",
                f"offset_conditioning is an AdaLN input of the DiT predictor; pass predictor='dit' "
                f"(got {self.predictor!r}) or offset_conditioning=False",
            )
            _check(
                per_offset,
                "offset_conditioning predicts each offset separately and needs one target per offset: "
                "pass fusion='none' (or 'frame_mean'), or offset_conditioning=False",
            )

    # ------------------------------------------------------------------ helpers

    @property
    def enabled(self) -> bool:
        """True when the foresight term contributes at some step (a weight > 0)."""
        return self.weight > 0 or any(w > 0 for _, w in self.weight_changes)

    def weight_at(self, step: int) -> float:
        """The weight at generator step ``step`` (0-based count of head steps taken).

        >>> cfg = ForesightConfig(weight=2.0, weight_changes=((500, 1.0),), weight_start=10, weight_ramp=4)
        >>> [cfg.weight_at(s) for s in (0, 9, 10, 11, 13, 499, 500)]
        [0.0, 0.0, 0.5, 1.0, 2.0, 2.0, 1.0]
        """
        return scheduled_weight(self, step)

    @property
    def max_offset(self) -> int:
        return self.offsets[-1]

    def replace(self, **changes: Any) -> ForesightConfig:
        """A copy with some fields changed (validated again).

        >>> ForesightConfig().replace(weight=0.1).weight
        0.1
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``ForesightConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["offsets"] = list(self.offsets)
        d["betas"] = list(self.betas)
        d["weight_changes"] = [list(change) for change in self.weight_changes]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ForesightConfig:
        return cls(**json.loads(text))

    @classmethod
    def from_upstream(cls, args: Any) -> ForesightConfig:
        """Read the official Video-Mirai config keys from an argparse namespace, an
        OmegaConf config, a dict or any attribute container.

        Keys read: ``foresight_weight`` (absent means 0: the term is off, as in the
        official trainer), ``foresight_student_layer`` / ``foresight_teacher_layer``
        (falling back to ``foresight_layer``), ``foresight_delta``,
        ``foresight_include_current``, ``foresight_skip``,
        ``foresight_delta_mean_pool``, ``foresight_projector_type``,
        ``projection_layers_num``, ``foresight_ffn_ratio``, ``foresight_loss_type``,
        ``lr_foresight`` (falling back to ``lr``), ``beta1``/``beta2``,
        ``weight_decay``, ``max_grad_norm_generator``, ``projector_every_step``, ``max_replay_pairs`` and
        ``num_frame_per_block``; and this package's schedule keys
        ``foresight_weight_start``, ``foresight_weight_ramp``,
        ``foresight_weight_changes`` (a list of ``[step, weight]``) and
        ``foresight_weight_stop``; ``foresight_activation_budget_mib`` and
        ``foresight_compute_dtype``. Other keys absent from ``args`` keep the recipe
        defaults. Official options this package does not implement raise.

        Example:
            >>> from argparse import Namespace
            >>> cfg = ForesightConfig.from_upstream(Namespace(
            ...     foresight_weight=0.2, foresight_student_layer=15, foresight_teacher_layer=20,
            ...     foresight_delta=1, foresight_include_current=True, foresight_delta_mean_pool=True,
            ...     foresight_projector_type="dit", projection_layers_num=3, foresight_ffn_ratio=4,
            ...     foresight_loss_type="cosine", lr_foresight=2e-6, projector_every_step=True))
            >>> cfg == ForesightConfig()
            True
        """
        get = key_reader(args)
        default = cls()

        for key, off_value in _UNSUPPORTED_UPSTREAM.items():
            value = get(key, None)
            if value is not None and value != off_value:
                raise MiraiError(
                    f"upstream option {key}={value!r} is not implemented by mirai_plugin; "
                    f"set {key}: {off_value!r} (the released recipe) or remove the key"
                )

        layer = get("foresight_layer", None)
        student_layer = _first(get("foresight_student_layer", None), layer, default.student_layer)
        encoder_layer = _first(get("foresight_teacher_layer", None), layer, default.encoder_layer)

        include_current = bool(_first(get("foresight_include_current", None), True))
        delta = int(_first(get("foresight_delta", None), 1))
        skip = int(_first(get("foresight_skip", None), 0))
        _check(delta >= 0 and skip >= 0, f"foresight_delta and foresight_skip must be >= 0, got {delta}, {skip}")
        offsets = ([0] if include_current else []) + list(range(1 + skip, delta + 1 + skip))
        _check(
            bool(offsets),
            "foresight_delta=0 with foresight_include_current=false leaves no target offset; "
            "set foresight_delta >= 1 or foresight_include_current: true",
        )

        mean_pool = bool(_first(get("foresight_delta_mean_pool", None), True))
        projector_type = str(_first(get("foresight_projector_type", None), "dit"))
        if projector_type not in _UPSTREAM_PREDICTORS:
            raise MiraiError(
                f"foresight_projector_type={projector_type!r} is unknown; "
                f"use one of {sorted(_UPSTREAM_PREDICTORS)}"
            )
        predictor, offset_conditioning = _UPSTREAM_PREDICTORS[projector_type]

        lr = _first(get("lr_foresight", None), get("lr", None), default.lr)
        betas = (
            float(_first(get("beta1", None), default.betas[0])),
            float(_first(get("beta2", None), default.betas[1])),
        )
        return cls(
            weight=float(_first(get("foresight_weight", None), 0.0)),
            student_layer=int(student_layer),
            encoder_layer=int(encoder_layer),
            offsets=tuple(offsets),
            fusion="mean" if mean_pool else "none",
            predictor=predictor,
            predictor_depth=int(_first(get("projection_layers_num", None), default.predictor_depth)),
            ffn_ratio=_first(get("foresight_ffn_ratio", None), default.ffn_ratio),
            offset_conditioning=offset_conditioning,
            loss=str(_first(get("foresight_loss_type", None), default.loss)),
            segment_frames=int(_first(get("num_frame_per_block", None), default.segment_frames)),
            lr=float(lr),
            betas=betas,
            weight_decay=float(_first(get("weight_decay", None), default.weight_decay)),
            max_grad_norm=_first(get("max_grad_norm_generator", None), default.max_grad_norm),
            replay=bool(_first(get("projector_every_step", None), default.replay)),
            replay_max_pairs=int(get("max_replay_pairs", 0) or 0) or None,
            activation_budget_mib=_first(get("foresight_activation_budget_mib", None), default.activation_budget_mib),
            compute_dtype=str(_first(get("foresight_compute_dtype", None), default.compute_dtype)),
            weight_start=int(_first(get("foresight_weight_start", None), 0)),
            weight_ramp=int(_first(get("foresight_weight_ramp", None), 0)),
            weight_changes=tuple(tuple(c) for c in _first(get("foresight_weight_changes", None), ())),
            weight_stop=get("foresight_weight_stop", None),
        )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiraiError(message)


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def key_reader(args: Any):
    """``get(key, default)`` over an argparse namespace, an OmegaConf config, a dict or any object."""
    if isinstance(args, Mapping):
        return lambda key, default: args.get(key, default)
    # OmegaConf DictConfig and argparse.Namespace both answer getattr; DictConfig
    # also answers `in`, which avoids its struct-mode errors on missing keys.
    if hasattr(args, "__contains__") and not isinstance(args, (str, bytes)):
        return lambda key, default: getattr(args, key) if key in args else default
    return lambda key, default: getattr(args, key, default)


def check_schedule(cfg: Any) -> None:
    """Validate the weight-schedule fields shared by the video and image configs."""
    for name in ("weight_start", "weight_ramp"):
        value = getattr(cfg, name)
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"{name} must be an int >= 0 (generator steps), got {value!r}",
        )
    stop = cfg.weight_stop
    _check(
        stop is None or (isinstance(stop, int) and not isinstance(stop, bool) and stop > cfg.weight_start),
        f"weight_stop must be None or a step after weight_start={cfg.weight_start}, got {stop!r}",
    )


def scheduled_weight(cfg: Any, step: int) -> float:
    """``cfg.weight`` at generator step ``step`` under its start / ramp / changes / stop schedule."""
    if step < cfg.weight_start or (cfg.weight_stop is not None and step >= cfg.weight_stop):
        return 0.0
    weight = float(cfg.weight)
    for change_step, value in cfg.weight_changes:
        if step >= change_step:
            weight = value
    if cfg.weight_ramp:
        weight *= min(1.0, (step - cfg.weight_start + 1) / cfg.weight_ramp)
    return weight


def normalise_changes(changes: Any) -> tuple[tuple[int, float], ...]:
    message = f"weight_changes must be ((step, weight), ...) with increasing steps >= 0 and weights >= 0, got {changes!r}"
    try:
        pairs = tuple((step, weight) for step, weight in changes)
    except (TypeError, ValueError):
        raise MiraiError(message) from None
    for step, weight in pairs:
        _check(isinstance(step, int) and not isinstance(step, bool) and step >= 0, message)
        _check(isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0, message)
    _check(all(a[0] < b[0] for a, b in zip(pairs, pairs[1:])), message)
    return tuple((step, float(weight)) for step, weight in pairs)


def _normalise_offsets(offsets: Any) -> tuple[int, ...]:
    try:
        values = tuple(offsets)
    except TypeError:
        raise MiraiError(f"offsets must be a sequence of ints such as (0, 1), got {offsets!r}") from None
    _check(len(values) > 0, "offsets is empty: give at least one segment offset, e.g. offsets=(0, 1)")
    for v in values:
        _check(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            f"offsets must be ints >= 0 (0 = current segment, 1 = next), got {offsets!r}",
        )
    _check(len(set(values)) == len(values), f"offsets has duplicates: {offsets!r}")
    return tuple(sorted(values))

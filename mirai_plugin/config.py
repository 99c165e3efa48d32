"""What the foresight term is: one typed, validated configuration.

Defaults are the official Video-Mirai Stage-3 recipe (chunk-wise DMD on Wan 2.1):
student block 15 of 30, encoder block 20 of 40, offsets {0, 1} fused by mean,
a 3-block DiT predictor, negative-cosine loss with weight 0.2, and projector
replay on critic steps with its own AdamW (lr 2e-6, betas (0, 0.999)).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mirai_plugin.checks import Rule, check, did_you_mean, fail, is_int, is_number, parse_device, show
from mirai_plugin.errors import MiraiError
from mirai_plugin.keys import OURS, check_keys, check_not_implemented, config_view

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

_LAYER = "a 0-based block index >= 0"
# What each scalar field may be; the same rules check the upstream keys that feed them.
_RULES = {
    "weight": Rule("number", minimum=0, fix="use 0 to disable the foresight term"),
    "student_layer": Rule("int", minimum=0, what=_LAYER),
    "encoder_layer": Rule("int", minimum=0, what=_LAYER),
    "fusion": Rule("choice", choices=FUSIONS),
    "predictor": Rule("choice", choices=PREDICTORS),
    "predictor_depth": Rule("int", minimum=1, fix="the official recipe uses 3 DiT blocks"),
    "ffn_ratio": Rule("number", above=0, fix="the official recipe uses 4"),
    "num_heads": Rule("int", minimum=1, none=True, fix="None uses a head width of 128"),
    "offset_conditioning": Rule("bool"),
    "loss": Rule("choice", choices=LOSSES),
    "segment_frames": Rule("int", minimum=1, fix="3 chunk-wise, 1 frame-wise"),
    "lr": Rule("number", above=0, fix="the official recipe uses 2e-6"),
    "weight_decay": Rule("number", minimum=0),
    "max_grad_norm": Rule("number", above=0, none=True, fix="None disables clipping"),
    "replay": Rule("bool"),
    "replay_segments": Rule("int", minimum=1, none=True, fix="None takes as many as activation_budget_mib allows"),
    "replay_max_pairs": Rule("int", minimum=1, none=True, fix="None replays all of them"),
    "replay_seed": Rule("int", minimum=0, maximum=2**63 - 1),
    "check_finite": Rule("bool"),
    "activation_budget_mib": Rule("number", above=0, none=True,
                                  fix="a budget in MiB such as 1024 (the default), or None to keep every segment's "
                                      "activations (one pass)"),
    "compute_dtype": Rule("choice", choices=COMPUTE_DTYPES),
}
_STEP = "an int >= 0 (generator steps)"
_BETA = Rule("number", minimum=0, below=1)


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
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        for name, rule in _RULES.items():
            set_(name, check(name, getattr(self, name), rule))
        set_("offsets", normalise_offsets(self.offsets))
        set_("betas", normalise_betas(self.betas))
        set_("replay_device", parse_device("replay_device", self.replay_device, none=True))
        set_("weight_changes", normalise_changes(self.weight_changes))
        check_schedule(self)

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
        check_field_names(type(self), changes, "replace")
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
        """Rebuild the config ``to_json`` wrote."""
        return cls(**fields_from_json(cls, text))

    def to_upstream(self) -> dict[str, Any]:
        """The trainer-config keys that ``from_upstream`` reads back into this config.

        Official keys where they exist (the window as ``foresight_delta`` /
        ``foresight_skip`` / ``foresight_include_current`` when it is one), this
        package's ``foresight_*`` keys for the rest. ``beta1``, ``beta2``,
        ``weight_decay``, ``num_frame_per_block`` and ``max_grad_norm_generator`` are
        the trainer's own keys: the official trainer shares them with the generator.

        >>> cfg = ForesightConfig(offsets=(0, 1, 2), fusion="none")
        >>> keys = cfg.to_upstream()
        >>> keys["foresight_delta"], keys["foresight_delta_mean_pool"]
        (2, False)
        >>> ForesightConfig.from_upstream(keys) == cfg
        True
        """
        if self.max_grad_norm is None:
            raise MiraiError(
                "max_grad_norm=None (no clipping) has no trainer key: the trainer clips the head at "
                "max_grad_norm_generator; give max_grad_norm a number to write the config as trainer keys"
            )
        projector = {"dit": "dit_adaln" if self.offset_conditioning else "dit"}.get(self.predictor, self.predictor)
        keys: dict[str, Any] = {
            "foresight_weight": self.weight,
            "foresight_student_layer": self.student_layer,
            "foresight_teacher_layer": self.encoder_layer,
            **_window_keys(self.offsets),
            "foresight_delta_mean_pool": self.fusion == "mean",
            "foresight_projector_type": projector,
            "projection_layers_num": self.predictor_depth,
            "foresight_ffn_ratio": self.ffn_ratio,
            "foresight_loss_type": self.loss,
            "num_frame_per_block": self.segment_frames,
            "lr_foresight": self.lr,
            "beta1": self.betas[0],
            "beta2": self.betas[1],
            "weight_decay": self.weight_decay,
            "max_grad_norm_generator": self.max_grad_norm,
            "projector_every_step": self.replay,
            "max_replay_pairs": self.replay_max_pairs or 0,
            "foresight_replay_device": self.replay_device if self.replay_device is not None else "none",
            "foresight_replay_seed": self.replay_seed,
            "foresight_check_finite": self.check_finite,
            "foresight_activation_budget_mib": (
                "none" if self.activation_budget_mib is None else self.activation_budget_mib),
            "foresight_compute_dtype": self.compute_dtype,
            "foresight_weight_start": self.weight_start,
            "foresight_weight_ramp": self.weight_ramp,
            "foresight_weight_changes": [list(change) for change in self.weight_changes],
        }
        if self.fusion == "frame_mean":
            keys["foresight_fusion"] = "frame_mean"
        optional = {
            "foresight_num_heads": self.num_heads,
            "foresight_replay_segments": self.replay_segments,
            "foresight_weight_stop": self.weight_stop,
        }
        keys.update({key: value for key, value in optional.items() if value is not None})
        return keys

    @classmethod
    def from_upstream(cls, args: Any) -> ForesightConfig:
        """Read the foresight keys of a trainer config: an argparse namespace, an OmegaConf
        config or a dict (the whole trainer config; its other keys pass untouched).

        Keys read (``mirai_plugin.keys`` lists them all): ``foresight_weight`` (absent
        means 0: the term is off, as in the official trainer),
        ``foresight_student_layer`` / ``foresight_teacher_layer`` (both from
        ``foresight_layer`` when neither is set), ``foresight_delta``,
        ``foresight_include_current``, ``foresight_skip`` (or ``foresight_offsets``),
        ``foresight_delta_mean_pool`` (or ``foresight_fusion``),
        ``foresight_projector_type``, ``projection_layers_num``,
        ``foresight_ffn_ratio``, ``foresight_loss_type``, ``lr_foresight`` (falling
        back to ``lr``), ``beta1``/``beta2``, ``weight_decay``,
        ``max_grad_norm_generator``, ``projector_every_step``, ``max_replay_pairs`` and
        ``num_frame_per_block``; and this package's ``foresight_num_heads``,
        ``foresight_replay_device`` / ``_segments`` / ``_seed``,
        ``foresight_check_finite``, ``foresight_activation_budget_mib`` (a number, or
        ``none``), ``foresight_compute_dtype`` and the schedule keys ``foresight_weight_start``,
        ``foresight_weight_ramp``, ``foresight_weight_changes`` (a list of
        ``[step, weight]``) and ``foresight_weight_stop``. Other keys absent from
        ``args`` keep the recipe defaults; ``null`` counts as absent.

        Values are read as YAML and command lines write them (``"false"``, ``"off"``
        and ``0`` are false; ``"2e-6"`` is a number); anything else raises, naming
        the key. So do keys that look like ours but are not known (a typo such as
        ``foresight_wieght``, with the closest known key) and official options this
        package does not implement.

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
        keys, get = config_view(args)
        check_keys(keys)
        check_not_implemented(get)
        default = cls()

        def read(key: str, rule: Rule | str, otherwise: Any = None) -> Any:
            value = get(key)
            if value is None:
                return otherwise
            return check(key, value, _RULES[rule] if isinstance(rule, str) else rule, coerce=True)

        student_layer, encoder_layer = _layers(read, default)
        offsets = _offsets(get, read)
        fusion = _fusion(read)
        projector_type = read("foresight_projector_type", Rule("choice", choices=tuple(_UPSTREAM_PREDICTORS)), "dit")
        predictor, offset_conditioning = _UPSTREAM_PREDICTORS[projector_type]
        if (predictor == "multi_mlp" or offset_conditioning) and fusion == "mean":
            raise MiraiError(
                f"foresight_projector_type={projector_type!r} predicts each offset separately and needs one target "
                f"per offset: set foresight_delta_mean_pool: false (it is true, or absent and the recipe's true), "
                f"or use foresight_projector_type: dit"
            )
        max_pairs = read("max_replay_pairs", Rule("int", minimum=0, fix="0 replays all pairs"), 0)
        budget = get("foresight_activation_budget_mib")
        budget_off = isinstance(budget, str) and budget.strip().lower() == "none"  # no bound: one pass
        replay_device = get("foresight_replay_device")
        if isinstance(replay_device, str) and replay_device.strip().lower() == "none":
            replay_device = None
        else:
            replay_device = parse_device("foresight_replay_device", _first(replay_device, default.replay_device))

        cfg = cls(
            weight=read("foresight_weight", "weight", 0.0),
            student_layer=student_layer,
            encoder_layer=encoder_layer,
            offsets=offsets,
            fusion=fusion,
            predictor=predictor,
            predictor_depth=read("projection_layers_num", "predictor_depth", default.predictor_depth),
            ffn_ratio=read("foresight_ffn_ratio", "ffn_ratio", default.ffn_ratio),
            num_heads=read("foresight_num_heads", "num_heads"),
            offset_conditioning=offset_conditioning,
            loss=read("foresight_loss_type", "loss", default.loss),
            segment_frames=read("num_frame_per_block", "segment_frames", default.segment_frames),
            lr=read("lr_foresight", "lr") or read("lr", "lr", default.lr),  # `or`: lr is read only without lr_foresight
            betas=(read("beta1", _BETA, default.betas[0]), read("beta2", _BETA, default.betas[1])),
            weight_decay=read("weight_decay", "weight_decay", default.weight_decay),
            max_grad_norm=read("max_grad_norm_generator", "max_grad_norm", default.max_grad_norm),
            replay=read("projector_every_step", "replay", default.replay),
            replay_device=replay_device,
            replay_segments=read("foresight_replay_segments", "replay_segments"),
            replay_max_pairs=max_pairs or None,
            replay_seed=read("foresight_replay_seed", "replay_seed", default.replay_seed),
            weight_start=read("foresight_weight_start", Rule("int", minimum=0, what=_STEP), 0),
            weight_ramp=read("foresight_weight_ramp", Rule("int", minimum=0, what=_STEP), 0),
            weight_changes=_changes(get("foresight_weight_changes")),
            weight_stop=read("foresight_weight_stop", Rule("int", minimum=1, what="an int >= 1 (generator steps)")),
            check_finite=read("foresight_check_finite", "check_finite", default.check_finite),
            activation_budget_mib=None if budget_off else read("foresight_activation_budget_mib",
                                                               "activation_budget_mib", default.activation_budget_mib),
            compute_dtype=read("foresight_compute_dtype", "compute_dtype", default.compute_dtype),
        )
        if not cfg.enabled:
            _note_off(keys, get)
        return cfg


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiraiError(message)


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _layers(read, default: ForesightConfig) -> tuple[int, int]:
    layer = read("foresight_layer", "student_layer")
    student = read("foresight_student_layer", "student_layer")
    teacher = read("foresight_teacher_layer", "encoder_layer")
    if layer is not None and (student is None) != (teacher is None):
        given, value = ("foresight_student_layer", student) if student is not None else ("foresight_teacher_layer", teacher)
        raise MiraiError(
            f"foresight_layer={layer} is set with only {given}={value}: the official trainer then uses "
            f"foresight_layer for both blocks and ignores {given}; set both foresight_student_layer and "
            f"foresight_teacher_layer, or only foresight_layer"
        )
    if student is None and teacher is None and layer is not None:
        return layer, layer
    return _first(student, default.student_layer), _first(teacher, default.encoder_layer)


def _offsets(get, read) -> tuple[int, ...]:
    window = [key for key in ("foresight_delta", "foresight_skip", "foresight_include_current") if get(key) is not None]
    explicit = get("foresight_offsets")
    if explicit is not None:
        if window:
            raise MiraiError(
                f"foresight_offsets and {', '.join(window)} both set the target offsets; keep foresight_offsets "
                f"or the official window keys, not both"
            )
        if isinstance(explicit, (str, bytes)) or not isinstance(explicit, Iterable):
            fail("foresight_offsets", "a list of ints >= 0 such as [0, 1]", explicit)
        offset = Rule("int", minimum=0, what="a list of ints >= 0 such as [0, 1]")
        return normalise_offsets([check("foresight_offsets", v, offset, coerce=True) for v in explicit])
    include_current = read("foresight_include_current", Rule("bool"), True)
    delta = read("foresight_delta", Rule("int", minimum=0), 1)
    skip = read("foresight_skip", Rule("int", minimum=0), 0)
    offsets = ([0] if include_current else []) + list(range(1 + skip, delta + 1 + skip))
    if not offsets:
        raise MiraiError(
            "foresight_delta=0 with foresight_include_current=false leaves no target offset; "
            "set foresight_delta >= 1 or foresight_include_current: true"
        )
    return tuple(offsets)


def _window_keys(offsets: tuple[int, ...]) -> dict[str, Any]:
    """The official window keys that give ``offsets``, or ``foresight_offsets`` when none do."""
    rest = [d for d in offsets if d > 0]
    if not rest:
        return {"foresight_include_current": True, "foresight_delta": 0, "foresight_skip": 0}
    if rest == list(range(rest[0], rest[-1] + 1)):
        return {"foresight_include_current": offsets[0] == 0, "foresight_delta": len(rest), "foresight_skip": rest[0] - 1}
    return {"foresight_offsets": list(offsets)}


def _fusion(read) -> str:
    mean_pool = read("foresight_delta_mean_pool", Rule("bool"))
    fusion = read("foresight_fusion", "fusion")
    if fusion is None:
        return "none" if mean_pool is False else "mean"
    if mean_pool is not None and mean_pool != (fusion == "mean"):
        raise MiraiError(
            f"foresight_fusion={fusion!r} disagrees with foresight_delta_mean_pool={mean_pool}: 'mean' is "
            f"foresight_delta_mean_pool: true, 'none' and 'frame_mean' are false; keep one of the two keys"
        )
    return fusion


def _changes(value: Any) -> tuple[tuple[int, float], ...]:
    """``foresight_weight_changes`` from a YAML list of ``[step, weight]`` pairs."""
    if value is None:
        return ()
    expected = "a list of [step, weight] pairs such as [[1000, 1.0]]"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        fail("foresight_weight_changes", expected, value)
    pairs = []
    for pair in value:
        try:
            step, weight = pair
        except (TypeError, ValueError):  # not a pair (a 0-d tensor says it is iterable)
            fail("foresight_weight_changes", expected, value)
        if isinstance(pair, (str, bytes, Mapping)):
            fail("foresight_weight_changes", expected, value)
        pairs.append((
            check("foresight_weight_changes", step, Rule("int", minimum=0, what=f"{expected} with steps >= 0"), coerce=True),
            check("foresight_weight_changes", weight, Rule("number", minimum=0, what=f"{expected} with weights >= 0"),
                  coerce=True),
        ))
    return normalise_changes(pairs, name="foresight_weight_changes")


def _note_off(keys: list[str], get) -> None:
    """Say once (rank 0, Python logging) that a config with foresight keys leaves the term off."""
    from mirai_plugin.distributed import log_once

    ours = sorted(key for key in keys if key in OURS and key != "foresight_weight" and get(key) is not None)
    if not ours:
        return
    weight = get("foresight_weight")
    listed = ", ".join(ours[:4]) + (", ..." if len(ours) > 4 else "")
    log_once(
        f"the trainer config sets foresight keys ({listed}) but foresight_weight is "
        f"{'absent' if weight is None else repr(weight)}: the foresight term is off "
        f"(foresight_weight: 0.2 is the official recipe)"
    )


def check_field_names(cls: type, names: Iterable[str], where: str) -> None:
    """Refuse names that are not fields of the dataclass ``cls``, with the closest field."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise MiraiError(
            f"{cls.__name__}.{where}: unknown field(s) "
            + ", ".join(f"{name!r}{did_you_mean(name, fields)}" for name in unknown)
            + f"; the fields are {fields}"
        )


def fields_from_json(cls: type, text: Any) -> dict[str, Any]:
    """The fields a ``to_json`` wrote, checked: JSON text of an object whose keys are fields of ``cls``."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise MiraiError(
            f"{cls.__name__}.from_json needs the JSON text that to_json() writes, got {show(text)} ({error})"
        ) from None
    if not isinstance(data, dict):
        raise MiraiError(f"{cls.__name__}.from_json needs a JSON object of fields, got {type(data).__name__}")
    check_field_names(cls, data, "from_json")
    return data


def key_reader(args: Any):
    """``get(key, default)`` over a trainer config (a mapping or a namespace; see ``mirai_plugin.keys``)."""
    _, get = config_view(args)
    return lambda key, default: _first(get(key), default)


def check_schedule(cfg: Any) -> None:
    """Validate (and normalise) the weight-schedule fields shared by the video and image configs."""
    for name in ("weight_start", "weight_ramp"):
        object.__setattr__(cfg, name, check(name, getattr(cfg, name), Rule("int", minimum=0, what=_STEP)))
    stop = cfg.weight_stop
    if stop is not None and not (is_int(stop) and stop > cfg.weight_start):
        fail("weight_stop", f"None or a step after weight_start={cfg.weight_start}", stop)
    object.__setattr__(cfg, "weight_stop", None if stop is None else int(stop))


def scheduled_weight(cfg: Any, step: int) -> float:
    """``cfg.weight`` at generator step ``step`` under its start / ramp / changes / stop schedule."""
    step = check("step", step, Rule("int", minimum=0, what="a generator step (an int >= 0)"))
    if step < cfg.weight_start or (cfg.weight_stop is not None and step >= cfg.weight_stop):
        return 0.0
    weight = float(cfg.weight)
    for change_step, value in cfg.weight_changes:
        if step >= change_step:
            weight = value
    if cfg.weight_ramp:
        weight *= min(1.0, (step - cfg.weight_start + 1) / cfg.weight_ramp)
    return weight


def normalise_changes(changes: Any, *, name: str = "weight_changes") -> tuple[tuple[int, float], ...]:
    expected = "((step, weight), ...) with increasing steps >= 0 and finite weights >= 0"
    if isinstance(changes, (str, bytes, Mapping)):
        fail(name, expected, changes)
    try:
        pairs = tuple((step, weight) for step, weight in changes)
    except (TypeError, ValueError):
        fail(name, expected, changes)
    for step, weight in pairs:
        if not (is_int(step) and step >= 0 and is_number(weight) and weight >= 0 and weight < float("inf")):
            fail(name, expected, changes)
    if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
        fail(name, expected, changes, "sort the steps and give each step once")
    return tuple((int(step), float(weight)) for step, weight in pairs)


def normalise_betas(betas: Any, *, name: str = "betas") -> tuple[float, float]:
    expected = "two numbers in [0, 1) such as (0.0, 0.999)"
    if isinstance(betas, (str, bytes, Mapping)) or not isinstance(betas, Iterable):
        fail(name, expected, betas)
    values = tuple(betas)
    if len(values) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in values):
        fail(name, expected, betas)
    return float(values[0]), float(values[1])


def normalise_offsets(offsets: Any) -> tuple[int, ...]:
    expected = "a non-empty sequence of distinct ints >= 0 such as (0, 1) (0 = current segment, 1 = next)"
    if isinstance(offsets, (str, bytes, Mapping)) or not isinstance(offsets, Iterable):
        fail("offsets", expected, offsets)
    values = tuple(offsets)
    if not values:
        raise MiraiError("offsets is empty: give at least one segment offset, e.g. offsets=(0, 1)")
    if not all(is_int(v) and v >= 0 for v in values):
        fail("offsets", expected, offsets)
    if len(set(values)) != len(values):
        fail("offsets", expected, offsets, "offsets has duplicates; give each offset once")
    return tuple(sorted(int(v) for v in values))

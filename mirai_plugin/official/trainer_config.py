"""The official trainer's config keys <-> ``ForesightConfig``.

The official Video-Mirai trainer reads flat keys from its YAML (``foresight_weight``,
``foresight_delta``, ``projector_every_step``, ...); this package adds its own
``foresight_*`` keys for what the official trainer does not have. ``config_from_upstream``
reads a whole trainer config (argparse namespace, OmegaConf or dict) and
``upstream_keys`` writes a config back as keys; ``ForesightConfig.from_upstream`` /
``to_upstream`` call them. ``mirai_plugin.keys`` is the registry of every known key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mirai_plugin.checks import Rule, check, fail, normalise_offsets, parse_device
from mirai_plugin.collectives import log_once
from mirai_plugin.errors import MiraiError
from mirai_plugin.keys import OURS, check_keys, check_not_implemented, config_view
from mirai_plugin.schedule import STEP, normalise_changes

# Official `foresight_projector_type` values and what they mean here.
UPSTREAM_PREDICTORS = {
    "dit": ("dit", False),
    "dit_adaln": ("dit", True),
    "mlp": ("mlp", False),
    "simple": ("mlp", False),
    "multi_mlp": ("multi_mlp", False),
}
_BETA = Rule("number", minimum=0, below=1)


def upstream_keys(cfg: Any) -> dict[str, Any]:
    """The trainer-config keys that ``config_from_upstream`` reads back into ``cfg`` (see
    ``ForesightConfig.to_upstream``)."""
    if cfg.max_grad_norm is None:
        raise MiraiError(
            "max_grad_norm=None (no clipping) has no trainer key: the trainer clips the head at "
            "max_grad_norm_generator; give max_grad_norm a number to write the config as trainer keys"
        )
    projector = {"dit": "dit_adaln" if cfg.offset_conditioning else "dit"}.get(cfg.predictor, cfg.predictor)
    keys: dict[str, Any] = {
        "foresight_weight": cfg.weight,
        "foresight_student_layer": cfg.student_layer,
        "foresight_teacher_layer": cfg.encoder_layer,
        **_window_keys(cfg.offsets),
        "foresight_delta_mean_pool": cfg.fusion == "mean",
        "foresight_projector_type": projector,
        "projection_layers_num": cfg.predictor_depth,
        "foresight_ffn_ratio": cfg.ffn_ratio,
        "foresight_loss_type": cfg.loss,
        "num_frame_per_block": cfg.segment_frames,
        "lr_foresight": cfg.lr,
        "beta1": cfg.betas[0],
        "beta2": cfg.betas[1],
        "weight_decay": cfg.weight_decay,
        "max_grad_norm_generator": cfg.max_grad_norm,
        "projector_every_step": cfg.replay,
        "max_replay_pairs": cfg.replay_max_pairs or 0,
        "foresight_replay_device": cfg.replay_device if cfg.replay_device is not None else "none",
        "foresight_replay_seed": cfg.replay_seed,
        "foresight_check_finite": cfg.check_finite,
        "foresight_activation_budget_mib": (
            "none" if cfg.activation_budget_mib is None else cfg.activation_budget_mib),
        "foresight_compute_dtype": cfg.compute_dtype,
        "foresight_weight_start": cfg.weight_start,
        "foresight_weight_ramp": cfg.weight_ramp,
        "foresight_weight_changes": [list(change) for change in cfg.weight_changes],
    }
    if cfg.fusion == "frame_mean":
        keys["foresight_fusion"] = "frame_mean"
    optional = {
        "foresight_num_heads": cfg.num_heads,
        "foresight_replay_segments": cfg.replay_segments,
        "foresight_weight_stop": cfg.weight_stop,
    }
    keys.update({key: value for key, value in optional.items() if value is not None})
    return keys


def config_from_upstream(cls: Any, args: Any) -> Any:
    """A ``cls`` (``ForesightConfig``) from a trainer config (see ``ForesightConfig.from_upstream``)."""
    keys, get = config_view(args)
    check_keys(keys)
    check_not_implemented(get)
    default = cls()

    def read(key: str, rule: Rule | str, otherwise: Any = None) -> Any:
        value = get(key)
        if value is None:
            return otherwise
        return check(key, value, cls.RULES[rule] if isinstance(rule, str) else rule, coerce=True)

    student_layer, encoder_layer = _layers(read, default)
    offsets = _offsets(get, read)
    fusion = _fusion(read)
    projector_type = read("foresight_projector_type", Rule("choice", choices=tuple(UPSTREAM_PREDICTORS)), "dit")
    predictor, offset_conditioning = UPSTREAM_PREDICTORS[projector_type]
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
        weight_start=read("foresight_weight_start", Rule("int", minimum=0, what=STEP), 0),
        weight_ramp=read("foresight_weight_ramp", Rule("int", minimum=0, what=STEP), 0),
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


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _layers(read, default: Any) -> tuple[int, int]:
    layer = read("foresight_layer", "student_layer")
    student = read("foresight_student_layer", "student_layer")
    teacher = read("foresight_teacher_layer", "encoder_layer")
    if layer is not None and (student is None) != (teacher is None):
        given, value = (
            ("foresight_student_layer", student) if student is not None else ("foresight_teacher_layer", teacher)
        )
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
        return {
            "foresight_include_current": offsets[0] == 0,
            "foresight_delta": len(rest),
            "foresight_skip": rest[0] - 1,
        }
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
            check("foresight_weight_changes", step, Rule("int", minimum=0, what=f"{expected} with steps >= 0"),
                  coerce=True),
            check("foresight_weight_changes", weight, Rule("number", minimum=0, what=f"{expected} with weights >= 0"),
                  coerce=True),
        ))
    return normalise_changes(pairs, name="foresight_weight_changes")


def _note_off(keys: list[str], get) -> None:
    """Say once (rank 0, Python logging) that a config with foresight keys leaves the term off."""
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

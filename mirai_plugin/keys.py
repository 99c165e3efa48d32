"""The one registry of trainer-config keys this package knows.

``ForesightConfig.from_upstream`` receives the whole trainer config. Trainer keys pass
untouched; a key that looks like ours (``foresight_*``, ``mirai*``, or close to one of
the official names without the prefix, such as ``projection_layers_num``) must be in
one of these tables, or it is refused with the closest known key: a misspelt key
would be ignored and a run would train something else (a plain baseline, other
offsets) for days.

* ``CONFIG_KEYS``: read into ``ForesightConfig`` (official Video-Mirai keys and this
  package's own).
* ``TRAINER_KEYS``: the trainer's own keys that ``from_upstream`` also reads (the
  official trainer shares them between the generator and the projector).
* ``GLUE_KEYS``: read by the trainer glue (``mirai_plugin.integrations``).
* ``NOT_IMPLEMENTED``: official options this package does not implement, accepted only
  at the value that turns them off.
* ``OFFICIAL_RUNTIME``: official keys that hold no setting of their own.

>>> looks_like_ours("foresight_wieght"), looks_like_ours("lr_critic")
(True, False)
>>> unknown_keys(["foresight_wieght", "lr_critic", "foresight_weight"])
["foresight_wieght (did you mean 'foresight_weight'?)"]
"""

from __future__ import annotations

import argparse
import difflib
import os
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mirai_plugin.checks import Rule, check
from mirai_plugin.errors import MiraiError

CONFIG_KEYS = {
    "foresight_weight": "lambda on the foresight loss; absent or 0: the term is off",
    "foresight_student_layer": "generator block (0-based) whose output is aligned",
    "foresight_teacher_layer": "encoder block (0-based) whose output is the target",
    "foresight_layer": "official: both layers, used when foresight_student_layer and _teacher_layer are not both set",
    "foresight_delta": "furthest segment offset of the target window",
    "foresight_skip": "skip the first offsets after 0",
    "foresight_include_current": "include offset 0 in the window",
    "foresight_offsets": "explicit offsets, instead of foresight_delta / _skip / _include_current",
    "foresight_delta_mean_pool": "true: one target, the mean over the offsets; false: one loss per offset",
    "foresight_fusion": "mean, none or frame_mean (instead of foresight_delta_mean_pool)",
    "foresight_projector_type": "dit, dit_adaln, mlp (or simple), multi_mlp",
    "projection_layers_num": "DiT predictor depth",
    "foresight_ffn_ratio": "predictor FFN width / student width",
    "foresight_num_heads": "attention heads of the DiT predictor (default: the generator's)",
    "foresight_loss_type": "cosine or mse",
    "lr_foresight": "the head's own AdamW learning rate (falls back to lr)",
    "projector_every_step": "replay the last generator step's pairs on critic steps",
    "max_replay_pairs": "replay at most this many segments (0: all)",
    "foresight_replay_device": "where replay pairs are kept: cpu, cuda..., or none (where they were computed)",
    "foresight_replay_segments": "segments per replay backward (1: the official memory bound)",
    "foresight_replay_seed": "seed of the replay sampling",
    "foresight_check_finite": "raise, naming the segment, when the loss is NaN/inf",
    "foresight_activation_budget_mib": "most predictor activations kept at once (MiB; none: one pass)",
    "foresight_compute_dtype": "predictor compute dtype: float32 or bfloat16 (autocast)",
    "foresight_weight_start": "generator step at which the term turns on",
    "foresight_weight_ramp": "steps of a linear ramp up to the weight",
    "foresight_weight_changes": "[[step, weight], ...]: from step on, the weight is weight",
    "foresight_weight_stop": "generator step from which the term is off",
}
TRAINER_KEYS = {
    "lr": "the generator's learning rate; the head's when lr_foresight is absent",
    "beta1": "AdamW beta1 of the generator and the head",
    "beta2": "AdamW beta2 of the generator and the head",
    "weight_decay": "AdamW weight decay of the generator and the head",
    "num_frame_per_block": "latent frames per segment",
    "max_grad_norm_generator": "gradient clip norm of the generator and the head",
}
GLUE_KEYS = {
    "foresight_head_sharding": "replicate, ddp or fsdp",
    "foresight_head_init": "a checkpoint to start the head from (ours or an official model.pt)",
    "foresight_encoder_name": "Stage 2 (ODE): the frozen bidirectional Wan that gives the targets",
    "foresight_encoder": (
        "LongLive: bidirectional (a frozen Wan2.2-TI2V-5B from foresight_encoder_ckpt) or causal_real_score"),
    "foresight_encoder_ckpt": (
        "LongLive: the bidirectional encoder's weights (needed by foresight_encoder: bidirectional)"),
    "foresight_encoder_sharding": "LongLive: fsdp (wrapped like the real score) or replicate",
    "foresight_scene_cut": "LongLive: mask (no target across a scene cut) or keep",
    "foresight_window_first_block": "LongLive, Rolling Forcing: as_dmd, supervise or mask the DMD window's first block",
    "foresight_window_blocks": "Rolling Forcing: which blocks of a window call are supervised (all, last, noise_below)",
    "foresight_window_max_timestep": "Rolling Forcing: noise_below keeps blocks at or under this timestep",
    "foresight_i2v_first_block": "LongLive: supervise or mask the block holding I2V's conditioning latent",
}
# key: (the value that turns it off, how to get the behaviour here if there is a way)
NOT_IMPLEMENTED = {
    "foresight_virtual_blocks": (False, ""),
    "foresight_spatial_offset": (False, ""),
    "foresight_spatial_offset_max": (3, "it only acts with foresight_spatial_offset"),
    "foresight_online_mean_pool": (False, ""),
    "block_wise_using_frame_wise_foresight": (False, "frame-wise targets: foresight_fusion: frame_mean"),
    "foresight_start_step": (
        0,
        (
            "for a late start use foresight_weight_start, counted in generator steps "
            "(the official step count divided by dfake_gen_update_ratio)"
        ),
    ),
}
OFFICIAL_RUNTIME = {
    "cache_foresight_pairs": "set by the official trainer from projector_every_step",
}
KNOWN = {**CONFIG_KEYS, **TRAINER_KEYS, **GLUE_KEYS, **dict.fromkeys(NOT_IMPLEMENTED, ""), **OFFICIAL_RUNTIME}
OURS = [key for key in KNOWN if key not in TRAINER_KEYS]

GLUE_RULES = {
    "foresight_head_sharding": Rule("choice", choices=("replicate", "ddp", "fsdp")),
    "foresight_head_init": Rule("str", none=True, what="a checkpoint path"),
    "foresight_encoder_name": Rule("str", none=True, what="a Wan model name such as 'Wan2.1-T2V-1.3B'"),
    "foresight_encoder": Rule("choice", choices=("bidirectional", "causal_real_score")),
    "foresight_encoder_ckpt": Rule("str", none=True, what="a checkpoint path"),
    "foresight_encoder_sharding": Rule("choice", choices=("fsdp", "replicate")),
    "foresight_scene_cut": Rule("choice", choices=("mask", "keep")),
    "foresight_window_first_block": Rule("choice", choices=("as_dmd", "supervise", "mask")),
    "foresight_window_blocks": Rule("choice", choices=("all", "last", "noise_below")),
    "foresight_window_max_timestep": Rule("number", minimum=0, none=True, what="a timestep in [0, 1000]"),
    "foresight_i2v_first_block": Rule("choice", choices=("supervise", "mask")),
}


def looks_like_ours(key: str) -> bool:
    """A ``foresight``/``mirai`` key, or one within a typo of a known key of ours."""
    lowered = key.lower()
    if "foresight" in lowered or lowered.startswith("mirai"):
        return True
    return bool(difflib.get_close_matches(lowered, OURS, n=1, cutoff=0.85))


def unknown_keys(keys: Iterable[str]) -> list[str]:
    """The keys that look like ours and are in no table, each with its closest known key."""
    found = []
    for key in keys:
        if key in KNOWN or not looks_like_ours(key):
            continue
        close = difflib.get_close_matches(key, OURS, n=1, cutoff=0.6)
        found.append(f"{key} (did you mean {close[0]!r}?)" if close else key)
    return found


def config_view(args: Any, *, caller: str = "from_upstream") -> tuple[list[str], Callable[[str], Any]]:
    """``(keys, get)`` over a trainer config: a mapping (dict, OmegaConf ``DictConfig``) or a
    namespace (``argparse.Namespace``, ``types.SimpleNamespace``). ``get(key)`` is ``None``
    for an absent key (YAML ``null`` reads as absent, as the official configs use it)."""
    if isinstance(args, Mapping):

        def get(key: str) -> Any:
            # DictConfig answers `in` without the struct-mode and missing-value errors its get() raises.
            return args[key] if key in args else None

        return [key for key in args if isinstance(key, str)], get
    if isinstance(args, (argparse.Namespace, types.SimpleNamespace)):
        values = vars(args)
        return list(values), values.get
    hint = ""
    if isinstance(args, (str, bytes, os.PathLike)):
        hint = "; to read a YAML file pass OmegaConf.load(path) (or yaml.safe_load(open(path)))"
    raise MiraiError(
        f"{caller} reads the trainer config as a mapping (dict, OmegaConf DictConfig) or a namespace "
        f"(argparse.Namespace), got {type(args).__name__}{hint}"
    )


def check_keys(keys: Iterable[str]) -> None:
    """Refuse keys that look like ours and are not known, and official options not implemented here."""
    unknown = unknown_keys(keys)
    if unknown:
        raise MiraiError(
            f"unknown foresight key(s) in the trainer config: {'; '.join(unknown)}. A misspelt key would be "
            f"ignored and the run would train something else; fix the spelling or remove the key "
            f"(known keys: docs/self-forcing.md)"
        )


def check_not_implemented(get: Callable[[str], Any]) -> None:
    for key, (off, how) in NOT_IMPLEMENTED.items():
        value = get(key)
        if value is None or _same(value, off):
            continue
        raise MiraiError(
            f"upstream option {key}={value!r} is not implemented by mirai_plugin; set {key}: {off!r} "
            f"(the released recipe) or remove the key" + (f"; {how}" if how else "")
        )


def _same(value: Any, off: Any) -> bool:
    if isinstance(off, bool):
        try:
            return check("", value, Rule("bool"), coerce=True) is off
        except MiraiError:
            return False
    try:
        return check("", value, Rule("number"), coerce=True) == off
    except MiraiError:
        return False


def glue_value(args: Any, key: str, default: Any = None) -> Any:
    """A glue key's value, checked (``default`` when absent)."""
    _, get = config_view(args, caller="the foresight glue")
    value = get(key)
    if value is None:
        return default
    return check(key, value, GLUE_RULES[key], coerce=True)


def key_reader(args: Any):
    """``get(key, default)`` over a trainer config (a mapping or a namespace; see ``mirai_plugin.keys``)."""
    _, get = config_view(args)
    return lambda key, default: default if get(key) is None else get(key)

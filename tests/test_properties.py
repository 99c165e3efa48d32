"""Property tests: random values, valid and not, through the configs, `from_upstream` and `fuse_targets`.

Each either succeeds with the value a user would expect (the oracles below are written independently of
the checks in the package) or raises `MiraiError` naming the argument; never another exception type.
Derandomized and bounded, so CI runs the same examples every time, fast.
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_config import OFFICIAL_RECIPE

from mirai_plugin import ForesightConfig, MiraiError, fuse_targets
from mirai_plugin.image import ImageForesightConfig
from mirai_plugin.keys import KNOWN, OURS

BOUNDED = settings(derandomize=True, max_examples=60, deadline=None)

WORDS = ["", "0", "1", "3", "-2", "2e-6", "0.5", "nan", "inf", "true", "false", "off", "On", "yes", "abc", "cpu",
         "mean", "dit", "3.0", " 4 "]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, -0.0, 1e-6, 0.999]),
    st.sampled_from(WORDS),
    st.lists(st.integers(-2, 5), max_size=3),
)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def raises_naming(name, build):
    with pytest.raises(MiraiError) as caught:
        build()
    assert name in str(caught.value), (name, str(caught.value))


# ------------------------------------------------------------------ ForesightConfig

INT_AT_LEAST = {"student_layer": 0, "encoder_layer": 0, "predictor_depth": 1, "segment_frames": 1,
                "replay_seed": 0, "weight_start": 0, "weight_ramp": 0}
INT_OR_NONE = {"num_heads": 1, "replay_segments": 1, "replay_max_pairs": 1, "weight_stop": 1}
NUMBER = {"weight": (0, None), "ffn_ratio": (None, 0), "lr": (None, 0), "weight_decay": (0, None)}  # (>=, >)
BOOL = ("replay", "check_finite")
CHOICE = {"fusion": ("mean", "none", "frame_mean"), "loss": ("cosine", "mse"), "predictor": ("dit", "mlp")}


def expected_field(name, value):
    """What ForesightConfig(**{name: value}) should hold, or None when it must be refused."""
    if name in INT_AT_LEAST:
        return value if is_int(value) and value >= INT_AT_LEAST[name] else None
    if name in INT_OR_NONE:
        return ("none",) if value is None else (value if is_int(value) and value >= INT_OR_NONE[name] else None)
    if name in NUMBER:
        at_least, above = NUMBER[name]
        ok = is_number(value) and (at_least is None or value >= at_least) and (above is None or value > above)
        return float(value) if ok else None
    if name == "max_grad_norm":
        return ("none",) if value is None else (float(value) if is_number(value) and value > 0 else None)
    if name in BOOL:
        return value if isinstance(value, bool) else None
    if name == "offset_conditioning":
        return False if value is False else None  # True needs per-offset targets (a cross-field error)
    return value if isinstance(value, str) and value in CHOICE[name] else None


def check_field(cls, name, value, expected, *, same_type):
    """``cls(name=value)`` keeps ``expected`` (``("none",)``: None), or refuses naming the field (``expected`` None)."""
    if expected is None:
        raises_naming(name, lambda: cls(**{name: value}))
        return
    got = getattr(cls(**{name: value}), name)
    if expected == ("none",):
        assert got is None
    else:
        assert got == expected and (not same_type or type(got) is type(expected))


FIELDS = sorted([*INT_AT_LEAST, *INT_OR_NONE, *NUMBER, "max_grad_norm", *BOOL, "offset_conditioning", *CHOICE])


@BOUNDED
@given(name=st.sampled_from(FIELDS), value=SCALARS)
def test_foresight_config_fields_take_what_a_user_means_or_name_themselves(name, value):
    check_field(ForesightConfig, name, value, expected_field(name, value), same_type=True)


@BOUNDED
@given(offsets=st.one_of(SCALARS, st.lists(st.one_of(st.integers(-2, 6), st.booleans(), st.floats(0, 3)), max_size=4)))
def test_offsets_are_distinct_ints_at_least_0(offsets):
    good = (isinstance(offsets, list) and offsets and all(is_int(v) and v >= 0 for v in offsets)
            and len(set(offsets)) == len(offsets))
    if good:
        assert ForesightConfig(offsets=offsets).offsets == tuple(sorted(offsets))
    else:
        raises_naming("offsets", lambda: ForesightConfig(offsets=offsets))


@BOUNDED
@given(betas=st.one_of(SCALARS, st.lists(st.one_of(st.floats(-1, 2), st.booleans(), st.sampled_from(WORDS)),
                                         max_size=3)))
def test_betas_are_two_numbers_in_0_1(betas):
    good = isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
    if good:
        assert ForesightConfig(betas=betas).betas == (float(betas[0]), float(betas[1]))
    else:
        raises_naming("betas", lambda: ForesightConfig(betas=betas))


DEVICES = {"cpu": "cpu", "cuda": "cuda", "cuda:1": "cuda:1", "cpu:0": "cpu:0", "mps": "mps", None: None}


@BOUNDED
@given(device=st.one_of(st.sampled_from([*DEVICES, "gpu", "meta", "", "cuda:x", "cuda:-1"]), SCALARS))
def test_replay_device_is_torch_device_syntax(device):
    if (device is None or isinstance(device, str)) and device in DEVICES:
        assert ForesightConfig(replay_device=device).replay_device == DEVICES[device]
    else:
        raises_naming("replay_device", lambda: ForesightConfig(replay_device=device))


# --------------------------------------------------------------- ImageForesightConfig

IMAGE_INT = {"student_layer": 0, "prefix_tokens": 0, "projector_dim": 1}
IMAGE_NUMBER = {"weight": (0, None, None), "lr": (None, 0, None), "weight_decay": (0, None, None),
                "ema_decay": (0, None, 1)}  # (>=, >, <)
IMAGE_CHOICE = {"source": ("ema", "encoder"), "order": ("grid", "raster"), "border": ("raster", "drop"),
                "loss": ("cosine", "mse")}
IMAGE_FIELDS = sorted([*IMAGE_INT, *IMAGE_NUMBER, *IMAGE_CHOICE, "neighbours", "align_prefix", "max_grad_norm"])


def expected_image_field(name, value):
    if name in IMAGE_INT:
        return value if is_int(value) and value >= IMAGE_INT[name] else None
    if name in IMAGE_NUMBER:
        at_least, above, below = IMAGE_NUMBER[name]
        ok = is_number(value) and all((
            at_least is None or value >= at_least, above is None or value > above, below is None or value < below))
        return float(value) if ok else None
    if name == "neighbours":
        return 3 if value is None else (value if is_int(value) and value >= 1 else None)
    if name == "align_prefix":
        return True if value is None else (value if isinstance(value, bool) else None)  # source "ema"
    if name == "max_grad_norm":
        return ("none",) if value is None else (float(value) if is_number(value) and value > 0 else None)
    return value if isinstance(value, str) and value in IMAGE_CHOICE[name] else None


@BOUNDED
@given(name=st.sampled_from(IMAGE_FIELDS), value=SCALARS)
def test_image_config_fields_take_what_a_user_means_or_name_themselves(name, value):
    check_field(ImageForesightConfig, name, value, expected_image_field(name, value), same_type=False)


@BOUNDED
@given(weights=st.one_of(SCALARS, st.lists(st.one_of(st.floats(-1, 3), st.booleans()), max_size=4)))
def test_image_head_weights_are_one_factor_per_offset(weights):
    good = (isinstance(weights, list) and len(weights) == 3 and all(is_number(w) and w >= 0 for w in weights)
            and any(w > 0 for w in weights))
    if weights is None:
        assert ImageForesightConfig(head_weights=None).head_weights == (1 / 3,) * 3
    elif good:
        assert ImageForesightConfig(head_weights=weights).head_weights == tuple(float(w) for w in weights)
    else:
        raises_naming("head_weights", lambda: ImageForesightConfig(head_weights=weights))


# ------------------------------------------------------------------- from_upstream

TRUE, FALSE = ("true", "yes", "on", "y", "1"), ("false", "no", "off", "n", "0")


def read_number(value):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if is_number(value) else None


def read_int(value):
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if is_int(value) else None


def read_bool(value):
    if isinstance(value, bool):
        return value
    if is_int(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    return None


def offsets_for(delta):
    return (0, *range(1, delta + 1))


# key: (reader, is the read value allowed, the field, the field's value from the read value)
UPSTREAM = {
    "foresight_weight": (read_number, lambda v: v >= 0, "weight", float),
    "lr_foresight": (read_number, lambda v: v > 0, "lr", float),
    "foresight_ffn_ratio": (read_number, lambda v: v > 0, "ffn_ratio", float),
    "projection_layers_num": (read_int, lambda v: v >= 1, "predictor_depth", int),
    "foresight_delta": (read_int, lambda v: v >= 0, "offsets", offsets_for),
    "max_replay_pairs": (read_int, lambda v: v >= 0, "replay_max_pairs", lambda v: v or None),
    "foresight_weight_start": (read_int, lambda v: v >= 0, "weight_start", int),
    "projector_every_step": (read_bool, lambda v: True, "replay", bool),
    "foresight_include_current": (read_bool, lambda v: True, "offsets", lambda v: (0, 1) if v else (1,)),
}


@BOUNDED
@given(key=st.sampled_from(sorted(UPSTREAM)), value=SCALARS)
def test_from_upstream_reads_values_as_yaml_users_mean_them_or_names_the_key(key, value):
    read, allowed, field, to_field = UPSTREAM[key]
    args = {**OFFICIAL_RECIPE, key: value}
    if value is None:  # YAML null: absent, the recipe's default (an absent weight is 0: the term is off)
        default = 0.0 if key == "foresight_weight" else getattr(ForesightConfig(), field)
        assert getattr(ForesightConfig.from_upstream(args), field) == default
        return
    got = read(value)
    if got is None or not allowed(got):
        raises_naming(key, lambda: ForesightConfig.from_upstream(args))
        return
    assert getattr(ForesightConfig.from_upstream(args), field) == to_field(got)


def one_typo(key, position, letter, kind):
    if kind == "drop":
        return key[:position] + key[position + 1 :]
    if kind == "swap":
        return key[:position] + letter + key[position + 1 :]
    return key[:position] + letter + key[position:]


@BOUNDED
@given(key=st.sampled_from(OURS), position=st.integers(0, 30), letter=st.sampled_from("aeiostx_"),
       kind=st.sampled_from(["drop", "swap", "insert"]))
def test_a_typo_of_any_key_of_ours_is_refused_with_a_suggestion(key, position, letter, kind):
    typo = one_typo(key, min(position, len(key) - 1), letter, kind)
    assume(typo not in KNOWN)
    with pytest.raises(MiraiError) as caught:
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, typo: 1})
    assert f"{typo} (did you mean" in str(caught.value)


@BOUNDED
@given(name=st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=20), value=SCALARS)
def test_the_trainers_own_keys_pass_untouched(name, value):
    key = f"trainer_{name}"  # no key of ours starts like this or is within a typo of one
    assume("foresight" not in key)
    assert ForesightConfig.from_upstream({**OFFICIAL_RECIPE, key: value}) == ForesightConfig()


VALID_CONFIGS = st.builds(
    lambda weight, layers, window, fusion_kind, depth, ffn, loss, frames, lr, pairs, start, seed: _config(
        weight, layers, window, fusion_kind, depth, ffn, loss, frames, lr, pairs, start, seed),
    st.floats(0, 3), st.tuples(st.integers(0, 40), st.integers(0, 40)),
    st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True), st.sampled_from(["mean", "none", "frame_mean",
                                                                                           "multi_mlp", "dit_adaln"]),
    st.integers(1, 6), st.floats(0.25, 8), st.sampled_from(["cosine", "mse"]), st.integers(1, 4),
    st.floats(1e-7, 1e-2), st.sampled_from([None, 1, 7]), st.integers(0, 100), st.integers(0, 2**31))


def _config(weight, layers, window, fusion_kind, depth, ffn, loss, frames, lr, pairs, start, seed):
    fusion = "none" if fusion_kind in ("multi_mlp", "dit_adaln") else fusion_kind
    return ForesightConfig(
        weight=weight, student_layer=layers[0], encoder_layer=layers[1], offsets=window, fusion=fusion,
        predictor="multi_mlp" if fusion_kind == "multi_mlp" else "dit", offset_conditioning=fusion_kind == "dit_adaln",
        predictor_depth=depth, ffn_ratio=ffn, loss=loss, segment_frames=frames, lr=lr, replay_max_pairs=pairs,
        weight_start=start, replay_seed=seed)


@BOUNDED
@given(cfg=VALID_CONFIGS)
def test_a_config_written_as_upstream_keys_reads_back_the_same(cfg):
    assert ForesightConfig.from_upstream(cfg.to_upstream()) == cfg


# -------------------------------------------------------------------- fuse_targets

BASE = {"segment_frames": 2, "tokens_per_frame": 4, "prefix_frames": 0, "offsets": (0, 1), "fusion": "mean",
        "segments": None}
FRAMES, TOKENS = 6, 24  # the encoder saw 6 frames of 4 tokens


def fuse_ok(name, value):
    """Whether fuse_targets must accept BASE with ``name`` set to ``value``."""
    if name == "segment_frames":
        return is_int(value) and value >= 1 and FRAMES % value == 0
    if name == "tokens_per_frame":
        return is_int(value) and value >= 1 and TOKENS % value == 0 and (TOKENS // value) % 2 == 0
    if name == "prefix_frames":
        return is_int(value) and 0 <= value < FRAMES and (FRAMES - value) % 2 == 0
    if name == "offsets":
        return (isinstance(value, list) and bool(value) and all(is_int(v) and v >= 0 for v in value)
                and len(set(value)) == len(value))
    if name == "fusion":
        return value in ("mean", "none", "frame_mean")
    return value is None or (is_int(value) and 0 <= value < 3) or (
        isinstance(value, list) and all(is_int(v) and 0 <= v < 3 for v in value))


@BOUNDED
@given(name=st.sampled_from(sorted(BASE)), value=SCALARS)
def test_fuse_targets_succeeds_with_the_right_shapes_or_names_the_argument(name, value):
    arguments = {**BASE, name: value}
    z = torch.randn(1, TOKENS, 3)
    if not fuse_ok(name, value):
        raises_naming(name, lambda: fuse_targets(z, **arguments))
        return
    result = fuse_targets(z, **arguments)
    n = arguments["segment_frames"] * arguments["tokens_per_frame"]
    k, o = result.valid.shape
    assert k == result.segments.numel() and o == len(arguments["offsets"])
    assert result.segments.tolist() == sorted(result.segments.tolist())
    expected = {
        "mean": (1, k, n, 3),
        "none": (1, k, o, n, 3),
        "frame_mean": (1, k, o, arguments["tokens_per_frame"], 3),
    }
    assert tuple(result.target.shape) == expected[arguments["fusion"]]

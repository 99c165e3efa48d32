"""ForesightConfig: recipe defaults, the official keys, and validation that names the fix."""

import argparse

import pytest

from mirai_plugin import ForesightConfig, MiraiError

OFFICIAL_RECIPE = dict(  # the official Stage-3 recipe, as docs/self-forcing.md lists its keys
    foresight_weight=0.2,
    foresight_student_layer=15,
    foresight_teacher_layer=20,
    foresight_delta=1,
    foresight_include_current=True,
    foresight_delta_mean_pool=True,
    foresight_projector_type="dit",
    projection_layers_num=3,
    foresight_ffn_ratio=4,
    foresight_loss_type="cosine",
    lr_foresight=2.0e-6,
    projector_every_step=True,
    num_frame_per_block=3,
    beta1=0.0,
    beta2=0.999,
    weight_decay=0.01,
)


def test_defaults_are_the_official_recipe():
    cfg = ForesightConfig()
    assert (cfg.weight, cfg.student_layer, cfg.encoder_layer) == (0.2, 15, 20)
    assert (cfg.offsets, cfg.fusion, cfg.predictor, cfg.predictor_depth) == ((0, 1), "mean", "dit", 3)
    assert (cfg.loss, cfg.lr, cfg.betas, cfg.replay, cfg.segment_frames) == ("cosine", 2e-6, (0.0, 0.999), True, 3)


@pytest.mark.parametrize("wrap", [dict, lambda d: argparse.Namespace(**d), "omegaconf"])
def test_from_upstream_reads_official_keys(wrap):
    if wrap == "omegaconf":
        omegaconf = pytest.importorskip("omegaconf")
        wrap = omegaconf.OmegaConf.create
    assert ForesightConfig.from_upstream(wrap(OFFICIAL_RECIPE)) == ForesightConfig()


def test_from_upstream_variants():
    per_offset = ForesightConfig.from_upstream(
        {**OFFICIAL_RECIPE, "foresight_delta": 2, "foresight_delta_mean_pool": False}
    )
    assert per_offset.offsets == (0, 1, 2) and per_offset.fusion == "none"
    next_only = ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_include_current": False})
    assert next_only.offsets == (1,)
    skipped = ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_skip": 1, "foresight_delta": 2})
    assert skipped.offsets == (0, 2, 3)
    shared = ForesightConfig.from_upstream(
        {"foresight_weight": 0.1, "foresight_layer": 12, "foresight_student_layer": None, "lr": 1e-5}
    )
    assert (shared.student_layer, shared.encoder_layer, shared.lr) == (12, 12, 1e-5)
    adaln = ForesightConfig.from_upstream(
        {**OFFICIAL_RECIPE, "foresight_projector_type": "dit_adaln", "foresight_delta_mean_pool": False}
    )
    assert adaln.offset_conditioning


def test_absent_weight_means_disabled():
    cfg = ForesightConfig.from_upstream({"num_frame_per_block": 1})
    assert not cfg.enabled and cfg.segment_frames == 1


def test_unsupported_official_options_raise():
    with pytest.raises(
        MiraiError, match="foresight_spatial_offset=True is not implemented.*set foresight_spatial_offset: False"
    ):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_spatial_offset": True})
    with pytest.raises(MiraiError, match=r"foresight_projector_type must be one of .*'dit'.*got 'transformer'"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_projector_type": "transformer"})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(offsets=()), "offsets is empty"),
        (dict(offsets=(0, -1)), "ints >= 0"),
        (dict(offsets=(1, 1)), "duplicates"),
        (dict(weight=-0.1), "weight must be a finite number >= 0"),
        (dict(student_layer=-1), "student_layer must be a 0-based block index"),
        (dict(fusion="max"), "fusion must be one of"),
        (dict(predictor="multi_mlp"), "pass fusion='none'"),
        (dict(offset_conditioning=True), "pass fusion='none'"),
        (dict(offset_conditioning=True, predictor="mlp", fusion="none"), "pass predictor='dit'"),
        (dict(segment_frames=0), "segment_frames must be an int >= 1"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
        (dict(max_grad_norm=0), "max_grad_norm must be a finite number > 0 or None"),
    ],
)
def test_validation_names_the_fix(changes, message):
    with pytest.raises(MiraiError, match=message):
        ForesightConfig(**changes)


def test_json_round_trip_and_keyword_only():
    cfg = ForesightConfig(offsets=(0, 1, 2), fusion="none", predictor="multi_mlp")
    assert ForesightConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TypeError):
        ForesightConfig(0.2)

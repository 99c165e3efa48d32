"""No silent failure: each bad input of the acceptance list gets a clear error (naming the argument and
the fix), each CLI error exits 2 with one `error:` line and no traceback, and a failure changes nothing."""

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from synthetic import synthetic_results
from test_config import OFFICIAL_RECIPE
from test_glue import ARGS, TinyDMD
from torch import nn

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden, fuse_targets
from mirai_plugin.image import FrozenImageEncoder, ImageForesightConfig, TokenForesightHead
from mirai_plugin.integrations.resolve import ROLLING_UPSTREAMS, resolve_rolling_forcing
from mirai_plugin.keys import CONFIG_KEYS, GLUE_KEYS, NOT_IMPLEMENTED
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.patching import PATCHES, parse_patch

omegaconf = pytest.importorskip("omegaconf")
OmegaConf = omegaconf.OmegaConf


def head_config(**changes):
    base = {"student_layer": 1, "encoder_layer": 3, "num_heads": 2, "segment_frames": 1, "predictor_depth": 1,
            "replay_device": None}
    return ForesightConfig(**{**base, **changes})


def cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of the command."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------ from_upstream: typos and non-configs


def test_from_upstream_refuses_a_mistyped_weight_with_the_closest_key():
    with pytest.raises(MiraiError, match=r"foresight_wieght \(did you mean 'foresight_weight'\?\)"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_wieght": 0.2})


def test_from_upstream_refuses_a_mistyped_delta_with_the_closest_key():
    with pytest.raises(MiraiError, match=r"foresight_delt \(did you mean 'foresight_delta'\?\).*fix the spelling"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_delt": 2})


@pytest.mark.parametrize("key, closest", [("projection_layer_num", "projection_layers_num"),
                                          ("lr_foresigth", "lr_foresight"),
                                          ("projector_every_steps", "projector_every_step"),
                                          ("max_replay_pair", "max_replay_pairs")])
def test_from_upstream_refuses_typos_of_the_official_keys_without_the_prefix(key, closest):
    with pytest.raises(MiraiError, match=rf"{key} \(did you mean '{closest}'\?\)"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, key: 1})


def test_from_upstream_leaves_the_trainers_own_keys_alone():
    trainer = {"lr_critic": 4e-7, "beta1_critic": 0.0, "real_name": "Wan2.1-T2V-14B", "denoising_step_list": [1000],
               "projector": {"num_layers": 3}, "model_kwargs": {"timestep_shift": 5.0}, "weight_decay": 0.01}
    assert ForesightConfig.from_upstream({**OFFICIAL_RECIPE, **trainer}) == ForesightConfig()


@pytest.mark.parametrize("args", ["configs/video_mirai_dmd_chunkwise.yaml", Path("x.yaml")])
def test_from_upstream_refuses_a_yaml_path(args):
    with pytest.raises(MiraiError, match=r"got (str|PosixPath|WindowsPath); to read a YAML file pass OmegaConf.load"):
        ForesightConfig.from_upstream(args)


@pytest.mark.parametrize("args", [None, 0.2, ["foresight_weight", 0.2]])
def test_from_upstream_refuses_what_is_not_a_config(args):
    with pytest.raises(MiraiError, match="as a mapping .* or a namespace"):
        ForesightConfig.from_upstream(args)


@pytest.mark.parametrize("word", ["false", "False", "off", "no", "0", 0])
def test_string_booleans_read_as_yaml_users_mean_them(word):
    cfg = ForesightConfig.from_upstream(
        {**OFFICIAL_RECIPE, "foresight_include_current": word, "projector_every_step": word})
    assert cfg.offsets == (1,) and cfg.replay is False


def test_a_word_that_is_no_boolean_is_refused():
    with pytest.raises(MiraiError, match="foresight_include_current must be true or false, got 'maybe'"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_include_current": "maybe"})


def test_numbers_written_as_strings_are_read_and_junk_is_refused():
    cfg = ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "lr_foresight": "2e-6", "projection_layers_num": "3"})
    assert cfg.lr == 2e-6 and cfg.predictor_depth == 3
    with pytest.raises(MiraiError, match="lr_foresight must be a finite number > 0, got 'fast'"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "lr_foresight": "fast"})
    with pytest.raises(MiraiError, match="foresight_weight must be a finite number >= 0, got True"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_weight": True})


def test_official_options_not_implemented_are_refused_unless_off():
    assert ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_virtual_blocks": False}) == ForesightConfig()
    for key, (off, _) in NOT_IMPLEMENTED.items():
        on = (not off) if isinstance(off, bool) else off + 1
        with pytest.raises(MiraiError, match=rf"{key}={on!r} is not implemented.*set {key}: {off!r}"):
            ForesightConfig.from_upstream({**OFFICIAL_RECIPE, key: on})


def test_foresight_layer_with_one_of_the_pair_is_ambiguous():
    with pytest.raises(MiraiError, match="ignores foresight_student_layer; set both"):
        ForesightConfig.from_upstream({"foresight_weight": 0.2, "foresight_layer": 12, "foresight_student_layer": 3})


def test_conflicting_keys_are_refused():
    with pytest.raises(MiraiError, match="foresight_fusion='mean' disagrees with foresight_delta_mean_pool=False"):
        ForesightConfig.from_upstream(
            {**OFFICIAL_RECIPE, "foresight_fusion": "mean", "foresight_delta_mean_pool": False}
        )
    with pytest.raises(MiraiError, match="foresight_offsets and foresight_delta"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_offsets": [0, 2]})
    with pytest.raises(MiraiError, match="'multi_mlp' .* set foresight_delta_mean_pool: false"):
        ForesightConfig.from_upstream({**OFFICIAL_RECIPE, "foresight_projector_type": "multi_mlp"})


def configs_added_by_patches():
    for patch in PATCHES.values():
        for change in parse_patch(patch.text()):
            if change.new_file and change.path.endswith(".yaml"):
                yield pytest.param(patch.name, "\n".join(change.added), id=f"{patch.name}:{change.path}")


@pytest.mark.parametrize("name, text", list(configs_added_by_patches()))
def test_the_patches_configs_are_read_as_written(name, text, tmp_path):
    from mirai_plugin.integrations.self_forcing import upstream_config

    config = OmegaConf.create(text)
    stage = "ode" if name.endswith("-ode") else "dmd"
    if name == "longlive":  # LongLive 2.0: sections flattened as its normalize_config does; its generator lr
        from mirai_plugin.integrations.longlive import longlive_config
        from mirai_plugin.tooling.trainer_config import normalize_longlive

        with pytest.raises(MiraiError, match="needs foresight_encoder_ckpt"):  # shipped unset: the user sets it
            longlive_config(normalize_longlive(config))
        (tmp_path / "wan.pt").write_bytes(b"")
        config.foresight_encoder_ckpt = str(tmp_path / "wan.pt")
        cfg, lr = longlive_config(normalize_longlive(config)), 1e-5
        assert cfg.segment_frames == 8 and cfg.encoder_layer == 15
    elif name in ROLLING_UPSTREAMS:  # read by the Rolling Forcing glue's reader, which takes the window keys
        cfg, lr = resolve_rolling_forcing(config, upstream=name).foresight, 2e-6
    else:
        cfg, lr = upstream_config(config, stage), 2e-6
    assert cfg.enabled and cfg.weight == 0.2 and cfg.student_layer == 15
    assert cfg.fusion == ("frame_mean" if stage == "ode" else "mean")
    assert cfg.predictor == "dit" and cfg.predictor_depth == 3 and cfg.lr == lr


@pytest.mark.skipif("MIRAI_VIDEO_MIRAI_DIR" not in os.environ, reason="the official Video-Mirai checkout")
def test_the_official_video_mirai_configs_are_read():
    folder = Path(os.environ["MIRAI_VIDEO_MIRAI_DIR"]) / "configs"
    default = OmegaConf.load(folder / "default_config.yaml")
    assert not ForesightConfig.from_upstream(default).enabled  # the official default: foresight off
    recipe = OmegaConf.merge(default, OmegaConf.load(folder / "video_mirai_dmd_chunkwise.yaml"))
    assert ForesightConfig.from_upstream(recipe) == ForesightConfig()  # the official recipe is our default


def test_glue_keys_are_known_and_their_values_checked():
    from mirai_plugin.integrations.self_forcing import upstream_config

    assert {"foresight_head_sharding", "foresight_head_init", "foresight_encoder_name"} <= set(GLUE_KEYS)
    assert "foresight_fusion" in CONFIG_KEYS
    with pytest.raises(MiraiError, match="foresight_head_sharding must be one of .* got 'fdsp'; did you mean 'fsdp'"):
        upstream_config({**OFFICIAL_RECIPE, "foresight_head_sharding": "fdsp"}, "dmd")
    with pytest.raises(MiraiError, match="foresight_encoder_name applies to Stage 2 .* remove the key"):
        upstream_config({**OFFICIAL_RECIPE, "foresight_encoder_name": "Wan2.1-T2V-14B"}, "dmd")


def test_a_config_written_as_upstream_keys_reads_back_the_same():
    for cfg in (ForesightConfig(), ForesightConfig(offsets=(0, 2, 5), fusion="none", predictor="multi_mlp"),
                ForesightConfig(offsets=(2, 3), fusion="frame_mean", predictor="dit", offset_conditioning=True,
                                replay_device=None, replay_segments=1, num_heads=4, weight_changes=((10, 0.1),),
                                weight_stop=20, check_finite=False, replay_max_pairs=3)):
        keys = cfg.to_upstream()
        assert ForesightConfig.from_upstream(keys) == cfg
        assert ForesightConfig.from_upstream(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.create(keys)))) == cfg
    with pytest.raises(MiraiError, match="max_grad_norm=None .* has no trainer key"):
        ForesightConfig(max_grad_norm=None).to_upstream()


def test_foresight_keys_with_the_weight_off_are_reported_once_on_rank_0(caplog, monkeypatch):
    from mirai_plugin import collectives

    monkeypatch.setattr(collectives, "_SAID", set())
    off = {**OFFICIAL_RECIPE, "foresight_weight": 0}
    with caplog.at_level(logging.WARNING, logger="mirai_plugin"):
        assert not ForesightConfig.from_upstream(off).enabled
        ForesightConfig.from_upstream(off)
        ForesightConfig.from_upstream({"lr": 1e-5, "num_frame_per_block": 3})  # no foresight keys: nothing to say
    said = [r.getMessage() for r in caplog.records if r.name == "mirai_plugin"]
    assert len(said) == 1 and "foresight_weight is 0" in said[0] and "the foresight term is off" in said[0]


# --------------------------------------------------------------- ForesightConfig types


@pytest.mark.parametrize("name", ["weight", "lr", "ffn_ratio", "max_grad_norm", "weight_decay"])
def test_true_is_not_a_number(name):
    with pytest.raises(MiraiError, match=rf"^{name} must be a finite number .* got True"):
        ForesightConfig(**{name: True})


@pytest.mark.parametrize("name", ["lr", "ffn_ratio", "max_grad_norm"])
def test_strings_are_not_numbers(name):
    with pytest.raises(MiraiError, match=rf"^{name} must be a finite number .* got '0.5'"):
        ForesightConfig(**{name: "0.5"})


@pytest.mark.parametrize("betas", [0.9, "0.9,0.99", (0.9, 1.0), (0.9, True, 0.1)])
def test_betas_must_be_two_numbers(betas):
    with pytest.raises(MiraiError, match=r"betas must be two numbers in \[0, 1\)"):
        ForesightConfig(betas=betas)


def test_replay_device_is_parsed_when_built_and_checked_at_first_use():
    with pytest.raises(MiraiError, match="replay_device must be a device such as 'cpu'.*got 'gpu0'"):
        ForesightConfig(replay_device="gpu0")
    with pytest.raises(MiraiError, match="replay_device must be a device that holds values"):
        ForesightConfig(replay_device="meta")
    cfg = head_config(replay_device="cuda:7")  # a config for another machine builds here
    assert cfg.replay_device == "cuda:7"
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    head = ForesightHead(cfg, student_dim=16, encoder_dim=16)
    hidden = [torch.randn(1, 4, 16, requires_grad=True) for _ in range(3)]
    with pytest.raises(MiraiError, match="replay_device='cuda:7', but .*(no cuda device|has \\d+ cuda)"):
        head(hidden, torch.randn(1, 12, 16))


def test_unknown_fields_of_replace_and_from_json_name_the_closest_field():
    with pytest.raises(MiraiError, match=r"'wieght' \(did you mean 'weight'\?\)"):
        ForesightConfig().replace(wieght=0.1)
    with pytest.raises(MiraiError, match=r"from_json: unknown field\(s\) 'fusoin'"):
        ForesightConfig.from_json('{"fusoin": "mean"}')
    with pytest.raises(MiraiError, match="from_json needs the JSON text"):
        ForesightConfig.from_json("{not json")


# ------------------------------------------------------------------ score and compare


def write(folder, name, data):
    path = folder / f"{name}_eval_results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("value", [1.7, -0.1, float("nan")])
def test_score_refuses_an_aggregate_outside_vbench_range(tmp_path, capsys, value):
    data = synthetic_results()
    data["color"][0] = value
    status, _, err = cli(capsys, "score", str(write(tmp_path, "run", data)))
    assert status == 2 and "color in " in one_error_line(err) and "fraction in [0, 1]" in err and repr(value) in err


def test_score_refuses_a_percent_table_value_out_of_range(tmp_path, capsys):
    table = {name: 80.0 for name in synthetic_results()}
    table["scene"] = 180.0
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    status, _, err = cli(capsys, "score", str(path))
    assert status == 2 and "scene in the table must be a percentage in [0, 100]" in one_error_line(err)


def test_score_refuses_a_table_of_fractions_for_percent(tmp_path, capsys):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({name: value[0] for name, value in synthetic_results().items()}))  # 0.8, not 80.0
    status, _, err = cli(capsys, "score", str(path))
    assert status == 2 and "looks like fractions" in one_error_line(err) and "multiply the values by 100" in err


@pytest.mark.parametrize("text, message", [("{not json", "is not a VBench result file or a table"),
                                           ("", "not JSON"),
                                           ("{}", "got an empty object"),
                                           ("[1, 2]", "expected {dimension")])
def test_score_refuses_malformed_or_empty_json(tmp_path, capsys, text, message):
    path = tmp_path / "x_eval_results.json"
    path.write_text(text)
    status, _, err = cli(capsys, "score", str(path))
    assert status == 2 and message in one_error_line(err)


def test_score_refuses_a_non_number_in_a_csv(tmp_path, capsys):
    path = tmp_path / "table.csv"
    path.write_text("dimension,percent\nsubject consistency,95.1\ncolor,high\n")
    status, _, err = cli(capsys, "score", str(path))
    assert status == 2 and "line 3: the score of 'color' is not a number: 'high'" in one_error_line(err)


def test_score_needs_only_the_aggregates_and_compare_says_why_it_needs_more(tmp_path, capsys):
    full = synthetic_results()
    aggregates = {name: [value[0], []] for name, value in full.items()}
    path = write(tmp_path, "agg", aggregates)
    status, out, _ = cli(capsys, "score", str(path), "--json")
    assert status == 0
    assert json.loads(out)["total"] == pytest.approx(json.loads(cli(capsys, "score", str(write(
        tmp_path, "full", full)), "--json")[1])["total"])
    status, _, err = cli(capsys, "compare", str(path), str(path), "--bootstrap", "10")
    assert status == 2 and "needs VBench's per-video entries" in one_error_line(err) and "score" in err


def test_compare_frames_missing_a_video_names_it(tmp_path, capsys):
    base = write(tmp_path, "base", synthetic_results(0))
    frames = tmp_path / "frames.json"
    frames.write_text(json.dumps({"prompt number 0-0.mp4": 81}))
    status, _, err = cli(capsys, "compare", str(base), str(base), "--frames", str(frames), "--bootstrap", "10")
    assert status == 2 and "--frames has no frame count for 'prompt number 0-1.mp4'" in one_error_line(err)
    frames.write_text("[81, 81]")
    status, _, err = cli(capsys, "compare", str(base), str(base), "--frames", str(frames))
    assert status == 2 and "must hold a JSON object" in one_error_line(err)


def test_compare_refuses_a_per_video_value_out_of_range(tmp_path, capsys):
    data = synthetic_results(0)
    data["aesthetic_quality"][1][0]["video_results"] = float("nan")
    bad = write(tmp_path, "bad", data)
    status, _, err = cli(capsys, "compare", str(bad), str(bad), "--bootstrap", "10")
    assert status == 2 and "aesthetic_quality: video_results of" in one_error_line(err) and "nan" in err


def test_vbench_yes_no_per_video_results_count_as_rates(tmp_path):
    from mirai_plugin.tooling.eval import load_results

    data = synthetic_results(0, prompts=2, seeds=2)
    entries = [
        {"video_path": f"/v/p{p}-{s}.mp4", "video_results": (p + s) % 2 == 0} for p in range(2) for s in range(2)
    ]
    data["dynamic_degree"] = [0.5, entries]
    assert load_results([write(tmp_path, "yes_no", data)])["dynamic_degree"].score == pytest.approx(0.5)


@pytest.mark.parametrize("content", [None, b"not a safetensors file at all"])
def test_probe_of_a_missing_or_foreign_file_is_one_error_line(tmp_path, capsys, content):
    path = tmp_path / "features.safetensors"
    if content is not None:
        path.write_bytes(content)
    status, _, err = cli(capsys, "probe", str(path))
    line = one_error_line(err)
    assert status == 2 and str(path) in line
    assert ("no such file" in line) if content is None else ("not a readable safetensors file" in line)


# ------------------------------------------------------------------------ the demo


@pytest.mark.parametrize("flags, message", [(["--seeds", "0"], "--seeds must be an int >= 1, got 0"),
                                            (["--steps", "-1"], "--steps must be an int >= 1, got -1"),
                                            (["--workers", "0"], "--workers must be an int >= 1, got 0"),
                                            (["--layer", "-2"], "--layer must be an int >= 0"),
                                            (["--offsets", "1", "1"], "--offsets has duplicates"),
                                            (["--image", "--seeds", "0"], "--seeds must be an int >= 1")])
def test_demo_checks_every_numeric_flag_before_running(capsys, flags, message):
    status, out, err = cli(capsys, "demo", *flags)
    assert status == 2 and message in one_error_line(err) and out == ""


# ------------------------------------------------------------------- checkpoints


def saved_head(tmp_path):
    head = ForesightHead(head_config(), student_dim=16, encoder_dim=24)
    head.save(tmp_path / "head.safetensors")
    return head, tmp_path / "head.safetensors"


def test_load_of_a_truncated_file_names_the_file(tmp_path):
    _, path = saved_head(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MiraiError, match=rf"{path.name} is not a readable safetensors file \(truncated"):
        ForesightHead.load(path)


def test_load_of_a_foreign_file_names_the_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(MiraiError, match=rf"{path.name} is not a readable safetensors file"):
        ForesightHead.load(path)
    with pytest.raises(MiraiError, match="no such file"):
        ForesightHead.load(tmp_path / "missing.safetensors")


def test_load_of_a_file_whose_tensors_do_not_fit_its_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    head, path = saved_head(tmp_path)
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors = {k: v.clone() for k, v in head.state_dict().items()}
    tensors["project.weight"] = torch.zeros(5, 16)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(
        MiraiError, match=r"does not fit the head its metadata describes: wrong shapes \['project.weight"
    ):
        ForesightHead.load(path)


def test_load_official_of_junk_bytes_never_suggests_unsafe_loading(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02junk" * 50)
    with pytest.raises(MiraiError) as caught:
        ForesightHead.load_official(path)
    assert str(path) in str(caught.value) and "not a PyTorch checkpoint" in str(caught.value)
    assert "weights_only=False" not in str(caught.value)


def test_load_official_of_a_checkpoint_with_objects_names_the_type_not_unsafe_loading(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"mirai_projector": {}, "args": Namespace(lr=1.0)}, path)
    with pytest.raises(
        MiraiError, match="argparse.Namespace, and mirai_plugin reads checkpoints with weights_only=True"
    ) as caught:
        ForesightHead.load_official(path)
    assert "weights_only=False" not in str(caught.value)


def test_load_official_with_values_that_are_not_tensors(tmp_path):
    projector = {"blocks.0.q.weight": [[0.0] * 4] * 4, "blocks.0.q.bias": torch.zeros(4)}
    with pytest.raises(
        MiraiError, match=r"must map names to tensors; these entries are not tensors: \['blocks.0.q.weight \(list\)'\]"
    ):
        ForesightHead.load_official({"mirai_projector": projector})
    path = tmp_path / "model.pt"
    torch.save({"mirai_projector": {"blocks.0.q.weight": 3}}, path)
    with pytest.raises(MiraiError, match=rf"{path}: the official projector .* not tensors"):
        ForesightHead.load_official(path)


def test_load_training_state_from_another_predictor_changes_nothing():
    dit = ForesightHead(head_config(), student_dim=16, encoder_dim=24)
    mlp = ForesightHead(head_config(predictor="mlp"), student_dim=16, encoder_dim=24)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(
        MiraiError, match=r"different head: predictor='dit' \(this head: 'mlp'\).*ForesightConfig\(\*\*state"
    ):
        mlp.load_training_state(dit.training_state())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items()) and mlp.steps_taken == 0
    with pytest.raises(MiraiError, match="not a head training state .*got str"):
        mlp.load_training_state("state.pt")


def test_image_load_training_state_that_does_not_fit_changes_nothing():
    three = TokenForesightHead(ImageForesightConfig(projector_dim=8), 16, 16, (4, 4))
    one = TokenForesightHead(ImageForesightConfig(projector_dim=8, neighbours=1), 16, 16, (4, 4))
    before = {k: v.clone() for k, v in one.state_dict().items()}
    with pytest.raises(MiraiError, match=r"does not fit this image head: unexpected \['projectors.1"):
        one.load_training_state(three.training_state())
    assert all(torch.equal(before[k], v) for k, v in one.state_dict().items())


# ------------------------------------------------------------------- image variant


def test_image_k_beyond_the_grid_is_refused_when_the_head_is_built():
    cfg = ImageForesightConfig(neighbours=5, border="drop", projector_dim=8)  # (0, 2) is off a 2-wide grid
    with pytest.raises(
        MiraiError, match=r"offsets \[\(0, 2\)\] have no target on the 2x2 token grid.*fewer neighbours"
    ):
        TokenForesightHead(cfg, 8, 8, (2, 2))


def test_image_heads_without_a_pair_are_left_out_of_the_average_and_reported(caplog, monkeypatch):
    from mirai_plugin import collectives

    monkeypatch.setattr(collectives, "_SAID", set())
    # (1, 1) pairs token 0 with token 3 on the full 2x2 grid, but not with the 3 positions an EMA target has
    cfg = ImageForesightConfig(offsets=((0, 0), (1, 1)), projector_dim=8, prefix_tokens=1, align_prefix=False)
    head = TokenForesightHead(cfg, 8, 8, (2, 2))
    hidden, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)  # class token + 3 image tokens
    with caplog.at_level(logging.WARNING, logger="mirai_plugin"):
        term, parts = head(hidden, target, return_breakdown=True)
    assert parts["unpaired_offsets"] == [(1, 1)] and parts["head_losses"][1] == 0
    assert term.item() == pytest.approx(cfg.weight * parts["head_losses"][0].item())  # the mean over paired heads
    assert any("(1, 1)" in r.getMessage() and "left out of the average" in r.getMessage() for r in caplog.records)


def test_a_mirai_i_target_that_misses_part_of_the_grid_is_refused():
    head = TokenForesightHead(ImageForesightConfig(source="encoder", projector_dim=8), 8, 8, (4, 4))
    with pytest.raises(MiraiError, match="Mirai-I target .* has 9 positions, the 4x4 token grid has 16"):
        head(torch.randn(1, 16, 8), torch.randn(1, 9, 8))


def test_encoder_features_laid_out_width_first_are_refused():
    class Encoder(nn.Module):  # 64 channels (a square) over 16 patches: (b e p)
        embed_dim = 64

        def forward(self, images):
            return torch.randn(images.shape[0], 64, 16)

    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\).*transpose"):
        FrozenImageEncoder(Encoder(), grid=(4, 4))(torch.randn(2, 3, 8, 8))
    flatten = nn.Flatten(2)  # declares no width
    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\): got 20 x 16 \(the last size is the 4x4"):
        FrozenImageEncoder(flatten, grid=(4, 4))(torch.randn(2, 20, 4, 4))  # 20 channels over the 16 tokens
    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\): got 9 x 16"):
        FrozenImageEncoder(flatten, grid=(4, 4), width=9)(torch.randn(2, 9, 4, 4))  # both sizes are squares
    assert FrozenImageEncoder(flatten, grid=(4, 4), width=9)(torch.randn(2, 16, 3, 3)).shape == (2, 16, 9)


# ----------------------------------------------------- fuse_targets and the capture


@pytest.mark.parametrize("changes, name", [({"segment_frames": 0}, "segment_frames"),
                                           ({"tokens_per_frame": -4}, "tokens_per_frame"),
                                           ({"prefix_frames": -1}, "prefix_frames"),
                                           ({"segment_frames": 2.0}, "segment_frames"),
                                           ({"segments": [0.5]}, "segments")])
def test_fuse_targets_names_the_bad_integer(changes, name):
    arguments = {"segment_frames": 2, "tokens_per_frame": 4, **changes}
    with pytest.raises(MiraiError, match=rf"^{name} must be"):
        fuse_targets(torch.randn(1, 24, 3), **arguments)


def test_a_multi_element_current_start_is_refused_by_the_capture():
    class Block(nn.Module):
        def forward(self, x, current_start=None):
            return x * 2

    model = nn.Module()
    model.blocks = nn.ModuleList([Block()])
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(MiraiError, match=r"current_start passed to .* must be one token offset .*values \[0, 12\]"), \
            capture_hidden(model, 0):
        model.blocks[0](x, current_start=torch.tensor([0, 12]))
    with pytest.raises(MiraiError, match=r"current_start passed to .* must be one token offset .*got 1.5"), \
            capture_hidden(model, 0):
        model.blocks[0](x, current_start=1.5)
    with capture_hidden(model, 0) as captured:  # the same position for every video is one position
        model.blocks[0](x, current_start=torch.tensor([12, 12]))
    assert captured[0].position == 12


def test_meta_device_inputs_are_refused_by_name():
    with pytest.raises(MiraiError, match="^encoder_hidden is on the meta device"):
        fuse_targets(torch.empty(1, 24, 3, device="meta"), segment_frames=2, tokens_per_frame=4)
    head = ForesightHead(head_config(), student_dim=16, encoder_dim=16)
    hidden = [torch.randn(1, 4, 16, requires_grad=True) for _ in range(3)]
    with pytest.raises(MiraiError, match="^encoder_hidden is on the meta device"):
        head(hidden, torch.empty(1, 12, 16, device="meta"))
    with pytest.raises(MiraiError, match="^captured hidden state 0 is on the meta device"):
        head([torch.empty(1, 4, 16, device="meta")], torch.randn(1, 12, 16))
    with torch.device("meta"):
        on_meta = ForesightHead(head_config(), student_dim=16, encoder_dim=16)
    with pytest.raises(MiraiError, match="head's parameters are on the meta device.*to_empty"):
        on_meta(hidden, torch.randn(1, 12, 16))
    image = TokenForesightHead(ImageForesightConfig(projector_dim=8), 8, 8, (4, 4))
    with pytest.raises(MiraiError, match="^target is on the meta device"):
        image(torch.randn(1, 16, 8), torch.empty(1, 16, 8, device="meta"))


# --------------------------------------------------------------------- patch revert


@pytest.fixture
def toy_with_config(tmp_path, monkeypatch):
    from toy_upstream import WITH_CONFIG, TextPatch, git, repository

    repo = tmp_path / "upstream"
    commit = repository(repo)
    monkeypatch.setitem(PATCHES, "toy", TextPatch("toy", "example/toy", commit, "toy.patch", "toy", WITH_CONFIG))
    return repo, lambda *args: git(repo, *args)


def test_revert_after_editing_the_patch_config_blames_only_it_and_its_advice_works(toy_with_config, capsys):
    repo, git = toy_with_config
    assert main(["patch", "apply", "--upstream", "toy", str(repo)]) == 0
    config = repo / "configs" / "mirai.yaml"
    config.write_text(config.read_text() + "foresight_student_layer: 12\n")
    capsys.readouterr()
    status, _, err = cli(capsys, "patch", "revert", "--upstream", "toy", str(repo))
    line = one_error_line(err)
    assert status == 2 and "['configs/mirai.yaml'] changed since" in line
    assert "model.py" not in line and "train.py" not in line and "stash -u" not in line
    assert "would stash the patch" in line and f"mv {config} {config}.mine" in line
    assert "loss = loss + 0" in (repo / "train.py").read_text()  # nothing was changed
    config.rename(config.with_name("mirai.yaml.mine"))  # the advice
    status, out, _ = cli(capsys, "patch", "check", "--upstream", "toy", str(repo))
    assert status == 0 and "except in ['configs/mirai.yaml']" in out
    assert main(["patch", "revert", "--upstream", "toy", str(repo)]) == 0
    assert git("status", "--porcelain").split() == ["??", "configs/"]  # only the user's copy is left
    assert (repo / "configs" / "mirai.yaml.mine").exists() and git("diff") == ""


# ------------------------------------------------------------------ FrozenEncoder


def test_frozen_encoder_on_a_forward_that_swallows_exceptions_returns_the_block_output():
    class Swallowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                with contextlib.suppress(Exception):  # the model under test swallows errors
                    x = block(x)
            return x

    model = Swallowing()
    x = torch.randn(2, 5, 4)
    encoder = FrozenEncoder(model, layer=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = encoder(x)
    torch.testing.assert_close(z, model.blocks[1](model.blocks[0](x)).detach())
    assert any("caught the exception FrozenEncoder raises after" in str(w.message) for w in caught)
    assert not any("without calling" in str(w.message) for w in caught)


# ------------------------------------------------------------------------- the CLI


def test_config_check_prints_the_resolved_config_or_the_error(tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text("foresight_weight: 0.2\nforesight_include_current: 'off'\nlr_foresight: 2e-6\n")
    status, out, _ = cli(capsys, "config", "check", str(good), "--json")
    report = json.loads(out)
    assert status == 0 and report["enabled"] and report["config"]["offsets"] == [1] and report["stage"] == "dmd"
    bad = tmp_path / "bad.yaml"
    bad.write_text("foresight_weight: 0.2\nforesight_wieght: 0.3\n")
    status, out, err = cli(capsys, "config", "check", str(bad))
    assert status == 2 and out == "" and "did you mean 'foresight_weight'" in one_error_line(err)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    status, _, err = cli(capsys, "config", "check", str(broken))
    assert status == 2 and "is not a readable YAML config" in one_error_line(err)


def test_config_check_finds_a_missing_head_init_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"foresight_weight: 0.2\nforesight_head_init: {tmp_path / 'missing.pt'}\n")
    status, _, err = cli(capsys, "config", "check", str(config))
    assert status == 2 and "foresight_head_init: no such file" in one_error_line(err)


def test_config_check_merges_the_default_config_like_the_trainer(tmp_path, capsys):
    (tmp_path / "default_config.yaml").write_text("foresight_weight: 0.0\nforesight_student_layer: 3\n")
    (tmp_path / "run.yaml").write_text("foresight_weight: 0.2\n")
    status, out, _ = cli(capsys, "config", "check", str(tmp_path / "run.yaml"))
    assert status == 0 and "merged over" in out and "ON, weight 0.2" in out and "student_layer            3" in out


def test_cli_errors_exit_2_without_traceback_unless_debug(tmp_path):
    command = [sys.executable, "-m", "mirai_plugin.tooling.cli", "config", "check", str(tmp_path / "missing.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MIRAI_DEBUG": ""}, check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no such config file")
    assert "Traceback" not in result.stderr
    debug = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MIRAI_DEBUG": "1"}, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "MiraiError" in debug.stderr
    flag = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True, check=False)
    assert flag.returncode == 1 and "Traceback" in flag.stderr


def test_an_os_error_in_a_command_is_one_line(tmp_path, capsys):
    status, _, err = cli(capsys, "compare", str(tmp_path), str(tmp_path))
    assert status == 2 and "holds no *_eval_results.json files" in one_error_line(err)
    status, _, err = cli(capsys, "score", str(tmp_path / "nowhere.json"))
    assert status == 2 and "no such file or folder" in one_error_line(err)


def test_the_glue_logs_the_resolved_config_once_at_start_up(caplog, monkeypatch):
    from mirai_plugin import collectives

    monkeypatch.setattr(collectives, "_SAID", set())
    with caplog.at_level(logging.INFO, logger="mirai_plugin"):
        TinyDMD(ARGS)
        TinyDMD(ARGS)
    said = [r.getMessage() for r in caplog.records if "foresight term on" in r.getMessage()]
    assert len(said) == 1 and "student_layer=1" in said[0] and "encoder_layer=3" in said[0]


def test_the_glue_reads_the_head_init_file_safely(tmp_path):
    junk = tmp_path / "init.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(MiraiError, match=rf"foresight_head_init {junk} is not a PyTorch checkpoint"):
        TinyDMD({**ARGS, "foresight_head_init": str(junk)})
    with pytest.raises(MiraiError, match="foresight_head_init: no such file"):
        TinyDMD({**ARGS, "foresight_head_init": str(tmp_path / "missing.pt")})


def test_ema_update_from_another_model_changes_nothing():
    from mirai_plugin.image import EMASource

    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, width)])

    source = EMASource(Net(4), 1, blocks="layers", decay=0.5)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    with pytest.raises(MiraiError, match=r"shape \(3, 4\) for 'layers.1.weight'"):
        source.update(Net(3))
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())


def test_head_term_checks_its_integers():
    head = ForesightHead(head_config(), student_dim=16, encoder_dim=16)
    hidden = [torch.randn(1, 4, 16, requires_grad=True) for _ in range(3)]
    with pytest.raises(MiraiError, match="^tokens_per_frame must be an int >= 1"):
        head(hidden, torch.randn(1, 12, 16), tokens_per_frame=0)
    with pytest.raises(MiraiError, match="^prefix_frames must be an int >= 0"):
        head(hidden, torch.randn(1, 12, 16), prefix_frames=-1)

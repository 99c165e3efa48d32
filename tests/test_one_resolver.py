"""One resolver per upstream: `config check`, `flops`, `memory` and the glue refuse (or accept) a trainer config
alike, for each of the trainers' rules. Expected verdicts are written from the trainers' own code (the
assertion or default each test names), not from the resolver.

The glue runs on a stand-in model (tiny Wan pair); the config reaches it in its trainer's form (Self-Forcing:
the YAML as loaded, no default_config.yaml here; LongLive: ``normalize_longlive``, checked against LongLive's
own ``normalize_config`` in integration_tests/test_one_resolver.py).
"""

import json
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tiny_models import make_pair

from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations import longlive
from mirai_plugin.integrations.longlive import LongLiveForesight
from mirai_plugin.integrations.resolve import ROLLING_UPSTREAMS, UPSTREAMS, WAN_MODELS
from mirai_plugin.integrations.self_forcing import DMDForesight
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.patching import PATCHES
from mirai_plugin.tooling.trainer_config import normalize_longlive

# configs/train_dmd.yaml's layout and sizes (LongLive 2.0), the term on with the causal real score (no checkpoint)
LONGLIVE = {
    "infra": {"sharding_strategy": "hybrid_full", "mixed_precision": True, "gradient_checkpointing": True},
    "model_kwargs": {"model_name": "Wan2.2-TI2V-5B", "timestep_shift": 5.0, "num_frame_per_block": 8,
                     "local_attn_size": 32},
    "algorithm": {"trainer": "score_distillation", "distribution_loss": "dmd", "all_causal": True},
    "training": {"lr": 1e-5, "dfake_gen_update_ratio": 5, "min_num_training_frames": 32, "num_training_frames": 32,
                 "slice_last_frames": 32, "batch_size": 1},
    "data": {"image_or_video_shape": [1, 32, 48, 44, 80]},
    "inference": {"sampling_steps": 4},
    "adapter": {"type": "lora", "rank": 128},
    "foresight_weight": 0.2, "foresight_student_layer": 15, "foresight_teacher_layer": 15,
    "foresight_encoder": "causal_real_score",
}
# configs/self_forcing_dmd.yaml's keys that count, plus the recipe's foresight keys
SELF_FORCING = {
    "trainer": "score_distillation", "distribution_loss": "dmd", "real_name": "Wan2.1-T2V-14B",
    "denoising_step_list": [1000, 750, 500, 250], "num_frame_per_block": 3, "num_training_frames": 21,
    "image_or_video_shape": [1, 21, 16, 60, 104], "dfake_gen_update_ratio": 5, "gradient_checkpointing": True,
    "mixed_precision": True, "foresight_weight": 0.2, "foresight_student_layer": 15, "foresight_teacher_layer": 20,
}
TOOLS = ("config check", "flops", "memory")
LENIENT = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def with_(base, **changes):
    """``base`` with ``section.key`` / ``key`` changes (``None`` removes a key)."""
    config = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = config
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return config


def tool_verdicts(tmp_path, config, capsys, *args):
    """``{tool: None (accepted) or its one-line error}``, the reader's prefix removed."""
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    verdicts = {}
    for tool in TOOLS:
        status = main([*tool.split(), str(path), "--json", *args])
        out, err = capsys.readouterr()
        if status == 0:
            verdicts[tool] = None
            json.loads(out)  # machine-readable
        else:
            assert status == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1
            verdicts[tool] = err.strip().removeprefix("error: ").split("): ", 1)[-1]
    return verdicts


def glue_verdict(upstream, config):
    """``None`` when the glue starts on ``config`` (in its trainer's form), else its error."""
    generator, real_score = make_pair()
    stand_in = types.SimpleNamespace(generator=generator, real_score=real_score, device=torch.device("cpu"),
                                     dtype=torch.float32)
    try:
        if upstream == "longlive":
            LongLiveForesight(stand_in, normalize_longlive(OmegaConf.create(config)))
        else:
            DMDForesight(stand_in, OmegaConf.create(config))
    except MiraiError as error:
        return str(error)
    return None


def verdicts(tmp_path, capsys, upstream, config, *args):
    return {**tool_verdicts(tmp_path, config, capsys, *args), "glue": glue_verdict(upstream, config)}


def assert_all(found, accepted, *words):
    """Every tool and the glue accept, or all refuse with the glue's message (naming ``words``)."""
    if accepted:
        assert found == dict.fromkeys(found), found
        return
    message = found["glue"]
    assert message is not None and all(word in message for word in words), found
    assert all(found[tool] == message for tool in TOOLS), found


@pytest.fixture(autouse=True)
def _stand_ins(tmp_path, monkeypatch):
    # the bidirectional encoder needs LongLive's Wan2.2 wrapper: the stand-in's encoder instead (the resolver
    # has run by then); and no ./configs/default_config.yaml to merge
    monkeypatch.setattr(longlive, "_bidirectional_encoder", lambda dmd, args, resolved: dmd.real_score)
    monkeypatch.chdir(tmp_path)


def test_the_readers_are_the_patches():
    assert set(PATCHES) == set(UPSTREAMS)


@LENIENT
@given(block=st.integers(1, 9), frames=st.integers(1, 40))
def test_longlive_frames_are_whole_blocks(tmp_path, capsys, block, frames):
    # model/base.py: assert max_num_frames % num_frame_per_block == 0 (and min_num_frames)
    config = with_(LONGLIVE, model_kwargs__num_frame_per_block=block, training__num_training_frames=frames,
                   training__min_num_training_frames=frames, training__slice_last_frames=-1,
                   data__image_or_video_shape=[1, 40, 48, 44, 80], foresight_weight=0)
    assert_all(verdicts(tmp_path, capsys, "longlive", config), frames % block == 0, "num_training_frames",
               "whole number of blocks")


@LENIENT
@given(block=st.integers(1, 8), frames=st.integers(21, 42))
def test_self_forcing_frames_are_whole_blocks(tmp_path, capsys, block, frames):
    # model/base.py: the rollout is drawn in [21, num_training_frames] frames, both asserted whole blocks
    config = with_(SELF_FORCING, num_frame_per_block=block, num_training_frames=frames, foresight_weight=0)
    assert_all(verdicts(tmp_path, capsys, "self-forcing", config), 21 % block == 0 and frames % block == 0,
               "whole number of blocks")


@LENIENT
@given(window=st.integers(-3, 40))
def test_longlive_dmd_window_has_frames_and_a_block(tmp_path, capsys, window):
    # model/dmd.py slice_last_frames: -1 keeps the whole rollout; the term needs one whole 8-frame block in it
    config = with_(LONGLIVE, training__slice_last_frames=window)
    assert_all(verdicts(tmp_path, capsys, "longlive", config), window == -1 or window >= 8, "slice_last_frames"
               if window < 1 else "DMD window")


@LENIENT
@given(height=st.integers(0, 5), width=st.integers(0, 5))
def test_latents_hold_a_patch(tmp_path, capsys, height, width):
    config = with_(LONGLIVE, data__image_or_video_shape=[1, 32, 48, height, width])
    assert_all(verdicts(tmp_path, capsys, "longlive", config), height >= 2 and width >= 2, "image_or_video_shape")


@LENIENT
@given(student=st.integers(0, 45), teacher=st.integers(0, 45))
def test_layers_are_within_the_models(tmp_path, capsys, student, teacher):
    # Wan2.2-TI2V-5B has 30 blocks (generator and real score)
    config = with_(LONGLIVE, foresight_student_layer=student, foresight_teacher_layer=teacher)
    assert_all(verdicts(tmp_path, capsys, "longlive", config), student < 30 and teacher < 30, "out of range",
               "30 blocks")


@pytest.mark.parametrize("teacher, accepted", [(39, True), (40, False)])
def test_self_forcing_encoder_layer_is_within_the_real_score(tmp_path, capsys, teacher, accepted):
    config = with_(SELF_FORCING, foresight_teacher_layer=teacher)  # Wan2.1-T2V-14B: 40 blocks
    assert_all(verdicts(tmp_path, capsys, "self-forcing", config), accepted, "foresight_teacher_layer=40",
               "Wan2.1-T2V-14B")


@pytest.mark.parametrize("upstream, change", [
    ("longlive", {"model_kwargs__model_name": "Wan2.2-T2V-A14B"}),  # once counted as the 5B
    ("self-forcing", {"real_name": "Wan2.1-T2V-3B"}),
    ("self-forcing", {"fake_name": "wan-1.3b"}),
])
def test_unknown_model_names_list_the_known_ones(tmp_path, capsys, upstream, change):
    config = with_(LONGLIVE if upstream == "longlive" else SELF_FORCING, **change)
    assert_all(verdicts(tmp_path, capsys, upstream, config), False, "unknown model", *WAN_MODELS)


@pytest.mark.parametrize("upstream, section", [
    ("longlive", "foresight"), ("longlive", "model_kwargs"), ("longlive", "adapter"), ("self-forcing", "foresight"),
    ("self-forcing", "model_kwargs"),
])
def test_foresight_keys_in_a_mapping_are_moved_to_the_top_level(tmp_path, capsys, upstream, section):
    base = LONGLIVE if upstream == "longlive" else SELF_FORCING
    config = with_(base, **{f"{section}__foresight_delta": 2})
    assert_all(verdicts(tmp_path, capsys, upstream, config), False, f"inside the {section!r} mapping",
               "move these keys to the top level")
    # in a section LongLive flattens, the key is the trainer's own: read
    if upstream == "longlive":
        assert_all(verdicts(tmp_path, capsys, upstream, with_(base, training__foresight_delta=2)), True)


def test_longlive_refuses_the_stage2_encoder_name(tmp_path, capsys):
    config = with_(LONGLIVE, foresight_encoder_name="Wan2.1-T2V-1.3B")
    assert_all(verdicts(tmp_path, capsys, "longlive", config), False, "foresight_encoder_name", "remove the key")


@pytest.mark.parametrize("key, value", [("foresight_scene_cut", "keep"), ("foresight_encoder_ckpt", "/x.pt"),
                                        ("foresight_encoder_name", "Wan2.1-T2V-1.3B")])
def test_self_forcing_dmd_refuses_keys_of_another_glue(tmp_path, capsys, key, value):
    assert_all(verdicts(tmp_path, capsys, "self-forcing", with_(SELF_FORCING, **{key: value})), False, key,
               "remove the key")


@pytest.mark.parametrize("case, accepted", [("unset", False), ("missing", False), ("present", True),
                                            ("causal", True), ("off", True)])
def test_longlive_encoder_checkpoint_exists_when_the_bidirectional_encoder_is_used(tmp_path, capsys, case,
                                                                                    accepted):
    present = tmp_path / "wan.pt"
    present.write_bytes(b"")
    changes = {"unset": {}, "missing": {"foresight_encoder_ckpt": str(tmp_path / "missing.pt")},
               "present": {"foresight_encoder_ckpt": str(present)},
               "causal": {"foresight_encoder": "causal_real_score"}, "off": {"foresight_weight": 0}}[case]
    config = with_(LONGLIVE, **{"foresight_encoder": "bidirectional", **changes})
    words = {"unset": ("needs foresight_encoder_ckpt", "causal_real_score"), "missing": ("no such file",)}
    assert_all(verdicts(tmp_path, capsys, "longlive", config), accepted, *words.get(case, ()))


@pytest.mark.parametrize("upstream", ["longlive", "self-forcing"])
def test_head_init_exists_when_the_term_is_on(tmp_path, capsys, upstream):
    config = with_(LONGLIVE if upstream == "longlive" else SELF_FORCING,
                   foresight_head_init=str(tmp_path / "head.pt"))
    assert_all(verdicts(tmp_path, capsys, upstream, config), False, "foresight_head_init: no such file")


@pytest.mark.parametrize("upstream, change", [("self-forcing", {"distribution_loss": "causvid"}),
                                              ("self-forcing", {"trainer": "diffusion"}),
                                              ("longlive", {"algorithm__trainer": "diffusion"})])
def test_a_trainer_that_builds_no_glue_is_not_read_as_one(tmp_path, capsys, upstream, change):
    # train.py dispatches on `trainer`; only score_distillation with distribution_loss: dmd builds DMD (and the glue)
    config = with_(LONGLIVE if upstream == "longlive" else SELF_FORCING, **change)
    assert_all(verdicts(tmp_path, capsys, upstream, config), False, "never builds", "ignored")


@pytest.mark.parametrize("sharding", ["replicate", "ddp", "fsdp"])
def test_memory_honours_the_head_sharding(tmp_path, capsys, sharding):
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(with_(SELF_FORCING, foresight_head_sharding=sharding)), path)
    assert main(["memory", str(path), "--world-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    count = report["parameter_count"]
    # FSDP holds 1/8 of the parameters (float32) per rank; replicate and DDP the whole head
    assert report["parameters"] == (-(-count // 8) if sharding == "fsdp" else count) * 4
    assert report["sharded"] == (sharding == "fsdp") and report["head_sharding"] == sharding
    assert main(["memory", str(path), "--world-size", "8", "--head-sharding", "fsdp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == -(-count // 8) * 4  # the flag chooses


def test_the_model_layout_is_read_as_longlive(tmp_path, capsys):
    # LongLive's normalize_config reads model.name / model.kwargs / model.num_frame_per_block into model_kwargs
    config = with_(LONGLIVE, model_kwargs=None)
    config["model"] = {"name": "Wan2.2-TI2V-5B", "num_frame_per_block": 4, "kwargs": {"local_attn_size": 16}}
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    assert main(["config", "check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["upstream"]["name"] == "longlive" and report["upstream"]["how"] == "detected"
    assert report["config"]["segment_frames"] == 4 and report["trainer"]["frames_per_block"] == 4
    assert report["trainer"]["generator"] == "Wan2.2-TI2V-5B" and report["trainer"]["attention_frames"] == 16
    assert main(["flops", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cycle"]["generator"]["dim"] == 3072


def test_the_detection_is_the_first_line_and_a_guess_says_so(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(SELF_FORCING), path)
    for tool in TOOLS:
        assert main([*tool.split(), str(path)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("upstream: self-forcing (detected: a flat config")
        assert "--upstream causal-forcing to choose" in first
        assert main([*tool.split(), str(path), "--upstream", "causal-forcing"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "upstream: causal-forcing (--upstream causal-forcing)"
    assert main(["config", "check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["upstream"]["alternatives"] == ["causal-forcing", *ROLLING_UPSTREAMS]
    assert report["upstream"]["name"] == "self-forcing"
    # the same file read by the LongLive reader is refused by that reader's rules
    assert main(["config", "check", str(path), "--upstream", "longlive"]) == 2
    assert "read as longlive (--upstream)" in capsys.readouterr().err
    assert main(["flops", str(path), "--upstream", "sd3"]) == 2
    assert "the readers are self-forcing, causal-forcing" in capsys.readouterr().err


def test_stage2_is_read_by_config_check_and_not_counted_as_a_dmd_cycle(tmp_path, capsys):
    config = {"trainer": "ode", "num_frame_per_block": 3, "foresight_weight": 0.2, "foresight_teacher_layer": 35,
              "foresight_encoder_name": "Wan2.1-T2V-14B"}
    path = tmp_path / "ode.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    assert main(["config", "check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["upstream"]["name"] == "causal-forcing-ode" and report["config"]["fusion"] == "frame_mean"
    assert report["trainer"]["encoder"] == "Wan2.1-T2V-14B" and not report["config"]["replay"]
    for tool in ("flops", "memory"):
        assert main([tool, str(path)]) == 2
        assert "model a DMD cycle" in capsys.readouterr().err
    OmegaConf.save(OmegaConf.create({**config, "foresight_encoder_name": "Wan2.1-T2V-1.3B"}), path)
    assert main(["config", "check", str(path)]) == 2
    assert "foresight_teacher_layer=35 is out of range: Wan2.1-T2V-1.3B" in capsys.readouterr().err


@pytest.mark.parametrize("layer, accepted", [(11, True), (12, False)])
def test_llamagen_layer_is_within_the_gpt(tmp_path, capsys, layer, accepted):
    import argparse

    from test_llamagen_glue import TinyLlamaGen

    from mirai_plugin.integrations.llamagen import LlamaGenMirai, add_mirai_arguments

    path = tmp_path / "c2i.yaml"
    path.write_text(f"gpt-model: GPT-B\nmirai: E\nmirai-layer: {layer}\n")  # GPT-B: 12 layers
    status = main(["config", "check", str(path), "--json"])
    out, err = capsys.readouterr()
    assert (status == 0) == accepted
    if accepted:
        report = json.loads(out)
        assert report["upstream"]["name"] == "llamagen" and report["trainer"]["depth"] == 12
    else:
        assert "--mirai-layer 12 is out of range" in err
    parser = argparse.ArgumentParser()
    for name, value in dict(epochs=2, lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.05, max_grad_norm=1.0).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    add_mirai_arguments(parser)
    model = TinyLlamaGen()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(12))
    args = parser.parse_args(["--mirai", "E", "--mirai-layer", str(layer), "--mirai-projector-dim", "8"])
    if accepted:
        LlamaGenMirai(model, args, steps_per_epoch=4, device=0)
    else:
        with pytest.raises(MiraiError, match="--mirai-layer 12 is out of range"):
            LlamaGenMirai(model, args, steps_per_epoch=4, device=0)


def test_llamagen_options_are_checked_by_name(tmp_path, capsys):
    path = tmp_path / "c2i.yaml"
    path.write_text("mirai: E\nmirai-layr: 3\n")  # train_c2i.py's parser refuses an unknown option
    assert main(["config", "check", str(path), "--upstream", "llamagen"]) == 2
    assert "unknown Mirai option(s) ['mirai_layr']; did you mean 'mirai_layer'?" in capsys.readouterr().err


def test_flops_and_memory_count_the_resolved_run(tmp_path, capsys):
    # LongLive: the DMD window (slice_last_frames), local attention and blocks of the config, not defaults
    config = with_(LONGLIVE, training__num_training_frames=48, training__min_num_training_frames=48,
                   training__slice_last_frames=24, data__image_or_video_shape=[1, 48, 48, 44, 80],
                   model_kwargs__local_attn_size=16, foresight_head_sharding="fsdp",
                   training__gradient_accumulation_steps=2)
    path = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    assert main(["flops", str(path), "--json"]) == 0
    cycle = json.loads(capsys.readouterr().out)["cycle"]
    assert (cycle["frames"], cycle["window_frames"], cycle["attention_frames"], cycle["segment_frames"]) == (
        48, 24, 16, 8)
    assert cycle["tokens_per_frame"] == 44 * 80 // 4 and cycle["lora"] and cycle["critic_ratio"] == 5
    assert main(["memory", str(path), "--world-size", "4", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)
    assert memory["sharded"] and memory["accumulation_steps"] == 2
    assert memory["encoder_output"] == 24 * 880 * 3072 * 2  # the window, bf16 (mixed_precision: true)


def test_longlive_defaults_are_the_trainers(tmp_path, capsys):
    # model/dmd.py: slice_last_frames, num_training_frames and min_num_training_frames default to 21, blocks to 1
    path = tmp_path / "run.yaml"
    for changes, expected in (
        ({"training__slice_last_frames": None}, (32, 32, 21, 8)),
        ({"training__slice_last_frames": None, "training__num_training_frames": None,
          "training__min_num_training_frames": None, "model_kwargs__num_frame_per_block": None}, (21, 21, 21, 1)),
    ):
        OmegaConf.save(OmegaConf.create(with_(LONGLIVE, **changes)), path)
        assert main(["config", "check", str(path), "--json"]) == 0
        run = json.loads(capsys.readouterr().out)["trainer"]
        assert (run["frames"], run["min_frames"], run["window_frames"], run["frames_per_block"]) == expected


def test_yaml_paths_are_read_from_a_file_only(tmp_path, capsys):
    assert main(["config", "check", str(Path(tmp_path) / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err

"""One resolver per upstream, against the upstreams' own config code and real runs.

For every config the patches add and every config under the upstreams' ``configs/`` folders that a reader
applies to, ``mirai-plugin config check --json``, ``flops --json`` and ``memory --json`` must resolve what the
trainer itself reads: expected values come from the upstream's own config code (Self-Forcing /
Causal-Forcing's ``OmegaConf.merge(default_config, config)`` as their ``train.py`` does, LongLive's
``utils/config.py: normalize_config`` and ``section_get`` imported from the checkout), read with the
trainer's own ``getattr`` defaults (written here with the file they come from) and the model sizes in the
checkouts' Wan configs. Real runs (``trainer_harness.py``, ``longlive_harness.py``, ``llamagen_harness.py``)
record the config and the sizes the glue holds and sees; ``config check`` on the same config must agree.

Needs ``MIRAI_SELF_FORCING_DIR``, ``MIRAI_CAUSAL_FORCING_DIR``, ``MIRAI_LONGLIVE_DIR``, ``MIRAI_LLAMAGEN_DIR``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkouts import checkout
from omegaconf import OmegaConf

from mirai_plugin.tooling.cli import main

HERE = Path(__file__).resolve().parent
LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}  # the tiny models have 4 blocks

# The configs each reader applies to, at the pinned commits (the patches' own configs included).
READ = {
    # self_forcing_sid.yaml sets distribution_loss: dmd, so train.py builds DMD (and the glue) for it too
    "self-forcing": ["self_forcing_dmd.yaml", "self_forcing_sid.yaml", "video_mirai_dmd_chunkwise.yaml"],
    "causal-forcing": ["causal_forcing_dmd_chunkwise.yaml", "causal_forcing_dmd_framewise.yaml",
                       "causal_forcing_dmd_framewise_1step.yaml", "causal_forcing_dmd_framewise_2step.yaml",
                       "video_mirai_dmd_chunkwise.yaml", "video_mirai_dmd_framewise.yaml"],
    "causal-forcing-ode": ["causal_ode_chunkwise.yaml", "causal_ode_framewise.yaml", "video_mirai_ode_chunkwise.yaml"],
    "longlive": ["train_dmd.yaml", "train_i2v_dmd.yaml", "nvfp4/train_dmd_nvfp4_step4.yaml",
                 "nvfp4/train_i2v_dmd_nvfp4_step4.yaml", "video_mirai_longlive_dmd.yaml",
                 "video_mirai_longlive_i2v_dmd.yaml"],
}
# Configs of trainers no patch hooks: the reader of their checkout refuses them, naming the trainer.
NOT_READ = {
    "causal-forcing": ["ar_diffusion_tf_chunkwise.yaml", "ar_diffusion_tf_framewise.yaml", "causal_cd_chunkwise.yaml",
                       "causal_cd_framewise.yaml"],
    "longlive": ["train_ar.yaml", "train_i2v_ar.yaml", "nvfp4/train_ar_nvfp4.yaml", "nvfp4/train_i2v_ar_nvfp4.yaml"],
}
NOT_TRAINING = {"self-forcing": ["default_config.yaml"], "causal-forcing": ["default_config.yaml"],
                "longlive": ["inference.yaml", "inference_i2v.yaml", "inference_sp.yaml", "fp8/inference_fp8.yaml",
                             "nvfp4/inference_nvfp4.yaml", "nvfp4/inference_i2v_nvfp4.yaml"]}
REPOS = {"self-forcing": "self-forcing", "causal-forcing": "causal-forcing", "causal-forcing-ode": "causal-forcing",
         "longlive": "longlive"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Patched copies, made on first use: ``repos("causal-forcing")``."""
    made = {}
    patches = {"self-forcing": ("self-forcing",), "causal-forcing": ("causal-forcing", "causal-forcing-ode"),
               "longlive": ("longlive",), "llamagen": ("llamagen",)}

    def get(name):
        if name not in made:
            made[name] = checkout(name, tmp_path_factory.mktemp(name) / "repo", *patches[name])
        return made[name]

    return get


def run_cli(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out)


def tools(capsys, path, *options):
    """``config check``, ``flops`` and ``memory`` on ``path``, their JSON."""
    return (run_cli(capsys, "config", "check", str(path), "--json", *options),
            run_cli(capsys, "flops", str(path), "--json", *options),
            run_cli(capsys, "memory", str(path), "--json", *options))


def wan_sizes(config_file: Path) -> dict:
    """A Wan config module's sizes (``wan/configs/wan_t2v_1_3B.py``: ``t2v_1_3B.dim = 1536`` ...)."""
    text = config_file.read_text()
    return {key: int(re.search(rf"\.{key} = (\d+)", text).group(1)) for key in ("dim", "num_layers", "ffn_dim")}


def wan_models(repos) -> dict:
    sf, ll = repos("self-forcing"), repos("longlive")
    return {"Wan2.1-T2V-1.3B": wan_sizes(sf / "wan/configs/wan_t2v_1_3B.py"),
            "Wan2.1-T2V-14B": wan_sizes(sf / "wan/configs/wan_t2v_14B.py"),
            "Wan2.2-TI2V-5B": wan_sizes(ll / "wan_5b/configs/wan_ti2v_5B.py")}


def expected_foresight(cfg, stage: str) -> dict:
    """The foresight settings a trainer config sets, by the keys docs/self-forcing.md lists (recipe defaults)."""
    get = lambda key, default: default if cfg.get(key) is None else cfg.get(key)
    delta, skip = get("foresight_delta", 1), get("foresight_skip", 0)
    offsets = ([0] if get("foresight_include_current", True) else []) + [skip + j for j in range(1, delta + 1)]
    fusion = get("foresight_fusion", None) or {True: "mean", False: "none", None: None}[
        cfg.get("foresight_delta_mean_pool")]
    return {
        "weight": float(get("foresight_weight", 0.0)),
        "student_layer": get("foresight_student_layer", get("foresight_layer", 15)),
        "encoder_layer": get("foresight_teacher_layer", get("foresight_layer", 20)),
        "offsets": get("foresight_offsets", offsets),
        "fusion": fusion or ("frame_mean" if stage == "ode" else "mean"),
        "predictor_depth": get("projection_layers_num", 3),
        "lr": float(get("lr_foresight", get("lr", 2e-6))),
        "replay": stage != "ode" and bool(get("projector_every_step", True)),
        "segment_frames": getattr(cfg, "num_frame_per_block", 1),  # model/dmd.py, model/ode_regression.py
    }


def assert_foresight(report: dict, cfg, stage: str) -> None:
    expected = expected_foresight(cfg, stage)
    assert {key: report["config"][key] for key in expected} == expected


def steps_of(step_list) -> int:
    """Rollout denoising steps: the training pipelines drop a trailing 0 timestep."""
    steps = list(step_list)
    return len(steps) - (1 if steps[-1] == 0 else 0)


def assert_cycle(cycle: dict, run: dict, models: dict) -> None:
    for role in ("generator", "real_score", "critic"):
        sizes = models[run[role]]
        assert (cycle[role]["dim"], cycle[role]["depth"], cycle[role]["ffn_dim"]) == (
            sizes["dim"], sizes["num_layers"], sizes["ffn_dim"]), role


# ----------------------------------------------------------------------------- the configs, without a run


@pytest.mark.parametrize("upstream, name", [(u, n) for u in ("self-forcing", "causal-forcing", "causal-forcing-ode")
                                            for n in READ[u]])
def test_self_forcing_layout_configs_resolve_as_their_trainer_reads_them(repos, capsys, monkeypatch, upstream,
                                                                         name):
    root = repos(REPOS[upstream])
    monkeypatch.chdir(root)  # train.py reads configs/default_config.yaml from where it runs
    path = Path("configs") / name
    cfg = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load(path))  # train.py
    stage = "ode" if upstream.endswith("-ode") else "dmd"
    detected = run_cli(capsys, "config", "check", str(path), "--json")["upstream"]
    if upstream == "causal-forcing":  # Self-Forcing's layout: a guess, and said to be one (Rolling Forcing's too)
        assert detected["name"] == "self-forcing" and detected["alternatives"] == [
            "causal-forcing", "rolling-forcing", "causal-forcing-long-video"]
    else:
        assert detected["name"] == upstream
    report = run_cli(capsys, "config", "check", str(path), "--json", "--upstream", upstream)
    run = report["trainer"]
    assert report["upstream"] == {"name": upstream, "how": "given", "reason": "--upstream", "alternatives": []}
    assert_foresight(report, cfg, stage)
    assert run["generator"] == cfg.model_kwargs.get("model_name", "Wan2.1-T2V-1.3B")  # utils/wan_wrapper.py
    assert run["frames_per_block"] == getattr(cfg, "num_frame_per_block", 1)
    assert run["denoising_steps"] == steps_of(cfg.denoising_step_list)
    assert (run["checkpointing"], run["mixed_precision"], run["batch_per_rank"], run["sharding_strategy"]) == (
        cfg.gradient_checkpointing, cfg.mixed_precision, cfg.batch_size, cfg.sharding_strategy)
    if stage == "ode":
        assert run["encoder"] == cfg.get("foresight_encoder_name", "Wan2.1-T2V-1.3B")
        assert run["frames"] is None and run["critic_ratio"] is None  # the ODE data set the frames
        return
    _, _, _, height, width = cfg.image_or_video_shape
    expected = {  # model/base.py: real_name / fake_name default to the 1.3B; rollouts in [21, num_training_frames],
        "real_score": getattr(cfg, "real_name", "Wan2.1-T2V-1.3B"),  # the last 21 frames kept for DMD
        "critic": getattr(cfg, "fake_name", "Wan2.1-T2V-1.3B"), "encoder": getattr(cfg, "real_name", "Wan2.1-T2V-1.3B"),
        "frames": getattr(cfg, "num_training_frames", 21), "window_frames": 21,
        "tokens_per_frame": (height // 2) * (width // 2), "critic_ratio": cfg.dfake_gen_update_ratio,
    }
    assert {key: run[key] for key in expected} == expected
    _, flops, memory = tools(capsys, path, "--upstream", upstream)
    cycle = flops["cycle"]
    assert_cycle(cycle, run, wan_models(repos))
    assert (cycle["frames"], cycle["window_frames"], cycle["tokens_per_frame"], cycle["segment_frames"],
            cycle["denoising_steps"], cycle["critic_ratio"], cycle["checkpointing"]) == (
        expected["frames"], 21, expected["tokens_per_frame"], run["frames_per_block"], run["denoising_steps"],
        cfg.dfake_gen_update_ratio, cfg.gradient_checkpointing)
    encoder_dim = wan_models(repos)[expected["real_score"]]["dim"]
    width_bytes = 2 if cfg.mixed_precision else 4
    assert memory["encoder_output"] == 21 * expected["tokens_per_frame"] * encoder_dim * width_bytes
    assert memory["sharded"] == (cfg.get("foresight_head_sharding") == "fsdp")


def longlive_config_module(root: Path):
    """LongLive's ``utils/config.py`` (``normalize_config``, ``section_get``), imported from the checkout."""
    spec = importlib.util.spec_from_file_location("longlive_utils_config", root / "utils" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_layout(raw):
    """``raw`` written in LongLive's ``model:`` layout (name, kwargs, num_frame_per_block) instead of
    ``model_kwargs``."""
    data = OmegaConf.to_container(raw)
    kwargs = data.pop("model_kwargs")
    data["model"] = {"name": kwargs.pop("model_name"), "num_frame_per_block": kwargs.pop("num_frame_per_block"),
                     "kwargs": kwargs}
    return OmegaConf.create(data)


@pytest.mark.parametrize("name", [*READ["longlive"], "train_dmd.yaml (model: layout)"])
def test_longlive_configs_resolve_as_normalize_config_leaves_them(repos, capsys, tmp_path, name):
    root = repos("longlive")
    upstream_config = longlive_config_module(root)
    raw = OmegaConf.load(root / "configs" / name.split()[0])
    if "model: layout" in name:
        raw = model_layout(raw)
    if raw.get("foresight_weight"):  # the shipped configs leave the encoder's weights to the user
        (tmp_path / "wan.pt").write_bytes(b"")
        raw.foresight_encoder_ckpt = str(tmp_path / "wan.pt")
    path = tmp_path / "run.yaml"
    OmegaConf.save(raw, path)
    cfg = upstream_config.normalize_config(OmegaConf.load(path))  # train.py
    # our normalisation leaves the trainer's config, but for two keys nothing here reads
    from mirai_plugin.tooling.trainer_config import normalize_longlive

    unread = ("wandb_host", "negative_prompt")
    ours = OmegaConf.to_container(normalize_longlive(OmegaConf.load(path)))
    ours = {k: v for k, v in ours.items() if k not in unread}
    theirs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in unread}
    assert ours == theirs

    report, flops, memory = tools(capsys, path)
    assert report["upstream"]["name"] == "longlive" and report["upstream"]["how"] == "detected"
    run = report["trainer"]
    assert_foresight(report, cfg, "dmd")
    frames = getattr(cfg, "num_training_frames", 21)  # model/dmd.py
    window = getattr(cfg, "slice_last_frames", 21)  # model/dmd.py generator_loss
    local = upstream_config.section_get(cfg, "inference", "local_attn_size",  # model/base.py
                                        cfg.model_kwargs.get("local_attn_size", -1),
                                        aliases=("inference_local_attn_size",))
    sampling = getattr(cfg, "sampling_steps", None)
    roles = {role: (cfg[f"{role}_model_kwargs"].model_name if cfg.get(f"{role}_model_kwargs") is not None
                    else getattr(cfg, f"{role}_name", "Wan2.2-TI2V-5B")) for role in ("real", "fake")}
    expected = {
        "generator": cfg.model_kwargs.model_name, "real_score": roles["real"], "critic": roles["fake"],
        "frames": frames, "min_frames": getattr(cfg, "min_num_training_frames", 21),
        "window_frames": frames if window == -1 else min(window, frames),
        "frames_per_block": getattr(cfg, "num_frame_per_block", 1),
        "tokens_per_frame": math.prod(cfg.image_or_video_shape[-2:]) // 4,  # model/base.py frame_seq_length
        "attention_frames": None if local == -1 else local,
        "denoising_steps": sampling if sampling is not None else steps_of(cfg.denoising_step_list),
        "critic_ratio": cfg.dfake_gen_update_ratio, "checkpointing": cfg.gradient_checkpointing,
        "lora": cfg.get("adapter") is not None, "mixed_precision": cfg.mixed_precision,
        "batch_per_rank": cfg.batch_size, "accumulation_steps": getattr(cfg, "gradient_accumulation_steps", 1),
        "i2v": getattr(cfg, "i2v", False), "independent_first_frame": getattr(cfg, "independent_first_frame", False),
    }
    assert {key: run[key] for key in expected} == expected
    assert report["glue"]["foresight_encoder"] == cfg.get("foresight_encoder", "bidirectional")
    cycle = flops["cycle"]
    assert_cycle(cycle, run, wan_models(repos))
    assert (cycle["frames"], cycle["window_frames"], cycle["attention_frames"], cycle["lora"],
            cycle["tokens_per_frame"], cycle["segment_frames"], cycle["denoising_steps"]) == (
        frames, expected["window_frames"], expected["attention_frames"], expected["lora"],
        expected["tokens_per_frame"], expected["frames_per_block"], expected["denoising_steps"])
    assert memory["accumulation_steps"] == expected["accumulation_steps"]
    assert memory["sharded"] == (cfg.get("foresight_head_sharding", "replicate") == "fsdp")


@pytest.mark.parametrize("name", ["video_mirai_longlive_dmd.yaml", "video_mirai_longlive_i2v_dmd.yaml"])
def test_the_shipped_longlive_configs_ask_for_the_encoder_checkpoint(repos, capsys, name):
    # as the glue does at start-up (test_longlive.py::test_longlive_encoder_choices runs it)
    path = repos("longlive") / "configs" / name
    for tool in (["config", "check"], ["flops"], ["memory"]):
        assert main([*tool, str(path)]) == 2
        assert "needs foresight_encoder_ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("repo", ["causal-forcing", "longlive"])
def test_configs_of_other_trainers_are_not_read_as_the_patched_one(repos, capsys, monkeypatch, repo):
    root = repos(repo)
    monkeypatch.chdir(root)
    for name in NOT_READ[repo]:
        raw = OmegaConf.load(Path("configs") / name)
        trainer = raw.get("trainer") or raw.algorithm.get("trainer")
        loss = raw.get("distribution_loss")
        assert trainer != "score_distillation" or loss != "dmd", name  # what train.py dispatches on
        assert main(["config", "check", f"configs/{name}", "--upstream", repo]) == 2, name
        assert "never builds" in capsys.readouterr().err


def test_every_config_of_the_checkouts_is_accounted_for(repos):
    for repo in ("self-forcing", "causal-forcing", "longlive"):
        folder = repos(repo) / "configs"
        found = {str(p.relative_to(folder)) for p in folder.rglob("*.yaml")}
        listed = {n for u, names in READ.items() if REPOS[u] == repo for n in names}
        listed |= set(NOT_READ.get(repo, [])) | set(NOT_TRAINING[repo])
        assert found == listed, repo


# ----------------------------------------------------------------------------- real runs


def harness(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          cwd=HERE.parent, timeout=900, check=False)
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    out = Path(args[args.index("--out") + 1])
    return torch.load(out / "result.pt", map_location="cpu", weights_only=False)


def without_heads(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "num_heads"}  # the glue takes the generator's heads


@pytest.mark.parametrize("repo, config, trainer", [
    ("self-forcing", "configs/video_mirai_dmd_chunkwise.yaml", "dmd"),
    ("causal-forcing", "configs/video_mirai_ode_chunkwise.yaml", "ode"),
])
def test_the_self_forcing_layout_glue_holds_what_config_check_resolves(repos, capsys, tmp_path, repo, config,
                                                                       trainer):
    result = harness("trainer_harness.py", "--checkout", str(repos(repo)), "--trainer", trainer, "--config", config,
                     "--steps", "1", "--out", str(tmp_path / "run"), "--overrides", json.dumps(LAYERS))
    glue = result["extra"]["glue"]
    path = tmp_path / "held.yaml"  # the config as the trainer held it (merged over default_config.yaml)
    OmegaConf.save(OmegaConf.create(result["extra"]["config"]), path)
    upstream = "causal-forcing-ode" if trainer == "ode" else repo
    report = run_cli(capsys, "config", "check", str(path), "--json", "--upstream", upstream, "--no-defaults")
    assert glue["class"] == ("ODEForesight" if trainer == "ode" else "DMDForesight")
    assert without_heads(report["config"]) == without_heads(glue["config"])
    assert glue["config"]["num_heads"] == 4  # the tiny generator's
    assert report["glue"] == glue["resolved"]["glue"]
    (_, frames, _, _, _), s = glue["videos"][0], glue["tokens_per_frame"][0]
    assert frames % report["config"]["segment_frames"] == 0
    if trainer == "dmd":
        run = report["trainer"]
        assert (frames, s) == (run["window_frames"], run["tokens_per_frame"]) == (21, 16)  # the 8x8 tiny latents
        cycle = run_cli(capsys, "flops", str(path), "--json", "--upstream", upstream, "--no-defaults")["cycle"]
        assert (cycle["window_frames"], cycle["tokens_per_frame"]) == (frames, s)


@pytest.mark.parametrize("config", ["configs/video_mirai_longlive_dmd.yaml",
                                    "configs/video_mirai_longlive_i2v_dmd.yaml"])
def test_the_longlive_glue_holds_what_config_check_resolves(repos, capsys, tmp_path, config):
    repo = repos("longlive")
    encoder = tmp_path / "wan.pt"
    done = subprocess.run([sys.executable, str(HERE / "longlive_harness.py"), "--mode", "encoder-ckpt", "--checkout",
                           str(repo), "--config", config, "--out", str(encoder)], capture_output=True, text=True,
                          cwd=HERE.parent, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    overrides = {**LAYERS, "foresight_encoder_ckpt": str(encoder)}
    result = harness("longlive_harness.py", "--checkout", str(repo), "--config", config, "--steps", "1",
                     "--out", str(tmp_path / "run"), "--overrides", json.dumps(overrides))
    glue = result["extra"]["glue"]
    path = tmp_path / "source.yaml"  # the file the run started from, before LongLive's normalize_config
    OmegaConf.save(OmegaConf.create(result["extra"]["source_config"]), path)
    report = run_cli(capsys, "config", "check", str(path), "--json")
    assert report["upstream"]["name"] == "longlive"
    # the glue resolved the config LongLive's own normalize_config made; config check ours: the same
    assert without_heads(report["config"]) == without_heads(glue["config"])
    assert report["glue"] == glue["resolved"]["glue"] and report["trainer"] == glue["resolved"]["trainer"]
    run = report["trainer"]
    (_, window, _, _, _), s = glue["videos"][0], glue["tokens_per_frame"][0]
    logged = glue["logged"][0]
    assert (window, s, logged["foresight_rollout_frames"]) == (run["window_frames"], run["tokens_per_frame"],
                                                                run["frames"])
    assert logged["foresight_segments"] == run["window_frames"] // run["frames_per_block"]
    cycle = run_cli(capsys, "flops", str(path), "--json")["cycle"]
    assert (cycle["frames"], cycle["window_frames"], cycle["tokens_per_frame"], cycle["segment_frames"]) == (
        logged["foresight_rollout_frames"], window, s, glue["config"]["segment_frames"])
    memory = run_cli(capsys, "memory", str(path), "--json")
    assert memory["sharded"] == (glue["resolved"]["glue"]["foresight_head_sharding"] == "fsdp")


def llamagen_parser_defaults(repo: Path) -> dict:
    """The patched ``train_c2i.py`` parser's defaults (its ``__main__`` block run until ``parse_args``)."""
    script = ("import json, sys; sys.path.insert(0, sys.argv[2]); import llamagen_harness as h; "
              "_, root = h._import_train_c2i(sys.argv[1]); "
              "args, _ = h._parse_train_args(root, {'code_path': 'x', 'cloud_save_path': 'y'}, []); "
              "print(json.dumps(vars(args)))")
    done = subprocess.run([sys.executable, "-c", script, str(repo), str(HERE)], capture_output=True, text=True,
                          cwd=HERE.parent, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_llamagen_reader_fills_the_parsers_defaults(repos):
    from mirai_plugin.integrations.resolve import LLAMAGEN_DEFAULTS

    defaults = llamagen_parser_defaults(repos("llamagen"))
    assert {key: defaults[key] for key in LLAMAGEN_DEFAULTS} == LLAMAGEN_DEFAULTS


def test_the_llamagen_glue_holds_what_config_check_resolves(repos, capsys, tmp_path):
    options = {"mirai": "E", "mirai_layer": 1, "mirai_projector_dim": 8}
    result = harness("llamagen_harness.py", "--checkout", str(repos("llamagen")), "--steps", "1", "--out",
                     str(tmp_path / "run"), "--overrides", json.dumps(options))
    glue = result["extra"]["glue"]
    assert glue["class"] == "LlamaGenMirai" and glue["enabled"]
    args = {k: v for k, v in result["args"].items() if v is not None}
    args["gpt_model"] = "GPT-B"  # the run's GPT-tiny is registered by the harness only; the settings compared
    path = tmp_path / "args.yaml"  # do not depend on the model's depth
    OmegaConf.save(OmegaConf.create(args), path)
    report = run_cli(capsys, "config", "check", str(path), "--json", "--upstream", "llamagen")
    ours, held = dict(report["config"]), dict(glue["config"])
    # the step-down step needs len(loader), which only the trainer knows
    assert ours.pop("weight_changes") == [] and held.pop("weight_changes") == [
        [int(args["epochs"] * glue["steps_per_epoch"] * args["mirai_step_down"]), args["mirai_weight_after"]]]
    assert ours == held
    run = report["trainer"]
    held_run = glue["resolved"]["trainer"]
    assert (run["grid"], run["prefix_tokens"], run["epochs"]) == (held_run["grid"], held_run["prefix_tokens"],
                                                                  held_run["epochs"])

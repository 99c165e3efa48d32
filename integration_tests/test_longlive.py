"""The LongLive 2.0 patch on LongLive's real DMD ``Trainer``: copy the checkout, apply the patch with the
``mirai-plugin`` command, train tiny random-weight models on a CPU (``longlive_harness.py``) from the
shipped configs with only sizes overridden (``all_causal: true``, bf16 mixed precision and ``hybrid_full``
as shipped; LoRA as shipped unless a test removes it).

Needs ``MIRAI_LONGLIVE_DIR`` (skipped otherwise, see ``checkouts.py``). Every run is its own process.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkouts import checkout
from trainer_runs import assert_bf16_recipe_dtypes, assert_moved, assert_term_reaches_up_to, block_index

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "longlive_harness.py"
CONFIG = "configs/video_mirai_longlive_dmd.yaml"
I2V_CONFIG = "configs/video_mirai_longlive_i2v_dmd.yaml"
LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}  # tiny models have 4 blocks
CAUSAL = {**LAYERS, "foresight_encoder": "causal_real_score"}
FULL = {"adapter": None}  # full fine-tuning: LongLive trains without LoRA when the section is absent


def run(args: list[str], *, nproc: int = 1, expect_ok: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + [str(HARNESS), *args], capture_output=True, text=True, cwd=HERE.parent,
                          timeout=900, check=False)
    if expect_ok:
        assert done.returncode == 0, f"harness failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def train(repo: Path, out: Path, *, config=CONFIG, steps=1, overrides=None, nproc=1, grad_probe=False,
          scene_cut_at=None, expect_ok=True, exact_resume=False):
    args = ["--checkout", str(repo), "--config", config, "--steps", str(steps), "--out", str(out),
            "--overrides", json.dumps(overrides or {})]
    if grad_probe:
        args.append("--grad-probe")
    if exact_resume:
        args += ["--one-prompt", "--seed-every-step"]
    if scene_cut_at is not None:
        args += ["--scene-cut-at", str(scene_cut_at)]
    done = run(args, nproc=nproc, expect_ok=expect_ok)
    if not expect_ok:
        return done
    return torch.load(out / "result.pt", map_location="cpu", weights_only=False)


def saved(out: Path) -> dict:
    path = max((out / "logs").glob("checkpoint_model_*/model.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)


def generator_record(result: dict) -> dict:
    return next(r for r in result["losses"] if r["train_generator"])


def logged(result: dict, key: str) -> list[float]:
    return [entry[key] for entry in result["logs"] if key in entry]


def same(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def head_calls(result: dict) -> list[dict]:
    """The head's calls that built a term (``glue_record.py``): term, unweighted loss, per-segment losses."""
    return result["extra"]["glue"]["head_calls"]


def close(a: float, b: float, effect: float) -> bool:
    """``a`` equals ``b`` up to 1 % of ``effect``, the size of the difference the comparison is about (bf16
    compute: the same per-segment losses come out of predictor groups of another size)."""
    return abs(a - b) <= 0.01 * abs(effect)


def terms(result: dict) -> list[tuple[list[float], float, float]]:
    """Per ``add_term`` call, from the head's own calls (one for all segments, or one per segment where the
    glue splits the window at scene cuts): the per-segment losses, the term they make (their weighted mean)
    and the weight."""
    calls = iter(head_calls(result))
    out = []
    for logged_values in result["extra"]["glue"]["logged"]:
        count = int(logged_values["foresight_segments"])
        values: list[float] = []
        term = 0.0
        while len(values) < count:
            call = next(calls)
            values += call["per_segment"]
            term += call["term"] * len(call["per_segment"]) / count
            weight = call["term"] / call["loss"]
        assert len(values) == count, (values, count)
        out.append((values, term, weight))
    return out


def first_term(result: dict) -> tuple[list[float], float]:
    """The per-segment losses of the first generator step's term and their weight."""
    values, _, weight = terms(result)[0]
    return values, weight


def assert_kept_segments(masked: dict, full: dict, dropped: int) -> None:
    """The masked run's term is the mean of the other segments' losses in the unmasked run of the same seed
    (the same rollout; the causal encoder's targets come from one call on the whole window), weighted as
    there; the unmasked term (all segments) fails that tolerance: the control."""
    everything, weight = first_term(full)
    kept = [v for k, v in enumerate(everything) if k != dropped]
    expected = sum(kept) / len(kept)
    effect = expected - sum(everything) / len(everything)
    values, _ = first_term(masked)
    assert effect != 0 and len(values) == len(kept)
    assert all(close(a, b, effect) for a, b in zip(values, kept)), (values, kept, effect)
    assert close(generator_record(masked)["foresight_loss"], weight * expected, weight * effect)
    assert not close(generator_record(full)["foresight_loss"], weight * expected, weight * effect)


@pytest.fixture(scope="module")
def patched_repo(tmp_path_factory):
    return checkout("longlive", tmp_path_factory.mktemp("ll") / "patched", "longlive")


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory):
    return checkout("longlive", tmp_path_factory.mktemp("ll") / "plain")


@pytest.fixture(scope="module")
def encoder_ckpt(patched_repo, tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "bidirectional_wan.pt"
    run(["--mode", "encoder-ckpt", "--checkout", str(patched_repo), "--config", CONFIG, "--out", str(path)])
    return str(path)


# ------------------------------------------------------------------ T2V and I2V steps


def test_longlive_t2v_generator_and_critic(patched_repo, encoder_ckpt, tmp_path):
    """Default encoder (a bidirectional Wan from foresight_encoder_ckpt), LoRA as shipped: one generator and
    one critic iteration; finite foresight and replay losses; the head moves on both."""
    overrides = {**LAYERS, "foresight_encoder_ckpt": encoder_ckpt}
    one = train(patched_repo, tmp_path / "one", steps=1, overrides=overrides, grad_probe=True)
    off = train(patched_repo, tmp_path / "off", steps=1, overrides={**overrides, "foresight_weight": 0},
                grad_probe=True)
    lora = [name for name in one["grads"] if "lora_" in name]
    assert_term_reaches_up_to(one["grads"], off["grads"], LAYERS["foresight_student_layer"], names=lora)
    two = train(patched_repo, tmp_path / "two", steps=2, overrides=overrides)
    (foresight,) = logged(two, "foresight_loss")
    (replay,) = logged(two, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay) and foresight != 0
    assert generator_record(two)["foresight_segments"] == 4  # 32 frames in blocks of 8, no gradient mask
    heads = [two["initial"]["head"], one["head"], two["head"]]
    for before, after in itertools.pairwise(heads):
        assert_moved(before, after)
    checkpoint = saved(tmp_path / "two")
    assert {"generator_lora", "critic_lora", "step", "foresight"} <= set(checkpoint)
    assert checkpoint["foresight"]["steps_taken"] == 1
    assert (two["extra"]["config"]["mixed_precision"], two["extra"]["config"]["sharding_strategy"]) == (
        True, "hybrid_full")
    assert_bf16_recipe_dtypes(two["extra"]["glue"], checkpoint)


def test_longlive_i2v_generator_and_critic(patched_repo, tmp_path):
    """I2V (the clean image latent in frame 0 of block 0): finite foresight and replay losses; the term's
    gradient reaches blocks 0..l only, the head moves. With ``foresight_i2v_first_block: mask`` the term is the
    mean of blocks 1..3's losses in the unmasked run (same seed)."""
    result = train(patched_repo, tmp_path / "i2v", config=I2V_CONFIG, steps=2, overrides=CAUSAL, grad_probe=True)
    off = train(patched_repo, tmp_path / "i2v_off", config=I2V_CONFIG, steps=1,
                overrides={**CAUSAL, "foresight_weight": 0}, grad_probe=True)
    lora = [name for name in result["grads"] if "lora_" in name]
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"], names=lora)
    assert_moved(result["initial"]["head"], result["head"])
    (foresight,) = logged(result, "foresight_loss")
    (replay,) = logged(result, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay) and foresight != 0
    assert generator_record(result)["foresight_segments"] == 4  # block 0 supervised (the default)
    assert_bf16_recipe_dtypes(result["extra"]["glue"], saved(tmp_path / "i2v"))
    masked = train(patched_repo, tmp_path / "i2v_mask", config=I2V_CONFIG, steps=1,
                   overrides={**CAUSAL, "foresight_i2v_first_block": "mask"})
    assert generator_record(masked)["foresight_segments"] == 3
    assert_kept_segments(masked, result, dropped=0)


# --------------------------------------------------------------- weight 0, inference


def test_longlive_weight_zero_is_unpatched(plain_repo, patched_repo, tmp_path):
    baseline = train(plain_repo, tmp_path / "a", config="configs/train_dmd.yaml", steps=2)
    runs = {
        "b": train(patched_repo, tmp_path / "b", steps=2, overrides={"foresight_weight": 0}),
        "c": train(patched_repo, tmp_path / "c", config="configs/train_dmd.yaml", steps=2),  # no foresight keys
    }
    for name, result in runs.items():
        assert result["logs"] == baseline["logs"], name
        assert result["losses"] == baseline["losses"], name
        for part in ("generator", "critic"):
            assert result[part].keys() == baseline[part].keys()
            assert all(torch.equal(result[part][k], baseline[part][k]) for k in baseline[part]), (name, part)
        assert set(saved(tmp_path / name)) == set(saved(tmp_path / "a"))
    # the comparison ran in bf16: the same run in float32 gives other numbers
    assert baseline["extra"]["config"]["mixed_precision"] is True
    float32 = train(plain_repo, tmp_path / "f32", config="configs/train_dmd.yaml", steps=2,
                    overrides={"infra": {"mixed_precision": False}})
    assert float32["losses"] != baseline["losses"]


def test_longlive_inference_untouched(plain_repo, patched_repo, tmp_path):
    """Checkpoints of patched runs (LoRA and full) load strictly into unpatched LongLive's inference
    pipeline; the latents are bit-identical in the unpatched and patched checkouts."""
    train(patched_repo, tmp_path / "lora", steps=1, overrides=CAUSAL)
    train(patched_repo, tmp_path / "full", steps=1, overrides={**CAUSAL, **FULL})
    for kind in ("lora", "full"):
        (ckpt,) = (tmp_path / kind / "logs").glob("checkpoint_model_*/model.pt")
        assert "foresight" in torch.load(ckpt, map_location="cpu", weights_only=False)
        videos = []
        for repo, name in ((plain_repo, "plain"), (patched_repo, "patched")):
            out = tmp_path / f"inf_{kind}_{name}"
            run(["--mode", "inference", "--checkout", str(repo), "--config", "configs/train_dmd.yaml",
                 "--checkpoint", str(ckpt), "--out", str(out)])
            videos.append(torch.load(out / "inference.pt", weights_only=False)["video"])
        assert torch.equal(videos[0], videos[1]), kind
    for path in ("inference.py", "inference_sp.py", "pipeline/causal_diffusion_inference.py",
                 "wan_5b/modules/causal_model.py", "wan_5b/modules/model.py", "utils/wan_5b_wrapper.py"):
        assert (plain_repo / path).read_bytes() == (patched_repo / path).read_bytes(), path


# ------------------------------------------------------------------ LoRA, encoders


def test_longlive_lora_gradients(patched_repo, tmp_path):
    """Same seeds with and without the term: its gradient reaches the LoRA parameters of blocks 0..l only;
    base weights get no gradient (frozen under LoRA)."""
    on = train(patched_repo, tmp_path / "on", steps=1, overrides=CAUSAL, grad_probe=True)
    off = train(patched_repo, tmp_path / "off", steps=1, overrides={**CAUSAL, "foresight_weight": 0}, grad_probe=True)
    assert on["grads"].keys() == off["grads"].keys()
    assert all(torch.isfinite(g).all() for g in on["grads"].values())  # bf16 as shipped
    lora = {name for name in on["grads"] if "lora_" in name}
    assert lora and all(block_index(name) is not None for name in lora)
    for name, grad in on["grads"].items():  # FSDP shows frozen parameters' gradients as zeros
        if name not in lora:
            assert grad.abs().max() == 0, name
    assert_term_reaches_up_to(on["grads"], off["grads"], LAYERS["foresight_student_layer"], names=lora)
    assert_moved(on["initial"]["head"], on["head"])


def test_longlive_encoder_choices(patched_repo, encoder_ckpt, tmp_path):
    """(a) refuses without a checkpoint, naming the options; (a) and (b) both train, on different targets."""
    refused = train(patched_repo, tmp_path / "none", overrides=LAYERS, expect_ok=False)
    assert refused.returncode != 0
    for words in ("foresight_encoder_ckpt", "causal_real_score", "foresight_weight: 0"):
        assert words in refused.stderr, refused.stderr[-2000:]
    a = train(patched_repo, tmp_path / "a", overrides={**LAYERS, "foresight_encoder_ckpt": encoder_ckpt})
    b = train(patched_repo, tmp_path / "b", overrides=CAUSAL)
    fa, fb = generator_record(a)["foresight_loss"], generator_record(b)["foresight_loss"]
    assert math.isfinite(fa) and math.isfinite(fb) and fa != fb
    assert_moved(a["initial"]["head"], a["head"])
    assert_moved(b["initial"]["head"], b["head"])
    # the DMD loss itself is the same: only the target differs
    assert generator_record(a)["dmdtrain_gradient_norm"] == generator_record(b)["dmdtrain_gradient_norm"]


# ------------------------------------------------------------------ window, scene cuts


def test_longlive_rollout_longer_than_window(patched_repo, tmp_path):
    """A 48-latent rollout with a 32-latent DMD window (first window latent re-encoded by the VAE): the
    generator's grad-enabled blocks are the window's, shifted into it; the first window block is supervised
    unless LongLive's gradient mask drops it (as_dmd) or the key says mask."""
    # Gradient checkpointing off: at this commit LongLive's own backward fails on rollouts longer than the
    # window with it on (the recomputed attention sees the KV cache grown since the forward: CheckpointError,
    # unpatched too; see docs/longlive.md).
    long = {"training": {"min_num_training_frames": 48, "num_training_frames": 48, "slice_last_frames": 32},
            "data": {"image_or_video_shape": [1, 48, 4, 4, 4]}, "infra": {"gradient_checkpointing": False},
            **CAUSAL}
    kept = train(patched_repo, tmp_path / "kept", overrides=long)
    record = generator_record(kept)
    assert math.isfinite(record["foresight_loss"]) and record["foresight_segments"] == 4
    assert record["foresight_rollout_frames"] == 48
    assert_moved(kept["initial"]["head"], kept["head"])
    masked = train(patched_repo, tmp_path / "masked", overrides={**long, "foresight_window_first_block": "mask"})
    assert generator_record(masked)["foresight_segments"] == 3
    assert_kept_segments(masked, kept, dropped=0)
    # rollout 48 != min 40: LongLive masks the window's first block from DMD, and so does the term (as_dmd)
    variable = {**long, "training": {**long["training"], "min_num_training_frames": 40}}
    dropped = train(patched_repo, tmp_path / "variable", overrides=variable, steps=1)
    record = generator_record(dropped)
    rollout = record["foresight_rollout_frames"]
    assert rollout in (40, 48)
    assert record["foresight_segments"] == (3 if rollout == 48 else 4)  # 40 == min: no gradient mask


def test_longlive_scene_cut(patched_repo, tmp_path):
    """A scene cut at rollout block 2 (multi_shot_rope_offset: 8 as shipped): `mask` gives no target across
    the cut (two shots), `keep` one run; same rollout, different foresight losses."""
    masked = train(patched_repo, tmp_path / "mask", overrides=CAUSAL, scene_cut_at=2)
    kept = train(patched_repo, tmp_path / "keep", overrides={**CAUSAL, "foresight_scene_cut": "keep"}, scene_cut_at=2)
    m, k = generator_record(masked), generator_record(kept)
    assert (m["foresight_shots"], k["foresight_shots"]) == (2, 1)
    assert m["foresight_segments"] == k["foresight_segments"] == 4
    assert m["dmdtrain_gradient_norm"] == k["dmdtrain_gradient_norm"]  # same rollout
    assert math.isfinite(m["foresight_loss"]) and m["foresight_loss"] != k["foresight_loss"]
    # `mask`: one head call per segment; segments 0, 2 and 3 keep the targets they have under `keep` (one block
    # ahead stays in their shot), segment 1's target stops at the cut: only its loss differs, and the term is
    # the mean of the four calls; the `keep` term fails that tolerance (the control)
    calls, (whole,) = head_calls(masked), head_calls(kept)
    assert [len(c["per_segment"]) for c in calls] == [1, 1, 1, 1]
    alone = [c["per_segment"][0] for c in calls]
    effect = alone[1] - whole["per_segment"][1]
    assert effect != 0
    assert all(close(alone[i], whole["per_segment"][i], effect) for i in (0, 2, 3)), (alone, whole, effect)
    weight = whole["term"] / whole["loss"]
    assert close(m["foresight_loss"], weight * sum(alone) / 4, weight * effect / 4)
    assert not close(k["foresight_loss"], weight * sum(alone) / 4, weight * effect / 4)
    assert_moved(masked["initial"]["head"], masked["head"])


def test_longlive_gradient_accumulation(patched_repo, tmp_path):
    """`gradient_accumulation_steps: 2` as LongLive does it (each micro-step's loss / 2, one optimizer step):
    a term per micro-step, one head step per update, the logged value their mean, replay over both."""
    result = train(patched_repo, tmp_path / "acc", steps=2, overrides={**CAUSAL, "training": {
        "gradient_accumulation_steps": 2}})
    records = [r for r in result["losses"] if r["train_generator"]]
    assert len(records) == 2 and all(math.isfinite(r["foresight_loss"]) for r in records)
    (logged_term,) = logged(result, "foresight_loss")
    micro = [term for _, term, _ in terms(result)]  # from what the head computed on each micro-step
    assert len(micro) == 2 and micro[0] != micro[1]
    assert [r["foresight_loss"] for r in records] == pytest.approx(micro, rel=1e-5)
    # the mean over the micro-steps; their sum fails the tolerance (the control)
    assert logged_term == pytest.approx(sum(micro) / 2, rel=1e-5)
    assert logged_term != pytest.approx(sum(micro), rel=1e-5)
    assert result["head_steps"] == 1 and math.isfinite(logged(result, "replay_foresight_loss")[0])
    assert_moved(result["initial"]["head"], result["head"])


# ------------------------------------------------------------------ resume, ranks


def test_longlive_resume_lora(patched_repo, tmp_path):
    """LongLive's auto-resume from its own LoRA checkpoint (generator_lora/critic_lora) restores the head and
    its optimizer step count too."""
    overrides = CAUSAL
    first = train(patched_repo, tmp_path / "run", steps=1, overrides=overrides)
    written = saved(tmp_path / "run")["foresight"]
    # same logdir: auto-resume at step 1, then up to the next generator iteration (5; dfake_gen_update_ratio 5)
    resumed = train(patched_repo, tmp_path / "run", steps=6, overrides=overrides)
    assert resumed["initial"]["step"] == 1 and written["steps_taken"] == 1
    assert resumed["initial"]["head_steps"] == 1
    for name, value in first["head"].items():
        assert torch.equal(resumed["initial"]["head"][name], value), name
    (foresight,) = logged(resumed, "foresight_loss")
    assert math.isfinite(foresight) and resumed["head_steps"] == 2
    assert_moved(resumed["initial"]["head"], resumed["head"])


def test_longlive_resume_continues_exactly_with_ema(plain_repo, patched_repo, tmp_path):
    """Full fine-tuning as shipped (bf16, hybrid_full) with EMA from step 1: LongLive's auto-resume restores
    generator, critic, optimizers, EMA and step, so with the data and random streams aligned
    (``--one-prompt --seed-every-step``) a run stopped at step 5 and resumed to 7 equals a run straight to 7,
    bit for bit: unpatched, and patched with the term on (head, its optimizer and schedule, the EMA). The EMA
    never sees a hook of ours, holds the generator's keys, and loads strictly into unpatched inference."""
    overrides = {**CAUSAL, **FULL, "training": {"ema_start_step": 1}}
    for repo, config, name in ((plain_repo, "configs/train_dmd.yaml", "plain"), (patched_repo, CONFIG, "patched")):
        straight = train(repo, tmp_path / f"{name}_straight", config=config, steps=7, overrides=overrides,
                         exact_resume=True)
        train(repo, tmp_path / f"{name}_resumed", config=config, steps=5, overrides=overrides, exact_resume=True)
        resumed = train(repo, tmp_path / f"{name}_resumed", config=config, steps=7, overrides=overrides,
                        exact_resume=True)
        assert resumed["initial"]["step"] == 5 and resumed["initial"]["ema"] is not None, name
        assert resumed["logs"] == [entry for entry in straight["logs"] if entry["step"] > 5], name
        for part in ("generator", "critic"):
            assert all(torch.equal(resumed[part][k], straight[part][k]) for k in straight[part]), (name, part)
        ema, expected = resumed["extra"]["ema"], straight["extra"]["ema"]
        assert ema.keys() == expected.keys() == straight["generator"].keys(), name
        assert all(torch.equal(ema[k], expected[k]) for k in expected), name
        events = straight["extra"]["ema_events"] + resumed["extra"]["ema_events"]
        assert any(e["event"] == "update" for e in events) and all(not e["mirai_hooks"] for e in events), events
    assert "foresight_loss" in resumed["logs"][0]
    assert resumed["head_steps"] == straight["head_steps"] == 2
    assert_moved(resumed["initial"]["head"], resumed["head"])
    for part in ("head", "optimizer", "replay_rng"):
        assert same(resumed["head_state"][part], straight["head_state"][part]), part
    # the patched checkpoint at step 5 in the unpatched trainer: its auto-resume takes generator and EMA as saved
    saved_dir = tmp_path / "patched_resumed" / "logs" / "checkpoint_model_000005"
    written = torch.load(saved_dir / "model.pt", map_location="cpu", weights_only=False)
    shutil.copytree(saved_dir, tmp_path / "plain_from_patched" / "logs" / saved_dir.name)
    plain = train(plain_repo, tmp_path / "plain_from_patched", config="configs/train_dmd.yaml", steps=6,
                  overrides=overrides, exact_resume=True)
    assert plain["initial"]["step"] == 5 and plain["initial"]["ema"].keys() == written["generator_ema"].keys()
    assert all(torch.equal(plain["initial"]["ema"][k], v) for k, v in written["generator_ema"].items())
    assert all(torch.equal(plain["initial"]["generator"][k], v) for k, v in written["generator"].items())
    ckpt = max((tmp_path / "patched_resumed" / "logs").glob("checkpoint_model_*/model.pt"))
    out = tmp_path / "inf_ema"
    run(["--mode", "inference", "--checkout", str(plain_repo), "--config", "configs/train_dmd.yaml",
         "--checkpoint", str(ckpt), "--out", str(out), "--use-ema", "--overrides", json.dumps(FULL)])
    assert torch.isfinite(torch.load(out / "inference.pt", weights_only=False)["video"]).all()


def test_longlive_two_ranks(patched_repo, encoder_ckpt, tmp_path):
    """torchrun, 2 ranks (gloo, FULL_SHARD), LoRA, the head and the bidirectional encoder sharded with FSDP as
    the config ships them, and a scene cut on rank 0 only (two shots there, one on rank 1): both ranks train.
    (On these tiny models the encoder is one FSDP unit that the early exit leaves gathered, so unequal
    encoder call counts would not hang here; the glue pads them for the 5B model's per-block units.)
    Rank 0's term is the one a single process computes on the same sample and seeds (``--one-prompt
    --seed-every-step``: rank 0's streams are the single process's) with the same scene cut: the per-segment
    losses and the term within 1 % of the scene cut's effect on them; the same process without the cut is
    the control."""
    overrides = {**LAYERS, "foresight_encoder_ckpt": encoder_ckpt}
    result = train(patched_repo, tmp_path / "two", steps=2, overrides=overrides, nproc=2, scene_cut_at="2,-1",
                   grad_probe=True, exact_resume=True)
    off = train(patched_repo, tmp_path / "off", steps=1, overrides={**overrides, "foresight_weight": 0}, nproc=2,
                scene_cut_at="2,-1", grad_probe=True, exact_resume=True)
    lora = [name for name in result["grads"] if "lora_" in name]
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"], names=lora)
    assert_moved(result["initial"]["head"], result["head"])
    assert result["extra"]["world_size"] == 2
    (foresight,) = logged(result, "foresight_loss")
    (replay,) = logged(result, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay)
    assert generator_record(result)["foresight_shots"] == 2  # rank 0's record
    assert saved(tmp_path / "two")["foresight"]["steps_taken"] == 1
    assert result["extra"]["config"]["sharding_strategy"] == "hybrid_full"
    assert_bf16_recipe_dtypes(result["extra"]["glue"], saved(tmp_path / "two"))

    alone = train(patched_repo, tmp_path / "alone", steps=1, overrides=overrides, scene_cut_at=2, exact_resume=True)
    uncut = train(patched_repo, tmp_path / "uncut", steps=1, overrides=overrides, exact_resume=True)
    (ranked, _, _), (single, single_term, _) = terms(result)[0], terms(alone)[0]
    (plain, plain_term, _) = terms(uncut)[0]
    effect = max(abs(a - b) for a, b in zip(single, plain))
    assert effect > 0 and len(ranked) == len(single) == len(plain)
    assert all(close(a, b, effect) for a, b in zip(ranked, single)), (ranked, single, effect)
    assert close(generator_record(result)["foresight_loss"], generator_record(alone)["foresight_loss"],
                 single_term - plain_term)
    assert not close(generator_record(result)["foresight_loss"], generator_record(uncut)["foresight_loss"],
                     single_term - plain_term)


@pytest.fixture(autouse=True)
def _keep_tmp_small(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)

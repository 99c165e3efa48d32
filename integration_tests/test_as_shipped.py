"""The recipes as users run them, on the real upstream trainers (``trainer_harness.py``): bf16 mixed
precision through the upstreams' own ``fsdp_wrap``, ``hybrid_full`` sharding, EMA past ``ema_start_step``,
resume, two ranks, and the official Video-Mirai trainer next to the patched Self-Forcing one in bf16.

Needs ``MIRAI_SELF_FORCING_DIR``, ``MIRAI_CAUSAL_FORCING_DIR`` and ``MIRAI_VIDEO_MIRAI_DIR`` (skipped
otherwise, see ``checkouts.py``). Every training run is its own process.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from checkouts import checkout
from trainer_runs import (
    EMA_SOON,
    LAYERS,
    assert_bf16_recipe_dtypes,
    assert_moved,
    assert_restored,
    assert_same_run,
    assert_term_reaches_up_to,
    checkpoint,
    checkpoint_path,
    generator_step,
    inference,
    logged,
    train,
)

from mirai_plugin import ForesightHead

pytestmark = pytest.mark.slow  # each test runs the real trainers in subprocesses (tens of seconds)
SF_CONFIG = "configs/video_mirai_dmd_chunkwise.yaml"

# How far bfloat16 compute moves the head from float32, at these tests' sizes (width 64 -> 96, 4 heads, 3 DiT
# blocks, 7 segments of 3 x 16 tokens, the official identity start on bfloat16 weights):
# `python benchmarks/bf16_difference.py --sizes integration --seeds 20`, the largest over the seeds.
BF16_TERM = 4.43e-6  # |term float32 - term bfloat16|
BF16_HEAD_GRADIENT = 2.42e-3  # relative L2, the head's gradient
BF16_UPDATE = 1.26e-1  # relative L2, one AdamW step of the recipe seen on bfloat16 weights
# The official projector and our head are two bfloat16 computations, each about that far from float32, on
# other data than the benchmark's: twice, twice (bf16_difference.TOLERANCE_FACTOR).
FACTOR = 4


def half_ulp_bf16(value: float) -> float:
    """Half the bfloat16 spacing at ``value``: the official trainer computes its loss in bf16, so its
    logged term is rounded to that."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 8)


def head_names(projector: dict, dim_proj: dict) -> dict:
    """Official projector tensors (weights, or gradients keyed like them) under our head's names, by the
    mapping ``ForesightHead.load_official`` applies."""
    head = ForesightHead.load_official({"mirai_projector": projector, "foresight_dim_proj": dim_proj})
    return {k: v.float() for k, v in head.state_dict().items()}


def relative(ours: dict, theirs: dict) -> float:
    a = torch.cat([ours[k].float().flatten() for k in theirs])
    b = torch.cat([theirs[k].flatten() for k in theirs])
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ official, bf16


def test_same_term_and_projector_update_as_the_official_video_mirai_in_bf16(tmp_path):
    """Both trainers as shipped (bf16; the official with one micro-step per update, as Self-Forcing has no
    accumulation), our head started from the official projector: the DMD part equal, the term, the projector's
    gradient and its update within the bf16 tolerances above. A head whose zero-initialised gates are perturbed
    (N(0, 0.1)) fails the term and the gradient."""
    official_repo = checkout("video-mirai", tmp_path / "vm")
    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")
    official_overrides = {**LAYERS, "gradient_accumulation_steps": 1}

    start = train(official_repo, SF_CONFIG, tmp_path / "vm0", steps=0, overrides=official_overrides)
    projector, dim_proj = start["extra"]["mirai_projector"], start["extra"]["foresight_dim_proj"]
    # The official model casts its projector to the trainer's dtype: bf16 weights, gradients and AdamW state.
    assert {v.dtype for v in projector.values() if v.is_floating_point()} == {torch.bfloat16}
    init = tmp_path / "official_init.pt"
    torch.save({"mirai_projector": projector, "foresight_dim_proj": dim_proj}, init)
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v.float().add(0.1 * torch.randn(v.shape, generator=generator)).to(v.dtype)
                 if "adaLN_modulation" in k and k.endswith("bias") else v for k, v in projector.items()}
    perturbed_init = tmp_path / "perturbed_init.pt"
    torch.save({"mirai_projector": perturbed, "foresight_dim_proj": dim_proj}, perturbed_init)

    official = train(official_repo, SF_CONFIG, tmp_path / "vm1", steps=1, overrides=official_overrides,
                     grad_probe=True)
    ours = train(repo, SF_CONFIG, tmp_path / "sf1", steps=1, grad_probe=True,
                 overrides={**LAYERS, "foresight_head_init": str(init)})
    wrong = train(repo, SF_CONFIG, tmp_path / "sf1p", steps=1, grad_probe=True,
                  overrides={**LAYERS, "foresight_head_init": str(perturbed_init)})
    assert_bf16_recipe_dtypes(ours["extra"]["glue"], checkpoint(tmp_path / "sf1"))

    theirs = generator_step(official)
    term_tolerance = FACTOR * BF16_TERM + half_ulp_bf16(theirs["foresight_loss"])
    official_grads = head_names({**official["extra"]["mirai_projector"], **official["head_grads"]["mirai_projector"]},
                                official["head_grads"]["foresight_dim_proj"])
    before = head_names(projector, dim_proj)
    after = head_names(official["extra"]["mirai_projector"], official["extra"]["foresight_dim_proj"])
    official_update = {k: after[k] - before[k] for k in before}
    assert any(v.abs().max() > 0 for v in official_update.values())

    def differences(run: dict, out: Path) -> tuple[float, float, float]:
        mine = generator_step(run)
        assert mine["dmdtrain_gradient_norm"] == theirs["dmdtrain_gradient_norm"]  # the same rollout and DMD
        head = checkpoint(out)["foresight"]["head"]
        # our float32 step as the official's bf16 weights would hold it
        update = {k: head[k].bfloat16().float() - before[k] for k in before}
        return (abs(mine["foresight_loss"] - theirs["foresight_loss"]), relative(run["head_grads"], official_grads),
                relative(update, official_update))

    term, gradient, update = differences(ours, tmp_path / "sf1")
    print(f"bf16: term {term:.2e} (tolerance {term_tolerance:.2e}), projector gradient {gradient:.2e} "
          f"({FACTOR * BF16_HEAD_GRADIENT:.2e}), update {update:.2e} ({FACTOR * BF16_UPDATE:.2e})")
    assert term <= term_tolerance
    assert gradient <= FACTOR * BF16_HEAD_GRADIENT
    assert update <= FACTOR * BF16_UPDATE
    term, gradient, _ = differences(wrong, tmp_path / "sf1p")
    print(f"perturbed head: term {term:.2e}, projector gradient {gradient:.2e}")
    assert term > term_tolerance and gradient > FACTOR * BF16_HEAD_GRADIENT


def test_official_video_mirai_as_shipped_on_two_ranks(tmp_path):
    """The official trainer with its config as shipped (bf16, FULL_SHARD, 8 accumulation micro-steps), two
    ranks: finite term and projector gradients; the projector and the dimension projection moved from their
    weights as built; the term's gradient (the same seeds at ``foresight_weight: 0`` subtracted) reaches the
    generator's blocks 0..1 and none after."""
    repo = checkout("video-mirai", tmp_path / "vm")
    result = train(repo, SF_CONFIG, tmp_path / "vm", steps=1, overrides=LAYERS, nproc=2, grad_probe=True)
    off = train(repo, SF_CONFIG, tmp_path / "off", steps=1, overrides={**LAYERS, "foresight_weight": 0.0}, nproc=2,
                grad_probe=True)
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"])
    for name in ("mirai_projector", "foresight_dim_proj"):
        assert_moved(result["extra"][f"{name}_init"], result["extra"][name])
    config = result["extra"]["config"]
    assert (config["mixed_precision"], config["gradient_accumulation_steps"]) == (True, 8)
    records = [r for r in result["losses"] if r["train_generator"]]
    assert len(records) == 8 and all(math.isfinite(r["foresight_loss"]) for r in records)
    grads = [g for part in result["head_grads"].values() for g in part.values()]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    before, after = result["extra"]["generator_init"], result["generator"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ EMA and resume


def test_self_forcing_ema_and_resume(tmp_path):
    """Past ema_start_step with the term on: the EMA never sees a hook of ours and holds exactly the
    generator's keys; its weights load strictly into unpatched Self-Forcing (inference.py --use_ema).
    Resuming from that checkpoint (generator_ckpt: the generator only, no optimizer state) the patched trainer
    with weight 0 equals the unpatched one bit for bit, and with the term on it restores the head as saved."""
    plain = checkout("self-forcing", tmp_path / "plain")
    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")
    run = train(repo, SF_CONFIG, tmp_path / "run", steps=6, overrides={**LAYERS, **EMA_SOON})
    events = run["extra"]["ema"]["events"]
    assert any(e["event"] == "update" for e in events) and all(not e["mirai_hooks"] for e in events), events
    saved = checkpoint(tmp_path / "run")
    assert set(saved) == {"generator", "critic", "generator_ema", "foresight"}
    assert_moved(run["extra"]["head_init"]["head"], saved["foresight"]["head"])
    assert set(saved["generator_ema"]) == set(saved["generator"]) == set(run["extra"]["generator_init"])
    assert {v.dtype for v in saved["generator_ema"].values()} == {torch.float32}
    assert any(not torch.equal(saved["generator_ema"][k], saved["generator"][k]) for k in saved["generator"])
    video = inference(plain, "configs/self_forcing_dmd.yaml", checkpoint_path(tmp_path / "run"), tmp_path / "inf",
                      use_ema=True)
    assert torch.isfinite(video).all()

    resume = {"generator_ckpt": str(checkpoint_path(tmp_path / "run")), **EMA_SOON}
    unpatched = train(plain, "configs/self_forcing_dmd.yaml", tmp_path / "u", steps=6, overrides=resume)
    off = train(repo, SF_CONFIG, tmp_path / "off", steps=6, overrides={**resume, "foresight_weight": 0})
    assert_same_run(off, unpatched)
    on = train(repo, SF_CONFIG, tmp_path / "on", steps=0, overrides={**LAYERS, **resume})
    assert_restored(on, unpatched, saved["foresight"], generator=saved["generator"])


def test_causal_forcing_ema_and_resume(tmp_path):
    """Causal-Forcing saves only ``generator_ema`` (and our ``foresight``) once EMA runs, and resumes from it:
    its own ``generator_ckpt`` path loads it strictly into the unpatched trainer. Resume as for Self-Forcing."""
    plain = checkout("causal-forcing", tmp_path / "plain")
    repo = checkout("causal-forcing", tmp_path / "cf", "causal-forcing")
    config, plain_config = "configs/video_mirai_dmd_chunkwise.yaml", "configs/causal_forcing_dmd_chunkwise.yaml"
    run = train(repo, config, tmp_path / "run", steps=6, overrides={**LAYERS, **EMA_SOON})
    events = run["extra"]["ema"]["events"]
    assert any(e["event"] == "update" for e in events) and all(not e["mirai_hooks"] for e in events), events
    saved = checkpoint(tmp_path / "run")
    assert set(saved) == {"generator_ema", "foresight"}
    assert_moved(run["extra"]["head_init"]["head"], saved["foresight"]["head"])
    assert set(saved["generator_ema"]) == set(run["extra"]["generator_init"])

    resume = {"generator_ckpt": str(checkpoint_path(tmp_path / "run")), **EMA_SOON}
    unpatched = train(plain, plain_config, tmp_path / "u", steps=6, overrides=resume)  # strict=True upstream
    loaded = unpatched["extra"]["generator_init"]
    assert all(torch.equal(loaded[k], saved["generator_ema"][k]) for k in loaded)
    off = train(repo, config, tmp_path / "off", steps=6, overrides={**resume, "foresight_weight": 0})
    assert_same_run(off, unpatched)
    on = train(repo, config, tmp_path / "on", steps=0, overrides={**LAYERS, **resume})
    assert_restored(on, unpatched, saved["foresight"], generator=saved["generator_ema"])


# ------------------------------------------------------------------ two ranks


def test_causal_forcing_dmd_on_two_ranks(tmp_path):
    """Causal-Forcing DMD (chunk-wise) as shipped on two ranks (bf16, hybrid_full as on one GPU node): the
    generator and critic steps run, finite term, replay and gradients, the bf16 dtypes; the term's gradient
    (same seeds at weight 0) reaches blocks 0..l only; the head moved."""
    repo = checkout("causal-forcing", tmp_path / "cf", "causal-forcing")
    result = train(repo, "configs/video_mirai_dmd_chunkwise.yaml", tmp_path / "run", steps=2, overrides=LAYERS,
                   nproc=2, grad_probe=True)
    off = train(repo, "configs/video_mirai_dmd_chunkwise.yaml", tmp_path / "off", steps=1, nproc=2, grad_probe=True,
                overrides={**LAYERS, "foresight_weight": 0})
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"])
    assert_moved(result["extra"]["head_init"]["head"], checkpoint(tmp_path / "run")["foresight"]["head"])
    assert result["extra"]["world_size"] == 2 and result["extra"]["config"]["sharding_strategy"] == "hybrid_full"
    (foresight,) = logged(result, "foresight_loss")
    (replay,) = logged(result, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay)
    assert all(torch.isfinite(g).all() for g in [*result["grads"].values(), *result["head_grads"].values()])
    assert_bf16_recipe_dtypes(result["extra"]["glue"], checkpoint(tmp_path / "run"))


def test_causal_forcing_ode_on_two_ranks(tmp_path):
    """The Stage-2 ODE trainer as shipped on two ranks: finite term and gradients, the bf16 dtypes; the term's
    part of the gradient (the ODE loss alone reaches every block: the difference to the same seeds at weight 0)
    is in blocks 0..l only; the head moved."""
    repo = checkout("causal-forcing", tmp_path / "cf", "causal-forcing-ode")
    result = train(repo, "configs/video_mirai_ode_chunkwise.yaml", tmp_path / "run", steps=1, overrides=LAYERS,
                   nproc=2, trainer="ode", grad_probe=True)
    off = train(repo, "configs/video_mirai_ode_chunkwise.yaml", tmp_path / "off", steps=1, nproc=2, trainer="ode",
                grad_probe=True, overrides={**LAYERS, "foresight_weight": 0})
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"])
    assert_moved(result["extra"]["head_init"]["head"], checkpoint(tmp_path / "run")["foresight"]["head"])
    assert result["extra"]["world_size"] == 2
    (record,) = result["losses"]
    assert math.isfinite(record["foresight_loss"]) and record["foresight_loss"] != 0
    assert all(torch.isfinite(g).all() for g in [*result["grads"].values(), *result["head_grads"].values()])
    assert_bf16_recipe_dtypes(result["extra"]["glue"], checkpoint(tmp_path / "run"))


@pytest.fixture(autouse=True)
def _keep_tmp_small(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)

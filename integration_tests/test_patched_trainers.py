"""The patches on the real upstream trainers: copy a checkout, apply the patch with the
``mirai-plugin`` command, train tiny random-weight models on a CPU (``trainer_harness.py``),
single process and ``torchrun --nproc_per_node 2`` (gloo), with the shipped configs' bf16 mixed
precision and sharding (``hybrid_full``) unless a test says otherwise (README.md, "What each harness
changes").

Needs checkouts (skipped otherwise, see ``checkouts.py``): ``MIRAI_SELF_FORCING_DIR``,
``MIRAI_CAUSAL_FORCING_DIR``, ``MIRAI_VIDEO_MIRAI_DIR``. Every training run is its own process
(the checkouts share top-level package names).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from checkouts import checkout
from trainer_runs import (
    FLOAT32,
    LAYERS,
    assert_bf16_recipe_dtypes,
    assert_moved,
    assert_term_reaches_up_to,
    block_index,
    checkpoint,
    generator_step,
    inference,
    logged,
    train,
)

pytestmark = pytest.mark.slow  # each test runs the real trainer in a subprocess (tens of seconds)
TOLERANCE = 1e-5  # float32: the same formulas, summed in another order


# ------------------------------------------------------------------ 1. steps


@pytest.mark.parametrize("nproc", [1, 2])
def test_self_forcing_generator_and_critic_steps(tmp_path, nproc):
    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")
    config = "configs/video_mirai_dmd_chunkwise.yaml"
    train(repo, config, tmp_path / "s0", steps=0, overrides=LAYERS, nproc=nproc)  # for its checkpoint
    train(repo, config, tmp_path / "s1", steps=1, overrides=LAYERS, nproc=nproc)
    on = train(repo, config, tmp_path / "on", steps=2, overrides=LAYERS, nproc=nproc, grad_probe=True)
    off = train(repo, config, tmp_path / "off", steps=2, overrides={**LAYERS, "foresight_weight": 0}, nproc=nproc,
                grad_probe=True)

    # finite foresight loss on the generator step, replay loss on the following critic step
    (foresight,) = logged(on, "foresight_loss")
    (replay,) = logged(on, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay) and foresight != 0
    # as shipped: bf16 mixed precision and hybrid sharding, what the head got and kept in bf16 and float32
    assert (on["extra"]["config"]["mixed_precision"], on["extra"]["config"]["sharding_strategy"]) == (
        True, "hybrid_full")
    assert_bf16_recipe_dtypes(on["extra"]["glue"], checkpoint(tmp_path / "on"))
    assert all(torch.isfinite(g).all() for g in on["grads"].values())

    # the head changes on the generator step and again on the replay step
    heads = [checkpoint(tmp_path / name)["foresight"]["head"] for name in ("s0", "s1", "on")]
    for before, after in zip(heads, heads[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)

    # the foresight term's gradient (same seeds with and without it) reaches blocks 0..l only
    assert_term_reaches_up_to(on["grads"], off["grads"], LAYERS["foresight_student_layer"])
    for name in (n for n in on["grads"] if n.startswith("model.head.")):
        assert torch.equal(on["grads"][name], off["grads"][name]), name

    if nproc == 2:
        # hybrid_full as on one GPU node (shard over the node's two ranks) reduces as FULL_SHARD does, exactly
        full = train(repo, config, tmp_path / "full", steps=2, overrides={**LAYERS, "sharding_strategy": "full"},
                     nproc=nproc, grad_probe=True)
        assert full["losses"] == on["losses"]
        assert all(torch.equal(full["grads"][k], on["grads"][k]) for k in on["grads"])
        assert all(torch.equal(full["head_grads"][k], on["head_grads"][k]) for k in on["head_grads"])


def test_self_forcing_two_ranks_with_an_fsdp_sharded_head(tmp_path):
    """`foresight_head_sharding: fsdp` (FULL_SHARD, size-based wrap, as the official trainer
    wraps its projector) trains like the replicated head: same losses, same head."""
    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")
    config = "configs/video_mirai_dmd_chunkwise.yaml"
    replicated = train(repo, config, tmp_path / "rep", steps=2, overrides=LAYERS, nproc=2)
    sharded = train(repo, config, tmp_path / "fsdp", steps=2, nproc=2,
                    overrides={**LAYERS, "foresight_head_sharding": "fsdp"})
    for key in ("foresight_loss", "replay_foresight_loss"):
        assert logged(sharded, key) == pytest.approx(logged(replicated, key), rel=1e-5, abs=1e-7), key
    saved = [checkpoint(tmp_path / name)["foresight"] for name in ("rep", "fsdp")]
    assert saved[0]["head"].keys() == saved[1]["head"].keys() and saved[1]["steps_taken"] == 1
    for name, value in saved[0]["head"].items():
        torch.testing.assert_close(saved[1]["head"][name], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- 2. official


def test_same_losses_as_the_official_video_mirai(tmp_path):
    """The same formulas: in float32 (where both trainers compute the same values up to the order of sums;
    in bf16 the official projector holds bf16 weights, test_as_shipped.py compares that) and with one
    micro-step per update (Self-Forcing's trainer has no gradient accumulation)."""
    official_repo = checkout("video-mirai", tmp_path / "vm")
    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")
    config = "configs/video_mirai_dmd_chunkwise.yaml"
    official_overrides = {**LAYERS, **FLOAT32, "gradient_accumulation_steps": 1}

    # the official projector's initial weights, handed to our head
    start = train(official_repo, config, tmp_path / "vm0", steps=0, overrides=official_overrides)
    init = tmp_path / "official_init.pt"
    torch.save({"mirai_projector": start["extra"]["mirai_projector"],
                "foresight_dim_proj": start["extra"]["foresight_dim_proj"]}, init)

    official = train(official_repo, config, tmp_path / "vm1", steps=1, overrides=official_overrides)
    float32_head = {**FLOAT32, "foresight_compute_dtype": "float32"}
    ours = train(repo, config, tmp_path / "sf1", steps=1,
                 overrides={**LAYERS, **float32_head, "foresight_head_init": str(init)})
    theirs, mine = generator_step(official), generator_step(ours)
    assert abs(mine["foresight_loss"] - theirs["foresight_loss"]) <= TOLERANCE
    dmd_theirs = theirs["generator_loss"] - theirs["foresight_loss"]
    dmd_mine = mine["generator_loss"] - mine["foresight_loss"]
    assert abs(dmd_mine - dmd_theirs) <= TOLERANCE
    assert abs(mine["dmdtrain_gradient_norm"] - theirs["dmdtrain_gradient_norm"]) <= TOLERANCE
    print(f"foresight official {theirs['foresight_loss']:.8f} ours {mine['foresight_loss']:.8f}; "
          f"dmd official {dmd_theirs:.8f} ours {dmd_mine:.8f}")


# --------------------------------------------------------------- 3. weight 0


def test_weight_zero_reproduces_the_unpatched_trainer(tmp_path):
    plain = checkout("self-forcing", tmp_path / "plain")
    patched = checkout("self-forcing", tmp_path / "patched", "self-forcing")
    baseline = train(plain, "configs/self_forcing_dmd.yaml", tmp_path / "a", steps=2)
    runs = [
        train(patched, "configs/video_mirai_dmd_chunkwise.yaml", tmp_path / "b", steps=2,
              overrides={"foresight_weight": 0}),
        train(patched, "configs/self_forcing_dmd.yaml", tmp_path / "c", steps=2),  # no foresight keys at all
    ]
    for run, name in zip(runs, "bc"):
        assert run["logs"] == baseline["logs"]
        assert run["losses"] == baseline["losses"]
        for part in ("generator", "critic"):
            assert run[part].keys() == baseline[part].keys()
            assert all(torch.equal(run[part][k], baseline[part][k]) for k in baseline[part])
        assert set(checkpoint(tmp_path / name)) == set(checkpoint(tmp_path / "a"))
    # the comparison ran in bf16: the same run in float32 gives other numbers
    assert baseline["extra"]["config"]["mixed_precision"] is True
    float32 = train(plain, "configs/self_forcing_dmd.yaml", tmp_path / "f32", steps=2, overrides=FLOAT32)
    assert float32["losses"] != baseline["losses"]


# ---------------------------------------------------------------- 4. inference


def test_inference_is_untouched(tmp_path):
    plain = checkout("self-forcing", tmp_path / "plain")
    patched = checkout("self-forcing", tmp_path / "patched", "self-forcing")
    train(patched, "configs/video_mirai_dmd_chunkwise.yaml", tmp_path / "run", steps=1, overrides=LAYERS)
    (saved,) = (tmp_path / "run" / "logs").glob("checkpoint_model_*/model.pt")
    assert {"generator", "foresight"} <= set(torch.load(saved, map_location="cpu", weights_only=False))

    videos = [inference(repo, "configs/self_forcing_dmd.yaml", saved, tmp_path / name)  # strict load into each
              for repo, name in ((plain, "inf_plain"), (patched, "inf_patched"))]
    assert torch.equal(videos[0], videos[1])
    for path in ("inference.py", "pipeline/causal_inference.py", "wan/modules/causal_model.py"):
        assert (plain / path).read_bytes() == (patched / path).read_bytes()


# ----------------------------------------------------------- Causal-Forcing


@pytest.mark.parametrize("segmenting", ["chunkwise", "framewise"])
def test_causal_forcing_dmd(tmp_path, segmenting):
    """As shipped (bf16, hybrid_full): finite term and replay, the bf16 dtypes; the term's gradient (same seed
    with weight 0) reaches blocks 0..l and none after, the head moves on the generator step and on replay; with
    weight 0 the patched trainer equals the unpatched one bit for bit (the unpatched config with the same
    settings)."""
    repo = checkout("causal-forcing", tmp_path / "cf", "causal-forcing")
    config = f"configs/video_mirai_dmd_{segmenting}.yaml"
    result = train(repo, config, tmp_path / "run", steps=2, overrides=LAYERS, grad_probe=True)
    (foresight,) = logged(result, "foresight_loss")
    (replay,) = logged(result, "replay_foresight_loss")
    assert math.isfinite(foresight) and math.isfinite(replay)
    assert all(torch.isfinite(g).all() for g in result["grads"].values())
    assert all(torch.isfinite(g).all() for g in result["head_grads"].values())
    saved = checkpoint(tmp_path / "run")
    assert_bf16_recipe_dtypes(result["extra"]["glue"], saved)
    assert saved["foresight"]["steps_taken"] == 1
    assert_moved(result["extra"]["head_init"]["head"], saved["foresight"]["head"])

    plain = checkout("causal-forcing", tmp_path / "plain")
    baseline = train(plain, f"configs/causal_forcing_dmd_{segmenting}.yaml", tmp_path / "a", steps=2)
    off = train(repo, config, tmp_path / "off", steps=2, overrides={"foresight_weight": 0}, grad_probe=True)
    assert_term_reaches_up_to(result["grads"], off["grads"], LAYERS["foresight_student_layer"])
    assert baseline["extra"]["config"]["mixed_precision"] is True
    assert off["losses"] == baseline["losses"] and off["logs"] == baseline["logs"]
    for part in ("generator", "critic"):
        assert all(torch.equal(off[part][k], baseline[part][k]) for k in baseline[part])


def test_causal_forcing_stage2_ode_with_ground_truth_future(tmp_path):
    """As shipped (bf16, hybrid_full; the ODE recipe has no EMA): finite term and gradients, the bf16 dtypes
    (no replay in Stage 2). The ODE loss alone already gives every block a gradient: the term's part is the
    difference to the run of the same seed at weight 0, non-zero in blocks 0..l and zero after; the head moved.
    Weight 0 equals the unpatched ODE trainer bit for bit, and that comparison ran in bf16 (the float32 run
    differs)."""
    plain = checkout("causal-forcing", tmp_path / "plain")
    repo = checkout("causal-forcing", tmp_path / "cf", "causal-forcing-ode")
    config = "configs/video_mirai_ode_chunkwise.yaml"
    on = train(repo, config, tmp_path / "on", steps=1, overrides=LAYERS, trainer="ode", grad_probe=True)
    (record,) = on["losses"]
    assert math.isfinite(record["foresight_loss"]) and record["foresight_loss"] != 0
    assert math.isfinite(record["generator_loss"])
    assert all(torch.isfinite(g).all() for g in on["grads"].values())
    saved = checkpoint(tmp_path / "on")
    assert_bf16_recipe_dtypes(on["extra"]["glue"], saved)
    assert saved["foresight"]["steps_taken"] == 1
    assert_moved(on["extra"]["head_init"]["head"], saved["foresight"]["head"])

    baseline = train(plain, "configs/causal_ode_chunkwise.yaml", tmp_path / "a", steps=1, trainer="ode")
    off = train(repo, config, tmp_path / "off", steps=1, overrides={**LAYERS, "foresight_weight": 0}, trainer="ode",
                grad_probe=True)
    assert any(block_index(n) == 0 and g.abs().max() > 0 for n, g in off["grads"].items())  # the ODE loss alone
    assert_term_reaches_up_to(on["grads"], off["grads"], LAYERS["foresight_student_layer"])
    assert off["losses"] == baseline["losses"]
    assert all(torch.equal(off["generator"][k], baseline["generator"][k]) for k in baseline["generator"])
    float32 = train(plain, "configs/causal_ode_chunkwise.yaml", tmp_path / "f32", steps=1, trainer="ode",
                    overrides=FLOAT32)
    assert baseline["extra"]["config"]["mixed_precision"] is True and float32["losses"] != baseline["losses"]


@pytest.fixture(autouse=True)
def _keep_tmp_small(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)

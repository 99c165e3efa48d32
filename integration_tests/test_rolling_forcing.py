"""The Rolling Forcing patches on the real upstream trainer: Rolling Forcing itself and Causal-Forcing's
``long_video/`` (the same trainer, 4 denoising steps instead of 5). Copy the checkout, apply the patch with
the ``mirai-plugin`` command, train tiny random-weight models on a CPU (``trainer_harness.py``), with the
shipped config's bf16 mixed precision and sharding (``hybrid_full``) unless a test says otherwise
(README.md, "What each harness changes"). Where a test names the rollout mode (``rollout=``) and length
(``rollout_frames=``), the trainer's coin and draw are still made and then replaced; where it does not,
they are the trainer's.

Needs ``MIRAI_ROLLING_FORCING_DIR`` and ``MIRAI_CAUSAL_FORCING_DIR`` (skipped otherwise, see
``checkouts.py``). Every training run is its own process (the checkouts share top-level package names).
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch
from checkouts import checkout
from trainer_runs import (
    EMA_SOON,
    FLOAT32,
    LAYERS,
    assert_bf16_recipe_dtypes,
    assert_moved,
    assert_restored,
    assert_same_run,
    assert_term_reaches_up_to,
    checkpoint,
    checkpoint_path,
    inference,
    logged,
    train,
)

pytestmark = pytest.mark.slow  # each test runs the real trainer in subprocesses
CONFIG = "configs/video_mirai_rolling_forcing_dmd.yaml"  # the patches' ready config (shipped recipe + foresight)
PLAIN_CONFIG = "configs/rolling_forcing_dmd.yaml"  # the shipped recipe
STEPS = {"rolling-forcing": 5, "causal-forcing-long-video": 4}  # len(denoising_step_list): the window, L blocks
FRAMES_PER_BLOCK = 3  # num_frame_per_block in both recipes
WINDOW_FRAMES = 21  # the DMD window: the rollout's last 21 frames


def rolling_checkout(upstream: str, dest, *, patched: bool = True):
    """A fresh copy: Rolling Forcing's root, or Causal-Forcing's ``long_video/`` (its own trainer)."""
    if upstream == "rolling-forcing":
        return checkout("rolling-forcing", dest, *(["rolling-forcing"] if patched else []))
    return checkout("causal-forcing", dest, *(["causal-forcing-long-video"] if patched else [])) / "long_video"


# ------------------------------------------------------------------ 1. steps


@pytest.mark.parametrize(("upstream", "mode", "frames"), [
    ("rolling-forcing", "rolling", 21),
    ("rolling-forcing", "self_forcing", 27),
    ("causal-forcing-long-video", "rolling", 27),
    ("causal-forcing-long-video", "self_forcing", 21),
])
def test_generator_and_critic_steps(tmp_path, upstream, mode, frames):
    """As shipped (bf16, hybrid_full), each rollout mode at each length on each checkout, L = 5 and 4: a finite
    term on the generator step and replay on the next critic step, the bf16 dtypes, the head moved on both;
    the term's gradient (same seeds at weight 0) reaches generator blocks 0..l and none after. The encoder
    reads the DMD window (21 frames); with 27 frames the window's first block is left to DMD's own mask.
    Every captured block equals the same generator call rerun whole without the capture, sliced at its
    ``current_start`` and frame counts."""
    repo = rolling_checkout(upstream, tmp_path / "repo")
    forced = {"rollout": mode, "rollout_frames": frames}
    train(repo, CONFIG, tmp_path / "s1", steps=1, overrides=LAYERS, **forced)
    on = train(repo, CONFIG, tmp_path / "on", steps=2, overrides=LAYERS, grad_probe=True, split_probe=True,
               **forced)
    off = train(repo, CONFIG, tmp_path / "off", steps=2, overrides={**LAYERS, "foresight_weight": 0},
                grad_probe=True, **forced)
    config, glue = on["extra"]["config"], on["extra"]["glue"]
    window = STEPS[upstream]
    assert len(config["denoising_step_list"]) == window and config["num_training_frames"] == 27  # as shipped
    assert set(on["extra"]["rollouts"]) == {mode} and len(on["extra"]["rollouts"]) == 3  # generator, 2 critic

    # generator step, critic step, critic step with replay
    assert [r["train_generator"] for r in on["losses"]] == [True, False, False]
    (foresight,) = logged(on, "foresight_loss")
    (replay,) = logged(on, "replay_foresight_loss")
    assert math.isfinite(foresight) and foresight != 0 and math.isfinite(replay) and replay != 0
    assert all(torch.isfinite(g).all() for g in [*on["grads"].values(), *on["head_grads"].values()])
    assert_bf16_recipe_dtypes(glue, checkpoint(tmp_path / "on"))

    # the encoder read the 21-frame window; 7 blocks, the first left out when the rollout is longer (as_dmd)
    ((_, video_frames, *_),) = glue["videos"]
    (seen,) = glue["logged"]
    assert video_frames == WINDOW_FRAMES and seen["foresight_rollout_frames"] == frames
    assert seen["foresight_segments"] == WINDOW_FRAMES // FRAMES_PER_BLOCK - (frames > WINDOW_FRAMES)

    # the head moved on the generator step, and again on replay
    heads = [on["extra"]["head_init"]["head"], checkpoint(tmp_path / "s1")["foresight"]["head"],
             checkpoint(tmp_path / "on")["foresight"]["head"]]
    for before, after in zip(heads, heads[1:]):
        assert_moved(before, after)

    # the term's gradient reaches blocks 0..l only
    assert_term_reaches_up_to(on["grads"], off["grads"], LAYERS["foresight_student_layer"])

    # the per-block split against the joint call
    (tokens_per_frame,) = set(glue["tokens_per_frame"])
    n = FRAMES_PER_BLOCK * tokens_per_frame
    blocks, calls = on["extra"]["split"]["blocks"], on["extra"]["split"]["calls"]
    rollout_blocks = frames // FRAMES_PER_BLOCK
    assert [b["segment"] for b in blocks] == list(range(WINDOW_FRAMES // FRAMES_PER_BLOCK))
    assert [b["rollout_block"] for b in blocks] == list(range(rollout_blocks - len(blocks), rollout_blocks))
    spans = [(c["current_start"] // n, c["hidden"].shape[1] // n) for c in calls]
    assert all(c["current_start"] % n == 0 and c["hidden"].shape[1] % n == 0 for c in calls)
    if mode == "rolling":  # every L-th window of the schedule: B + L - 1 windows that grow, slide and shrink
        schedule = [(max(0, w - window + 1), min(w, rollout_blocks - 1)) for w in range(rollout_blocks + window - 1)]
        indices = [schedule.index((first, first + count - 1)) for first, count in spans]
        assert all(b - a == window for a, b in zip(indices, indices[1:])), (spans, indices)
        assert spans[-1][0] + spans[-1][1] == rollout_blocks and max(c for _, c in spans) > 1, spans
    else:  # one block per call, the blocks of the DMD window (earlier ones run without gradients)
        assert spans == [(k, 1) for k in range(rollout_blocks - len(blocks), rollout_blocks)], spans
    for block in blocks:
        (call,) = [c for c, (first, count) in zip(calls, spans)
                   if first <= block["rollout_block"] < first + count]
        offset = block["rollout_block"] * n - call["current_start"]
        assert torch.equal(block["hidden"], call["hidden"][:, offset:offset + n]), block["rollout_block"]


# --------------------------------------------------------------- 2. weight 0


@pytest.mark.parametrize("upstream", ["rolling-forcing", "causal-forcing-long-video"])
def test_weight_zero_reproduces_the_unpatched_trainer(tmp_path, upstream):
    """The trainer's own coin and rollout length, bf16 as shipped: the patched trainer at weight 0, and with the
    unpatched config, equals the unpatched trainer bit for bit (logs, losses, weights, the rollouts' modes, the
    checkpoint's keys). Rolling Forcing also runs the unpatched trainer in float32: other numbers, so the
    comparison is one in bf16."""
    plain = rolling_checkout(upstream, tmp_path / "plain", patched=False)
    repo = rolling_checkout(upstream, tmp_path / "patched")
    baseline = train(plain, PLAIN_CONFIG, tmp_path / "a", steps=2)
    runs = [train(repo, CONFIG, tmp_path / "b", steps=2, overrides={"foresight_weight": 0}),
            train(repo, PLAIN_CONFIG, tmp_path / "c", steps=2)]  # no foresight keys at all
    for run, name in zip(runs, "bc"):
        assert run["logs"] == baseline["logs"] and run["losses"] == baseline["losses"]
        assert run["extra"]["rollouts"] == baseline["extra"]["rollouts"]
        for part in ("generator", "critic"):
            assert run[part].keys() == baseline[part].keys()
            assert all(torch.equal(run[part][k], baseline[part][k]) for k in baseline[part]), part
        assert set(checkpoint(tmp_path / name)) == set(checkpoint(tmp_path / "a"))
    assert baseline["extra"]["config"]["mixed_precision"] is True
    if upstream == "rolling-forcing":
        float32 = train(plain, PLAIN_CONFIG, tmp_path / "f32", steps=2, overrides=FLOAT32)
        assert float32["losses"] != baseline["losses"]


# ---------------------------------------------------------------- 3. inference


@pytest.mark.parametrize("upstream", ["rolling-forcing", "causal-forcing-long-video"])
def test_inference_is_untouched(tmp_path, upstream):
    """A patched checkpoint (generator and our ``foresight`` entry) loads strictly into the repository's own
    rolling inference pipeline, patched and unpatched, and gives the same latents bit for bit; the patch
    changed only the two trainer files and added the ready config."""
    plain = rolling_checkout(upstream, tmp_path / "plain", patched=False)
    repo = rolling_checkout(upstream, tmp_path / "patched")
    train(repo, CONFIG, tmp_path / "run", steps=1, overrides=LAYERS)
    saved = checkpoint_path(tmp_path / "run")
    assert {"generator", "foresight"} <= set(torch.load(saved, map_location="cpu", weights_only=False))
    videos = [inference(r, PLAIN_CONFIG, saved, tmp_path / name) for r, name in ((plain, "i0"), (repo, "i1"))]
    assert torch.isfinite(videos[0]).all() and videos[0].shape[1] == WINDOW_FRAMES
    assert torch.equal(videos[0], videos[1])
    changed = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all", "."],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    assert sorted(line[3:].split("long_video/")[-1] for line in changed if line) == [
        CONFIG, "model/dmd.py", "trainer/distillation.py"], changed


# ---------------------------------------------------------------- 4. two ranks


@pytest.mark.parametrize(("upstream", "mode"), [("rolling-forcing", "rolling"),
                                                ("causal-forcing-long-video", "self_forcing")])
def test_two_ranks(tmp_path, upstream, mode):
    """Two ranks (gloo, hybrid_full as on one node, bf16), rollouts of 27 frames: each rank captures its own
    rollout (ranks are seeded apart, so their terms differ; in rolling mode their gradient windows, which
    upstream does not broadcast, differ too) and the same number of blocks, and both end with the same head,
    bit for bit, after the generator step and replay."""
    repo = rolling_checkout(upstream, tmp_path / "repo")
    # seed 4: the ranks' exit_flag draws (seeds 4 and 5) pick gradient windows of 2 and 3 grad calls
    result = train(repo, CONFIG, tmp_path / "run", steps=2, overrides=LAYERS, nproc=2, rollout=mode,
                   rollout_frames=27, split_probe=True, seed=4)
    assert result["extra"]["world_size"] == 2
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]
    terms = [[call["term"] for call in rank["glue"]["head_calls"]] for rank in ranks]
    assert len(terms[0]) == len(terms[1]) == 1 and all(math.isfinite(t[0]) for t in terms)
    assert terms[0] != terms[1]  # different rollouts
    segments = [rank["glue"]["logged"][0]["foresight_segments"] for rank in ranks]
    assert segments == [WINDOW_FRAMES // FRAMES_PER_BLOCK - 1] * 2
    starts = [[call["current_start"] for call in rank["split"]["calls"]] for rank in ranks]
    if mode == "rolling":  # each rank's own exit_flag: other windows, another number of grad calls
        assert len(starts[0]) != len(starts[1]), starts
    heads = [rank["head"]["head"] for rank in ranks]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert_moved(result["extra"]["head_init"]["head"], heads[0])
    assert all(rank["head"]["steps_taken"] == 1 for rank in ranks)
    (replay,) = logged(result, "replay_foresight_loss")
    assert math.isfinite(replay)


# ----------------------------------------------------------- 5. EMA and resume


def test_ema_and_resume(tmp_path):
    """Past ema_start_step with the term on: the EMA never sees a hook of ours and holds exactly the generator's
    keys. Rolling Forcing resumes from ``generator_ckpt`` only (the generator's weights; the step restarts at
    0, no optimizer state): from our checkpoint the patched trainer at weight 0 equals the unpatched one bit
    for bit, and with the term on it restores the generator as the unpatched trainer does and the head as
    saved (weights, AdamW state, steps taken)."""
    plain = rolling_checkout("rolling-forcing", tmp_path / "plain", patched=False)
    repo = rolling_checkout("rolling-forcing", tmp_path / "patched")
    run = train(repo, CONFIG, tmp_path / "run", steps=6, overrides={**LAYERS, **EMA_SOON})
    events = run["extra"]["ema"]["events"]
    assert any(e["event"] == "update" for e in events) and all(not e["mirai_hooks"] for e in events), events
    saved = checkpoint(tmp_path / "run")
    assert set(saved) == {"generator", "critic", "generator_ema", "foresight"}
    assert set(saved["generator_ema"]) == set(saved["generator"]) == set(run["extra"]["generator_init"])
    assert saved["foresight"]["steps_taken"] == 2  # generator steps 0 and 5

    resume = {"generator_ckpt": str(checkpoint_path(tmp_path / "run")), **EMA_SOON}
    unpatched = train(plain, PLAIN_CONFIG, tmp_path / "u", steps=6, overrides=resume)
    off = train(repo, CONFIG, tmp_path / "off", steps=6, overrides={**resume, "foresight_weight": 0})
    assert_same_run(off, unpatched)
    on = train(repo, CONFIG, tmp_path / "on", steps=0, overrides={**LAYERS, **resume})
    assert_restored(on, unpatched, saved["foresight"], generator=saved["generator"])


@pytest.fixture(autouse=True)
def _keep_tmp_small(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)

"""The Rolling Forcing patch on the real upstream trainer: copy the checkout, apply the patch with the
``mirai-plugin`` command, train tiny random-weight models on a CPU (``trainer_harness.py``), with the
shipped config's bf16 mixed precision and sharding (``hybrid_full``) unless a test says otherwise
(README.md, "What each harness changes"). The rollout mode is chosen by the test (``rollout=``), never
left to the trainer's coin.

Needs ``MIRAI_ROLLING_FORCING_DIR`` (skipped otherwise, see ``checkouts.py``). Every training run is its
own process (the checkouts share top-level package names).
"""

from __future__ import annotations

import math

import pytest
import torch
from checkouts import checkout
from trainer_runs import LAYERS, assert_term_reaches_up_to, checkpoint, logged, train

pytestmark = pytest.mark.slow  # each test runs the real trainer in a subprocess
CONFIG = "configs/video_mirai_rolling_forcing_dmd.yaml"  # the patch's ready config
FRAMES_21 = {"num_training_frames": 21}  # rollouts of exactly 21 frames: no decode and re-encode


def test_rolling_forcing_generator_and_critic_steps_rolling_21_frames(tmp_path):
    # L = 5: the shipped denoising_step_list (1000 .. 200), so rolling windows of 5 blocks
    repo = checkout("rolling-forcing", tmp_path / "rf", "rolling-forcing")
    overrides = {**LAYERS, **FRAMES_21}
    train(repo, CONFIG, tmp_path / "s0", steps=0, overrides=overrides, rollout="rolling")  # for its checkpoint
    on = train(repo, CONFIG, tmp_path / "on", steps=1, overrides=overrides, rollout="rolling", grad_probe=True)
    off = train(repo, CONFIG, tmp_path / "off", steps=1, overrides={**overrides, "foresight_weight": 0},
                rollout="rolling", grad_probe=True)
    config = on["extra"]["config"]
    assert len(config["denoising_step_list"]) == 5 and config["num_training_frames"] == 21
    assert on["extra"]["rollouts"] == off["extra"]["rollouts"] == ["rolling", "rolling"]  # generator, critic

    # one generator step and one critic step, a finite term on the generator step
    assert [r["train_generator"] for r in on["losses"]] == [True, False]
    (foresight,) = logged(on, "foresight_loss")
    assert math.isfinite(foresight) and foresight != 0
    assert all(torch.isfinite(g).all() for g in on["grads"].values())

    # the head moved on the generator step
    before, after = (checkpoint(tmp_path / name)["foresight"]["head"] for name in ("s0", "on"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # the term's gradient (same seeds with and without it) reaches generator blocks 0..l only
    assert_term_reaches_up_to(on["grads"], off["grads"], LAYERS["foresight_student_layer"])

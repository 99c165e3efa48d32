"""The Self-Forcing / Causal-Forcing glue on a DMD-shaped stand-in: what the patch lines do."""

import pytest
import torch
from conftest import all_hooks
from test_config import OFFICIAL_RECIPE
from tiny_models import make_inputs, make_pair, rollout

from mirai_plugin.integrations.self_forcing import DMDForesight, foresight_of, with_foresight_capture

ARGS = {  # the official recipe's keys, sized for the tiny models
    **OFFICIAL_RECIPE,
    "foresight_student_layer": 1,
    "foresight_teacher_layer": 3,
    "projection_layers_num": 2,
    "lr_foresight": 1e-3,
}


class TinyDMD(torch.nn.Module):
    """The attributes and call pattern of the upstream DMD that the glue relies on."""

    def __init__(self, args, seed=0):
        super().__init__()
        self.generator, self.real_score = make_pair(seed)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.foresight = DMDForesight(self, args)

    @with_foresight_capture
    def generator_loss(self, seed=0, fail=False):
        noise, cond = make_inputs(seed)
        video, _ = rollout(self.generator, noise, cond)
        if fail:
            raise RuntimeError("rollout failed")
        dmd_loss, log = video.square().mean().double(), {}
        dmd_loss = self.foresight.add_term(dmd_loss, log, video, cond)
        return dmd_loss, log


def test_disabled_is_a_no_op_that_consumes_no_randomness():
    for args in ({**ARGS, "foresight_weight": 0.0}, {}):
        state = torch.random.get_rng_state()
        dmd = TinyDMD(args)
        torch.random.set_rng_state(state)
        reference = TinyDMD({**ARGS, "foresight_weight": 0.0})
        assert not dmd.foresight.enabled and dmd.foresight.head is None
        torch.manual_seed(3)
        loss, log = dmd.generator_loss()
        torch.manual_seed(3)
        plain_video, _ = rollout(dmd.generator, *make_inputs(0))
        assert torch.equal(loss, plain_video.square().mean().double()) and log == {}
        assert dmd.foresight.log_values() == {} and dmd.foresight.checkpoint_state() == {}
        dmd.foresight.after_generator_step()
        dmd.foresight.after_critic_step(False)
        assert list(dmd.state_dict()) == list(reference.state_dict())


def test_generator_step_replay_and_logging():
    dmd = TinyDMD(ARGS)
    keys = list(dmd.generator.state_dict())
    loss, log = dmd.generator_loss()
    assert "foresight_loss" in log and loss.dtype == torch.float64
    loss.backward()
    assert all(p.grad is not None for p in dmd.foresight.head.parameters())
    before = [p.clone() for p in dmd.foresight.head.parameters()]
    dmd.foresight.after_generator_step()
    after = [p.clone() for p in dmd.foresight.head.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert set(dmd.foresight.log_values()) == {"foresight_loss"} and dmd.foresight.log_values() == {}

    dmd.foresight.after_critic_step(True)  # a generator step: no replay
    assert all(torch.equal(a, b) for a, b in zip(after, dmd.foresight.head.parameters()))
    dmd.foresight.after_critic_step(False)
    assert set(dmd.foresight.log_values()) == {"replay_foresight_loss"}
    assert any(not torch.equal(a, b) for a, b in zip(after, dmd.foresight.head.parameters()))
    assert list(dmd.generator.state_dict()) == keys and all_hooks(dmd.generator) == 0


def test_checkpoint_round_trip_resumes_head_and_optimizer():
    dmd = TinyDMD(ARGS)
    dmd.generator_loss()[0].backward()
    dmd.foresight.after_generator_step()
    saved = {"generator": dmd.generator.state_dict(), **dmd.foresight.checkpoint_state()}
    resumed = TinyDMD(ARGS, seed=1)
    resumed.foresight.load_checkpoint_state(saved)
    for a, b in zip(dmd.foresight.head.parameters(), resumed.foresight.head.parameters()):
        assert torch.equal(a, b)
    exp_avg = lambda f: [s["exp_avg"] for s in f.head.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg(dmd.foresight), exp_avg(resumed.foresight)))
    resumed.generator.load_state_dict(saved["generator"], strict=True)  # the generator entry is untouched


def test_hooks_gone_after_a_failing_rollout_and_foresight_of_other_models():
    dmd = TinyDMD(ARGS)
    with pytest.raises(RuntimeError, match="rollout failed"):
        dmd.generator_loss(fail=True)
    assert all_hooks(dmd.generator) == 0
    other = torch.nn.Linear(2, 2)
    assert not foresight_of(other).enabled and foresight_of(other).log_values() == {}
    assert foresight_of(dmd) is dmd.foresight


def test_schedule_keys_turn_the_term_on_late_and_step_it_down():
    dmd = TinyDMD(
        {**ARGS, "foresight_weight": 0.4, "foresight_weight_start": 1, "foresight_weight_changes": [[2, 0.1]]}
    )
    seen = []
    for _ in range(3):
        loss, log = dmd.generator_loss()
        seen.append((dmd.foresight.head.weight, "foresight_loss" in log))
        loss.backward()
        dmd.foresight.after_generator_step()
        dmd.foresight.after_critic_step(False)
        assert all_hooks(dmd.generator) == 0
    assert seen == [(0.0, False), (0.4, True), (0.1, True)]
    assert dmd.foresight.head.steps_taken == 3
    assert dmd.foresight.checkpoint_state()["foresight"]["steps_taken"] == 3

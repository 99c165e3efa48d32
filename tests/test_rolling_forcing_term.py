"""The Rolling Forcing glue (``RollingForcingForesight``) on a DMD-shaped stand-in whose rollouts make the calls
docs/rolling-forcing.md states for the trainer: rolling windows of up to L blocks (grad windows ``w % L ==
exit_flag`` ending inside the last 21 frames, a no-grad cache call on each window's first block) or one-block
self-forcing calls, with the pipeline's keywords (``noisy_image_or_video``, ``timestep``, ``current_start``).

The oracle of the term is independent of the capture: each grad call run once more without gradients (the
denoising calls do not write the KV cache, so it sees the same cache) with the tiny model's own
``return_hidden_at_layer``, sliced by hand into blocks, each block given to a copy of the head on its own with
the target frames of its offsets; the term is the mean of those per-block losses.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import all_hooks
from test_glue import ARGS as SF_ARGS
from tiny_models import TOKENS_PER_FRAME, _model, make_inputs, make_pair

from mirai_plugin import FrozenEncoder, HiddenRecord
from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.resolve import resolve_self_forcing
from mirai_plugin.integrations.rolling_forcing import RollingForcingForesight, foresight_of, with_foresight_capture

F, S, WINDOW = 3, TOKENS_PER_FRAME, 21  # frames per block, tokens per frame, DMD window
N = F * S  # tokens per block
ARGS = {**SF_ARGS, "denoising_step_list": [1000, 800, 600, 400, 200]}
LAYER = ARGS["foresight_student_layer"]


def levels(steps):
    """One timestep per block of a full window, oldest (cleanest) first: (L*F)."""
    return torch.linspace(1000, 1000 / steps, steps).flip(0).repeat_interleave(F)


def rolling(generator, noise, cond, *, steps, exit_flag, joint):
    """A rolling rollout; returns the DMD window of its output. ``joint`` gets (first block, blocks, hidden) of
    each grad call, from the same call rerun without gradients and without hooks."""
    b, frames = noise.shape[:2]
    blocks, start_gradient = frames // F, frames - WINDOW
    cache = _model(generator).new_cache(b, frames * S)
    shared = levels(steps)[None].expand(b, -1)  # (b L*F)
    noisy, output = noise.clone(), torch.zeros_like(noise)
    for w in range(blocks + steps - 1):
        first, last = max(0, w - steps + 1), min(blocks - 1, w)
        count = last - first + 1
        t = shared if count == steps else shared[:, -count * F:] if first == 0 else shared[:, :count * F]
        x = noisy[:, first * F:(last + 1) * F].clone()
        call = dict(noisy_image_or_video=x, conditional_dict=cond, timestep=t, kv_cache=cache,
                    current_start=first * F * S)
        grad = w % steps == exit_flag and (last + 1) * F > start_gradient
        with torch.set_grad_enabled(grad):
            _, x0 = generator(**call)
        if grad:
            output[:, first * F:(last + 1) * F] = x0
            with torch.no_grad():
                joint.append((first, count, generator(**call, return_hidden_at_layer=LAYER)[2]))
        with torch.no_grad():
            noisy[:, first * F:(last + 1) * F] = 0.7 * x0 + 0.3 * noise[:, first * F:(last + 1) * F]
            generator(x0[:, :F], cond, torch.zeros(b, F), kv_cache=cache, current_start=first * F * S,
                      write_cache=True)
    return output[:, -WINDOW:]


def self_forcing(generator, noise, cond, *, steps, exit_flag, joint):
    """A self-forcing rollout: one block per call, its exit call with gradients from the gradient range on."""
    b, frames = noise.shape[:2]
    cache = _model(generator).new_cache(b, frames * S)
    output = torch.zeros_like(noise)
    for k in range(frames // F):
        x = noise[:, k * F:(k + 1) * F]
        for i in range(exit_flag + 1):
            call = dict(noisy_image_or_video=x, conditional_dict=cond, timestep=torch.full((b, F), 1000.0 - 200 * i),
                        kv_cache=cache, current_start=k * F * S)
            grad = i == exit_flag and k * F >= frames - WINDOW
            with torch.set_grad_enabled(grad):
                _, x0 = generator(**call)
            if grad:
                with torch.no_grad():
                    joint.append((k, 1, generator(**call, return_hidden_at_layer=LAYER)[2]))
            x = 0.5 * x0.detach() + 0.5 * x
        output[:, k * F:(k + 1) * F] = x0
        with torch.no_grad():
            generator(x0, cond, torch.zeros(b, F), kv_cache=cache, current_start=k * F * S, write_cache=True)
    return output[:, -WINDOW:]


class TinyRollingDMD(torch.nn.Module):
    """The attributes and call pattern of Rolling Forcing's DMD that the glue relies on."""

    def __init__(self, args, seed=0):
        super().__init__()
        self.generator, self.real_score = make_pair(seed)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.foresight = RollingForcingForesight(self, args)
        self.joint: list = []

    @with_foresight_capture
    def generator_loss(self, mode="rolling", *, frames=21, steps=5, exit_flag=0, seed=0, fail=False):
        noise, cond = make_inputs(seed, frames=frames)
        self.joint = []
        video = (rolling if mode == "rolling" else self_forcing)(self.generator, noise, cond, steps=steps,
                                                                 exit_flag=exit_flag, joint=self.joint)
        if fail:
            raise RuntimeError("rollout failed")
        dmd_loss, log = video.square().mean(), {}
        return self.foresight.add_term(dmd_loss, log, video, cond), log, video, cond


def oracle(dmd, head, video, cond, segments, *, shift=0):
    """The mean over ``segments`` (window blocks) of the head's loss on each block alone, from the joint calls
    sliced by hand. ``shift``: take the hidden state of the block ``shift`` later (a wrong split)."""
    target = FrozenEncoder(dmd.real_score, ARGS["foresight_teacher_layer"])(video.detach(), cond)  # (b t e)
    first_block = max(first + count for first, count, _ in dmd.joint) - WINDOW // F
    losses = []
    for k in segments:
        block = first_block + k + shift
        (first, _, hidden), = [c for c in dmd.joint if c[0] <= block < c[0] + c[1]]
        view = hidden[:, (block - first) * N:(block - first + 1) * N]  # (b n d)
        reach = min(k + 2, WINDOW // F)  # offsets 0 and 1, inside the window
        record = HiddenRecord(view, 0, 0, view._version)
        with torch.no_grad():  # the joint calls ran without gradients: the head evaluates
            losses.append(head([record], target[:, k * N:reach * N], tokens_per_frame=S))
    return torch.stack(losses).mean()


CASES = [("rolling", 21, 5, e) for e in range(5)] + [("rolling", 27, 4, e) for e in range(4)] + [
    ("rolling", 24, 5, 1), ("self_forcing", 21, 4, 2), ("self_forcing", 27, 5, 3)]


@pytest.mark.parametrize(("mode", "frames", "steps", "exit_flag"), CASES)
def test_the_term_is_the_mean_of_per_block_losses_from_the_joint_calls(mode, frames, steps, exit_flag):
    dmd = TinyRollingDMD(ARGS)
    head = copy.deepcopy(dmd.foresight.head)
    loss, log, video, cond = dmd.generator_loss(mode, frames=frames, steps=steps, exit_flag=exit_flag)
    segments = range(int(frames > WINDOW), WINDOW // F)  # as_dmd: block 0 leaves with DMD's gradient mask
    expected = oracle(dmd, head, video, cond, segments)
    assert torch.allclose(log["foresight_loss"], expected, rtol=1e-5, atol=1e-7)
    assert log["foresight_segments"] == len(segments) and log["foresight_rollout_frames"] == frames
    assert torch.allclose(loss, video.square().mean() + expected, rtol=1e-5, atol=1e-7)
    if mode == "rolling":
        assert any(count > 1 for _, count, _ in dmd.joint)  # multi-block grad calls were split


def test_a_split_off_by_one_block_gives_another_term():
    """Negative control: the oracle with each block's state taken from its neighbour does not match."""
    dmd = TinyRollingDMD(ARGS)
    head = copy.deepcopy(dmd.foresight.head)
    _, log, video, cond = dmd.generator_loss("rolling", frames=21, steps=5, exit_flag=1)
    wrong = oracle(dmd, head, video, cond, range(6), shift=1)
    assert not torch.allclose(log["foresight_loss"], wrong, rtol=1e-3)


def test_both_modes_make_one_encoder_pass_and_one_head_call_on_every_exit():
    dmd = TinyRollingDMD(ARGS)
    calls = {"encoder": 0, "head": 0}
    dmd.real_score.register_forward_pre_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    dmd.foresight.head.register_forward_pre_hook(  # the trainer's calls (records), not the head's own inner ones
        lambda _, args: calls.__setitem__("head", calls["head"] + isinstance(args[0], list)))
    seen = set()
    for mode, steps in (("rolling", 5), ("self_forcing", 5), ("rolling", 4)):
        for exit_flag in range(steps):
            for frames in (21, 27):
                before = dict(calls)
                _, log, _, _ = dmd.generator_loss(mode, frames=frames, steps=steps, exit_flag=exit_flag)
                assert (calls["encoder"] - before["encoder"], calls["head"] - before["head"]) == (1, 1)
                seen.add((frames, log["foresight_segments"]))
                dmd.foresight.head.zero_grad(set_to_none=True)
    assert seen == {(21, 7), (27, 6)}  # the same count in either mode, whatever exit_flag


def test_generator_step_replay_checkpoint_and_logging():
    dmd = TinyRollingDMD(ARGS)
    keys = list(dmd.generator.state_dict())
    loss, log, video, _ = dmd.generator_loss("rolling", frames=24, steps=5, exit_flag=3)
    # the returned loss is the stand-in's DMD loss plus the weighted term it logged
    torch.testing.assert_close(loss.detach(), video.detach().square().mean() + log["foresight_loss"])
    loss.backward()
    grads = [p.grad for p in dmd.foresight.head.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert dmd.generator.model.blocks[0].qkv.weight.grad.abs().sum() > 0
    dmd.foresight.after_generator_step()
    after = [p.clone() for p in dmd.foresight.head.parameters()]
    assert set(dmd.foresight.log_values()) == {"foresight_loss"}
    dmd.foresight.after_critic_step(True)  # a generator step: no replay
    assert all(torch.equal(a, b) for a, b in zip(after, dmd.foresight.head.parameters()))
    dmd.foresight.after_critic_step(False)
    assert set(dmd.foresight.log_values()) == {"replay_foresight_loss"}
    assert any(not torch.equal(a, b) for a, b in zip(after, dmd.foresight.head.parameters()))
    saved = {"generator": dmd.generator.state_dict(), **dmd.foresight.checkpoint_state()}
    assert list(saved) == ["generator", "foresight"] and list(dmd.generator.state_dict()) == keys
    resumed = TinyRollingDMD(ARGS, seed=1)
    resumed.foresight.load_checkpoint_state(saved, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(dmd.foresight.head.parameters(), resumed.foresight.head.parameters()))
    resumed.generator.load_state_dict(saved["generator"], strict=True)
    assert foresight_of(dmd) is dmd.foresight and all_hooks(dmd.generator) == 0


def test_weight_zero_is_a_no_op():
    dmd = TinyRollingDMD({**ARGS, "foresight_weight": 0.0})
    torch.manual_seed(0)
    loss, log, video, _ = dmd.generator_loss("rolling", frames=27, steps=5, exit_flag=2)
    assert dmd.foresight.head is None and log == {} and torch.equal(loss, video.square().mean())
    assert dmd.foresight.checkpoint_state() == {} and dmd.foresight.log_values() == {}


def test_hooks_are_gone_after_a_failing_rollout():
    dmd = TinyRollingDMD({**ARGS, "foresight_window_blocks": "noise_below", "foresight_window_max_timestep": 500})
    with pytest.raises(RuntimeError, match="rollout failed"):
        dmd.generator_loss("rolling", fail=True)
    assert all_hooks(dmd.generator) == 0


@pytest.mark.parametrize("exit_flag", range(5))
def test_last_supervises_each_grad_calls_newest_block(exit_flag):
    dmd = TinyRollingDMD({**ARGS, "foresight_window_blocks": "last", "foresight_window_first_block": "supervise"})
    head = copy.deepcopy(dmd.foresight.head)
    _, log, video, cond = dmd.generator_loss("rolling", frames=21, steps=5, exit_flag=exit_flag)
    newest = [first + count - 1 for first, count, _ in dmd.joint]  # window blocks (21 frames: rollout blocks)
    assert log["foresight_segments"] == len(newest) == (3 if exit_flag == 0 else 2)
    assert torch.allclose(log["foresight_loss"], oracle(dmd, head, video, cond, newest), rtol=1e-5, atol=1e-7)


def test_noise_below_supervises_the_blocks_at_or_under_the_timestep():
    """21 frames, L = 5, exit 0: grad windows hold blocks 0 (t 1000), 0-4 (t 200..1000), 5-6 (t 200, 400)."""
    dmd = TinyRollingDMD({**ARGS, "foresight_window_blocks": "noise_below", "foresight_window_max_timestep": 400})
    head = copy.deepcopy(dmd.foresight.head)
    _, log, video, cond = dmd.generator_loss("rolling", frames=21, steps=5, exit_flag=0)
    assert [(first, count) for first, count, _ in dmd.joint] == [(0, 1), (1, 5), (6, 1)]
    t = {0: 1000.0, **{1 + j: float(levels(5)[j * F]) for j in range(5)}, 6: float(levels(5)[0])}
    kept = [k for k in range(7) if t[k] <= 400]
    assert kept == [1, 2, 6]
    assert log["foresight_segments"] == 3
    assert torch.allclose(log["foresight_loss"], oracle(dmd, head, video, cond, kept), rtol=1e-5, atol=1e-7)


def test_a_rank_without_a_supervised_block_still_runs_the_encoder_and_adds_nothing():
    dmd = TinyRollingDMD({**ARGS, "foresight_window_blocks": "noise_below", "foresight_window_max_timestep": 0})
    calls = []
    dmd.real_score.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, log, video, _ = dmd.generator_loss("rolling", frames=21, steps=5, exit_flag=2)
    assert calls == [1] and log["foresight_segments"] == 0 and log["foresight_loss"] == 0
    assert torch.equal(loss, video.square().mean()) and dmd.foresight.log_values() == {}


@pytest.mark.parametrize(("keys", "message"), [
    ({"foresight_window_blocks": "last", "foresight_head_sharding": "ddp"}, "use foresight_head_sharding: replicate"),
    ({"foresight_window_blocks": "noise_below"}, "set foresight_window_max_timestep"),
    ({"foresight_window_max_timestep": 400}, "only acts with foresight_window_blocks: noise_below"),
    ({"foresight_window_blocks": "first"}, "foresight_window_blocks must be one of"),
    ({"denoising_step_list": None}, "denoising_step_list is not set"),
])
def test_the_reader_refuses_what_the_glue_cannot_run(keys, message):
    with pytest.raises(MiraiError, match=message):
        RollingForcingForesight(torch.nn.Module(), {**ARGS, **keys})


def test_the_window_keys_belong_to_the_rolling_reader():
    with pytest.raises(MiraiError, match="foresight_window_blocks applies to the glues of rolling-forcing"):
        resolve_self_forcing({**ARGS, "foresight_window_blocks": "all"})

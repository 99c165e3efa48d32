"""The head inside a training loop: weight schedules, gradient accumulation, exact
resume after a restart, and what a crash leaves behind."""

import pytest
import torch
from conftest import all_hooks
from test_head import reference_loss
from tiny_models import make_inputs, make_pair, rollout

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden

LAYER, ENCODER_LAYER, SEGMENT_FRAMES = 1, 3, 3


def config(**changes):
    base = dict(
        student_layer=LAYER, encoder_layer=ENCODER_LAYER, num_heads=2, predictor_depth=1,
        segment_frames=SEGMENT_FRAMES, replay_device=None, lr=1e-2,
    )  # fmt: skip
    return ForesightConfig(**{**base, **changes})


def generator_step(generator, encoder, head, noise, cond, *, scale=1.0):
    """Rollout under capture, base loss + term, backward (no optimizer step)."""
    with capture_hidden(generator, LAYER) as captured:
        video, _ = rollout(generator, noise, cond, segment_frames=SEGMENT_FRAMES, exit_index=0)
    z = FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond) if head.active else None
    term = head(captured, z)
    ((video.square().mean() + term) * scale).backward()
    return term.detach()


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ schedule


def test_weight_schedule_late_start_ramp_step_down_and_stop():
    cfg = ForesightConfig(weight=2.0, weight_start=2, weight_ramp=2, weight_changes=((5, 1.0),), weight_stop=7)
    assert [cfg.weight_at(s) for s in range(8)] == [0.0, 0.0, 1.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    assert ForesightConfig(weight=0.0, weight_changes=((3, 0.2),)).enabled  # off at first, on later
    assert not ForesightConfig(weight=0.0).enabled


def test_head_follows_the_schedule_and_is_inert_while_off():
    generator, encoder = make_pair(0)
    head = ForesightHead(config(weight=0.5, weight_start=1, weight_changes=((2, 0.25),)), 32, 48)
    noise, cond = make_inputs(0, batch=1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    term = generator_step(generator, encoder, head, noise, cond)  # step 0: off, no encoder needed
    assert not head.active and term.item() == 0.0 and head.replay_pairs == 0
    head.step()
    assert states_equal(before, head.state_dict())  # no gradient, nothing moved
    assert head.replay() is None

    weights = []
    for scheduled in (0.5, 0.25):  # steps 1 and 2
        with capture_hidden(generator, LAYER) as captured:
            video, explicit = rollout(generator, noise, cond, segment_frames=SEGMENT_FRAMES, exit_index=0,
                                      hidden_layer=LAYER)
        z = FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond)
        term = head(captured, z)
        weights.append(head.weight)
        with torch.no_grad():
            expected = reference_loss(head, explicit, z, (0, 1), weight=scheduled)  # an explicit loop over segments
        # float32 rounding of the same sums in another order; the other step's weight must fail it
        torch.testing.assert_close(term.detach(), expected, rtol=1e-5, atol=1e-7)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(term.detach(), expected * (0.75 - scheduled) / scheduled, rtol=1e-5, atol=1e-7)
        term.backward()
        head.step()
    assert weights == [0.5, 0.25] and head.steps_taken == 3


def test_schedule_keys_from_an_upstream_config_and_bad_values():
    cfg = ForesightConfig.from_upstream(
        {
            "foresight_weight": 2.0, "foresight_weight_start": 10, "foresight_weight_ramp": 5,
            "foresight_weight_changes": [[3000, 1.0]], "foresight_weight_stop": 6000, "max_replay_pairs": 4,
        }
    )  # fmt: skip
    assert (cfg.weight_start, cfg.weight_ramp, cfg.weight_changes, cfg.weight_stop) == (10, 5, ((3000, 1.0),), 6000)
    assert cfg.replay_max_pairs == 4
    assert ForesightConfig.from_upstream({"foresight_weight": 0.2}).replay_max_pairs is None
    assert ForesightConfig.from_json(cfg.to_json()) == cfg
    for bad in (
        dict(weight_changes=((5, 1.0), (5, 0.5))),
        dict(weight_changes=((5, -1.0),)),
        dict(weight_changes=(5, 1.0)),
        dict(weight_start=3, weight_stop=3),
        dict(weight_ramp=-1),
        dict(replay_max_pairs=0),
    ):
        with pytest.raises(MiraiError):
            ForesightConfig(**bad)


# ------------------------------------------------------- gradient accumulation


def test_accumulated_micro_steps_equal_one_step_on_the_whole_batch():
    noise, cond = make_inputs(0, batch=2)
    generator, encoder = make_pair(0)
    whole = ForesightHead(config(), 32, 48)
    micro = ForesightHead(config(), 32, 48)
    micro.load_state_dict(whole.state_dict())

    generator_step(generator, encoder, whole, noise, cond)
    for b in range(2):  # two micro-steps of one video each, the loss scaled by 1/2
        generator_step(
            generator, encoder, micro, noise[b : b + 1], {"prompt_embeds": cond["prompt_embeds"][b : b + 1]}, scale=0.5
        )
    assert micro.replay_pairs == 2 * whole.replay_pairs  # both micro-steps cached
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    whole.step(), micro.step()
    whole.replay(), micro.replay()
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # AdamW amplifies rounding where a gradient is ~0


# ------------------------------------------------------------- exact resume


def _train(cycles, *, generator, encoder, head, optimizer, start=0):
    """DMD-shaped cycles: one generator step, then two critic steps that replay."""
    for cycle in range(start, start + cycles):
        noise, cond = make_inputs(cycle, batch=1)
        optimizer.zero_grad()
        generator_step(generator, encoder, head, noise, cond)
        optimizer.step()
        head.step()
        for _ in range(2):
            head.replay()


def _fresh(seed):
    generator, encoder = make_pair(seed)
    head = ForesightHead(
        config(weight=0.4, weight_start=1, weight_ramp=2, weight_changes=((4, 0.2),), replay_max_pairs=2), 32, 48
    )
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    return dict(generator=generator, encoder=encoder, head=head, optimizer=optimizer)


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    straight = _fresh(0)
    _train(6, **straight)

    torch.manual_seed(0)
    first = _fresh(0)
    _train(3, **first)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "generator": first["generator"].state_dict(),
            "optimizer": first["optimizer"].state_dict(),
            "foresight": first["head"].training_state(),
        },
        path,
    )
    saved = torch.load(path, weights_only=True)
    resumed = _fresh(1)  # different initial weights: everything must come from the checkpoint
    resumed["generator"].load_state_dict(saved["generator"])
    resumed["optimizer"].load_state_dict(saved["optimizer"])
    resumed["encoder"].load_state_dict(straight["encoder"].state_dict())  # frozen, loaded from its own file
    resumed["head"].load_training_state(saved["foresight"])
    assert resumed["head"].steps_taken == 3 and resumed["head"].weight == first["head"].weight
    _train(3, **resumed, start=3)

    assert states_equal(straight["head"].state_dict(), resumed["head"].state_dict())
    assert states_equal(straight["generator"].state_dict(), resumed["generator"].state_dict())

    # The replay-sampling RNG is part of the state: without it the run diverges.
    control = _fresh(1)
    control["generator"].load_state_dict(saved["generator"])
    control["optimizer"].load_state_dict(saved["optimizer"])
    control["encoder"].load_state_dict(straight["encoder"].state_dict())
    control["head"].load_training_state({**saved["foresight"], "replay_rng": saved["foresight"]["replay_rng"][:0]})
    _train(3, **control, start=3)
    assert not states_equal(straight["head"].state_dict(), control["head"].state_dict())


def test_training_state_of_a_head_that_never_stepped_leaves_its_optimizer_alone():
    head = ForesightHead(config(), 32, 48)
    state = head.training_state()
    assert state["optimizer"] is None and state["steps_taken"] == 0
    assert not head.optimizer.state  # reading the state took no zero step
    other = ForesightHead(config(), 32, 48)
    other.load_training_state(state)
    assert states_equal(head.state_dict(), other.state_dict())
    with pytest.raises(MiraiError, match="widths"):
        ForesightHead(config(), 32, 64).load_training_state(state)
    with pytest.raises(MiraiError, match="training_state"):
        head.load_training_state({"head": head.state_dict()})


def test_loading_leaves_the_checkpoint_dict_unchanged():
    generator, encoder = make_pair(0)
    head = ForesightHead(config(), 32, 48)
    generator_step(generator, encoder, head, *make_inputs(0, batch=1))
    head.step()
    state = head.training_state()
    snapshot = {k: v.clone() for k, v in state["head"].items()}
    ForesightHead(config(), 32, 48).load_training_state(state)
    assert states_equal(snapshot, state["head"]) and all(type(v) is torch.Tensor for v in state["head"].values())


# ------------------------------------------------------------------- crashes


class _Boom(RuntimeError):
    pass


def test_a_crash_inside_the_rollout_leaves_no_hook_and_no_stale_capture():
    generator, encoder = make_pair(0)
    head = ForesightHead(config(), 32, 48)
    noise, cond = make_inputs(0, batch=1)
    calls = []

    def fail_on_second_segment(module, args, kwargs, output):
        if torch.is_grad_enabled():
            calls.append(kwargs.get("current_start"))
            if len(calls) == 2:
                raise _Boom("out of memory in segment 1")

    block = generator.model.blocks[3]
    handle = block.register_forward_hook(fail_on_second_segment, with_kwargs=True)
    with pytest.raises(_Boom):
        generator_step(generator, encoder, head, noise, cond)
    handle.remove()
    assert all_hooks(generator) == 0 and head.replay_pairs == 0

    # The next step sees exactly its own three segments.
    with capture_hidden(generator, LAYER) as captured:
        video, _ = rollout(generator, noise, cond, segment_frames=SEGMENT_FRAMES, exit_index=0)
        assert [r.position for r in captured.records] == [0, 12, 24]
    _, parts = head(captured, FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond), return_breakdown=True)
    assert parts["segments"] == [0, 1, 2] and len(captured) == 0  # read once, then cleared


def test_a_crash_inside_the_encoder_leaves_no_hook_and_restores_its_mode():
    _generator, encoder = make_pair(0)
    encoder.train()

    def fail(module, args, output):
        raise _Boom("encoder failed")

    handle = encoder.model.blocks[1].register_forward_hook(fail)
    noise, cond = make_inputs(0, batch=1)
    with pytest.raises(_Boom):
        FrozenEncoder(encoder, ENCODER_LAYER)(noise, cond)
    handle.remove()
    assert all_hooks(encoder) == 0 and encoder.training

"""Misuse in the wrong order loses no work: ``head.replay()`` before ``head.step()`` raises and keeps the
step's gradients and the replay cache; a head call that fails a check leaves the capture for the corrected
call. The expected values come from a twin head (same weights) used in the right order."""

import copy

import pytest
import torch
from tiny_models import TOKENS_PER_FRAME, make_inputs, make_pair, rollout

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden

LAYER, ENCODER_LAYER, S = 1, 3, TOKENS_PER_FRAME
PATHS = {"one pass": None, "recomputed": 1e-9}


def config(budget, **changes):
    return ForesightConfig(student_layer=LAYER, encoder_layer=ENCODER_LAYER, num_heads=2, replay_device=None,
                           lr=1e-2, activation_budget_mib=budget, **changes)


def twins(budget, **changes):
    """Two heads with the same live (random) weights."""
    head = ForesightHead(config(budget, **changes), 32, 48)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return head, copy.deepcopy(head)


def captured_step(generator, encoder, seed=0):
    noise, cond = make_inputs(seed)
    torch.manual_seed(seed)  # the rollout draws its noise
    with capture_hidden(generator, LAYER) as captured:
        video, _ = rollout(generator, noise, cond)
    return captured, FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond)


def generator_grads(generator):
    grads = {n: p.grad.clone() for n, p in generator.named_parameters() if p.grad is not None}
    generator.zero_grad(set_to_none=True)
    return grads


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:  # the same operations in the same order
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("path", PATHS)
def test_misuse_order_replay_before_step_raises_and_keeps_the_work(path):
    """replay() between the generator's backward and step(): an error; the gradients and the cache (and its
    draw of replay_max_pairs) stay, so step() then replay() ends where the right order does."""
    right, wrong = twins(PATHS[path], replay_max_pairs=2)
    generator, encoder = make_pair()
    for head in (right, wrong):
        captured, z = captured_step(generator, encoder)
        head(captured, z).backward()
    right_grads = {n: p.grad.clone() for n, p in right.named_parameters()}
    right.step()
    right.replay()

    with pytest.raises(MiraiError, match="replay\\(\\) would discard the head's gradients.*call head.step\\(\\) after "
                                         "the generator's backward and before head.replay\\(\\)"):
        wrong.replay()
    assert_same({n: p.grad for n, p in wrong.named_parameters()}, right_grads)
    assert wrong.replay_pairs == 3
    wrong.step()
    wrong.replay()
    assert_same(wrong.state_dict(), right.state_dict())
    assert_same(wrong.training_state()["optimizer"]["state"], right.training_state()["optimizer"]["state"])


def test_misuse_order_replay_without_step_adds_to_the_waiting_gradients():
    """replay(step=False) neither zeroes nor steps: its gradients add to the generator step's."""
    generator, encoder = make_pair()
    plain, added = twins(None)
    for head in (plain, added):
        captured, z = captured_step(generator, encoder)
        head(captured, z).backward()
    term_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    plain.zero_grad()
    plain.replay(step=False)
    added.replay(step=False)
    for name, p in added.named_parameters():
        torch.testing.assert_close(p.grad, term_grads[name] + dict(plain.named_parameters())[name].grad)


MISTAKES = {
    "encoder width": lambda z: torch.randn(*z.shape[:2], 40),
    "encoder batch": lambda z: z[:1],
    "encoder too short": lambda z: z[:, : 6 * S],
    "non-finite target": lambda z: z.index_fill(1, torch.tensor([3 * S * 2]), float("nan")),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mistake", MISTAKES)
def test_misuse_order_a_failed_check_keeps_the_capture(mistake, path):
    """The corrected call reads the same capture and gives the term and gradients of a call made right."""
    generator, encoder = make_pair()
    right, retried = twins(PATHS[path])
    captured, z = captured_step(generator, encoder)
    expected_term = right(captured, z)
    expected_term.backward()
    expected = generator_grads(generator)

    captured, z = captured_step(generator, encoder)
    with pytest.raises(MiraiError):
        retried(captured, MISTAKES[mistake](z))
    assert len(captured) == 3
    term = retried(captured, z)
    assert len(captured) == 0  # read: the graph references are dropped
    term.backward()
    torch.testing.assert_close(term, expected_term, rtol=0, atol=0)
    assert_same(generator_grads(generator), expected)
    assert retried.replay_pairs == right.replay_pairs == 3

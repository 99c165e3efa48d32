"""No term that cannot reach the generator: with gradients enabled, captured states of which none requires
grad (captured after ``.detach()``, through a model that detaches, off a frozen generator) raise
``MiraiError`` naming the fix, on both paths, and leave the capture for the corrected call. Under
``no_grad`` the term evaluates; states passed as leaves that require grad train the head alone, on purpose."""

import pytest
import torch
from tiny_models import make_inputs, make_pair, rollout

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden

LAYER, ENCODER_LAYER = 1, 3
PATHS = {"one pass": None, "recomputed": 1e-9}
WAYS = ["select detaches", "model detaches", "frozen generator"]


def detached_step(way, budget):
    """A rollout whose captured states do not require grad, the head and the encoder's targets."""
    generator, encoder = make_pair()
    head = ForesightHead(ForesightConfig(student_layer=LAYER, encoder_layer=ENCODER_LAYER, num_heads=2,
                                         replay_device=None, activation_budget_mib=budget), 32, 48)
    block = generator.model.blocks[LAYER]
    if way == "model detaches":
        block.register_forward_hook(lambda module, args, out: out.detach())  # runs before the capture's hook
    if way == "frozen generator":
        generator.requires_grad_(False)
    select = (lambda h: h.detach()) if way == "select detaches" else None
    noise, cond = make_inputs()
    with capture_hidden(generator, LAYER, select=select) as captured:
        video, _ = rollout(generator, noise, cond)
    return head, captured, FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("way", WAYS)
def test_term_reaches_the_generator_or_raises(way, path):
    head, captured, z = detached_step(way, PATHS[path])
    assert len(captured) == 3 and not any(record.hidden.requires_grad for record in captured)
    with pytest.raises(MiraiError, match="none of the captured hidden states at .*requires grad.*cannot reach the "
                                         "generator.*select=.*torch.no_grad.*requires_grad_"):
        head(captured, z)
    assert len(captured) == 3  # the capture is still there for the corrected call
    assert all(p.grad is None for p in head.parameters()) and head.replay_pairs == 0

    with torch.no_grad():  # evaluating the term is fine
        evaluated = head(captured, z)
    assert torch.isfinite(evaluated) and len(captured) == 0

    head, captured, z = detached_step(way, PATHS[path])
    leaves = [record.hidden.detach().requires_grad_() for record in captured]  # the head alone, on purpose
    head(leaves, z).backward()
    assert all(p.grad is not None for p in head.parameters()) and all(h.grad is not None for h in leaves)


@pytest.mark.parametrize("path", PATHS)
def test_term_reaches_the_generator_when_one_segment_is_attached(path):
    """Only a term of which nothing can reach the generator is refused."""
    head, captured, z = detached_step("select detaches", PATHS[path])
    states = [record.hidden for record in captured]
    states[1] = states[1].clone().requires_grad_()
    head(states, z).backward()
    assert states[1].grad is not None and states[1].grad.abs().sum() > 0

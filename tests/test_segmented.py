"""The term in groups of segments under a memory budget: same value and gradients as one pass,
under loss scaling, accumulation and skipped backwards; groups as planned."""

import pytest
import torch

from mirai_plugin import ForesightConfig, ForesightHead
from mirai_plugin.segmented import GroupPlan

D, E, S, SEGMENTS, BATCH = 16, 24, 4, 5, 2  # 5 segments of 1 frame, 4 tokens each


def tiny_config(**changes):
    return ForesightConfig(**{"num_heads": 2, "segment_frames": 1, "predictor_depth": 2, "replay_device": None,
                              **changes})


CONFIGS = {
    "official": tiny_config(),
    "mse": tiny_config(loss="mse"),
    "none": tiny_config(fusion="none", offsets=(0, 1, 2)),
    "frame_mean": tiny_config(fusion="frame_mean", segment_frames=2, offsets=(1,)),
    "multi_mlp": tiny_config(predictor="multi_mlp", fusion="none"),
    "dit_adaln": tiny_config(offset_conditioning=True, fusion="none"),
}


def rollout(config, seed=0, batch=BATCH, device="cpu"):
    """Captured states (one (b n d) per segment, as leaves) and the encoder output (b t e)."""
    g = torch.Generator().manual_seed(seed)
    frames = SEGMENTS * config.segment_frames
    n = config.segment_frames * S
    hidden = [torch.randn(batch, n, D, generator=g).to(device).requires_grad_() for _ in range(SEGMENTS)]
    return hidden, torch.randn(batch, frames * S, E, generator=g).to(device)


def heads(config, budgets, device="cpu"):
    """Heads with the same weights (made live) that differ only in their budget."""
    first = ForesightHead(config.replace(activation_budget_mib=budgets[0]), D, E)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in first.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = [first]
    for budget in budgets[1:]:
        head = ForesightHead(config.replace(activation_budget_mib=budget), D, E)
        head.load_state_dict(first.state_dict())
        out.append(head)
    return [head.to(device) for head in out]


def budget_for(head, segments, config):
    """A budget (MiB) that holds ``segments`` segments of this rollout at once."""
    return (segments + 0.5) * head.segment_bytes(BATCH, config.segment_frames * S) / 2**20


def grads(head, hidden):
    out = {f"head.{n}": p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    out.update({f"hidden.{i}": h.grad.clone() for i, h in enumerate(hidden) if h.grad is not None})
    for h in hidden:
        h.grad = None
    head.zero_grad(set_to_none=True)
    return out


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        scale = expected[key].abs().max().item()  # summation order differs: errors scale with the tensor
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6 * max(scale, 0.1), msg=key)


@pytest.mark.parametrize("name", CONFIGS)
def test_groups_and_block_checkpointing_give_the_one_pass_value_and_gradients(name, device):
    config = CONFIGS[name]
    probe = ForesightHead(config, D, E)
    groups_of_two, one_block = budget_for(probe, 2, config), 1e-9
    one_pass, grouped, checkpointed = heads(config, [None, groups_of_two, one_block], device)
    n = config.segment_frames * S
    assert one_pass.plan(SEGMENTS, batch=BATCH, tokens=n) == GroupPlan(SEGMENTS, False, False)
    assert grouped.plan(SEGMENTS, batch=BATCH, tokens=n) == GroupPlan(2, True, False)
    assert checkpointed.plan(SEGMENTS, batch=BATCH, tokens=n) == GroupPlan(1, True, True)

    hidden, z = rollout(config, device=device)
    reference = one_pass(hidden, z)
    reference.backward()
    expected = grads(one_pass, hidden)
    for head in (grouped, checkpointed):
        term = head(hidden, z)
        torch.testing.assert_close(term, reference, rtol=1e-6, atol=1e-8)
        term.backward()
        assert_same(grads(head, hidden), expected)


def test_groups_run_as_planned():
    """Block 0 runs once per group forward: one pass 1 call; groups of 2: 3 groups without a graph,
    then again in the backward; one segment with checkpointed blocks: once more per segment."""
    config = CONFIGS["official"]
    probe = ForesightHead(config, D, E)
    calls = {}
    for label, budget in (("one pass", None), ("groups of 2", budget_for(probe, 2, config)), ("checkpointed", 1e-9)):
        (head,) = heads(config, [budget])
        rows = []
        # a pre-hook: a checkpointed recomputation stops as soon as it has what backward needs
        head.predictor.blocks[0].register_forward_pre_hook(
            lambda m, a, rows=rows: rows.append((a[0].shape[0], torch.is_grad_enabled())))
        hidden, z = rollout(config)
        term = head(hidden, z)
        forward_calls = list(rows)
        term.backward()
        calls[label] = (forward_calls, rows[len(forward_calls):])
    assert calls["one pass"] == ([(BATCH * SEGMENTS, True)], [])
    assert calls["groups of 2"] == ([(2 * BATCH, False), (2 * BATCH, False), (BATCH, False)],
                                    [(2 * BATCH, True), (2 * BATCH, True), (BATCH, True)])
    forward_calls, backward_calls = calls["checkpointed"]
    assert forward_calls == [(BATCH, False)] * SEGMENTS
    assert backward_calls == [(BATCH, True)] * (2 * SEGMENTS)  # the group, then the block's recomputation


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 2.0**16])
def test_a_scaled_loss_scales_the_head_gradients_as_autograd_does(scale, device):
    """The trainer's 1/A or a GradScaler's scale reaches the head's gradients in both paths."""
    config = CONFIGS["official"]
    one_pass, grouped = heads(config, [None, 1e-9], device)
    hidden, z = rollout(config, device=device)
    (one_pass(hidden, z) * scale).backward()
    expected = grads(one_pass, hidden)
    (grouped(hidden, z) * scale).backward()
    assert_same(grads(grouped, hidden), expected)


def test_grad_scaler_steps_the_same_head():
    config = CONFIGS["official"]
    one_pass, grouped = heads(config, [None, 1e-9])
    for head in (one_pass, grouped):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        hidden, z = rollout(config)
        scaler.scale(head(hidden, z)).backward()
        scaler.step(head.optimizer)
        scaler.update()
    for a, b in zip(one_pass.parameters(), grouped.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_skipped_backward_leaves_no_gradient_and_accumulation_adds_up(device):
    config = CONFIGS["official"]
    one_pass, grouped = heads(config, [None, 1e-9], device)
    for head in (one_pass, grouped):
        skipped, z = rollout(config, seed=5, device=device)
        head(skipped, z)  # e.g. a non-finite step the trainer skips: no backward
        assert all(p.grad is None for p in head.parameters())
        for micro_step in range(2):  # two micro-steps, each scaled by 1/2
            hidden, z = rollout(config, seed=micro_step, batch=1, device=device)
            (head(hidden, z) * 0.5).backward()
    for a, b in zip(one_pass.parameters(), grouped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_replay_in_groups_equals_one_backward(device):
    config = CONFIGS["official"]
    one_pass, checkpointed = heads(config, [None, 1e-9], device)
    hidden, z = rollout(config, device=device)
    losses = []
    for head in (one_pass, checkpointed):
        head(hidden, z).backward()
        head.zero_grad(set_to_none=True)
        losses.append(head.replay(step=False))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-8)
    for a, b in zip(one_pass.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_the_recipe_runs_one_segment_with_checkpointed_blocks_and_tiny_shapes_one_pass():
    with torch.device("meta"):
        recipe = ForesightHead(ForesightConfig(), 1536, 5120)
    assert recipe.plan(7, batch=1, tokens=3 * 1560) == GroupPlan(1, True, True)
    assert recipe.plan(7, batch=1, tokens=3 * 1560).size == 1
    assert ForesightHead(CONFIGS["official"], D, E).plan(SEGMENTS, batch=BATCH, tokens=S).recompute is False


def test_bfloat16_compute_keeps_float32_weights_and_a_close_loss(device):
    config = CONFIGS["official"]
    (full,) = heads(config, [None], device)
    half = ForesightHead(config.replace(compute_dtype="bfloat16"), D, E).to(device)
    half.load_state_dict(full.state_dict())
    hidden, z = rollout(config, device=device)
    reference, term = full(hidden, z), half(hidden, z)
    assert term.dtype == torch.float32 and half.compute_dtype == torch.bfloat16
    with torch.no_grad():  # the bf16 effect at the inputs alone: the float32 head on inputs rounded to bf16
        rounded = full([h.bfloat16().float() for h in hidden], z.bfloat16().float())
    # bf16 rounds again at every op of the two-block predictor: 32 times the input effect (the difference is about
    # 8 times here, 1.4 % of the term), and not zero (the head did compute in bf16)
    tolerance = 32 * (rounded - reference).abs().item()
    assert 0 < (term - reference).abs().item() <= tolerance
    g = torch.Generator().manual_seed(5)  # control: states moved by 5 % give a term outside the tolerance
    moved = [(h.detach() + 0.05 * torch.randn(h.shape, generator=g).to(device)).requires_grad_() for h in hidden]
    assert (full(moved, z) - reference).abs().item() > tolerance
    term.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in half.parameters())


def test_the_backward_recomputes_under_the_trainers_autocast():
    """A trainer that runs its step under autocast gets the gradient of what its forward computed."""
    config = CONFIGS["official"]
    one_pass, grouped = heads(config, [None, 1e-9])
    hidden, z = rollout(config)
    expected = {}
    for head in (one_pass, grouped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            term = head(hidden, z)
        term.backward()
        expected[head] = (term.detach(), grads(head, hidden))
    torch.testing.assert_close(expected[grouped][0], expected[one_pass][0], rtol=1e-3, atol=1e-4)
    # bfloat16 rounding: about 0.5 % here, 4 % if recomputed in float32
    for key, value in expected[one_pass][1].items():
        torch.testing.assert_close(expected[grouped][1][key], value, rtol=0, atol=1e-2 * value.abs().max().item())

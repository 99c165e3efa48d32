"""ForesightHead end to end on tiny models: the term, its gradients, replay, save/load, errors."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TOKENS_PER_FRAME, make_inputs, make_pair, rollout

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden

S, N = TOKENS_PER_FRAME, 3
STUDENT_LAYER, ENCODER_LAYER = 1, 3


def config(**changes):
    base = dict(student_layer=STUDENT_LAYER, encoder_layer=ENCODER_LAYER, num_heads=2, replay_device=None)
    return ForesightConfig(**{**base, **changes})


def randomise(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def training_step(head, generator, encoder, seed=0):
    noise, cond = make_inputs(seed)
    torch.manual_seed(seed)
    with capture_hidden(generator, head.config.student_layer) as captured:
        video, explicit = rollout(generator, noise, cond, hidden_layer=head.config.student_layer)
    z = FrozenEncoder(encoder, head.config.encoder_layer)(video.detach(), cond)
    return head(captured, z), explicit, z


def reference_segment_losses(head, hidden, z, offsets):
    """docs/design.md's data flow as a loop: per segment with a valid offset, -mean cos to the mean of its targets."""
    K = z.shape[1] // (N * S)
    seg = lambda k: z[:, k * N * S : (k + 1) * N * S]
    losses = []
    for k, h in enumerate(hidden):
        parts = [seg(k + d) for d in offsets if k + d < K]
        if not parts:
            continue
        y = torch.stack(parts).mean(0)
        p = head.predict(h)
        losses.append(-F.cosine_similarity(p.reshape(-1, p.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1).mean())
    return torch.stack(losses)


def reference_loss(head, hidden, z, offsets, weight=None):
    """The segments' mean, times ``weight`` (default: the config's)."""
    weight = head.config.weight if weight is None else weight
    return reference_segment_losses(head, hidden, z, offsets).mean() * weight


def test_term_matches_the_method_and_gradients_stop_at_the_student_layer():
    generator, encoder = make_pair()
    head = randomise(ForesightHead(config(), 32, 48))
    loss, explicit, z = training_step(head, generator, encoder)
    expected = reference_loss(head, explicit, z, (0, 1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)

    loss.backward()
    blocks = generator.model.blocks
    for i, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters()]
        reached = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert reached == (i <= STUDENT_LAYER), f"block {i}"
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_dit_predictor_starts_as_identity_and_attends_within_a_segment():
    head = ForesightHead(config(), 32, 32)
    x = torch.randn(3, 12, 32)
    assert torch.equal(head.predictor(x), x)
    randomise(head)
    y = head.predict(x)
    x2 = x.clone()
    x2[1] += 1.0
    y2 = head.predict(x2)
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2]) and not torch.equal(y[1], y2[1])


@pytest.mark.parametrize(
    "changes",
    [
        dict(offsets=(0, 1, 2), fusion="none"),
        dict(offsets=(0, 1), fusion="none", predictor="multi_mlp"),
        dict(offsets=(0, 1, 2), fusion="none", offset_conditioning=True),
    ],
)
def test_per_offset_losses_average_over_valid_pairs(changes):
    generator, encoder = make_pair()
    head = randomise(ForesightHead(config(**changes), 32, 48))
    loss, explicit, z = training_step(head, generator, encoder)
    K = len(explicit)
    pairs = []
    for k, h in enumerate(explicit):
        for d in head.config.offsets:
            if k + d < K:
                y = z[:, (k + d) * N * S : (k + d + 1) * N * S]
                p = head.predict(h, d)
                pairs.append(-F.cosine_similarity(p, y, dim=-1).mean())
    torch.testing.assert_close(loss, torch.stack(pairs).mean() * 0.2, rtol=0, atol=1e-6)


def test_offset_conditioning_changes_the_prediction():
    head = randomise(ForesightHead(config(offsets=(0, 1), fusion="none", offset_conditioning=True), 32, 48))
    x = torch.randn(2, 12, 32)
    assert not torch.allclose(head.predict(x, 0), head.predict(x, 1))


def test_frame_mean_fusion_aligns_every_frame_to_the_frame_average():
    generator, encoder = make_pair()
    head = randomise(ForesightHead(config(fusion="frame_mean"), 32, 48))
    loss, explicit, z = training_step(head, generator, encoder)
    pairs = []
    for k, h in enumerate(explicit):
        for d in (0, 1):
            if k + d < len(explicit):
                y = z[:, (k + d) * N * S : (k + d + 1) * N * S].view(2, N, S, 48).mean(1)  # (b s e)
                p = head.predict(h).view(2, N, S, 48)
                pairs.append(-F.cosine_similarity(p, y[:, None], dim=-1).mean())
    torch.testing.assert_close(loss, torch.stack(pairs).mean() * 0.2, rtol=0, atol=1e-6)


def test_one_call_covering_all_segments_needs_tokens_per_frame():
    head = randomise(ForesightHead(config(), 32, 48))
    hidden = [torch.randn(2, N * S, 32, requires_grad=True) for _ in range(3)]
    z = torch.randn(2, 9 * S, 48)
    whole = head([torch.cat(hidden, dim=1)], z, tokens_per_frame=S)
    per_segment = head(hidden, z)
    torch.testing.assert_close(whole, per_segment, rtol=0, atol=1e-6)


def test_replay_matches_the_generator_step_and_touches_only_the_head():
    generator, encoder = make_pair()
    head = randomise(ForesightHead(config(lr=1e-3), 32, 48))
    loss, explicit, z = training_step(head, generator, encoder)
    assert head.replay_pairs == 3

    # gradient of weight * mean over pairs, on detached inputs: what replay must produce
    head.zero_grad()
    reference_loss(head, [h.detach() for h in explicit], z, (0, 1)).backward()
    expected = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad()
    for p in generator.parameters():
        p.grad = None

    replayed = head.replay(step=False)
    torch.testing.assert_close(replayed, loss.detach(), rtol=0, atol=1e-6)
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in generator.parameters())

    before = [p.clone() for p in head.parameters()]
    head.zero_grad()  # the step=False gradients were only inspected
    head.replay()  # with the optimizer step
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    assert all(p.grad is None for p in head.parameters())


def test_replay_cache_accumulates_micro_steps_and_restarts_after_step():
    generator, encoder = make_pair()
    head = ForesightHead(config(), 32, 48)
    for seed in (0, 1):  # two accumulation micro-steps
        training_step(head, generator, encoder, seed)[0].backward()
    assert head.replay_pairs == 6
    head.step()
    assert head.replay() is not None and head.replay_pairs == 6  # critic steps replay the same pairs
    training_step(head, generator, encoder, 2)
    assert head.replay_pairs == 3  # a new generator step starts a new cache
    head.eval()
    training_step(head, generator, encoder, 3)
    assert head.replay_pairs == 3  # eval mode never caches


def test_state_dict_save_and_load(tmp_path):
    generator, encoder = make_pair()
    keys = list(generator.state_dict())
    head = randomise(ForesightHead(config(), 32, 48))
    training_step(head, generator, encoder)[0].backward()
    head.step()
    assert all(k.startswith(("predictor.", "project.")) for k in head.state_dict())
    assert list(generator.state_dict()) == keys

    head.save(tmp_path / "head.safetensors")
    loaded = ForesightHead.load(tmp_path / "head.safetensors")
    assert loaded.config == head.config
    x = torch.randn(2, 12, 32)
    assert torch.equal(loaded.predict(x), head.predict(x))


def test_errors_name_the_problem():
    generator, encoder = make_pair()
    head = ForesightHead(config(), 32, 48)
    noise, cond = make_inputs()
    with capture_hidden(generator, STUDENT_LAYER) as captured:
        with torch.no_grad():
            video, _ = rollout(generator, noise, cond)
    z = FrozenEncoder(encoder, ENCODER_LAYER)(video, cond)
    with pytest.raises(MiraiError, match="nothing captured at TinyWrapper.model.blocks\\[1\\].*torch.no_grad"):
        head(captured, z)

    hidden = [torch.randn(2, N * S, 32, requires_grad=True) for _ in range(3)]
    with pytest.raises(MiraiError, match="expected \\(batch, tokens, 32\\).*student_dim=32"):
        head([torch.randn(2, N * S, 16)], z)
    with pytest.raises(MiraiError, match="expected \\(batch, tokens, 48\\).*encoder_dim=48"):
        head(hidden, torch.randn(2, 9 * S, 40))
    with pytest.raises(MiraiError, match="encoder saw only 2 segments"):
        head(hidden, z[:, : 6 * S])
    with pytest.raises(MiraiError, match="not a whole number of segments"):
        head(hidden, z, tokens_per_frame=5)

    bad = z.clone()
    bad[:, 3 * S * 2] = float("nan")  # inside segment 2
    with pytest.raises(MiraiError, match="encoder targets contain NaN/inf at segments \\[1, 2\\]"):
        head(hidden, bad)
    nan_hidden = [h.detach().clone() for h in hidden]
    nan_hidden[0][0, 0, 0] = float("inf")
    with pytest.raises(MiraiError, match="generator hidden states contain NaN/inf at segments \\[0\\]"):
        head([h.requires_grad_() for h in nan_hidden], z)

    edited = [h.detach().clone() for h in hidden]
    from mirai_plugin import HiddenRecord

    records = [HiddenRecord(h, None, i, h._version) for i, h in enumerate(edited)]
    edited[1].add_(1.0)
    with pytest.raises(MiraiError, match="modified in place after capture.*clone=True"):
        head(records, z)

    with pytest.raises(MiraiError, match="not divisible by num_heads=5"):
        ForesightHead(config(num_heads=5), 32, 48)


def test_bfloat16_head_and_states_give_a_float32_term():
    generator, encoder = make_pair()
    generator.to(torch.bfloat16)
    encoder.to(torch.bfloat16)
    head = randomise(ForesightHead(config(), 32, 48)).to(torch.bfloat16)
    noise, cond = make_inputs()
    cond = {"prompt_embeds": cond["prompt_embeds"].bfloat16()}
    with capture_hidden(generator, STUDENT_LAYER) as captured:
        video, explicit = rollout(generator, noise.bfloat16(), cond, hidden_layer=STUDENT_LAYER)
    z = FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond)
    loss = head(captured, z)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = reference_loss(head, explicit, z, (0, 1))
    torch.testing.assert_close(loss, reference.float(), rtol=0, atol=2e-3)
    loss.backward()
    assert generator.model.blocks[0].out.weight.grad.dtype == torch.bfloat16


def test_breakdown_names_segments_and_unweighted_losses():
    head = randomise(ForesightHead(config(offsets=(1,)), 32, 48))
    hidden = [torch.randn(2, N * S, 32, requires_grad=True) for _ in range(3)]
    z = torch.randn(2, 9 * S, 48)
    loss, parts = head(hidden, z, return_breakdown=True)
    assert parts["segments"] == [0, 1]  # the last segment has no next segment
    with torch.no_grad():
        per_segment = reference_segment_losses(head, hidden, z, (1,))  # (2)
        own_segment = reference_segment_losses(head, hidden, z, (0,))[:2]  # control: the neighbouring target
    # float32 rounding of the same sums in another order: about 1e-7 relative
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["per_segment"], per_segment, **close)
    torch.testing.assert_close(parts["foresight_loss_unweighted"], per_segment.mean(), **close)
    torch.testing.assert_close(loss.detach(), 0.2 * per_segment.mean(), **close)  # ForesightConfig's default weight
    with pytest.raises(AssertionError):
        torch.testing.assert_close(parts["per_segment"], own_segment, **close)


def test_replay_grouping_changes_memory_not_gradients():
    generator, encoder = make_pair()
    grads = []
    for group in (1, 2, None):
        head = randomise(ForesightHead(config(replay_segments=group), 32, 48))
        training_step(head, generator, encoder)
        head.zero_grad()
        loss = head.replay(step=False)
        grads.append((loss, [p.grad.clone() for p in head.parameters()]))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=0, atol=1e-7)
        for a, b in zip(grad, grads[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)

"""The memory-lean fused loss equals the straightforward one, values and gradients."""

import pytest
import torch

import mirai_plugin.mean_target_cosine as fused
from mirai_plugin import foresight_loss, fuse_targets
from mirai_plugin.targets import segment_layout

S, N_FRAMES = 4, 3


@pytest.mark.parametrize("offsets", [(0, 1), (0, 1, 2), (1,)])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_matches_fuse_then_cosine(monkeypatch, offsets, chunk):
    monkeypatch.setattr(fused, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 21 * S, 16, generator=g)
    layout = segment_layout(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=offsets)
    target = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=offsets).target
    pred = torch.randn(2, len(layout.segments), N_FRAMES * S, 16, generator=g, requires_grad=True)
    weights = torch.rand(len(layout.segments), generator=g)

    expected = foresight_loss(pred, target, keep_dims=(1,))
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), pred)
    got = fused.mean_target_cosine(pred, layout.z, layout.source, layout.valid)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), pred)
    assert (got - expected).abs().max() <= 1e-6
    assert (got_grad - expected_grad).abs().max() <= 1e-6


def test_bfloat16_rounds_the_target_like_the_official_mean():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 21 * S, 16, generator=g).bfloat16()
    layout = segment_layout(z, segment_frames=N_FRAMES, tokens_per_frame=S)
    target = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S).target  # bf16, rounded once
    pred = torch.randn(1, 7, N_FRAMES * S, 16, generator=g).bfloat16().requires_grad_(True)
    got = fused.mean_target_cosine(pred, layout.z, layout.source, layout.valid)
    assert got.dtype == torch.float32
    assert (got - foresight_loss(pred, target, keep_dims=(1,))).abs().max() <= 1e-6
    got.sum().backward()
    assert pred.grad.dtype == torch.bfloat16


def test_zero_prediction_gives_zero_loss_and_finite_gradient():
    z = torch.randn(1, 21 * S, 8)
    layout = segment_layout(z, segment_frames=N_FRAMES, tokens_per_frame=S)
    pred = torch.zeros(1, 7, N_FRAMES * S, 8, requires_grad=True)
    loss = fused.mean_target_cosine(pred, layout.z, layout.source, layout.valid)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(7)) and torch.isfinite(pred.grad).all()

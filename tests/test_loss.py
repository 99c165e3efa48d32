"""foresight_loss: the official value, float32 compute, stop-gradient target."""

import pytest
import torch
import torch.nn.functional as F

from mirai_plugin import MiraiError, foresight_loss


def test_cosine_is_negative_mean_cosine_over_tokens():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 10, 6, generator=g), torch.randn(2, 3, 10, 6, generator=g)
    expected = -F.cosine_similarity(pred.reshape(-1, 6), target.reshape(-1, 6), dim=-1).mean()
    torch.testing.assert_close(foresight_loss(pred, target), expected, rtol=0, atol=1e-6)
    per_segment = foresight_loss(pred, target, keep_dims=(1,))
    assert per_segment.shape == (3,)
    torch.testing.assert_close(per_segment[1], -F.cosine_similarity(pred[:, 1], target[:, 1], dim=-1).mean())


def test_mse_and_broadcast_target():
    pred, target = torch.randn(2, 3, 4, 6), torch.randn(2, 1, 4, 6)
    torch.testing.assert_close(foresight_loss(pred, target, kind="mse"), F.mse_loss(pred, target.expand_as(pred)))


def test_float32_compute_for_bfloat16_inputs():
    pred, target = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    low = foresight_loss(pred.bfloat16(), target.bfloat16())
    exact = foresight_loss(pred.bfloat16().float(), target.bfloat16().float())
    assert low.dtype == torch.float32
    assert torch.equal(low, exact)


def test_target_is_stop_gradient():
    pred = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5, requires_grad=True)
    foresight_loss(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_zero_vectors_give_zero_not_nan():
    assert foresight_loss(torch.zeros(2, 4), torch.ones(2, 4)).item() == 0.0


def test_errors():
    with pytest.raises(MiraiError, match="prediction width 4 != target width 5"):
        foresight_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(MiraiError, match="does not broadcast"):
        foresight_loss(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(MiraiError, match="kind must be one of"):
        foresight_loss(torch.zeros(2, 4), torch.zeros(2, 4), kind="l1")

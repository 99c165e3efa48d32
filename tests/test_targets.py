"""fuse_targets against a per-segment loop written from docs/design.md's data flow
(y_k = the mean over valid offsets d of the encoder tokens of segment k+d)."""

import pytest
import torch

from mirai_plugin import MiraiError, fuse_targets

S, N_FRAMES, FRAMES = 4, 3, 21  # tokens per frame, frames per segment, frames
K = FRAMES // N_FRAMES


def encoder_hidden(batch=2, width=8, prefix=0, dtype=torch.float32):
    return torch.randn(batch, (prefix + FRAMES) * S, width, generator=torch.Generator().manual_seed(0)).to(dtype)


def segment(z, k, prefix=0):
    start = (prefix + k * N_FRAMES) * S
    return z[:, start : start + N_FRAMES * S]


def loop_reference(z, offsets, prefix=0):
    out = {}
    for k in range(K):
        parts = [segment(z, k + d, prefix) for d in offsets if k + d < K]
        if parts:
            out[k] = torch.stack(parts).mean(0)
    return out


@pytest.mark.parametrize("offsets", [(0,), (1,), (0, 1), (0, 1, 2), (2,)])
def test_mean_fusion_matches_loop(offsets):
    z = encoder_hidden()
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=offsets)
    expected = loop_reference(z, offsets)
    assert t.segments.tolist() == sorted(expected)
    for row, k in enumerate(t.segments.tolist()):
        torch.testing.assert_close(t.target[:, row], expected[k], rtol=0, atol=1e-6)


def test_mean_fusion_off_by_one_would_be_caught():
    z = encoder_hidden()
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(0, 1))
    shifted = loop_reference(z, (1, 2))
    assert not torch.allclose(t.target[:, 0], shifted[0])
    # the last segment has only offset 0 valid: its target is its own features
    torch.testing.assert_close(t.target[:, -1], segment(z, K - 1), rtol=0, atol=0)


def test_none_fusion_keeps_offsets_and_validity():
    z = encoder_hidden()
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(0, 1, 2), fusion="none")
    assert t.target.shape == (2, K, 3, N_FRAMES * S, 8)
    for k in range(K):
        for o, d in enumerate((0, 1, 2)):
            assert bool(t.valid[k, o]) == (k + d < K)
            if k + d < K:
                assert torch.equal(t.target[:, k, o], segment(z, k + d))
            else:
                assert not t.target[:, k, o].any()


def test_frame_mean_fusion_averages_frames_keeping_token_position():
    z = encoder_hidden()
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(0, 1), fusion="frame_mean")
    assert t.target.shape == (2, K, 2, S, 8)
    expected = segment(z, 3 + 1).view(2, N_FRAMES, S, 8).mean(1)
    torch.testing.assert_close(t.target[:, 3, 1], expected, rtol=0, atol=1e-6)


def test_segment_subset_and_unsupervised_segments_dropped():
    z = encoder_hidden()
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(1,), segments=[2, 6, 4])
    assert t.segments.tolist() == [2, 4]  # segment 6 has no next segment
    assert torch.equal(t.target[:, 1], segment(z, 5))


def test_prefix_frames_are_skipped():
    z = encoder_hidden(prefix=1)
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(0,), prefix_frames=1)
    assert torch.equal(t.target[:, 0], segment(z, 0, prefix=1))


def test_bfloat16_mean_rounds_once_like_stack_mean():
    z = encoder_hidden(dtype=torch.bfloat16)
    t = fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(0, 1))
    expected = loop_reference(z, (0, 1))
    assert t.target.dtype == torch.bfloat16
    assert all(torch.equal(t.target[:, k], expected[k]) for k in range(K))


def test_bad_shapes_name_the_fix():
    z = encoder_hidden()
    with pytest.raises(MiraiError, match="not divisible by segment_frames=4"):
        fuse_targets(z, segment_frames=4, tokens_per_frame=S)
    with pytest.raises(MiraiError, match="not a whole number of frames of tokens_per_frame=5 tokens"):
        fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=5)
    with pytest.raises(MiraiError, match="non-empty"):
        fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=())
    with pytest.raises(MiraiError, match="non-empty"):
        fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, offsets=(-1,))
    with pytest.raises(MiraiError, match="out of range"):
        fuse_targets(z, segment_frames=N_FRAMES, tokens_per_frame=S, segments=[7])

"""Loose ends: the pure functions on empty and non-finite input, fuse_targets with repeated offsets,
wan_tokens_per_frame on a model that is not Wan, temporal_flickering on frames in [0, 1], score given one
dimension under two spellings, probe on features with a NaN, patch check after the patch's added file was
deleted, an image encoder's features in the transposed layout.

Each either gives the value an independent oracle computes (closed forms, loops, VBench's own formula) or
raises ``MiraiError`` naming the problem and the fix; never NaN, never another exception type.
"""

import json
import math
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from toy_upstream import WITH_CONFIG, TextPatch, git, repository

from mirai_plugin import MiraiError, foresight_loss, fuse_targets
from mirai_plugin.image import FrozenImageEncoder
from mirai_plugin.integrations.diffusers import wan_tokens_per_frame
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.eval import DIMENSIONS, feature_consistency, final_scores, temporal_flickering
from mirai_plugin.tooling.patching import PATCHES
from mirai_plugin.tooling.probe import probe

BOUNDED = settings(derandomize=True, max_examples=60, deadline=None)


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ foresight_loss: empty and non-finite

SHAPES = st.lists(st.integers(0, 3), min_size=1, max_size=4)


def loss_oracle(pred, target, kind, keep):
    """The loss from torch's own formulas: per-token cosine / MSE, then the mean over the dims not kept."""
    pred, target = torch.broadcast_tensors(pred.double(), target.double())
    per_token = -F.cosine_similarity(pred, target, dim=-1, eps=1e-8) if kind == "cosine" \
        else ((pred - target) ** 2).mean(-1)
    reduce = [d for d in range(per_token.dim()) if d not in keep]
    return per_token.mean(dim=reduce) if reduce else per_token


@BOUNDED
@given(shape=SHAPES, kind=st.sampled_from(["cosine", "mse"]), data=st.data())
def test_foresight_loss_over_any_shape_is_the_oracle_or_refused(shape, kind, data):
    keep = data.draw(st.sets(st.integers(0, len(shape) - 2), max_size=len(shape) - 1)) if len(shape) > 1 else set()
    g = torch.Generator().manual_seed(len(shape))
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    empty_reduced = any(size == 0 for d, size in enumerate(shape[:-1]) if d not in keep)
    if shape[-1] == 0 or empty_reduced:  # a mean over nothing
        with pytest.raises(MiraiError, match=r"foresight_loss got (no tokens to average|width 0).*skip the term"):
            foresight_loss(pred, target, kind=kind, keep_dims=sorted(keep))
        return
    got = foresight_loss(pred, target, kind=kind, keep_dims=sorted(keep))
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), loss_oracle(pred, target, kind, keep), rtol=1e-5, atol=1e-6)


def test_foresight_loss_over_zero_tokens_is_refused_not_nan():
    with pytest.raises(MiraiError, match=r"no tokens to average \(dims \[1\] have size 0\): pred \(2, 0, 16\)"):
        foresight_loss(torch.randn(2, 0, 16), torch.randn(2, 0, 16))
    with pytest.raises(MiraiError, match=r"no tokens to average \(dims \[1\] have size 0\)"):
        foresight_loss(torch.randn(2, 1, 16), torch.randn(2, 0, 16), kind="mse")  # empty by broadcasting
    with pytest.raises(MiraiError, match="width 0"):
        foresight_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0), kind="mse")
    # an empty dim that is kept is a well-defined empty result
    assert foresight_loss(torch.randn(2, 0, 4), torch.randn(2, 0, 4), keep_dims=(1,)).shape == (0,)


def test_foresight_loss_keep_dims_are_leading_dims():
    pred = torch.randn(2, 3, 4)
    with pytest.raises(MiraiError, match=r"keep_dims must be leading dims of pred \(2, 3, 4\) \(ints in \[-2, 2\)"):
        foresight_loss(pred, pred, keep_dims=(2,))  # the width: it used to keep dim 0 instead
    torch.testing.assert_close(foresight_loss(pred, pred, keep_dims=(-1,)), torch.full((3,), -1.0))


@BOUNDED
@given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=4), kind=st.sampled_from(["cosine", "mse"]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), in_target=st.booleans(), data=st.data())
def test_a_non_finite_input_gives_a_non_finite_loss_exactly_where_it_falls(shape, kind, bad, in_target, data):
    index = tuple(data.draw(st.integers(0, size - 1)) for size in shape)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    (target if in_target else pred)[index] = bad
    per_token = foresight_loss(pred, target, kind=kind, keep_dims=tuple(range(len(shape) - 1)))
    expected = torch.ones(shape[:-1], dtype=torch.bool)
    expected[index[:-1]] = False  # only the token holding the value
    assert torch.equal(torch.isfinite(per_token), expected)
    assert not math.isfinite(foresight_loss(pred, target, kind=kind).item())  # never a finite mean that hides it


# ------------------------------------------------------------------ fuse_targets with repeated offsets


def fused_by_loop(z, segment_frames, tokens_per_frame, offsets):
    """The mean target of each supervised segment: the average over its distinct offsets inside the video."""
    n = segment_frames * tokens_per_frame
    segments = z.shape[1] // n
    rows = []
    for k in range(segments):
        inside = [z[:, (k + d) * n:(k + d + 1) * n] for d in dict.fromkeys(offsets) if k + d < segments]
        if inside:
            rows.append(torch.stack(inside).mean(0))
    if not rows:  # no segment has an offset inside the video: no supervised segment
        return z.new_zeros(z.shape[0], 0, n, z.shape[2])
    return torch.stack(rows, dim=1)


@BOUNDED
@given(offsets=st.lists(st.integers(0, 3), min_size=1, max_size=4), fusion=st.sampled_from(["mean", "none"]))
def test_fuse_targets_with_repeated_offsets_is_refused(offsets, fusion):
    z = torch.randn(1, 6 * 4, 3, generator=torch.Generator().manual_seed(1))  # 6 frames of 4 tokens, 3 segments
    if len(set(offsets)) < len(offsets):
        repeated = sorted({d for d in offsets if offsets.count(d) > 1})
        with pytest.raises(MiraiError, match=rf"offsets .* repeat {re.escape(str(repeated))}; give each offset once"):
            fuse_targets(z, segment_frames=2, tokens_per_frame=4, offsets=offsets, fusion=fusion)
        return
    result = fuse_targets(z, segment_frames=2, tokens_per_frame=4, offsets=offsets, fusion=fusion)
    assert result.valid.shape[1] == len(offsets)
    if fusion == "mean":
        torch.testing.assert_close(result.target, fused_by_loop(z, 2, 4, offsets))


def test_a_repeated_offset_would_weigh_its_segment_twice():
    z = torch.arange(6.0).repeat_interleave(4).view(1, 24, 1)  # frame f holds the value f
    with pytest.raises(MiraiError, match=r"offsets \(0, 0, 1\) repeat \[0\]; give each offset once, e.g. \(0, 1\)"):
        fuse_targets(z, segment_frames=2, tokens_per_frame=4, offsets=(0, 0, 1))
    # token 0 of segment 0 pairs frames 0 and 2: (0 + 2) / 2, where the repeat would have given (0 + 0 + 2) / 3
    assert fuse_targets(z, segment_frames=2, tokens_per_frame=4, offsets=(0, 1)).target[0, 0, 0, 0].item() == 1.0


# ------------------------------------------------------------------ wan_tokens_per_frame on a model that is not Wan


def declaring(patch=None, *, in_config=False):
    model = nn.Module()
    if patch is not None:
        if in_config:
            model.config = types.SimpleNamespace(patch_size=patch)
        else:
            model.patch_size = patch
    return model


@pytest.mark.parametrize("model, message", [
    (nn.Linear(4, 4), r"Linear declares no patch size \(config.patch_size or patch_size\): not a Wan transformer"),
    (declaring(16), r"Module.patch_size is 16, not Wan's \(p_t, p_h, p_w\)"),  # a ViT
    (declaring(2, in_config=True), r"Module.config.patch_size is 2, not Wan's"),  # CogVideoX, HunyuanVideo
    (declaring((2, 2), in_config=True), r"Module.config.patch_size is \(2, 2\), not Wan's"),  # an image DiT
    (declaring((1, 0, 2)), r"Module.patch_size is \(1, 0, 2\), not Wan's \(p_t, p_h, p_w\) of three ints >= 1"),
], ids=["none", "vit", "cogvideox", "image-dit", "zero"])
def test_wan_tokens_per_frame_refuses_a_model_that_is_not_wan(model, message):
    latents = torch.zeros(1, 16, 3, 60, 104)
    with pytest.raises(MiraiError, match=message) as error:
        wan_tokens_per_frame(model, latents)
    assert "pass the head tokens_per_frame=" in str(error.value)


def test_wan_tokens_per_frame_on_wan_through_a_wrapper_and_on_empty_latents():
    wan = declaring((1, 2, 2), in_config=True)
    ddp = nn.Module()
    ddp.module = wan
    assert wan_tokens_per_frame(ddp, torch.zeros(1, 16, 21, 60, 104)) == 30 * 52  # 832x480: 1,560 tokens
    with pytest.raises(MiraiError, match=r"have no pixels \(height x width 0x104\)"):
        wan_tokens_per_frame(wan, torch.zeros(1, 16, 21, 0, 104))


# ------------------------------------------------------------------ temporal_flickering on frames in [0, 1]


def vbench_flickering(frames: np.ndarray) -> float:
    """VBench's temporal_flickering.cal_score on uint8 frames: mean of cv2.absdiff over float32, then
    (255 - mean) / 255 (cv2.absdiff of float32 arrays is np.abs of their difference)."""
    maes = [np.mean(np.abs(frames[i].astype(np.float32) - frames[i + 1].astype(np.float32)))
            for i in range(len(frames) - 1)]
    return (255.0 - float(np.mean(maes))) / 255.0


@BOUNDED
@given(t=st.integers(2, 4), size=st.integers(1, 4), seed=st.integers(0, 2**16),
       scale=st.sampled_from(["uint8", "float255", "unit", "signed"]))
def test_temporal_flickering_reads_0_255_frames_and_refuses_other_ranges(t, size, seed, scale):
    pixels = torch.randint(0, 256, (t, size, size, 3), generator=torch.Generator().manual_seed(seed))
    assume(bool(pixels.any()))
    if scale == "uint8":
        frames = pixels.to(torch.uint8)
    elif scale == "float255":
        frames = pixels.float()
    elif scale == "unit":  # the same video scaled to [0, 1]: VBench would see it as nearly black
        frames = pixels.float() / 255
    else:
        frames = pixels.float() / 127.5 - 1
    if scale == "unit":
        with pytest.raises(MiraiError, match=r"frames scaled to \[0, 1\] would score about 1.*pass frames \* 255"):
            temporal_flickering(frames)
        return
    if scale == "signed":
        with pytest.raises(MiraiError, match=r"pixel values in \[0, 255\].*\(frames \+ 1\) \* 127.5"):
            temporal_flickering(frames)
        return
    assert temporal_flickering(frames).item() == pytest.approx(vbench_flickering(pixels.numpy().astype(np.uint8)))


def test_temporal_flickering_edge_frames():
    dark = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
    dark[1] = 1  # a 0-255 video this dark is only unambiguous as uint8
    assert temporal_flickering(dark).item() == pytest.approx((255 - 1) / 255)  # every pixel changes by 1, twice
    assert temporal_flickering(torch.zeros(3, 4, 4, 3)).item() == 1.0  # black scores 1 on either scale
    with pytest.raises(MiraiError, match=r"frames hold 1 NaN or inf value\(s\), the first at index \(1, 0, 2, 1\) "
                                         r"of shape \(3, 4, 4, 3\); a consistency score needs finite frames"):
        bad = torch.full((3, 4, 4, 3), 100.0)
        bad[1, 0, 2, 1] = math.nan
        temporal_flickering(bad)
    with pytest.raises(MiraiError, match="with >= 2 frames of at least one pixel, got \\(3, 0, 4, 3\\)"):
        temporal_flickering(torch.zeros(3, 0, 4, 3))
    with pytest.raises(MiraiError, match="width >= 1"):
        feature_consistency(torch.zeros(4, 0))
    features = torch.randn(4, 8)
    features[2, 3] = math.inf
    with pytest.raises(MiraiError, match=r"features hold 1 NaN or inf value\(s\), the first at index \(2, 3\)"):
        feature_consistency(features)


# ------------------------------------------------------------------ score: one dimension under two spellings


def percent_table(**changes):
    table = {d: 80.0 for d in DIMENSIONS}
    table.update(changes)
    return table


def test_final_scores_refuses_one_dimension_under_two_spellings():
    scores = {d: 0.8 for d in DIMENSIONS}
    with pytest.raises(MiraiError, match="'subject_consistency' appears twice, as 'subject_consistency' and "
                                         "'Subject Consistency'; keep one"):
        final_scores({**scores, "Subject Consistency": 0.9})


def test_score_refuses_one_dimension_under_two_spellings_in_a_table(tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text(json.dumps(percent_table(**{"Subject Consistency": 95.0})))
    assert main(["score", str(table)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'subject_consistency' appears twice in the table, as 'subject_consistency' and 'Subject Consistency'" \
        in line
    csv = tmp_path / "table.csv"
    csv.write_text("dimension,percent\n" + "".join(f"{d},80\n" for d in DIMENSIONS) + "color,90\n")
    assert main(["score", str(csv)]) == 2
    assert f"'color' appears twice, on lines {DIMENSIONS.index('color') + 2} and 18" in \
        one_error_line(capsys.readouterr().err)
    same_key = tmp_path / "same_key.json"
    same_key.write_text("{" + ", ".join(f'"{d}": 80' for d in DIMENSIONS) + ', "color": 90}')
    assert main(["score", str(same_key)]) == 2
    assert "the key 'color' appears twice in one JSON object" in one_error_line(capsys.readouterr().err)
    table.write_text(json.dumps(percent_table()))  # one spelling each: scored
    assert main(["score", str(table), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subject_consistency"] == pytest.approx(80.0)


def test_score_refuses_one_dimension_under_two_spellings_in_result_files(tmp_path, capsys):
    entries = [{"video_path": "/v/a cat-0.mp4", "video_results": 0.8}]
    data = {d: [0.8, entries] for d in DIMENSIONS}
    data["Temporal Flickering"] = [0.9, entries]
    (tmp_path / "all_eval_results.json").write_text(json.dumps(data))
    assert main(["score", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "dimension 'temporal_flickering' appears twice, as 'temporal_flickering' and 'Temporal Flickering'" in line
    split = tmp_path / "split"
    split.mkdir()
    (split / "a_eval_results.json").write_text(json.dumps({d: [0.8, entries] for d in DIMENSIONS}))
    (split / "b_eval_results.json").write_text(json.dumps({"Temporal Flickering": [0.9, entries]}))
    assert main(["score", str(split)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "appears in more than one result file" in line and "a_eval_results.json ('temporal_flickering')" in line
    assert "b_eval_results.json ('Temporal Flickering')" in line


# ------------------------------------------------------------------ probe on features with a NaN


def probe_inputs(videos=8):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(videos, 3, 4, 6, generator=g)
    targets = torch.zeros(videos, 3, 4, 2)
    targets[:, 1:] = features[:, :-1, :, :2]
    return features, targets


def test_probe_refuses_features_or_targets_with_a_nan(tmp_path, capsys):
    features, targets = probe_inputs()
    features[3, 1, 2, 0] = math.nan
    with pytest.raises(MiraiError, match=r"features hold 1 NaN or inf value\(s\), the first at \(video, segment, "
                                         r"token, channel\) \(3, 1, 2, 0\)"):
        probe(features, targets, horizons=(1,), steps=5)
    features, targets = probe_inputs()
    targets[0, 2, 0, 1] = math.inf
    with pytest.raises(MiraiError, match=r"targets hold 1 NaN or inf value\(s\)"):
        probe(features, targets, horizons=(1,), steps=5)
    with pytest.raises(MiraiError, match=r"features of shape \(8, 3, 0, 6\) are empty"):
        probe(torch.zeros(8, 3, 0, 6), torch.zeros(8, 3, 0, 2), horizons=(1,), steps=5)

    from safetensors.torch import save_file

    features, targets = probe_inputs()
    features[5, 0, 0, 4] = math.nan
    path = tmp_path / "features.safetensors"
    save_file({"features": features, "targets": targets}, str(path))
    assert main(["probe", str(path), "--horizons", "1", "--steps", "5"]) == 2
    assert "features hold 1 NaN or inf value(s)" in one_error_line(capsys.readouterr().err)
    psnr = probe(*probe_inputs(), horizons=(1,), steps=5)[1]["psnr"]
    assert math.isfinite(psnr)


# ------------------------------------------------------------------ patch check after the added file was deleted


@pytest.fixture
def applied(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "upstream"
    commit = repository(repo)
    monkeypatch.setitem(PATCHES, "toy", TextPatch("toy", "example/toy", commit, "toy.patch", "toy", WITH_CONFIG))
    assert main(["patch", "apply", "--upstream", "toy", str(repo)]) == 0
    capsys.readouterr()
    return repo, lambda *args: git(repo, *args)


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_patch_check_after_the_added_file_was_deleted_says_so_and_its_advice_works(applied, capsys):
    repo, git = applied
    added = repo / "configs" / "mirai.yaml"
    added.unlink()
    status, out, _ = run(capsys, "patch", "check", "--upstream", "toy", str(repo))
    assert status == 0
    assert "patch is applied, except in ['configs/mirai.yaml']: configs/mirai.yaml (added by the patch) was deleted " \
           "since; revert, then apply, to add it again" in out
    status, _, err = run(capsys, "patch", "apply", "--upstream", "toy", str(repo))
    assert status == 2 and "configs/mirai.yaml (added by the patch) was deleted since" in one_error_line(err)
    status, out, _ = run(capsys, "patch", "revert", "--upstream", "toy", str(repo))  # the advice
    assert status == 0 and "skipped: configs/mirai.yaml (deleted since)" in out and "removed: model.py" in out
    assert "removed: configs/mirai.yaml" not in out
    assert git("status", "--porcelain") == ""
    assert run(capsys, "patch", "apply", "--upstream", "toy", str(repo))[0] == 0
    assert added.read_text() == "# mirai-plugin: recipe\nforesight_weight: 0.2\n"


def test_patch_check_after_a_patched_upstream_file_was_deleted_says_so_and_its_advice_works(applied, capsys):
    repo, git = applied
    (repo / "train.py").unlink()
    status, out, _ = run(capsys, "patch", "check", "--upstream", "toy", str(repo))
    assert status == 0
    advice = f"git -C {repo} checkout -- train.py"
    assert f"train.py (patched) was deleted since; {advice} brings back the upstream file" in out
    git("checkout", "--", "train.py")  # the advice
    status, out, _ = run(capsys, "patch", "check", "--upstream", "toy", str(repo))
    assert status == 0 and "train.py holds none of the patch's lines (restored since)" in out
    status, out, _ = run(capsys, "patch", "revert", "--upstream", "toy", str(repo))
    assert status == 0 and "skipped: train.py (restored since)" in out
    assert git("status", "--porcelain") == ""


# ------------------------------------------------------------------ image encoder features, transposed


def encoder_returning(features):
    class Encoder(nn.Module):  # declares no width
        def forward(self, images):
            return features

    return Encoder()


def test_transposed_features_whose_patch_count_is_not_the_token_grid_are_named():
    images = torch.zeros(2, 3, 8, 8)
    # 36 patches (6x6) of width 20, transposed; the token grid is 4x4
    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\): got 20 x 36 \(only the last size, "
                                         r"36, is a square patch grid\)"):
        FrozenImageEncoder(encoder_returning(torch.randn(2, 20, 36)), grid=(4, 4))(images)
    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\): got 20 x 36 \(the last size is "
                                         r"encoder_grid's 36 patches\)"):
        FrozenImageEncoder(encoder_returning(torch.randn(2, 20, 36)), grid=(4, 4), encoder_grid=(3, 12))(images)
    # width 25 (a square) over 36 patches: either could be the grid; it used to be read as 5x5 patches of width 36
    with pytest.raises(MiraiError, match=r"are 25 x 36: both sizes are squares.*pass width="):
        FrozenImageEncoder(encoder_returning(torch.randn(2, 25, 36)), grid=(4, 4))(images)
    with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\): got 25 x 36 and the width is 25"):
        FrozenImageEncoder(encoder_returning(torch.randn(2, 25, 36)), grid=(4, 4), width=25)(images)


@BOUNDED
@given(side=st.integers(2, 7), width=st.integers(2, 40), transposed=st.booleans())
def test_encoder_features_are_laid_out_right_or_refused(side, width, transposed):
    """A transposed layout is never taken for patches; the right one gives the bilinear resize or names width=."""
    tokens = 16  # the 4x4 token grid
    assume(not (transposed and width == tokens))  # (b, 16, p): 16 is the token count, read as patches (documented)
    g = torch.Generator().manual_seed(side * 100 + width)
    patches = torch.randn(2, side * side, width, generator=g)  # (b p e)
    features = patches.transpose(1, 2) if transposed else patches
    encoder = FrozenImageEncoder(encoder_returning(features), grid=(4, 4))
    if transposed:
        with pytest.raises(MiraiError, match=r"laid out \(batch, width, patches\)|both sizes are squares"):
            encoder(torch.zeros(2, 3, 8, 8))
        return
    try:
        got = encoder(torch.zeros(2, 3, 8, 8))
    except MiraiError as error:
        assert "width=" in str(error)
        got = FrozenImageEncoder(encoder_returning(features), grid=(4, 4), width=width)(torch.zeros(2, 3, 8, 8))
    square = patches.transpose(1, 2).reshape(2, width, side, side)
    expected = F.interpolate(square, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, patches if side == 4 else expected)

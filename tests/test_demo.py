"""The demo: its world, its metric, the probe, and the --quick run end to end."""

import json

import pytest
import torch

from mirai_plugin import MiraiError
from mirai_plugin.cli import main
from mirai_plugin.demo.experiment import consistency
from mirai_plugin.demo.models import Student
from mirai_plugin.demo.run import make_config
from mirai_plugin.demo.world import World
from mirai_plugin.probe import probe


def test_world_is_deterministic_per_seed_and_identities_persist():
    world = World()
    a, background = world.render(6, 12, seed=3)
    b, _ = world.render(6, 12, seed=3)
    c, _ = world.render(6, 12, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 12, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    # the sprites keep their colours: the set of clearly non-background colours is the same at start and end
    colours = lambda frame: {tuple((p * 4).long().tolist()) for p in frame.flatten(1).T}  # noqa: E731
    moved = (a[:, 0] != a[:, -1]).any()
    assert moved and colours(a[0, 0]) & colours(a[0, -1])
    assert torch.equal(background, world.render(6, 12, seed=3)[1])


def test_consistency_prefers_true_videos_to_shuffled_identities():
    video, background = World().render(16, 24, seed=0)
    swapped = video.clone()
    swapped[:, 12:] = video.roll(1, dims=0)[:, 12:]  # the second half comes from another video
    true, fake = consistency(video, background), consistency(swapped, background)
    assert true["subject"][:, -1].mean() > fake["subject"][:, -1].mean() + 0.1
    assert true["background"][:, -1].mean() > fake["background"][:, -1].mean()
    assert torch.allclose(true["subject"][:, 10], fake["subject"][:, 10])  # identical first halves


def test_probe_recovers_a_known_linear_future():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, 6, 8, 10, generator=g)
    mixing = torch.randn(10, 5, generator=g) * 0.1
    targets = torch.zeros(64, 6, 8, 5)
    targets[:, 2:] = features[:, :-2] @ mixing  # segment k+2 is a linear function of segment k
    result = probe(features, targets, horizons=(1, 2), steps=400)
    assert result[2]["psnr"] > 35  # recovered
    assert result[1]["psnr"] < result[2]["psnr"] - 15  # nothing to read one segment ahead
    with pytest.raises(MiraiError, match="horizon 6 needs at least 7 segments"):
        probe(features, targets, horizons=(6,))


def test_student_is_causal_across_segments():
    torch.manual_seed(0)
    student = Student(32, 2, 2, 16, segment_frames=3, window=2).eval()
    video, _ = World().render(2, 9, seed=0)
    t = torch.full((2,), 0.5)
    outputs = []
    for future in (video[:, 6:], torch.rand_like(video[:, 6:])):
        cache = student.new_cache()
        with torch.no_grad():
            student(video[:, :3], torch.zeros(2), cache, 0, previous=torch.zeros_like(video[:, 0]), write=True)
            outputs.append(student(video[:, 3:6], t, cache, 1, previous=video[:, 2]))
            student(future, torch.zeros(2), cache, 2, previous=video[:, 5], write=True)  # cannot change segment 1
    assert torch.equal(outputs[0], outputs[1])


def test_demo_options_are_validated():
    with pytest.raises(MiraiError, match="segment_frames=5 must divide"):
        make_config(segment_frames=5)
    with pytest.raises(MiraiError, match="layer 4 out of range"):
        make_config(layer=4)
    with pytest.raises(MiraiError, match="offsets"):
        make_config(offsets=())


def test_quick_demo_writes_table_json_and_figure(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "probe PSNR" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["per_seed"]) == {"baseline", "foresight"} and len(results["per_seed"]["foresight"]) == 2
    assert results["verdict"] and results["per_seed"]["foresight"][0]["final_foresight_loss"] < 0
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as image:
        assert image.size == (1200, 420)


def test_probe_command_on_a_features_file(tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    features = torch.randn(32, 5, 8, 6, generator=g)
    targets = torch.zeros(32, 5, 8, 3)
    targets[:, 1:] = features[:, :-1, :, :3] * 0.1
    save_file({"features.good": features, "features.noise": torch.randn(32, 5, 8, 6, generator=g),
               "targets": targets}, tmp_path / "probe.safetensors")
    assert main(["probe", str(tmp_path / "probe.safetensors"), "--horizons", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["good"]["1"]["psnr"] > result["noise"]["1"]["psnr"] + 10
    save_file({"targets": targets}, tmp_path / "bad.safetensors")
    assert main(["probe", str(tmp_path / "bad.safetensors")]) == 2
    assert "no 'features'" in capsys.readouterr().err

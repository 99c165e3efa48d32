"""VBench scoring, the paired bootstrap, consistency formulas and the VBench runner's checks."""

import json
from pathlib import Path

import pytest
import torch
from synthetic import synthetic_results

from mirai_plugin import MiraiError
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.eval import (
    DIMENSIONS,
    compare,
    feature_consistency,
    final_scores,
    load_results,
    prompt_of,
    scores_from_percent,
    temporal_flickering,
)
from mirai_plugin.tooling.eval.runner import missing_weights, run_vbench
from mirai_plugin.tooling.eval.vbench_score import NORMALISATION


def write(tmp_path, name, data):
    path = tmp_path / f"{name}_eval_results.json"
    path.write_text(json.dumps(data))
    return path


def test_final_score_known_answers():
    assert final_scores({d: NORMALISATION[d][0] for d in DIMENSIONS})["total"] == 0
    assert final_scores({d: NORMALISATION[d][1] for d in DIMENSIONS})["total"] == pytest.approx(1.0)
    middle = final_scores({d: sum(NORMALISATION[d]) / 2 for d in DIMENSIONS})
    assert middle["quality"] == pytest.approx(0.5) and middle["semantic"] == pytest.approx(0.5)
    # dynamic degree weighs half: moving it from 0 to 1 adds 0.5 / 6.5 to Quality and 4/5 of that to Total
    zero = {d: NORMALISATION[d][0] for d in DIMENSIONS}
    moved = final_scores({**zero, "dynamic_degree": 1.0})
    assert moved["quality"] == pytest.approx(0.5 / 6.5) and moved["total"] == pytest.approx(0.8 * 0.5 / 6.5)
    assert moved["semantic"] == 0
    scene = final_scores({**zero, "scene": 0.8222})
    assert scene["semantic"] == pytest.approx(1 / 9) and scene["total"] == pytest.approx(0.2 / 9)


def test_results_files_reaggregate_like_vbench_and_match_a_percent_table(tmp_path):
    data = synthetic_results()
    results = load_results([write(tmp_path, "run", data)])
    for name in DIMENSIONS:
        assert results[name].score == pytest.approx(data[name][0], abs=1e-12), name
        assert len(results[name].prompts) == 12 and results[name].videos == 36
    percent = {name.replace("_", " "): 100 * data[name][0] for name in DIMENSIONS}
    from_table = final_scores(scores_from_percent(percent))
    from_files = final_scores({n: r.reported for n, r in results.items()})
    assert from_table["total"] == pytest.approx(from_files["total"], abs=1e-12)
    assert prompt_of("/x/a dog running on the beach-4.mp4") == "a dog running on the beach"


def test_score_command_and_errors(tmp_path, capsys):
    data = synthetic_results()
    split = [{k: v for k, v in data.items() if k in half} for half in (DIMENSIONS[:7], DIMENSIONS[7:])]
    files = [write(tmp_path, f"part{i}", part) for i, part in enumerate(split)]
    assert main(["score", *map(str, files), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["total"] == pytest.approx(100 * final_scores({n: v[0] for n, v in data.items()})["total"])

    assert main(["score", str(files[0])]) == 2
    assert "missing VBench dimensions" in capsys.readouterr().err and "object_class" not in str(DIMENSIONS[:7])
    bad = write(tmp_path, "bad", {**data, "beauty": [0.5, []]})
    assert main(["score", str(bad)]) == 2
    assert "unknown VBench dimension 'beauty'" in capsys.readouterr().err
    malformed = write(tmp_path, "malformed", {"color": [0.5]})
    assert main(["score", str(malformed)]) == 2
    assert "must be [aggregate, [per-video results]]" in capsys.readouterr().err
    with pytest.raises(MiraiError, match="missing VBench dimensions in the table"):
        scores_from_percent({"color": 80.0})


def test_bootstrap_identical_inputs_give_a_zero_interval(tmp_path):
    results = load_results([write(tmp_path, "run", synthetic_results())])
    for row in compare(results, results, replicates=500, seed=1):
        assert row.difference == 0 and row.low == 0 and row.high == 0 and not row.significant


def test_bootstrap_recovers_a_constant_shift_and_is_reproducible(tmp_path):
    base = load_results([write(tmp_path, "base", synthetic_results(0))])
    shifted = load_results([write(tmp_path, "cand", synthetic_results(0, shift={"aesthetic_quality": 0.02}))])
    rows = {r.name: r for r in compare(base, shifted, replicates=1000, seed=3)}
    row = rows["aesthetic_quality"]
    assert row.difference == pytest.approx(2.0) and row.low == pytest.approx(2.0) and row.high == pytest.approx(2.0)
    assert rows["total"].difference == pytest.approx(100 * 0.8 * 0.02 / 6.5) and rows["total"].significant
    assert rows["color"].difference == 0 and not rows["color"].significant

    noisy = load_results([write(tmp_path, "noisy", synthetic_results(5))])
    first, again = compare(base, noisy, replicates=300, seed=7), compare(base, noisy, replicates=300, seed=7)
    other = compare(base, noisy, replicates=300, seed=8)
    assert first == again and first != other
    total = first[-1]
    assert total.low < total.difference < total.high and total.standard_error > 0


def test_compare_command_and_prompt_mismatch(tmp_path, capsys):
    base = write(tmp_path, "base", synthetic_results(0))
    cand = write(tmp_path, "cand", synthetic_results(1))
    assert main(["compare", str(base), str(cand), "--bootstrap", "200", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "95% CI" in out and "Paired prompt-level bootstrap, 200 replicates" in out
    fewer = write(tmp_path, "fewer", synthetic_results(1, prompts=10))
    assert main(["compare", str(base), str(fewer), "--bootstrap", "200"]) == 2
    assert "different prompts" in capsys.readouterr().err


def test_consistency_formulas():
    same = torch.ones(6, 4)
    assert feature_consistency(same).item() == pytest.approx(1.0)
    alternating = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # to previous: always 0; to first: 0, 1, 0, 1 -> mean of (0 + x) / 2 = 0.25
    assert feature_consistency(alternating).item() == pytest.approx(0.25)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert feature_consistency(opposite).item() == 0.0  # negative cosines count as 0, as in VBench
    static = torch.full((4, 8, 8, 3), 100.0)
    assert temporal_flickering(static).item() == 1.0
    blinking = torch.stack([torch.zeros(8, 8, 3), torch.full((8, 8, 3), 255.0)] * 2)
    assert temporal_flickering(blinking).item() == 0.0
    half = torch.stack([torch.zeros(8, 8, 3), torch.full((8, 8, 3), 51.0)])
    assert temporal_flickering(half).item() == pytest.approx(0.8)
    batched = torch.stack([same, torch.ones(6, 4)])
    assert feature_consistency(batched).shape == (2,)


def test_vbench_runner_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "cache"))
    missing = missing_weights(["subject_consistency", "background_consistency", "temporal_flickering"])
    assert missing == sorted(str(tmp_path / "cache" / f) for f in (
        "clip_model/ViT-B-32.pt", "dino_model/dino_vitbase16_pretrain.pth", "dino_model/facebookresearch_dino_main"))
    (tmp_path / "cache" / "clip_model").mkdir(parents=True)
    (tmp_path / "cache" / "clip_model" / "ViT-B-32.pt").write_bytes(b"")
    assert missing_weights(["background_consistency"]) == []
    videos = tmp_path / "videos"
    videos.mkdir()
    with pytest.raises(MiraiError, match="vbench package is not installed|VBench weights missing"):
        run_vbench(videos, mode="long", output=tmp_path / "out", name="x")
    with pytest.raises(MiraiError, match="mode must be"):
        run_vbench(videos, mode="short", output=tmp_path / "out", name="x")


VBENCH = Path(__file__).parent / "data" / "vbench_reference.safetensors"  # tools/record_vbench_reference.py
VBENCH_TOLERANCE = 1e-6  # VBench scores float32 cosines and float32 pixel means: about 1e-7 from float64


def vbench_reference():
    from safetensors import safe_open

    with safe_open(VBENCH, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        results = json.loads(f.metadata()["results"])
    videos = len(results["temporal_flickering"][1])
    return [tensors[f"features.{v}"] for v in range(videos)], [tensors[f"frames.{v}"] for v in range(videos)], results


def test_consistency_formulas_match_vbench_on_recorded_inputs():
    """VBench 0.1.5's own subject / background consistency and temporal flickering, recorded on fixed inputs."""
    features, frames, results = vbench_reference()
    for name in ("subject_consistency", "background_consistency"):
        for video, entry in zip(features, results[name][1], strict=True):
            assert feature_consistency(video).item() == pytest.approx(entry["video_results"], abs=VBENCH_TOLERANCE)
    for video, entry in zip(frames, results["temporal_flickering"][1], strict=True):
        assert temporal_flickering(video).item() == pytest.approx(entry["video_results"], abs=VBENCH_TOLERANCE)
    # video 1 has negative cosines: VBench's score there is not the unclamped mean
    phi = torch.nn.functional.normalize(features[1].double(), dim=-1)
    unclamped = (((phi[1:] * phi[:-1]).sum(-1) + (phi[1:] * phi[:1]).sum(-1)) / 2).mean().item()
    assert abs(unclamped - results["subject_consistency"][1][1]["video_results"]) > 100 * VBENCH_TOLERANCE

    # controls: a small change of the inputs moves the score past the tolerance
    g = torch.Generator().manual_seed(0)
    nudged = features[0].clone()
    nudged[2] += 1e-3 * torch.randn(nudged.shape[-1], generator=g)
    moved = abs(feature_consistency(nudged).item() - results["subject_consistency"][1][0]["video_results"])
    assert moved > 10 * VBENCH_TOLERANCE, moved
    closer = frames[0].clone()  # one row of the last frame one level closer to the frame before it
    step = (closer[-2, 0].int() - closer[-1, 0].int()).sign().to(torch.uint8)
    closer[-1, 0] += step
    moved = abs(temporal_flickering(closer).item() - results["temporal_flickering"][1][0]["video_results"])
    assert moved > 10 * VBENCH_TOLERANCE, moved


def test_result_files_reaggregate_to_vbenchs_own_aggregates(tmp_path):
    """VBench's aggregates of the recorded runs: frame-weighted for the consistencies, a mean for flickering."""
    features, _, results = vbench_reference()
    path = write(tmp_path, "vbench", results)
    frames = {Path(e["video_path"]).name: len(f) for e, f in zip(results["subject_consistency"][1], features)}
    loaded = load_results([path], frames=frames)
    for name in results:
        assert loaded[name].score == pytest.approx(results[name][0], abs=VBENCH_TOLERANCE), name
    # control: without frame counts the subject score is the mean over videos, not VBench's aggregate
    unweighted = load_results([path])["subject_consistency"].score
    assert abs(unweighted - results["subject_consistency"][0]) > 100 * VBENCH_TOLERANCE

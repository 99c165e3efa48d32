"""The video demo: its world, DMD, the arms, the metrics, the shipped models, and the --quick run end to end."""

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mirai_plugin import MiraiError
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.demo import pretrained, store
from mirai_plugin.tooling.demo.dmd import critic_loss, dmd_loss
from mirai_plugin.tooling.demo.evaluation import consistency, encoder_gate
from mirai_plugin.tooling.demo.experiment import train_arm
from mirai_plugin.tooling.demo.models import Student, Teacher
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.reappearance import hidden_pairs, reappearance_colour_error, reappearance_frames
from mirai_plugin.tooling.demo.registration import load_config, quick, registration_path
from mirai_plugin.tooling.demo.report import paired_bootstrap
from mirai_plugin.tooling.demo.run import make_config, run_demo
from mirai_plugin.tooling.demo.world import OccludedWorld
from mirai_plugin.tooling.probe import probe

ROOT = Path(__file__).parent.parent


def test_world_hides_the_object_then_brings_it_back_with_its_identity():
    world = OccludedWorld()
    scene = world.render(32, 48, seed=3)
    assert torch.equal(scene.video, world.render(32, 48, seed=3).video)
    assert not torch.equal(scene.video, world.render(32, 48, seed=4).video)
    assert scene.video.shape == (32, 48, 3, 16, 16) and 0 <= scene.video.min() and scene.video.max() <= 1
    assert (scene.visible[:, :3] > 0.85).all()  # the given first segment shows the object (its soft edge aside)
    for visible in scene.visible:
        hidden_runs = "".join("0" if v == 0 else "1" for v in visible.tolist()).split("1")
        assert max(len(run) for run in hidden_runs) >= 3  # wholly off-screen for at least a segment's frames
    # where it is back, its interior pixels have the colour drawn for the video
    back = reappearance_frames(scene, 3, 3)
    assert back.sum(dim=1).min() >= 6  # at least two returns in 48 frames
    assert reappearance_colour_error(scene.video, scene, back).max() < 1e-6


def test_hidden_pairs_and_reappearance_frames_follow_visibility():
    scene = OccludedWorld().render(256, 12, seed=0)
    pairs = hidden_pairs(scene, 3)  # (v 3)
    per_segment = scene.visible.view(256, 4, 3).amax(dim=2)
    assert pairs.any() and (per_segment[:, :-1][pairs] == 0).all() and (per_segment[:, 1:][pairs] >= 0.25).all()
    assert pairs[:, 2].float().mean() > 0.7  # in most training clips segment 2 is hidden and 3 brings it back
    frames = reappearance_frames(OccludedWorld().render(8, 48, seed=1), 3, 3)
    assert (frames.sum(dim=1) % 3 == 0).all() and not frames[:, :3].any()


def test_colour_error_measures_identity_at_the_reappearance():
    scene = OccludedWorld().render(16, 48, seed=2)
    frames = reappearance_frames(scene, 3, 3)
    other = scene.colour.roll(1, dims=0)  # another video's object colour
    alpha = scene.alpha[:, :, None]
    recoloured = scene.background[:, None] * (1 - alpha) + other[:, None, :, None, None] * alpha
    error = reappearance_colour_error(recoloured, scene, frames)
    expected = (other - scene.colour).square().mean(dim=1).sqrt()
    assert torch.allclose(error, expected, atol=1e-5)
    blank = reappearance_colour_error(scene.background[:, None].expand_as(scene.video), scene, frames)
    assert (blank > 0.1).all()  # a student that forgets the object entirely


def test_consistency_prefers_true_videos_to_swapped_identities():
    scene = OccludedWorld().render(32, 36, seed=1)
    shown = scene.visible >= 0.5
    swapped = scene.video.clone()
    swapped[:, 18:] = scene.video.roll(1, dims=0)[:, 18:]  # the second half comes from another video
    true, fake = consistency(scene.video, scene.background, shown), consistency(swapped, scene.background, shown)
    assert true["subject"].mean() > fake["subject"].mean() + 0.1
    assert true["background"].mean() > fake["background"].mean()
    blank = consistency(scene.background[:, None].expand_as(scene.video), scene.background, shown)
    assert (blank["subject"] == 0).all()  # no subject where one should be


class _Affine(torch.nn.Module):
    """A stand-in score: x0 prediction ``scale * noisy``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, noisy, levels):
        return self.scale * noisy


def test_dmd_gradient_is_self_forcings_normalised_score_difference():
    video = torch.rand(3, 12, 3, 16, 16, requires_grad=True)
    real, fake = _Affine(0.5), _Affine(0.8)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    loss = dmd_loss(video, real, fake, given_frames=3, t_range=(0.02, 0.98), g=g)
    loss.backward()
    g.set_state(state)  # redraw the same t and noise
    t = 0.02 + 0.96 * torch.rand(3, generator=g)
    noise = torch.randn(video.shape, generator=g)
    level = t[:, None, None, None, None]
    noisy = (1 - level) * video.detach() + level * noise
    x = video.detach()[:, 3:]
    p_real, p_fake = 0.5 * noisy[:, 3:], 0.8 * noisy[:, 3:]
    grad = (p_fake - p_real) / (x - p_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(video.grad[:, 3:], grad / x.numel(), atol=1e-9)  # d/dx of 0.5 * mse(x, x - grad)
    assert (video.grad[:, :3] == 0).all()  # the given segment is outside the loss
    assert torch.isclose(loss, 0.5 * grad.square().mean().float())


def test_critic_loss_scores_only_the_generated_frames():
    fake = Teacher(16, 1, 2, 16, max_frames=12)
    video = torch.rand(2, 12, 3, 16, 16)
    changed = video.clone()
    changed[:, :3] = 0.0
    losses = [critic_loss(fake, v, given_frames=3, t_range=(0.5, 0.5), g=torch.Generator().manual_seed(0)) for v in
              (video, changed)]
    assert losses[0] > 0 and not torch.isclose(losses[0], losses[1])  # the context matters, its frames are not scored
    torch.manual_seed(0)
    teacher = Teacher(16, 2, 2, 16, max_frames=12).eval()
    t = torch.rand(2)
    assert torch.allclose(teacher(video, t), teacher(video, t[:, None].expand(2, 12)))


def test_student_is_causal_across_segments():
    torch.manual_seed(0)
    student = Student(32, 2, 2, 16, segment_frames=3, window=2).eval()
    video = OccludedWorld().render(2, 9, seed=0).video
    t = torch.full((2,), 0.5)
    outputs = []
    for future in (video[:, 6:], torch.rand_like(video[:, 6:])):
        cache = student.new_cache()
        with torch.no_grad():
            student(video[:, :3], torch.zeros(2), cache, 0, previous=torch.zeros_like(video[:, 0]), write=True)
            outputs.append(student(video[:, 3:6], t, cache, 1, previous=video[:, 2]))
            student(future, torch.zeros(2), cache, 2, previous=video[:, 5], write=True)  # cannot change segment 1
    assert torch.equal(outputs[0], outputs[1])


def _tiny(cfg, **dmd):
    models = replace(cfg.models, teacher_dim=16, student_dim=16, teacher_depth=2, student_depth=2, teacher_steps=2,
                     base_steps=2, student_steps=2, batch=2)
    foresight = {**cfg.foresight, "student_layer": 1, "encoder_layer": 1}
    return replace(cfg, models=models, foresight=foresight, dmd=replace(cfg.dmd, batch=2, **dmd))


def _train_tiny(cfg, arm, seed=0):
    torch.manual_seed(0)
    teacher = cfg.models.teacher().eval().requires_grad_(False)
    fake, student = cfg.models.base(), cfg.models.student()
    log = train_arm(cfg, teacher, fake, student, seed, arm)
    return student, fake, log


def test_arms_differ_by_the_foresight_lines_only():
    """With the term's weight at 0 the foresight and control arms run the same DMD as the baseline,
    bit for bit: capture, encoder, head steps and replay change nothing else."""
    cfg = _tiny(load_config(), generator_steps=2)
    baseline, baseline_fake, _ = _train_tiny(cfg, "baseline")
    off = replace(cfg, foresight={**cfg.foresight, "weight": 0.0})
    for arm in ("foresight", "control"):
        student, fake, log = _train_tiny(off, arm)
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), baseline.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(fake.state_dict().values(), baseline_fake.state_dict().values()))
    student, _, log = _train_tiny(cfg, "foresight")  # weight 0.2: the term now reaches the student
    assert not all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), baseline.state_dict().values()))
    assert len(log["foresight_term"]) == 2 and all(abs(v) <= 0.2 for v in log["foresight_term"])  # 0.2 * -cos
    assert log["gradient"]["ratio"] > 0 and len(log["cycle_seconds"]) == 2


def test_replay_runs_on_the_critic_steps_between_generator_steps(monkeypatch):
    from mirai_plugin import ForesightHead

    calls = []
    original = ForesightHead.replay
    monkeypatch.setattr(ForesightHead, "replay", lambda self, **kw: calls.append(1) or original(self, **kw))
    cfg = _tiny(load_config(), generator_steps=2)
    _train_tiny(cfg, "control")
    assert len(calls) == 2 * (cfg.dmd.critic_per_generator - 1)
    assert cfg.foresight_config().replay


def test_paired_bootstrap_pairs_videos():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g)
    shifted = (base - 0.05).tolist()  # every video 0.05 lower: a paired CI is tight around -0.05
    ci = paired_bootstrap(base.tolist(), shifted, replicates=2000, seed=0, level=0.95)
    assert ci["low"] == pytest.approx(-0.05, abs=1e-6) and ci["high"] == pytest.approx(-0.05, abs=1e-6)
    noisy = (base + 0.3 * torch.randn(200, generator=g)).tolist()
    ci = paired_bootstrap(base.tolist(), noisy, replicates=2000, seed=0, level=0.95)
    assert ci["low"] < ci["difference"] < ci["high"] and ci["high"] - ci["low"] > 0.05


@pytest.mark.parametrize("registration", [1, 2])
def test_registration_is_the_recipe_and_is_recorded(registration):
    cfg = load_config(registration, addendum=False)
    fcfg = cfg.foresight_config()
    assert (fcfg.weight, fcfg.offsets, fcfg.fusion, fcfg.predictor, fcfg.predictor_depth, fcfg.loss) == (
        0.2, (0, 1), "mean", "dit", 3, "cosine")
    assert fcfg.student_layer == cfg.models.student_depth // 2 and fcfg.encoder_layer == cfg.models.teacher_depth // 2
    assert fcfg.replay and fcfg.lr == cfg.dmd.generator_lr and cfg.dmd.critic_per_generator == 5
    assert set(cfg.arms) == {"baseline", "foresight", "control"}
    # the settings file is the one its registration document records (any change is a new, reported run)
    recorded = re.search(r"sha256\s+`([0-9a-f]{64})`",
                         (ROOT / "docs" / f"demo-registration-{registration}.md").read_text())
    assert recorded and recorded.group(1) == hashlib.sha256(registration_path(registration).read_bytes()).hexdigest()


def test_registration_2_keeps_what_it_says_it_keeps():
    """Registration 2 changes how the models are trained and leaves the run's size to its pilot; the world, the
    models' sizes, the gate, the DMD, the recipe, the arms, the metric and the decision rules are registration 1's."""
    first, second = (json.loads(registration_path(n).read_text()) for n in (1, 2))
    assert second["world"] == first["world"] and second["gate"] == first["gate"]
    assert second["foresight"] == first["foresight"] and second["arms"] == first["arms"]
    assert second["primary_metric"] == first["primary_metric"]
    assert {k: v for k, v in second["dmd"].items() if k != "generator_steps"} == {
        k: v for k, v in first["dmd"].items() if k != "generator_steps"}
    assert {k: v for k, v in second["evaluation"].items() if k not in ("eval_videos", "block")} == {
        k: v for k, v in first["evaluation"].items() if k != "eval_videos"}
    sizes = ("train_frames", "teacher_dim", "teacher_depth", "student_dim", "student_depth", "heads", "batch", "seed")
    assert {k: second["models"][k] for k in sizes} == {k: first["models"][k] for k in sizes}
    assert second["dmd"]["generator_steps"] is None and second["seeds"] is None  # the pilot's to set
    assert second["evaluation"]["eval_videos"] is None
    assert not set(second["pilot"]["seeds"]) & set(range(max(second["pilot"]["seed_counts"])))  # never the run's


def test_demo_options_are_validated():
    with pytest.raises(MiraiError, match="layer 4 out of range"):
        make_config(layer=4)
    with pytest.raises(MiraiError, match="offsets"):
        make_config(offsets=())
    with pytest.raises(MiraiError, match="--seeds must be >= 1"):
        make_config(seeds=0)
    assert make_config(steps=7, layer=1).deviations == ("generator_steps=7", "layer=1")
    assert main(["demo", "--workers", "0"]) == 2


def test_models_come_from_the_cache_under_their_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path))
    monkeypatch.setattr(store, "SHIPPED", tmp_path / "none")
    settings = _tiny(load_config()).models
    first = store.obtain_models(settings, Progress(enabled=False), workers=1)
    again = store.obtain_models(settings, Progress(enabled=False), workers=1)
    assert first.source.startswith("trained now") and again.source.startswith("local cache")
    assert all(
        torch.equal(a, b) for a, b in zip(first.student.state_dict().values(), again.student.state_dict().values())
    )
    assert pretrained.models_key(replace(settings, teacher_steps=3)) != pretrained.models_key(settings)


def test_shipped_models_are_the_training_scripts_output_for_this_code():
    cfg = load_config()
    assert store.stored_key(store.SHIPPED) == pretrained.models_key(cfg.models), (
        "the shipped models were trained by other code or settings: run tools/train_demo_models.py")
    assert sum(p.stat().st_size for p in store.SHIPPED.glob("*.safetensors")) < 4 * 2**20


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="blocked: the pre-registered teacher misses the gate (+1.66 dB of the 2 dB "
                   "needed, docs/demo.md); strict, so a teacher that passes turns this into a failure to update")
def test_shipped_teacher_passes_the_encoder_gate():
    cfg = load_config()
    models = store.load_models(store.SHIPPED, cfg.models, "shipped")
    g = cfg.gate
    scene = cfg.world.render(g.videos, cfg.models.train_frames, seed=80_000_000 + g.seed)
    fcfg = cfg.foresight_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs it
    try:
        gate = encoder_gate(models.teacher, scene, layer=fcfg.encoder_layer, offsets=fcfg.offsets,
                            segment_frames=cfg.segment_frames, test_videos=g.test_videos, hidden=g.probe_hidden,
                            steps=g.probe_steps, lr=g.probe_lr, batch=g.probe_batch, seed=g.seed)
    finally:
        torch.set_num_threads(threads)
    assert gate["hidden"]["margin"] >= g.margin_db, gate


def test_a_failed_gate_stops_a_full_run_before_any_student(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path / "cache"))
    cfg = _tiny(quick(load_config()))
    cfg = replace(cfg, gate=replace(cfg.gate, margin_db=1000.0), deviations=())  # binding, and out of reach
    results = run_demo(cfg, tmp_path / "out", workers=1, progress=Progress(enabled=False))
    assert results["status"].startswith("blocked") and "per_run" not in results
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gate"]["passed"] is False
    assert "NOT PASSED" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_prints_gate_ratio_table_and_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "encoder gate (" in printed and "|grad of the weighted term| / |grad of DMD|" in printed
    assert "reappearance colour error" in printed and "verdict:" in printed and "% CI" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "complete" and results["deviations"] == ["--quick: every stage at a tiny size"]
    assert {(r["seed"], r["arm"]) for r in results["per_run"]} == {
        (s, a) for s in (0, 1) for a in ("start", "baseline", "foresight", "control")}
    primary = results["summary"]["primary"]
    assert {"foresight", "control"} <= set(primary) and primary["foresight"]["videos"] == 32
    assert all(r["train"]["gradient"]["ratio"] > 0 for r in results["per_run"] if r["arm"] in ("foresight", "control"))
    from PIL import Image

    with Image.open(tmp_path / "out" / "figure.png") as image:
        assert image.size == (1320, 800)


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

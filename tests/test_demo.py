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
from mirai_plugin.tooling.demo import registration as registration_module
from mirai_plugin.tooling.demo import run as run_module
from mirai_plugin.tooling.demo.dmd import critic_loss, dmd_loss
from mirai_plugin.tooling.demo.evaluation import consistency, encoder_gate
from mirai_plugin.tooling.demo.experiment import evaluate_student, train_arm
from mirai_plugin.tooling.demo.models import Student, Teacher
from mirai_plugin.tooling.demo.pilot import OVERHEAD_SECONDS, choose, detection, predict_seconds
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.quality import Criterion, Validation
from mirai_plugin.tooling.demo.quality import read as quality_read
from mirai_plugin.tooling.demo.reappearance import hidden_pairs, reappearance_colour_error, reappearance_frames
from mirai_plugin.tooling.demo.registration import PilotSettings, check_models, load_config, quick, registration_path
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
                     base_steps=2, student_steps=2, batch=2, schedule="fixed")
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
    # a 4-segment training clip whose first segment is given: the student generates segments 1-3
    with pytest.raises(MiraiError, match=r"--offsets 3: .* the furthest offset with a target is 2"):
        make_config(registration=1, offsets=(0, 3))
    assert make_config(registration=1, offsets=(0, 2)).foresight["offsets"] == (0, 2)
    with pytest.raises(MiraiError, match="--seeds must be >= 1"):
        make_config(seeds=0)
    assert make_config(registration=1, steps=7, layer=1).deviations == ("generator_steps=7", "layer=1")
    with pytest.raises(MiraiError, match="no registration 9"):
        make_config(registration=9)
    assert main(["demo", "--registration", "0"]) == 2
    assert main(["demo", "--workers", "0"]) == 2


def test_models_come_from_the_cache_under_their_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path))
    monkeypatch.setattr(store, "SHIPPED", tmp_path / "none")
    settings = _tiny(load_config()).models
    first = store.obtain_models(settings, Progress(enabled=False), workers=1, train=True)
    again = store.obtain_models(settings, Progress(enabled=False), workers=1)
    assert first.source.startswith("trained now") and again.source.startswith("local cache")
    assert all(
        torch.equal(a, b) for a, b in zip(first.student.state_dict().values(), again.student.state_dict().values())
    )
    assert again.training["teacher"] == first.training["teacher"]  # the training log travels with the weights
    assert pretrained.models_key(replace(settings, teacher_steps=3)) != pretrained.models_key(settings)


def test_models_are_trained_only_when_asked(tmp_path, monkeypatch, capsys):
    """A key that matches no shipped or cached models stops with what training would take, and trains nothing."""
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path))
    settings = replace(_tiny(load_config()).models, seed=7)
    with pytest.raises(MiraiError, match="mirai-plugin demo --train-models"):
        store.obtain_models(settings, Progress(enabled=False), workers=1)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(store, "models_key", lambda settings: "0" * 16)  # no shipped or cached models have this key
    assert main(["demo", "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--train-models" in err and "hours" in err


@pytest.mark.parametrize("registration", [1, 2])
def test_shipped_models_are_the_training_scripts_output_for_this_code(registration):
    cfg = load_config(registration)
    folder = store.SHIPPED / f"registration-{registration}"
    assert store.stored_key(folder) == pretrained.models_key(cfg.models), (
        "the shipped models were trained by other code or settings: run tools/train_demo_models.py")
    assert store.shipped_folder(cfg.models) == folder
    assert sum(p.stat().st_size for p in store.SHIPPED.glob("*/*.safetensors")) < 4 * 2**20


def _gate(registration: int) -> dict:
    cfg = load_config(registration)
    models = store.load_models(store.SHIPPED / f"registration-{registration}", cfg.models, "shipped")
    g = cfg.gate
    scene = cfg.world.render(g.videos, cfg.models.train_frames, seed=80_000_000 + g.seed)
    fcfg = cfg.foresight_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs it
    try:
        return encoder_gate(models.teacher, scene, layer=fcfg.encoder_layer, offsets=fcfg.offsets,
                            segment_frames=cfg.segment_frames, test_videos=g.test_videos, hidden=g.probe_hidden,
                            steps=g.probe_steps, lr=g.probe_lr, batch=g.probe_batch, seed=g.seed)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_registration_1_reproduces_its_reported_gate():
    """Registration 1's shipped teacher gives the gate readings its run reported (docs/demo.md), to the digits shown."""
    gate = _gate(1)["hidden"]
    assert (round(gate["features"], 2), round(gate["pixels"], 2), gate["test_pairs"]) == (26.07, 24.41, 117)


@pytest.mark.slow
def test_shipped_teacher_passes_the_encoder_gate():
    cfg = load_config()
    gate = _gate(cfg.registration)
    assert gate["hidden"]["margin"] >= cfg.gate.margin_db, gate


def test_the_demo_runs_the_newest_registration_ready_to_run_and_says_why_not_a_newer_one(monkeypatch, tmp_path, capsys):
    shipped = {1}  # registrations whose models are shipped
    # no addendum committed (the real one is replaced by a file of tmp_path, written below)
    monkeypatch.setattr(registration_module, "addendum_path", lambda number: tmp_path / f"{number}-pilot.json")
    monkeypatch.setattr(run_module, "shipped_folder", lambda settings: tmp_path if any(
        settings == load_config(number).models for number in shipped) else None)
    assert run_module.default_registration() == (1, "registration 2 is not ready to run (its models are not shipped "
                                                    "yet and its pilot addendum is not committed yet): running "
                                                    "registration 1, its predecessor")
    (tmp_path / "2-pilot.json").write_text(json.dumps({"chosen": {"generator_steps": 100, "eval_videos": 128,
                                                                  "seeds": [0, 1, 2]}}))
    assert run_module.default_registration()[0] == 1  # sized, but its models are still missing
    shipped.add(2)
    assert run_module.default_registration() == (2, "")
    shipped.clear()
    assert run_module.default_registration() == (2, "")  # nothing ready: registration 2's own error will say why


def test_a_failed_gate_stops_a_full_run_before_any_student(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIRAI_DEMO_CACHE", str(tmp_path / "cache"))
    cfg = _tiny(quick(load_config()))
    cfg = replace(cfg, gate=replace(cfg.gate, margin_db=1000.0), deviations=())  # binding, and out of reach
    results = run_demo(cfg, tmp_path / "out", workers=1, progress=Progress(enabled=False), train_models=True)
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
    assert results["registration"] == 2 and printed.startswith("registration 2")
    assert results["wall_seconds"] > 0 and len(results["load"]["before"]) == 3 and results["load"]["cpus"] >= 1
    assert results["models_training"]["teacher"]["schedule"] == "quality"  # the tiny models went through checks
    assert len(results["models_training"]["student"]["checks"]) >= 1
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


# ---------------------------------------------------------------- registration 2: models trained to a quality


def test_low_noise_share_draws_registration_1s_levels_when_off():
    drawn = pretrained.draw_levels(1000, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.rand(1000, generator=torch.Generator().manual_seed(3)))
    mixed = pretrained.draw_levels(200_000, torch.Generator().manual_seed(3), (0.25, 0.1))
    # P(t < 0.1) = 0.25 + 0.75 * 0.1; above 0.1 the density is 0.75 of uniform's
    assert (mixed < 0.1).float().mean().item() == pytest.approx(0.325, abs=0.005)
    assert (mixed > 0.5).float().mean().item() == pytest.approx(0.375, abs=0.005)
    assert 0 <= mixed.min() and mixed.max() < 1


def _readings(losses, errors):
    return [{"loss": loss, "colour_error": {"0.25": error}} for loss, error in zip(losses, errors)]


def test_criterion_needs_the_threshold_and_a_plateau():
    criterion = Criterion(5.0, 0.25, plateau_checks=2, tolerance=0.01)
    assert not criterion.met(_readings([1.0, 0.9, 0.8], [4, 4, 4]))  # still improving: 0.8 < 0.99 * 1.0
    assert criterion.met(_readings([1.0, 0.8, 0.995], [9, 9, 4]))  # 0.995 > 0.99 * 1.0, and 4% <= 5%
    assert not criterion.met(_readings([1.0, 0.8, 0.995], [4, 4, 6]))  # the plateau, but 6% > 5%
    assert not criterion.met(_readings([1.0, 1.0], [1, 1]))  # too few checks to compare with 2 earlier
    assert Criterion(None, 0.0, 1, 0.01).met(_readings([1.0, 1.0], [90, 90]))  # plateau only


def test_quality_schedule_warms_up_holds_then_decays_from_the_check_that_met_the_criterion(monkeypatch):
    """The learning rate of every step, against the schedule written out: linear warm-up, constant until the check
    at which the criterion is met, then linear decay over decay_fraction of the steps so far; reads only at checks."""
    settings = replace(load_config().models, teacher_steps=100, teacher_lr=0.5, warmup_steps=4, check_every=10,
                       decay_fraction=0.2, plateau_checks=1, plateau_tolerance=0.01, teacher_quality=(5.0, 0.25))
    scripted = iter(_readings([1.0, 0.5, 0.3, 0.299, 0.2], [9, 9, 4, 4, 1]))  # met at the 4th check (step 40)
    reads = []
    monkeypatch.setattr(pretrained, "read", lambda model, *a, **k: reads.append(1) or next(scripted))
    monkeypatch.setattr(pretrained.Validation, "render", classmethod(lambda cls, *a: None))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    lrs = []
    log = pretrained.fit(settings, "teacher", model, optimizer, lambda i: lrs.append(optimizer.param_groups[0]["lr"]),
                         Progress(enabled=False), torch.Generator())
    # the decay lasts max(check_every, 0.2 * 40) = 10 steps
    expected = [0.5 * min(1, (i + 1) / 4) for i in range(40)] + [0.5 * (10 - j) / 10 for j in range(10)]
    assert lrs == pytest.approx(expected) and log["steps"] == 50 and log["decay_from"] == 40
    assert log["stopped"] == "criterion met at step 40" and len(log["checks"]) == 4 and len(reads) == 5
    assert log["final"]["loss"] == 0.2


def test_quality_schedule_stops_where_the_decay_still_fits_under_the_cap(monkeypatch):
    settings = replace(load_config().models, student_steps=60, warmup_steps=1, check_every=10, decay_fraction=0.2,
                       plateau_checks=1, student_quality=(10.0, 0.5))
    monkeypatch.setattr(pretrained, "read", lambda *a, **k: {"loss": 1.0, "colour_error": {"0.5": 50.0}})
    monkeypatch.setattr(pretrained.Validation, "render", classmethod(lambda cls, *a: None))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    log = pretrained.fit(settings, "student", model, optimizer, lambda i: None, Progress(enabled=False),
                         torch.Generator())
    assert log["decay_from"] == 50 and log["steps"] == 60 and log["stopped"].startswith("step cap")  # 50 * 1.2 = 60
    with pytest.raises(MiraiError, match="below one check and its decay"):
        check_models(replace(settings, base_steps=11))


@pytest.mark.parametrize("where", ["before the decay", "inside the decay"])
def test_training_resumed_from_its_file_ends_with_the_weights_of_one_that_never_stopped(tmp_path, monkeypatch, where):
    """A run interrupted at a training step and started again with the same resume file ends bit for bit where an
    uninterrupted run ends: the same weights, schedule and checks (processor times aside)."""
    settings = replace(load_config().models, teacher_dim=8, teacher_depth=1, teacher_steps=12, warmup_steps=2,
                       check_every=2, validation_videos=2, plateau_checks=1, batch=2, teacher_quality=None)
    monkeypatch.setattr(pretrained, "read", lambda model, *a, **k: {
        "loss": 1.0 + 1e-3 * float(sum(p.detach().sum() for p in model.parameters())), "colour_error": {"0.25": 0.0}})
    whole, whole_log = pretrained.train_bidirectional(settings, "teacher", Progress(enabled=False))
    assert whole_log["decay_from"] > 2 and whole_log["steps"] == whole_log["decay_from"] + 2  # 2 steps of decay
    stop_at = 3 if where == "before the decay" else whole_log["decay_from"] + 1

    render = OccludedWorld.render

    def interrupted(world, videos, frames, seed):
        if seed == 1_000_000 + stop_at:
            raise KeyboardInterrupt
        return render(world, videos, frames, seed=seed)

    monkeypatch.setattr(OccludedWorld, "render", interrupted)
    resume = tmp_path / "teacher.resume.pt"
    with pytest.raises(KeyboardInterrupt):
        pretrained.train_bidirectional(settings, "teacher", Progress(enabled=False), resume)
    assert torch.load(resume, weights_only=False)["i"] == stop_at // 2 * 2  # the last check before the stop
    monkeypatch.setattr(OccludedWorld, "render", render)
    resumed, resumed_log = pretrained.train_bidirectional(settings, "teacher", Progress(enabled=False), resume)
    assert {k: v for k, v in resumed_log.items() if k not in ("checks", "final", "seconds")} == {
        k: v for k, v in whole_log.items() if k not in ("checks", "final", "seconds")}
    assert [c["loss"] for c in resumed_log["checks"]] == [c["loss"] for c in whole_log["checks"]]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    with pytest.raises(MiraiError, match="delete it to train from the start"):
        pretrained.train_bidirectional(replace(settings, teacher_lr=0.5), "teacher", Progress(enabled=False), resume)


def test_validation_readings_score_a_perfect_denoiser_and_a_forgetful_one():
    """The readings against closed forms: a model that returns the clean clips scores 0 on both; one that returns
    the background alone scores the object's colour distance to it on the returning frames."""
    world = OccludedWorld()
    validation = Validation.render(world, 24, 12)

    class Oracle(torch.nn.Module):
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, noisy, levels):
            return self.output

    reading = quality_read(Oracle(validation.scene.video), validation, student=False)
    assert reading["loss"] == 0 and all(e < 1e-4 for e in reading["colour_error"].values())
    background = validation.scene.background[:, None].expand_as(validation.scene.video)
    expected = 100 * reappearance_colour_error(background, validation.scene, validation.frames)
    reading = quality_read(Oracle(background), validation, student=False)
    assert set(reading["colour_error"]) == {"0.25", "0.5", "1"}
    assert reading["colour_error"]["0.5"] == pytest.approx(expected[validation.returns].mean().item(), rel=1e-5)
    assert validation.returns.any() and not validation.returns.all()


# ---------------------------------------------------------------- registration 2: the pilot


def test_a_smaller_evaluation_is_the_first_blocks_of_a_larger_one():
    """The pilot reads 512 videos and judges 128 and 256 on their first blocks: exactly what a smaller run sees."""
    cfg = _tiny(load_config())
    cfg = replace(cfg, evaluation=replace(cfg.evaluation, rollout_frames=12, block=4))
    torch.manual_seed(0)
    student = cfg.models.student().eval()
    small, large = (evaluate_student(replace(cfg, evaluation=replace(cfg.evaluation, eval_videos=n)), student, 3,
                                     primary_only=True)["identity_error"] for n in (4, 8))
    assert small == large[:4] and len(large) == 8


def test_a_checkpoint_is_the_student_of_a_shorter_run():
    """The pilot evaluates candidates at checkpoints of one run: the student there is a shorter run's, bit for bit."""
    cfg = _tiny(load_config(), generator_steps=2)
    seen = {}

    def keep(student, cycles):
        seen[cycles] = {k: v.clone() for k, v in student.state_dict().items()}

    torch.manual_seed(0)
    teacher = cfg.models.teacher().eval().requires_grad_(False)
    train_arm(cfg, teacher, cfg.models.base(), cfg.models.student(), 0, "control", checkpoints=(1,),
              at_checkpoint=keep)
    shorter, _, _ = _train_tiny(replace(cfg, dmd=replace(cfg.dmd, generator_steps=1)), "control")
    assert list(seen) == [1] and all(torch.equal(seen[1][k], v) for k, v in shorter.state_dict().items())


def _pilot(**changes):
    settings = {"seeds": (100, 101, 102), "arms": ("baseline", "control"), "generator_steps": (50, 100),
                "eval_videos": (128, 256), "seed_counts": (3, 4), "budget_seconds": 450, "workers": 2,
                "min_detecting_seeds": 2, "max_half_width_ratio": 0.5}
    return PilotSettings(**{**settings, **changes})


def test_pilot_detects_a_control_effect_only_when_clear_on_enough_seeds():
    g = torch.Generator().manual_seed(0)
    base = {s: (20 + torch.randn(256, generator=g)).tolist() for s in (100, 101, 102)}
    lowered = {s: [x - 1.0 + 0.1 * float(torch.randn(1, generator=g)) for x in base[s]] for s in base}
    result = detection(base, lowered, _pilot(), replicates=2000, seed=0, level=0.95)
    assert result["detected"] and result["direction"] == "lower" and result["detecting_seeds"] == 3
    # an effect on one seed only: not enough seeds
    one = {s: (lowered[s] if s == 100 else [x + 0.1 * float(torch.randn(1, generator=g)) for x in base[s]])
           for s in base}
    assert not detection(base, one, _pilot(), replicates=2000, seed=0, level=0.95)["detected"]
    # an effect whose CI excludes 0 but is wider than half of it: not clear enough
    noisy = {s: [x - 0.3 + 2.0 * float(torch.randn(1, generator=g)) for x in base[s]] for s in base}
    for entry in detection(base, noisy, _pilot(), replicates=2000, seed=0, level=0.95)["per_seed"]:
        assert not entry["detected"] or entry["half_width"] <= 0.5 * abs(entry["difference"])
    # opposite directions on two seeds do not add up
    mixed = {s: [x + (1.0 if s == 100 else -1.0) * (s != 102) for x in base[s]] for s in base}
    assert not detection(base, mixed, _pilot(), replicates=2000, seed=0, level=0.95)["detected"]


def test_pilot_predicts_the_run_by_placing_tasks_on_the_first_free_worker():
    costs = {"serial_seconds": 10.0, "evaluation_seconds": {"128": 5.0},
             "cycle_seconds": {"baseline": 1.0, "control": 2.0}}
    # 3 seeds: foresight 3 x 205, control 3 x 205, baseline 3 x 105, starts 3 x 5, in that order, each on the
    # first free worker: A runs F F C B B (825 s), B runs F C C B S S S (735 s)
    assert predict_seconds(costs, generator_steps=100, eval_videos=128, seed_count=3, workers=2) == pytest.approx(
        10 + OVERHEAD_SECONDS + 825)
    assert predict_seconds(costs, generator_steps=100, eval_videos=128, seed_count=1, workers=1) == pytest.approx(
        10 + OVERHEAD_SECONDS + 205 + 205 + 105 + 5)


def test_pilot_chooses_the_cheapest_detecting_candidate_then_the_most_seeds_in_budget():
    def candidate(steps, videos, detected, seconds):
        return {"generator_steps": steps, "eval_videos": videos, "detection": {"detected": detected},
                "predicted_seconds": {"3": seconds, "4": seconds + 60}}

    pilot = _pilot()
    chosen = choose([candidate(50, 128, False, 200), candidate(100, 128, True, 380), candidate(100, 256, True, 400),
                     candidate(50, 256, True, 460)], pilot)
    assert chosen == {"generator_steps": 100, "eval_videos": 128, "seeds": [0, 1, 2, 3], "predicted_seconds": 440}
    chosen = choose([candidate(100, 128, True, 420)], pilot)
    assert chosen["seeds"] == [0, 1, 2]  # 4 seeds would take 480 s
    assert choose([candidate(100, 128, False, 100), candidate(200, 128, True, 451)], pilot) is None


def test_the_pilot_addendum_is_the_one_its_document_records_and_its_choice_follows_the_rule():
    """Registration 2's addendum has the sha256 docs/demo-registration-2-pilot.md records, and its choice is the
    registered rule applied by hand to its own record: the detecting candidates within the budget, the shortest
    predicted time (then fewer steps, fewer videos), then the most seeds that keep it within the budget."""
    path = registration_module.addendum_path(2)
    recorded = re.search(r"sha256\s+`([0-9a-f]{64})`", (ROOT / "docs" / "demo-registration-2-pilot.md").read_text())
    assert recorded and recorded.group(1) == hashlib.sha256(path.read_bytes()).hexdigest()
    addendum = json.loads(path.read_text())
    pilot = load_config(2, addendum=False).pilot
    fewest = str(min(pilot.seed_counts))

    def detected(candidate):  # per seed: the CI excludes 0, half-width at most half the difference; one direction
        signs = [1 if s["difference"] > 0 else -1 for s in candidate["detection"]["per_seed"]
                 if (s["low"] > 0 or s["high"] < 0) and (s["high"] - s["low"]) / 2 <= 0.5 * abs(s["difference"])]
        return max(signs.count(1), signs.count(-1)) >= pilot.min_detecting_seeds

    fitting = [c for c in addendum["pilot"]["candidates"]
               if detected(c) and c["predicted_seconds"][fewest] <= pilot.budget_seconds]
    best = min(fitting, key=lambda c: (c["predicted_seconds"][fewest], c["generator_steps"], c["eval_videos"]))
    seeds = max(n for n in pilot.seed_counts if best["predicted_seconds"][str(n)] <= pilot.budget_seconds)
    chosen = addendum["chosen"]
    assert (chosen["generator_steps"], chosen["eval_videos"], chosen["seeds"]) == (
        best["generator_steps"], best["eval_videos"], list(range(seeds)))

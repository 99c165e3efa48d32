"""The image demo: its world's rules, the AR model's causality, the verdict arithmetic,
option checks, and the --quick run end to end."""

import json
import math

import pytest
import torch

from mirai_plugin import MiraiError
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.demo.image import ARMS, ImageDemoConfig, make_image_config, new_model, train_arm
from mirai_plugin.tooling.demo.image_models import MaskedTokenEncoder
from mirai_plugin.tooling.demo.image_report import summarise
from mirai_plugin.tooling.demo.image_world import FAMILIES, VOCAB, ImageWorld, nll_per_token, satisfies
from mirai_plugin.tooling.demo.progress import Progress

MIRROR, RECTANGLE, RECURRENCE = (FAMILIES.index(name) for name in ("mirror", "rectangle", "recurrence"))


# ---------------------------------------------------------------- the world


def test_world_is_deterministic_and_every_true_sample_obeys_its_rule():
    world = ImageWorld()
    grids, labels = world.sample(300, seed=1)
    again, _ = world.sample(300, seed=1)
    assert torch.equal(grids, again) and not torch.equal(grids, world.sample(300, seed=2)[0])
    assert grids.shape == (300, 8, 8) and grids.min() >= 0 and grids.max() < VOCAB
    assert labels.bincount().tolist() == [100, 100, 100]
    assert satisfies(grids, labels).all()
    # the rules are not trivially satisfied: unstructured token grids fail every one of them
    noise = torch.randint(VOCAB, (300, 8, 8), generator=torch.Generator().manual_seed(0))
    assert not satisfies(noise, labels).any()


def _change(grid, row, col, g):
    value = (int(grid[row, col]) + 1 + int(torch.randint(VOCAB - 1, (1,), generator=g))) % VOCAB
    corrupted = grid.clone()
    corrupted[row, col] = value  # always a different token
    return corrupted


@pytest.mark.parametrize("family", [MIRROR, RECTANGLE])
def test_any_single_token_change_breaks_a_mirror_or_a_rectangle(family):
    world, g = ImageWorld(), torch.Generator().manual_seed(0)
    grids, labels = world.sample(40, seed=3, labels=torch.full((40,), family))
    corrupted = torch.stack([
        _change(grid, int(torch.randint(8, (1,), generator=g)), int(torch.randint(8, (1,), generator=g)), g)
        for grid in grids
    ])
    assert not satisfies(corrupted, labels).any()


def test_recurrence_rejects_a_changed_edge_and_ignores_the_noise():
    world, g = ImageWorld(), torch.Generator().manual_seed(0)
    grids, labels = world.sample(30, seed=4, labels=torch.full((30,), RECURRENCE))
    bottom = torch.stack([_change(grid, 7, i % 8, g) for i, grid in enumerate(grids)])
    top = torch.stack([_change(grid, 0, i % 8, g) for i, grid in enumerate(grids)])
    swapped = grids.clone()
    swapped[:, 7] = grids.roll(1, dims=0)[:, 7]  # another image's bottom row: its colour, not this one's
    for broken in (bottom, top, swapped[grids[:, 0, 0] != grids.roll(1, dims=0)[:, 0, 0]]):
        assert not satisfies(broken, labels[: len(broken)]).any()
    noise = torch.stack([_change(grid, 1 + i % 6, i % 8, g) for i, grid in enumerate(grids)])
    assert satisfies(noise, labels).all()  # the noise rows are free


def test_data_entropy_is_the_mean_log_likelihood_and_below_uniform():
    world = ImageWorld()
    grids, labels = world.sample(300, seed=5)
    floor = nll_per_token(grids, labels)
    assert 0.5 < floor < math.log(VOCAB)
    # a rectangle: colour pair, four extents, nothing else is random
    rect, rect_labels = world.sample(1, seed=0, labels=torch.tensor([RECTANGLE]))
    assert nll_per_token(rect, rect_labels) < (math.log(16 * 15) + 4 * math.log(6)) / 64 + 1e-9


# --------------------------------------------------------------- the models


def test_ar_model_is_causal_each_token_sees_only_the_ones_before_it():
    world = ImageWorld()
    model = new_model(make_image_config(quick=True), world, seed=0).eval()
    grids, labels = world.sample(2, seed=0)
    idx = grids.flatten(1)[:, :-1]  # LlamaGen's training input: the image without its last token
    later = 30
    changed = idx.clone()
    changed[:, later] = (changed[:, later] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx, labels), model(changed, labels)
    assert before.shape == (2, 64, VOCAB)
    # position p = 1 + t holds token t; logits at positions <= later + 0 never see it
    torch.testing.assert_close(before[:, : later + 1], after[:, : later + 1], rtol=0, atol=0)
    assert not torch.allclose(before[:, later + 1], after[:, later + 1])


def test_cached_sampling_draws_from_the_full_forward_distribution():
    world = ImageWorld()
    model = new_model(make_image_config(quick=True), world, seed=0).eval()
    labels = torch.tensor([0, 1, 2, 0])
    sampled = model.sample(labels, generator=torch.Generator().manual_seed(5))
    # the plain loop: the whole prefix through forward() at every step, same random draws
    g, idx = torch.Generator().manual_seed(5), torch.empty(4, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(64):
            idx = torch.cat([idx, torch.multinomial(model(idx, labels)[:, -1].softmax(-1), 1, generator=g)], dim=1)
    assert sampled.shape == (4, 64) and torch.equal(sampled, idx)


def test_masked_encoder_is_bidirectional():
    encoder = MaskedTokenEncoder(vocab=VOCAB, tokens=64, dim=16, depth=2, heads=2).eval()
    grids, _ = ImageWorld().sample(2, seed=0)
    images = grids.flatten(1)
    changed = images.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(encoder.features(images)[:, 0], encoder.features(changed)[:, 0])  # sees the future


def test_arms_share_initial_weights_and_data_order():
    # With the term off for the whole run (a warm-up as long as training), Mirai-E's run is
    # the baseline's, bit for bit: same init, same batches, and nothing else touches the model.
    cfg = make_image_config(quick=True, steps=4, eval_every=2, val_images=8, warmup_fraction=1.0)
    world, progress = ImageWorld(), Progress(enabled=False)
    validation = world.sample(8, seed=9)
    validation = (validation[0].flatten(1), validation[1])
    base = train_arm(cfg, world, "baseline", 0, None, validation, progress)
    ema = train_arm(cfg, world, "mirai-e", 0, None, validation, progress)
    assert ema.foresight_terms == [] and base.val_losses == ema.val_losses
    assert all(torch.equal(p, q) for p, q in zip(base.model.parameters(), ema.model.parameters()))


# ------------------------------------------------------------ the verdict


def _fake(coherence, curve):
    return {"coherence": coherence, "final_val_loss": curve[-1], "val_steps": [0, 25, 50, 75, 100],
            "val_loss": curve, "train_step_seconds": 0.01}


def test_verdicts_are_computed_from_the_numbers():
    base = [_fake(0.40, [2.0, 1.5, 1.2, 1.1, 1.0]), _fake(0.42, [2.0, 1.6, 1.3, 1.1, 1.01]),
            _fake(0.41, [2.0, 1.4, 1.1, 1.0, 0.99])]  # thresholds (the loss at step 50): 1.2, 1.3, 1.1
    better = [_fake(0.60, [1.1, 1.0, 1.0, 0.95, 0.9]), _fake(0.63, [1.2, 1.2, 1.0, 0.95, 0.92]),
              _fake(0.61, [1.05, 1.05, 1.0, 0.95, 0.91])]  # below the threshold from the start
    worse = [_fake(0.20, [2.0, 1.8, 1.6, 1.4, 1.25]), _fake(0.22, [2.0, 1.8, 1.6, 1.45, 1.35]),
             _fake(0.21, [2.0, 1.8, 1.5, 1.3, 1.2])]
    noisy = [_fake(0.50, [2.0, 1.4, 1.15, 1.0, 0.95]), _fake(0.30, [2.0, 1.7, 1.4, 1.2, 1.1]),
             _fake(0.41, [2.0, 1.3, 1.05, 1.0, 0.99])]
    summary = summarise({"baseline": base, "better": better, "worse": worse, "noisy": noisy}, eval_every=25, steps=100)
    assert summary["verdict"]["better"].startswith("helped (3 of 3")
    assert summary["verdict"]["worse"].startswith("hurt (3 of 3")
    assert summary["verdict"]["noisy"].startswith("no clear difference")
    assert [r["steps_to_threshold"] for r in base] == [50, 50, 50]
    assert [r["steps_to_threshold"] for r in better] == [0, 0, 0]
    assert [r["steps_to_threshold"] for r in worse] == [125, 125, 125]  # never reached: censored at steps + eval_every
    # one validation interval on every seed is within the step count's resolution
    one_interval = [_fake(0.4, [2.0, 1.1, 1.0, 0.95, 0.9]) for _ in range(3)]
    assert summarise({"baseline": base, "arm": one_interval}, eval_every=25, steps=100)["metric_verdicts"]["arm"][
        "steps to reach the baseline's mid-training validation loss"] == "no clear difference"
    # two seeds moving the same way by different amounts do not pass the t-test
    two = summarise({"baseline": base[:2], "arm": [_fake(0.5, base[0]["val_loss"]), _fake(0.9, base[1]["val_loss"])]},
                    eval_every=25, steps=100)
    assert two["metric_verdicts"]["arm"][next(iter(two["metric_verdicts"]["arm"]))] == "no clear difference"


# ---------------------------------------------------------------- options


def test_image_demo_options_are_validated(capsys):
    with pytest.raises(MiraiError, match="layer 4 out of range"):
        make_image_config(layer=4)
    with pytest.raises(MiraiError, match="too few"):
        make_image_config(steps=10)
    with pytest.raises(MiraiError, match="at least one seed"):
        make_image_config(seeds=())
    assert main(["demo", "--image", "--offsets", "0", "1"]) == 2
    assert "video demo only" in capsys.readouterr().err
    assert main(["demo", "--image", "--seeds", "0"]) == 2
    assert "at least one seed" in capsys.readouterr().err
    cfg = ImageDemoConfig()
    assert cfg.foresight("baseline") is None
    assert cfg.foresight("mirai-e").offsets == ((0, 0), (0, 1), (1, 0)) and cfg.foresight("mirai-i").neighbours == 1
    assert cfg.foresight("mirai-e").weight_at(cfg.warmup_steps - 1) == 0.0
    assert [cfg.foresight("mirai-i").weight_at(s) for s in (0, cfg.steps // 2)] == [2.0, 1.0]


# --------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_image_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--image", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "structure coherence" in printed and "verdict mirai-e:" in printed and "verdict mirai-i:" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["per_seed"]) == set(ARMS) and all(len(runs) == 2 for runs in results["per_seed"].values())
    assert set(results["verdict"]) == {"mirai-e", "mirai-i"}
    assert all(
        v.split(" (")[0] in ("helped", "hurt", "mixed", "no clear difference") for v in results["verdict"].values()
    )
    baseline, ema, encoder = (results["per_seed"][arm][0] for arm in ARMS)
    assert baseline["final_foresight_term"] is None
    assert ema["final_foresight_term"] < 0 and encoder["final_foresight_term"] < 0  # a negative cosine, weighted
    assert 0 <= baseline["coherence"] <= 1 and set(baseline["coherence_by_family"]) == set(FAMILIES)
    assert baseline["val_loss"][-1] < baseline["val_loss"][0]  # it learns
    assert results["foresight"]["mirai-e"]["ema_decay"] == 0.99
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as image:
        assert image.size[0] > 400

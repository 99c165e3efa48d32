"""`config check`, `flops` and `memory` on Rolling Forcing's and Causal-Forcing long_video's configs
(docs/rolling-forcing.md): read with `--upstream` by the glue's own reader, never detected, and the rolling
window's cost counted; the FLOP counts against closed forms worked out by hand."""

from __future__ import annotations

import json

import pytest

from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.resolve import resolve_rolling_forcing
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.flops import (
    CycleShape,
    TransformerShape,
    cycle_for,
    dmd_cycle,
    rolling_rollout,
    rolling_windows,
)
from mirai_plugin.tooling.trainer_config import load_trainer_config

pytest.importorskip("omegaconf")

DEFAULTS = "num_training_frames: 27\nindependent_first_frame: false\nsame_step_across_blocks: true\n"
SHIPPED = """\
real_name: Wan2.1-T2V-14B
denoising_step_list: [1000, 800, 600, 400, 200]
warp_denoising_step: true
mixed_precision: true
sharding_strategy: hybrid_full
batch_size: 1
dfake_gen_update_ratio: 5
image_or_video_shape: [1, 21, 16, 60, 104]
distribution_loss: dmd
trainer: score_distillation
gradient_checkpointing: true
num_frame_per_block: 3
"""
FORESIGHT = "foresight_weight: 0.2\nforesight_student_layer: 15\nforesight_teacher_layer: 20\n"


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A config written as the shipped rolling_forcing_dmd.yaml plus foresight keys, beside its defaults."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default_config.yaml").write_text(DEFAULTS)

    def write(extra: str = "", steps: str = "[1000, 800, 600, 400, 200]") -> str:
        path = tmp_path / "video_mirai_rolling_forcing_dmd.yaml"
        path.write_text(SHIPPED.replace("[1000, 800, 600, 400, 200]", steps) + FORESIGHT + extra)
        return str(path)

    return write


def run(capsys, *argv):
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_windows_grow_slide_and_shrink():
    windows = rolling_windows(7, 5)  # 21 frames, L = 5: the frame counts and starts docs/rolling-forcing.md lists
    assert [3 * count for _, count in windows] == [3, 6, 9, 12, 15, 15, 15, 12, 9, 6, 3]
    assert [3 * first for first, _ in windows] == [0, 0, 0, 0, 0, 3, 6, 9, 12, 15, 18]
    for blocks, steps in ((7, 5), (9, 5), (7, 4), (9, 4), (2, 5)):
        windows = rolling_windows(blocks, steps)
        assert len(windows) == blocks + steps - 1
        assert sum(count for _, count in windows) == blocks * steps  # every block is in L windows


# A block of width 1, no FFN, no text: forward(q, k) = 8 q + 4 q k, so a rollout's FLOPs are sums of
# queries and of queries x keys over its calls. s = 1 token per frame, n = 3 tokens per block.
TOY = TransformerShape(dim=1, depth=1, ffn_dim=0, text_tokens=0, cross_attention=False)


def toy_cycle(frames, steps, **changes):
    return CycleShape(**{**dict(generator=TOY, frames=frames, tokens_per_frame=1, segment_frames=3,
                                denoising_steps=steps, window_frames=21, attention_frames=21,
                                rolling_window_blocks=steps, rolling_share=0.5, checkpointing=True), **changes})


def test_a_rolling_rollout_of_21_frames_against_its_closed_form():
    # L = 5, B = 7. Windows (blocks x keys in blocks): growing 1x1 .. 5x5 (55), sliding 5x6 + 5x7 (65),
    # shrinking 4x7 + 3x7 + 2x7 + 1x7 (70): sum q k = 190 n^2 over 35 n queries. Cache calls: one block
    # each, keys 1 (five times, first block 0) then 2..7: 32 n^2 over 11 n. Every window ends inside the
    # DMD window (the whole rollout): the grad windows' expectation is 1/5 of all window calls.
    forward, grad = rolling_rollout(toy_cycle(21, 5))
    n = 3
    assert forward == 8 * (35 + 11) * n + 4 * (190 + 32) * n * n
    assert grad == pytest.approx((8 * 35 * n + 4 * 190 * n * n) / 5)


def test_a_rolling_rollout_of_27_frames_attends_to_21_frames_at_most():
    # L = 5, B = 9, keys capped at 7 blocks: sum q k = 1+4+9+16+25+30+35+35+35+28+21+14+7 = 260 over 45 n;
    # cache calls: 5 x 1 + (2+3+4+5+6+7+7+7) = 46 over 13 n. The first two windows (blocks 0 and 0-1) end
    # before the DMD window (frame 6): the grad expectation is 1/5 of the rest, 42 n queries and 255 n^2.
    forward, grad = rolling_rollout(toy_cycle(27, 5))
    n = 3
    assert forward == 8 * (45 + 13) * n + 4 * (260 + 46) * n * n
    assert grad == pytest.approx((8 * 42 * n + 4 * 255 * n * n) / 5)


def test_the_cycle_takes_the_expectation_over_the_two_rollout_modes():
    rolling = toy_cycle(27, 4)
    plain = toy_cycle(27, 4, rolling_window_blocks=None)
    forward, grad = rolling_rollout(rolling)
    mixed, sf = dmd_cycle(rolling)["terms"], dmd_cycle(plain)["terms"]
    rollout, backward = "generator rollout (generator step)", "generator backward"
    assert mixed[rollout] == pytest.approx(0.5 * forward + 0.5 * sf[rollout])
    assert mixed[backward] == pytest.approx(3 * 0.5 * grad + 0.5 * sf[backward])
    assert mixed["generator rollouts (critic steps, no grad)"] == pytest.approx(5 * mixed[rollout])
    for name in ("real score forwards (cond + uncond)", "fake score forward (generator step)"):
        assert mixed[name] == sf[name]  # the scores see the same 21 frames in either mode


def test_the_tools_read_the_config_through_the_glues_reader(config, capsys):
    path = config()
    status, out, _ = run(capsys, "flops", path, "--upstream", "rolling-forcing", "--json")
    assert status == 0
    result = json.loads(out)
    loaded = load_trainer_config(path, upstream="rolling-forcing")
    assert loaded.merged_over is not None
    resolved = resolve_rolling_forcing(loaded.config)
    expected = dmd_cycle(cycle_for(resolved), resolved.foresight)
    assert result["baseline"] == pytest.approx(expected["baseline"])
    assert result["foresight"] == pytest.approx(expected["foresight"])
    assert result["cycle"]["rolling_window_blocks"] == 5 and result["cycle"]["frames"] == 27
    assert result["upstream"] == {"name": "rolling-forcing", "how": "given", "reason": "--upstream", "alternatives": []}
    for tool in (["memory"], ["config", "check"]):
        status, out, _ = run(capsys, *tool, path, "--upstream", "rolling-forcing", "--json")
        assert status == 0 and json.loads(out)["resolved" if tool == ["memory"] else "trainer"]


def test_causal_forcing_long_video_is_the_same_reader_with_four_steps(config, capsys):
    path = config(steps="[1000, 750, 500, 250]")
    status, out, _ = run(capsys, "config", "check", path, "--upstream", "causal-forcing-long-video", "--json")
    report = json.loads(out)
    assert status == 0 and report["upstream"]["name"] == "causal-forcing-long-video"
    assert report["trainer"]["rolling_window_blocks"] == 4 and report["trainer"]["attention_frames"] == 21
    assert report["glue"]["foresight_window_blocks"] == "all"


def test_detection_never_picks_the_rolling_readers(config, capsys):
    path = config()
    detection = load_trainer_config(path).detection
    assert detection.upstream == "self-forcing" and detection.how == "detected"
    assert {"rolling-forcing", "causal-forcing-long-video"} <= set(detection.alternatives)
    status, out, _ = run(capsys, "flops", path)
    first = out.splitlines()[0]
    assert status == 0 and first.startswith("upstream: self-forcing (detected") and "rolling-forcing" in first
    with pytest.raises(MiraiError, match="foresight_window_blocks applies to the glues of rolling-forcing"):
        load_trainer_config(config("foresight_window_blocks: last\n"))  # detected: Self-Forcing's reader refuses


@pytest.mark.parametrize(("extra", "message"), [
    ("foresight_window_blocks: last\nforesight_head_sharding: fsdp\n", "use foresight_head_sharding: replicate"),
    ("foresight_window_blocks: noise_below\n", "set foresight_window_max_timestep"),
])
def test_config_check_refuses_what_the_glue_refuses(config, capsys, extra, message):
    status, _, err = run(capsys, "config", "check", config(extra), "--upstream", "rolling-forcing")
    assert status != 0 and message in err and "read as rolling-forcing (--upstream)" in err


def test_stage_does_not_apply_to_the_rolling_readers(config):
    with pytest.raises(MiraiError, match="--stage applies to the Self-Forcing layout"):
        load_trainer_config(config(), upstream="rolling-forcing", stage="dmd")


def test_without_the_defaults_the_rollout_is_the_trainers_own_21_frames(config, capsys):
    status, out, _ = run(capsys, "flops", config(), "--upstream", "rolling-forcing", "--no-defaults", "--json")
    cycle = json.loads(out)["cycle"]
    assert status == 0 and cycle["frames"] == 21 and cycle["rolling_window_blocks"] == 5

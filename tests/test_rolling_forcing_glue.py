"""The Rolling Forcing glue's per-call block split (docs/rolling-forcing.md): captured window calls -> DMD window
blocks, checked against the same joint calls run without capture and sliced by hand.

The rollouts here follow the rules docs/rolling-forcing.md states for the trainer (windows of up to L blocks,
grad windows ``w % L == exit_flag`` ending inside the last 21 frames, a no-grad context call on each window's
first block; or one-block self-forcing calls) on a toy generator whose blocks mix tokens across the whole call,
as the window's bidirectional attention does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mirai_plugin import HiddenRecord, capture_hidden
from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.rolling_forcing import supervised_blocks, window_blocks
from mirai_plugin.records import split_into_segments

FRAMES_PER_BLOCK, TOKENS_PER_FRAME, WIDTH, LAYER, WINDOW = 3, 2, 4, 1, 21
N = FRAMES_PER_BLOCK * TOKENS_PER_FRAME  # tokens per block


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, *, current_start):
        return torch.tanh(self.linear(x)) + x.mean(dim=1, keepdim=True) + current_start  # every token sees the call


class _Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x, *, current_start):
        for block in self.blocks:
            x = block(x, current_start=current_start)
        return x

    def hidden(self, x, *, current_start):
        """The output of ``blocks[LAYER]``, computed without hooks: the oracle."""
        for block in self.blocks[:LAYER + 1]:
            x = block(x, current_start=current_start)
        return x


def _rolling(model, *, frames, steps, exit_flag):
    """The grad-enabled calls of a rolling rollout, as (first block, blocks, input); runs every call."""
    blocks, start_gradient = frames // FRAMES_PER_BLOCK, frames - WINDOW
    torch.manual_seed(frames * 10 + steps)
    noise = torch.randn(1, blocks * N, WIDTH)  # (b u d): the rollout's inputs, block after block
    calls = []
    for w in range(blocks + steps - 1):
        first, last = max(0, w - steps + 1), min(blocks - 1, w)
        x = noise[:, first * N:(last + 1) * N] * (w + 1)  # (b u d)
        grad = w % steps == exit_flag and (last + 1) * FRAMES_PER_BLOCK > start_gradient
        with torch.set_grad_enabled(grad):
            model(x, current_start=first * N)
        with torch.no_grad():
            model(x[:, :N], current_start=first * N)  # the cache refresh: the window's first block only
        if grad:
            calls.append((first, last - first + 1, x))
    return calls


def _self_forcing(model, *, frames, steps, exit_step):
    """The grad-enabled calls of a self-forcing rollout: one block per call, from the gradient range on."""
    blocks, start_gradient = frames // FRAMES_PER_BLOCK, frames - WINDOW
    torch.manual_seed(frames)
    calls = []
    for b in range(blocks):
        x = torch.randn(1, N, WIDTH)  # (b n d)
        for step in range(steps):
            grad = step == exit_step and b * FRAMES_PER_BLOCK >= start_gradient
            with torch.set_grad_enabled(grad):
                model(x * (step + 1), current_start=b * N)
            if step == exit_step:
                if grad:
                    calls.append((b, 1, x * (step + 1)))
                break
        with torch.no_grad():
            model(x, current_start=b * N)
    return calls


def _split(model, rollout, **kwargs):
    with capture_hidden(model, LAYER) as captured:
        calls = rollout(model, **kwargs)
    blocks = window_blocks(captured.records, tokens_per_frame=TOKENS_PER_FRAME, frames_per_block=FRAMES_PER_BLOCK,
                           window_frames=WINDOW)
    return blocks, calls


def _check_against_joint_calls(model, blocks, calls, frames):
    first_block = (frames - WINDOW) // FRAMES_PER_BLOCK  # rollout block of window segment 0
    assert [b.segment for b in blocks] == list(range(WINDOW // FRAMES_PER_BLOCK))
    for b in blocks:
        block = first_block + b.segment
        (first, count, x), = [c for c in calls if c[0] <= block < c[0] + c[1]]
        with torch.no_grad():
            joint = model.hidden(x, current_start=first * N)  # (b u d), the same call without capture
        j = block - first
        assert torch.equal(b.record.hidden, joint[:, j * N:(j + 1) * N])
        assert (b.index_in_call, b.call_blocks, b.last_in_call) == (j, count, j == count - 1)
        assert b.record.position == b.segment * N
        assert b.rollout_block == block
        assert b.record.hidden.requires_grad


@pytest.mark.parametrize("frames", [21, 24, 27])
@pytest.mark.parametrize("steps", [4, 5])
def test_rolling_calls_split_into_the_window_blocks_of_the_joint_calls(frames, steps):
    model = _Generator()
    for exit_flag in range(steps):
        blocks, calls = _split(model, _rolling, frames=frames, steps=steps, exit_flag=exit_flag)
        _check_against_joint_calls(model, blocks, calls, frames)
        assert any(count > 1 for _, count, _ in calls)  # a rolling rollout holds multi-block grad calls


@pytest.mark.parametrize("frames", [21, 27])
def test_self_forcing_calls_are_one_block_each(frames):
    model = _Generator()
    blocks, calls = _split(model, _self_forcing, frames=frames, steps=4, exit_step=2)
    _check_against_joint_calls(model, blocks, calls, frames)
    assert all(b.call_blocks == 1 and b.last_in_call for b in blocks)


def test_a_straddling_window_loses_its_blocks_before_the_dmd_window():
    """27 frames, L = 5, exit 2: the grad windows are blocks 0-2, 3-7 and 8; blocks 0 and 1 are dropped."""
    model = _Generator()
    blocks, calls = _split(model, _rolling, frames=27, steps=5, exit_flag=2)
    assert [(first, count) for first, count, _ in calls] == [(0, 3), (3, 5), (8, 1)]
    assert [(b.index_in_call, b.call_blocks) for b in blocks] == [(2, 3), *[(j, 5) for j in range(5)], (0, 1)]


def test_the_blocks_feed_the_head_split_and_carry_the_graph():
    model = _Generator()
    blocks, _ = _split(model, _rolling, frames=24, steps=4, exit_flag=1)
    chunks, segments = split_into_segments([b.record for b in blocks], width=WIDTH, segment_frames=FRAMES_PER_BLOCK,
                                           tokens_per_frame=TOKENS_PER_FRAME, prefix_frames=0)
    assert segments == list(range(7))
    sum(c.sum() for c in chunks).backward()
    assert model.blocks[0].linear.weight.grad.abs().sum() > 0
    assert model.blocks[LAYER + 1].linear.weight.grad is None


def test_an_in_place_edit_after_capture_is_still_detected():
    model = _Generator()
    blocks, _ = _split(model, _rolling, frames=21, steps=5, exit_flag=0)
    with torch.no_grad():
        blocks[3].record.hidden.mul_(2)  # edits the call's capture, which the other blocks of the call share
    with pytest.raises(MiraiError, match="modified in place"):
        split_into_segments([b.record for b in blocks], width=WIDTH, segment_frames=FRAMES_PER_BLOCK,
                            tokens_per_frame=TOKENS_PER_FRAME, prefix_frames=0)


def _record(blocks, first_block, index=0):
    hidden = torch.zeros(1, blocks * N, WIDTH)
    return HiddenRecord(hidden, first_block * N, index, hidden._version)


def _place(records, window=WINDOW):
    return window_blocks(records, tokens_per_frame=TOKENS_PER_FRAME, frames_per_block=FRAMES_PER_BLOCK,
                         window_frames=window)


@pytest.mark.parametrize(("records", "message"), [
    ([], "no grad-enabled generator call"),
    ([_record(5, 0), _record(3, 4, 1)], r"window block 4 .* captured by two"),
    ([_record(5, 0), _record(1, 6, 1)], r"window blocks \[5\] of 7 were not captured"),
    ([HiddenRecord(torch.zeros(1, N, WIDTH), N + 1, 0, 0)], "not a block boundary"),
    ([HiddenRecord(torch.zeros(1, N + 1, WIDTH), 0, 0, 0)], "whole blocks of 6 tokens"),
    ([HiddenRecord(torch.zeros(1, N, WIDTH), None, 0, 0)], "carries no current_start"),
    ([_record(5, 0)], "the DMD window has 21 frames but the captured rollout only 15"),
])
def test_errors_name_the_call(records, message):
    with pytest.raises(MiraiError, match=message):
        _place(records)


def test_a_window_of_partial_blocks_is_refused():
    with pytest.raises(MiraiError, match="not a whole number of blocks"):
        _place([_record(7, 0)], window=20)


@pytest.mark.parametrize("frames", [21, 24, 27])
@pytest.mark.parametrize("steps", [4, 5])
def test_last_keeps_the_newest_block_of_each_grad_call(frames, steps):
    model = _Generator()
    first_window_block = (frames - WINDOW) // FRAMES_PER_BLOCK
    for exit_flag in range(steps):
        blocks, calls = _split(model, _rolling, frames=frames, steps=steps, exit_flag=exit_flag)
        newest = sorted(first + count - 1 - first_window_block for first, count, _ in calls)  # window blocks
        kept = supervised_blocks(blocks, rule="last", first_block="supervise")
        assert [b.segment for b in kept] == [k for k in newest if k >= 0]


@pytest.mark.parametrize(("frames", "first_block", "dropped"), [
    (21, "as_dmd", False), (24, "as_dmd", True), (27, "as_dmd", True),
    (21, "mask", True), (27, "supervise", False),
])
def test_the_first_window_block_follows_dmds_gradient_mask(frames, first_block, dropped):
    model = _Generator()
    blocks, _ = _split(model, _rolling, frames=frames, steps=5, exit_flag=3)
    kept = [b.segment for b in supervised_blocks(blocks, first_block=first_block)]
    assert kept == list(range(int(dropped), WINDOW // FRAMES_PER_BLOCK))


def test_noise_below_keeps_the_blocks_at_or_under_the_timestep():
    model = _Generator()
    blocks, _ = _split(model, _self_forcing, frames=27, steps=4, exit_step=1)
    timesteps = {b.rollout_block: float(100 * b.rollout_block) for b in blocks}
    kept = supervised_blocks(blocks, rule="noise_below", first_block="supervise", max_timestep=500, timesteps=timesteps)
    assert [b.rollout_block for b in kept] == [2, 3, 4, 5]
    with pytest.raises(MiraiError, match=r"no timestep recorded for rollout block 3 \(window block 1\)"):
        supervised_blocks(blocks, rule="noise_below", max_timestep=500, timesteps={2: 0.0})
    with pytest.raises(MiraiError, match="needs foresight_window_max_timestep"):
        supervised_blocks(blocks, rule="noise_below")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rule": "first"}, "foresight_window_blocks='first'; choose one of all, last, noise_below"),
    ({"first_block": "drop"}, "foresight_window_first_block='drop'; choose one of as_dmd, supervise, mask"),
])
def test_unknown_choices_name_the_key_and_the_choices(kwargs, message):
    with pytest.raises(MiraiError, match=message):
        supervised_blocks([], **kwargs)

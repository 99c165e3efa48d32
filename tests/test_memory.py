"""The memory formula against the bytes real tensors hold, on tiny heads."""

import json
import math

import pytest
import torch

from mirai_plugin import ForesightConfig, ForesightHead, MiraiError
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.flops import CycleShape
from mirai_plugin.tooling.memory import foresight_memory, memory_for_cycle

D, E, TOKENS_PER_FRAME, FRAMES, BATCH = 16, 24, 4, 4, 2  # 4 segments of 1 frame


def tiny_config(**changes):
    return ForesightConfig(**{"num_heads": 2, "segment_frames": 1, "predictor_depth": 2, **changes})


def tiny_memory(config, **kwargs):
    kwargs.setdefault("compute_dtype", torch.float32)
    return foresight_memory(config, student_dim=D, encoder_dim=E, frames=FRAMES, tokens_per_frame=TOKENS_PER_FRAME,
                            batch_per_rank=BATCH, **kwargs)


def rollout(dtype=torch.float32, seed=0):
    """Captured states (one (b n d) per segment) and the encoder output (b t e)."""
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(BATCH, TOKENS_PER_FRAME, D, generator=g).to(dtype).requires_grad_() for _ in range(FRAMES)]
    return hidden, torch.randn(BATCH, FRAMES * TOKENS_PER_FRAME, E, generator=g).to(dtype)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_for_backward(head, run):
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in head.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


HEADS = {
    "dit": tiny_config(),
    "mlp": tiny_config(predictor="mlp"),
    "multi_mlp": tiny_config(predictor="multi_mlp", fusion="none"),
    "dit_adaln": tiny_config(offset_conditioning=True, fusion="none"),
}


@pytest.mark.parametrize("name", HEADS)
def test_head_state_equals_real_parameters_gradients_and_adamw(name):
    config = HEADS[name]
    head = ForesightHead(config, D, E)
    memory = tiny_memory(config)
    hidden, z = rollout()
    head(hidden, z).backward()

    assert memory.parameter_count == sum(p.numel() for p in head.parameters())
    assert memory.parameters == nbytes(head.parameters())
    assert memory.gradients == nbytes(p.grad for p in head.parameters())
    head.step()
    state = head.optimizer.state
    assert len(state) == len(list(head.parameters()))
    assert {key for s in state.values() for key in s} == {"step", "exp_avg", "exp_avg_sq"}
    assert memory.optimizer_state == nbytes(s[key] for s in state.values() for key in ("exp_avg", "exp_avg_sq"))
    assert all(s["step"].numel() == 1 for s in state.values())  # step counters: 0-dim, left out


@pytest.mark.parametrize("fusion, offsets", [("mean", (0, 1)), ("none", (1, 2)), ("frame_mean", (0, 1))])
def test_replay_cache_equals_what_the_head_keeps(fusion, offsets):
    config = ForesightConfig(num_heads=2, segment_frames=2, predictor_depth=1, fusion=fusion, offsets=offsets)
    head = ForesightHead(config, D, E)
    for micro_step in range(2):  # gradient accumulation: both micro-steps stay cached
        hidden, z = rollout(torch.bfloat16, seed=micro_step)
        hidden = [torch.cat(hidden[i : i + 2], dim=1) for i in (0, 2)]  # 2 segments of 2 frames
        head(hidden, z).backward()

    memory = tiny_memory(config, compute_dtype=torch.bfloat16, accumulation_steps=2)
    kept = nbytes(t for batch in head.replay_cache.batches for t in (batch.hidden, batch.target, batch.valid))
    assert len(head.replay_cache.batches) == 2
    assert memory.replay_cache == kept
    assert memory.replay_device_bytes == kept and memory.persistent == memory.parameters + memory.optimizer_state


@pytest.mark.parametrize("name, head_dtype", [("dit", torch.float32), ("dit", torch.bfloat16), ("mlp", torch.float32)])
def test_predictor_activations_equal_what_autograd_saves(name, head_dtype):
    config = HEADS[name]
    head = ForesightHead(config, D, E).to(head_dtype)
    memory = tiny_memory(config, head_dtype=head_dtype)
    rows = torch.randn(BATCH * FRAMES, TOKENS_PER_FRAME, D, requires_grad=True)  # every segment is supervised
    measured = saved_for_backward(head, lambda: head.predict(rows))
    assert measured == memory.predictor_activations  # the prediction is saved by the loss, not here


def test_generator_step_saves_activations_prediction_encoder_output_and_loss_buffers():
    config = tiny_config()  # the official path: fusion mean, cosine, fused loss
    head = ForesightHead(config, D, E)
    memory = tiny_memory(config)
    hidden, z = rollout()
    measured = saved_for_backward(head, lambda: head(hidden, z))
    counted = memory.predictor_activations + memory.prediction + memory.encoder_output + memory.loss_buffers
    assert 0 <= measured - counted <= 512  # plus segment indices and validity masks (int64, bool)
    assert memory.captured_states == 0 and memory.stacked_hidden == 0  # float32 in, float32 head: no copy


def test_sharded_head_is_one_nth_plus_one_unsharded_unit():
    config = tiny_config()
    head = ForesightHead(config, D, E)
    replicated, sharded = tiny_memory(config, world_size=4), tiny_memory(config, world_size=4, sharded=True)
    count = replicated.parameter_count
    assert sharded.parameters == sharded.gradients == math.ceil(count / 4) * 4
    assert sharded.optimizer_state == 2 * sharded.parameters
    assert abs(sharded.parameters - replicated.parameters / 4) < 4
    largest = max(sum(p.numel() for p in block.parameters()) for block in head.predictor.blocks)
    assert largest > count - 2 * largest  # a predictor block, not the rest, is the largest unit here
    assert sharded.unsharded_unit == 2 * largest * 4  # gathered parameters and full gradient of one unit
    assert sharded.gradient_averaging == 0 and replicated.gradient_averaging == 2 * replicated.gradients
    assert replicated.unsharded_unit == 0 and tiny_memory(config).gradient_averaging == 0
    assert sharded.predictor_activations == replicated.predictor_activations  # activations are per rank anyway
    one_unit = tiny_memory(config, world_size=4, sharded=True, fsdp_units="head")  # shard_head without a policy
    assert one_unit.unsharded_unit == 2 * count * 4 and one_unit.parameters == sharded.parameters


def test_accumulation_multiplies_only_the_replay_cache():
    one, eight = tiny_memory(tiny_config()), tiny_memory(tiny_config(), accumulation_steps=8)
    assert eight.replay_cache == 8 * one.replay_cache
    assert eight.generator_step_peak == one.generator_step_peak and eight.gradients == one.gradients


def test_replay_options():
    assert tiny_memory(tiny_config(replay=False)).replay_cache == 0
    assert tiny_memory(tiny_config(replay=False)).targets == 0  # the fused loss never builds the targets
    one_segment = tiny_memory(tiny_config(replay_segments=1))
    assert one_segment.replay_step < tiny_memory(tiny_config()).replay_step
    assert tiny_memory(tiny_config(replay_max_pairs=1)).replay_step == one_segment.replay_step
    on_gpu = tiny_memory(tiny_config(replay_device=None))
    assert on_gpu.replay_device_bytes == 0 and on_gpu.persistent > on_gpu.parameters + on_gpu.optimizer_state
    off = tiny_memory(tiny_config(weight=0.0))
    assert off.gpu_peak == off.replay_device_bytes == 0  # no head is built


def test_official_recipe():
    memory = memory_for_cycle(CycleShape(), ForesightConfig(), world_size=8, accumulation_steps=8)
    assert memory.parameter_count == 92_877_312
    n, k = 3 * 1560, 7
    assert memory.encoder_output == 21 * 1560 * 5120 * 2
    assert memory.replay_cache == 8 * (k * n * (1536 + 5120) * 2 + k * 2)
    assert "GPU peak added per rank" in memory.report()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"batch_per_rank": 0}, "batch_per_rank"),
        ({"frames": 5, "config": tiny_config(segment_frames=2)}, "divisible by segment_frames"),
        ({"frames": 1, "config": tiny_config(offsets=(1,))}, "no segment has a target"),
        ({"compute_dtype": torch.int64}, "floating torch.dtype"),
        ({"sharded": True, "fsdp_units": "layers"}, "fsdp_units"),
        ({"accumulation_steps": 1.5}, "accumulation_steps"),
        ({"config": {"weight": 0.2}}, "must be a ForesightConfig"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    arguments = {"config": tiny_config(), "student_dim": D, "encoder_dim": E, "frames": FRAMES,
                 "tokens_per_frame": TOKENS_PER_FRAME}
    arguments.update(kwargs)
    with pytest.raises(MiraiError, match=message):
        foresight_memory(arguments.pop("config"), **arguments)
    with pytest.raises(MiraiError, match="segment_frames"):
        memory_for_cycle(CycleShape(segment_frames=1), ForesightConfig())


def test_memory_command(tmp_path, capsys):
    assert main(["memory"]) == 0
    assert "GPU peak added per rank" in capsys.readouterr().out
    assert main(["memory", "--world-size", "8", "--sharded", "--accumulation", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    n, k = 3 * 1560, 7  # the recipe's 7 segments of 3 frames; 8 micro-steps of bf16 states and targets
    assert result["sharded"] and result["replay_cache"] == 8 * (k * n * (1536 + 5120) * 2 + k * 2)
    count = 92_877_312  # the recipe's head, float32, over 8 ranks
    assert result["parameters"] == result["gradients"] == math.ceil(count / 8) * 4
    config = tmp_path / "c.yaml"
    config.write_text("image_or_video_shape: [1, 21, 16, 60, 104]\nnum_frame_per_block: 1\nreal_name: Wan2.1-T2V-14B\n"
                      "foresight_weight: 0.2\nmixed_precision: false\n")
    assert main(["memory", str(config), "--json"]) == 0
    frame_wise = json.loads(capsys.readouterr().out)
    assert frame_wise["encoder_output"] == 21 * 1560 * 5120 * 4  # float32 without mixed precision
    assert main(["memory", "--world-size", "0"]) == 2
    assert "world_size" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["none", "frame_mean", "mse", "multi_mlp", "dit_adaln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_loss_paths_save_no_more_than_counted(name, dtype):
    configs = {**HEADS, "none": tiny_config(fusion="none"), "mse": tiny_config(loss="mse"),
               "frame_mean": tiny_config(fusion="frame_mean", segment_frames=2)}
    config = configs[name]
    head = ForesightHead(config, D, E)
    memory = tiny_memory(config, compute_dtype=dtype)
    hidden, z = rollout(dtype)
    if config.segment_frames == 2:
        hidden = [torch.cat(hidden[i : i + 2], dim=1) for i in (0, 2)]
    measured = saved_for_backward(head, lambda: head(hidden, z))
    assert memory.predictor_activations <= measured
    assert measured <= memory.predictor_activations + memory.prediction + memory.targets + memory.loss_buffers + 1024

"""The LongLive glue's decisions without a checkout: config reading, the encoder refusal, window segments,
scene-cut shots, and the LongLive branch of the FLOP model (the trainer itself: integration_tests)."""

import types

import pytest
import torch
from docs_tables import row
from omegaconf import OmegaConf
from test_config import OFFICIAL_RECIPE

from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.longlive import LongLiveForesight, _segment_prompt, longlive_config, resolve_longlive
from mirai_plugin.tooling.flops import WAN_2_2_5B, cycle_for, dmd_cycle
from mirai_plugin.tooling.trainer_config import normalize_longlive

LONGLIVE = {  # the sections of configs/train_dmd.yaml that the glue and the FLOP model read
    "infra": {"sharding_strategy": "hybrid_full", "mixed_precision": True, "gradient_checkpointing": True},
    "model_kwargs": {"model_name": "Wan2.2-TI2V-5B", "num_frame_per_block": 8, "local_attn_size": 32},
    "algorithm": {"all_causal": True},
    "training": {"lr": 1e-5, "dfake_gen_update_ratio": 5, "min_num_training_frames": 32,
                 "num_training_frames": 32, "slice_last_frames": 32},
    "data": {"image_or_video_shape": [1, 32, 48, 44, 80]},
    "inference": {"sampling_steps": 4, "sink_size": 0, "multi_shot_rope_offset": 8},
    "adapter": {"type": "lora", "rank": 128},
    **{k: v for k, v in OFFICIAL_RECIPE.items() if k not in ("num_frame_per_block", "lr_foresight", "weight_decay")},
    "foresight_teacher_layer": 15,
    "lr_foresight": 1e-5,
}
CAUSAL = {**LONGLIVE, "foresight_encoder": "causal_real_score"}  # the term on without an encoder checkpoint


def flatten_longlive(config):
    return normalize_longlive(OmegaConf.create(config))


def glue(**keys):
    """A LongLiveForesight whose term is off (nothing built), to call its decision helpers."""
    args = flatten_longlive({**LONGLIVE, **keys, "foresight_weight": 0})
    return LongLiveForesight(types.SimpleNamespace(generator=None, real_score=None), args)


def test_config_is_read_flat_and_nested_foresight_keys_are_refused():
    cfg = longlive_config(flatten_longlive(CAUSAL))
    assert (cfg.segment_frames, cfg.student_layer, cfg.encoder_layer, cfg.lr) == (8, 15, 15, 1e-5)
    # a key in one of LongLive's sections is flattened like its own keys; a section of one's own is not
    in_training = {**CAUSAL, "training": {**CAUSAL["training"], "foresight_weight": 0.5}}
    assert longlive_config(flatten_longlive(in_training)).weight == 0.5
    with pytest.raises(MiraiError, match="inside the 'foresight' mapping.*move these keys to the top level"):
        longlive_config({**flatten_longlive(CAUSAL), "foresight": {"foresight_weight": 0.5}})
    with pytest.raises(MiraiError, match="inside the 'model_kwargs' mapping"):
        longlive_config({**flatten_longlive(CAUSAL), "model_kwargs": {"foresight_student_layer": 3}})
    with pytest.raises(MiraiError, match="foresight_scene_cut must be one of"):
        longlive_config({**flatten_longlive(CAUSAL), "foresight_scene_cut": "drop"})


def test_the_bidirectional_encoder_needs_a_checkpoint_and_names_the_options():
    dmd = types.SimpleNamespace(generator=None, real_score=None, device=torch.device("cpu"))
    with pytest.raises(MiraiError) as error:
        LongLiveForesight(dmd, flatten_longlive(LONGLIVE))
    for words in ("foresight_encoder_ckpt", "causal_real_score", "foresight_weight: 0", "docs/longlive.md"):
        assert words in str(error.value)


def test_window_first_block_follows_the_dmd_gradient_mask():
    as_dmd, supervise, mask = (glue(foresight_window_first_block=v) for v in ("as_dmd", "supervise", "mask"))
    # rollout 32 == min_num_training_frames: LongLive keeps the first block in DMD
    assert not as_dmd._dropped(0, 0, 0, 32, {})
    # rollout 48 != 32: LongLive's gradient_mask drops the window's first block, and so does as_dmd
    assert as_dmd._dropped(0, 0, 16, 48, {}) and not as_dmd._dropped(1, 0, 16, 48, {})
    assert not supervise._dropped(0, 0, 16, 48, {}) and mask._dropped(0, 0, 0, 32, {})


def test_i2v_block_zero_is_supervised_unless_masked():
    condition = {"initial_latent": torch.zeros(1, 1, 4, 2, 2)}
    assert not glue(independent_first_frame=True, i2v=True)._dropped(0, 0, 0, 32, condition)
    masked = glue(foresight_i2v_first_block="mask", independent_first_frame=True, i2v=True)  # I2V configs set it
    assert masked._dropped(0, 0, 0, 32, condition) and not masked._dropped(1, 0, 0, 32, condition)
    assert not masked._dropped(0, 0, 8, 40, condition)  # the window does not hold the conditioning frame


def test_scene_cuts_split_the_window_into_shots():
    cuts = {"scene_cut_mask": [False, False, True, False]}  # rollout blocks; a cut before block 2
    assert glue()._shots([0, 1, 2, 3], 4, 0, 8, cuts) == [([0, 1], (0, 2)), ([2, 3], (2, 4))]
    assert glue(foresight_scene_cut="keep")._shots([0, 1, 2, 3], 4, 0, 8, cuts) == [([0, 1, 2, 3], (0, 4))]
    # a 48-frame rollout whose window starts at rollout block 2: the cut is then at window segment 0
    assert glue()._shots([1, 2, 3], 4, 16, 8, {"scene_cut_mask": [False, False, True, False, True, False]}) == [
        ([1], (1, 2)), ([2, 3], (2, 4))]


def test_segment_prompts_come_from_the_sliced_blockwise_embeddings():
    embeds = torch.arange(2 * 4, dtype=torch.float32).view(8, 1, 1).expand(8, 3, 2)  # (b*n l c), b 2, n 4
    assert _segment_prompt(embeds, 2, 1, 4)[:, 0, 0].tolist() == [1.0, 5.0]
    assert _segment_prompt(embeds[:2], 2, 3, 4).shape == (2, 3, 2)  # one prompt for all blocks


def test_flops_read_the_longlive_recipe():
    resolved = resolve_longlive(flatten_longlive(CAUSAL))
    cycle, foresight = cycle_for(resolved), resolved.foresight
    assert cycle.generator == cycle.real_score == WAN_2_2_5B and cycle.tokens_per_frame == 22 * 40
    assert (cycle.frames, cycle.window_frames, cycle.attention_frames, cycle.lora) == (32, 32, 32, True)
    full = dmd_cycle(cycle.__class__(**{**cycle.__dict__, "lora": False}), foresight)
    lora = dmd_cycle(cycle, foresight)
    # LoRA: no weight gradients for the base (one backward pass instead of two, plus the recomputation)
    assert lora["terms"]["generator backward"] * 3 == full["terms"]["generator backward"] * 2
    assert row("longlive.md", "**foresight overhead**")[0] == f"**{100 * lora['overhead']:.1f} %**"  # 4.3 %
    # a 48-frame rollout with a 32-frame window: only the window's 4 blocks run with gradients
    longer = dmd_cycle(cycle.__class__(**{**cycle.__dict__, "frames": 48}), foresight)
    unsliced = dmd_cycle(cycle.__class__(**{**cycle.__dict__, "frames": 48, "window_frames": None}), foresight)
    block = 2 * 30 * (8 * 3072**2 * 880 * 8 + 4 * 3072 * 14336 * 880 * 8)  # the two blocks the window leaves out,
    assert unsliced["terms"]["generator backward"] - longer["terms"]["generator backward"] > block  # attention aside
    real = "real score forwards (cond + uncond)"
    assert longer["terms"][real] == lora["terms"][real]

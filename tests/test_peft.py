"""LoRA students and encoders: capture and FrozenEncoder through PEFT, gradients reach LoRA weights only."""

import pytest

pytest.importorskip("peft")

import copy

import torch
from conftest import all_hooks
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tiny_models import make_inputs, make_pair, rollout

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden

LAYER, ENCODER_LAYER = 2, 3
TINY_TARGETS = ["qkv", "out"]  # tiny_models.Block's attention linears
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers WanAttention's linears


def lora(targets: list[str]) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=targets)


def randomise_lora_b(model: torch.nn.Module) -> None:
    """LoRA B starts at zero (the adapter is a no-op), so A would get no gradient; give B values."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def run(generator, seed: int = 0):
    noise, cond = make_inputs(seed)
    torch.manual_seed(seed)  # the rollout's re-noising draws
    return rollout(generator, noise, cond)[0], cond


def block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("blocks") + 1]) if "blocks" in parts else None


def assert_only_lora_grads_up_to(model: torch.nn.Module, layer: int) -> None:
    """LoRA weights of blocks <= layer have nonzero gradients; every other parameter has none."""
    lora_seen = 0
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        assert p.requires_grad == is_lora, name
        block = block_index(name)
        if is_lora and block is not None and block <= layer:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            lora_seen += 1
        else:
            assert p.grad is None, name
    assert lora_seen > 0


def head_for(student_dim: int, encoder_dim: int, *, segment_frames: int, layer: int) -> ForesightHead:
    cfg = ForesightConfig(
        num_heads=2, segment_frames=segment_frames, predictor_depth=1, student_layer=layer, encoder_layer=ENCODER_LAYER
    )
    return ForesightHead(cfg, student_dim, encoder_dim)


# ------------------------------------------------------------ KV-cache student


def test_capture_through_peft_equals_the_base_model():
    generator, _ = make_pair()
    reference = copy.deepcopy(generator)
    student = get_peft_model(generator, lora(TINY_TARGETS))
    with capture_hidden(student, LAYER) as captured:
        run(student)
    with capture_hidden(reference, LAYER) as expected:
        run(reference)
    assert captured.location == f"PeftModel.base_model.model.model.blocks[{LAYER}]"
    assert len(captured) == len(expected) == 3
    for got, want in zip(captured, expected):
        assert got.position == want.position and torch.equal(got.hidden, want.hidden)  # zero LoRA B: same outputs
    assert all_hooks(student) == 0


def test_foresight_gradients_reach_lora_weights_only():
    generator, encoder = make_pair()
    student = get_peft_model(generator, lora(TINY_TARGETS))
    randomise_lora_b(student)
    adapter_keys = set(get_peft_model_state_dict(student))
    head = head_for(32, 48, segment_frames=3, layer=LAYER)

    with capture_hidden(student, LAYER) as captured:
        video, cond = run(student)
    loss = head(captured, FrozenEncoder(encoder, ENCODER_LAYER)(video.detach(), cond))
    loss.backward()

    assert_only_lora_grads_up_to(student, LAYER)
    assert all(p.grad is not None for p in head.parameters())  # the head trains beside, outside the adapter
    assert set(get_peft_model_state_dict(student)) == adapter_keys  # save_pretrained writes the same adapter
    assert all_hooks(student) == 0


def test_frozen_encoder_through_peft():
    _, encoder = make_pair()
    expected = FrozenEncoder(encoder, ENCODER_LAYER)
    critic = get_peft_model(copy.deepcopy(encoder), lora(TINY_TARGETS))
    wrapped = FrozenEncoder(critic, ENCODER_LAYER)
    assert wrapped.convention == "wan_wrapper" and wrapped.location.startswith("PeftModel.base_model.model")
    video, cond = make_inputs()
    assert torch.equal(wrapped(video, cond), expected(video, cond))

    randomise_lora_b(critic)  # a trained LoRA critic whose base weights are the frozen encoder's
    assert not torch.equal(wrapped(video, cond), expected(video, cond))
    with critic.disable_adapter():
        assert torch.equal(wrapped(video, cond), expected(video, cond))
    assert all_hooks(critic) == 0


# ------------------------------------------------------------ diffusers Wan


@pytest.mark.parametrize("attach", ["get_peft_model", "add_adapter"])
def test_diffusers_wan_lora_student(attach):
    pytest.importorskip("diffusers")
    from test_diffusers import SEGMENT_FRAMES, STUDENT_LAYER, tiny_encoder, tiny_wan
    from test_diffusers import make_inputs as wan_inputs

    from mirai_plugin.integrations.diffusers import wan_tokens_per_frame

    base = tiny_wan(0).train()
    reference = copy.deepcopy(base)
    if attach == "get_peft_model":
        student, location = get_peft_model(base, lora(WAN_TARGETS)), "PeftModel.base_model.model"
    else:  # diffusers' own in-place LoRA, as its training scripts do
        base.requires_grad_(False)
        base.add_adapter(lora(WAN_TARGETS))
        student, location = base, "WanTransformer3DModel"
    latents, prompt_embeds = wan_inputs()
    timestep = torch.full((2,), 500)

    with capture_hidden(reference, STUDENT_LAYER) as expected:
        reference(latents, timestep, prompt_embeds)
    with capture_hidden(student, STUDENT_LAYER) as unchanged:
        student(latents, timestep, prompt_embeds)
    assert unchanged.location == f"{location}.blocks[{STUDENT_LAYER}]"
    assert torch.equal(unchanged[0].hidden, expected[0].hidden)  # zero LoRA B: same outputs

    randomise_lora_b(student)
    encoder = FrozenEncoder(tiny_encoder(), ENCODER_LAYER)
    head = head_for(16, 24, segment_frames=SEGMENT_FRAMES, layer=STUDENT_LAYER)
    with capture_hidden(student, STUDENT_LAYER) as captured:
        video = student(latents, timestep, prompt_embeds, return_dict=False)[0]
    tokens_per_frame = wan_tokens_per_frame(student, latents)
    assert tokens_per_frame * latents.shape[2] == captured[0].hidden.shape[1]
    head(captured, encoder(video.detach(), prompt_embeds), tokens_per_frame=tokens_per_frame).backward()

    assert_only_lora_grads_up_to(student, STUDENT_LAYER)
    assert all_hooks(student) == 0


def test_frozen_encoder_on_peft_wrapped_diffusers_wan():
    pytest.importorskip("diffusers")
    from test_diffusers import make_inputs as wan_inputs
    from test_diffusers import tiny_encoder

    encoder = tiny_encoder()
    expected = FrozenEncoder(encoder, ENCODER_LAYER)
    wrapped = FrozenEncoder(get_peft_model(copy.deepcopy(encoder), lora(WAN_TARGETS)), ENCODER_LAYER)
    assert wrapped.convention == "diffusers_wan"
    latents, prompt_embeds = wan_inputs()
    assert torch.equal(wrapped(latents, prompt_embeds), expected(latents, prompt_embeds))

"""diffusers' WanTransformer3DModel as frozen encoder and as student: detection, early exit,
capture of whole-video and segment-by-segment calls, tokens per frame, gradients."""

import pytest

pytest.importorskip("diffusers")

import subprocess
import sys

import torch
from conftest import all_hooks
from diffusers import WanTransformer3DModel

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden
from mirai_plugin.integrations.diffusers import wan_tokens_per_frame

CHANNELS, TEXT_DIM, HEAD_DIM = 4, 16, 8
FRAMES, HEIGHT, WIDTH = 6, 4, 4
TOKENS_PER_FRAME = (HEIGHT // 2) * (WIDTH // 2)  # patch (1, 2, 2)
SEGMENT_FRAMES = 2
STUDENT_LAYER, ENCODER_LAYER = 1, 3


def tiny_wan(seed: int, *, heads: int = 2, depth: int = 4, patch: tuple = (1, 2, 2)) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=patch,
        num_attention_heads=heads,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=depth,
        rope_max_seq_len=32,
    )


def tiny_encoder() -> WanTransformer3DModel:
    encoder = tiny_wan(1, heads=3, depth=6)  # width 24: the head projects 16 -> 24
    return encoder.requires_grad_(False)


def make_inputs(seed: int = 0, *, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=g)  # (b c f h w)
    return latents, torch.randn(batch, 3, TEXT_DIM, generator=g)


def block_output(model: WanTransformer3DModel, layer: int, latents, prompt_embeds, timestep=None) -> torch.Tensor:
    """blocks[layer]'s output in a full eval forward (timestep 0 unless given), read by a plain forward hook."""
    if timestep is None:
        timestep = torch.zeros(latents.shape[0], dtype=torch.int64)
    seen = []
    handle = model.blocks[layer].register_forward_hook(lambda m, a, out: seen.append(out))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(latents, timestep, prompt_embeds, return_dict=False)
    model.train(was_training)
    handle.remove()
    return seen[0]


def test_helpers_do_not_import_diffusers():
    code = "import sys, mirai_plugin.integrations.diffusers; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------ FrozenEncoder


def test_frozen_encoder_returns_block_output_and_stops_there():
    encoder = tiny_encoder().train()
    latents, prompt_embeds = make_inputs()
    expected = block_output(encoder, ENCODER_LAYER, latents, prompt_embeds)

    calls = []
    counters = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(encoder.blocks)]
    counters.append(encoder.proj_out.register_forward_hook(lambda *a: calls.append("proj_out")))
    wrapped = FrozenEncoder(encoder, ENCODER_LAYER)
    z = wrapped(latents, prompt_embeds)
    for handle in counters:
        handle.remove()

    assert wrapped.convention == "diffusers_wan"
    assert calls == list(range(ENCODER_LAYER + 1))  # later blocks and the output projection never ran
    assert torch.equal(z, expected)
    assert z.shape == (2, FRAMES * TOKENS_PER_FRAME, 24) and not z.requires_grad
    assert all(m.training for m in encoder.modules())
    assert all_hooks(encoder) == 0


def test_frozen_encoder_passes_timestep_and_extra_keywords():
    encoder = tiny_encoder()
    latents, prompt_embeds = make_inputs()
    timestep = torch.tensor([900, 250])  # one per sample, on diffusers' 0..1000 scale
    noisy = FrozenEncoder(encoder, ENCODER_LAYER)(
        latents, prompt_embeds, timestep=timestep, attention_kwargs={"scale": 1.0}
    )
    # the model's own forward at these timesteps
    assert torch.equal(noisy, block_output(encoder, ENCODER_LAYER, latents, prompt_embeds, timestep))
    # controls: timestep 0, the timesteps swapped between the samples, and the timesteps as fractions of 1000
    for other in (torch.zeros(2, dtype=torch.int64), timestep.flip(0), timestep / 1000):
        moved = (noisy - block_output(encoder, ENCODER_LAYER, latents, prompt_embeds, other)).abs().max()
        assert moved > 1e-2, (other, moved)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x: x[:, :, 0], r"expects a latent video \(b c f h w\)"),  # one frame, 4-d
        (lambda x: x.transpose(1, 2), r"transpose\(1, 2\)"),  # Self-Forcing's (b f c h w) layout
        (lambda x: x[..., :3], "not divisible by the model.s patch size"),
    ],
    ids=["4d", "frames-first", "odd-width"],
)
def test_frozen_encoder_rejects_wrong_latent_shapes(bad, message):
    encoder = tiny_encoder().train()
    latents, prompt_embeds = make_inputs()
    with pytest.raises(MiraiError, match=message):
        FrozenEncoder(encoder, ENCODER_LAYER)(bad(latents), prompt_embeds)
    assert encoder.training and all_hooks(encoder) == 0


# -------------------------------------------------------------- tokens per frame


@pytest.mark.parametrize("frames, height, width", [(FRAMES, HEIGHT, WIDTH), (3, 6, 8)])
def test_tokens_per_frame_matches_the_transformer(frames, height, width):
    student = tiny_wan(0)
    latents = torch.randn(1, CHANNELS, frames, height, width)
    tokens = block_output(student, 0, latents, torch.randn(1, 3, TEXT_DIM)).shape[1]
    assert wan_tokens_per_frame(student, latents) * frames == tokens
    assert wan_tokens_per_frame(torch.compile(student), latents) * frames == tokens  # _orig_mod


def test_tokens_per_frame_errors():
    latents = torch.randn(1, CHANNELS, 4, 6, 6)
    with pytest.raises(MiraiError, match="not divisible by the model's patch size"):
        wan_tokens_per_frame(tiny_wan(0, patch=(1, 4, 4)), latents)
    with pytest.raises(MiraiError, match="pass tokens_per_frame=9 yourself"):
        wan_tokens_per_frame(tiny_wan(0, patch=(2, 2, 2)), latents)
    with pytest.raises(MiraiError, match="5-d latents"):
        wan_tokens_per_frame(tiny_wan(0), latents[:, :, 0])


# ------------------------------------------------------------ the student side


def student_forward(student, latents, prompt_embeds, *, whole_video: bool) -> torch.Tensor:
    """One teacher-forcing call over the whole video, or one call per segment in video order."""
    timestep = torch.full((latents.shape[0],), 500)
    if whole_video:
        return student(latents, timestep, prompt_embeds, return_dict=False)[0]
    segments = latents.split(SEGMENT_FRAMES, dim=2)
    return torch.cat([student(x, timestep, prompt_embeds, return_dict=False)[0] for x in segments], dim=2)


def foresight_config() -> ForesightConfig:
    return ForesightConfig(
        num_heads=2,
        segment_frames=SEGMENT_FRAMES,
        predictor_depth=1,
        student_layer=STUDENT_LAYER,
        encoder_layer=ENCODER_LAYER,
    )


@pytest.mark.parametrize("whole_video", [True, False], ids=["whole-video", "per-segment"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_student_capture_and_foresight_gradients(whole_video, checkpointing):
    student = tiny_wan(0).train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    encoder = FrozenEncoder(tiny_encoder(), ENCODER_LAYER)
    latents, prompt_embeds = make_inputs()
    head = ForesightHead(foresight_config(), student_dim=16, encoder_dim=24)

    # Without early stop the backward recomputation runs blocks[l] to its end, hooks included.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with capture_hidden(student, STUDENT_LAYER) as captured:
            video = student_forward(student, latents, prompt_embeds, whole_video=whole_video)
            calls = 1 if whole_video else FRAMES // SEGMENT_FRAMES
            call_tokens = FRAMES * TOKENS_PER_FRAME // calls
            assert [tuple(r.hidden.shape) for r in captured] == [(2, call_tokens, 16)] * calls
            assert all(r.position is None and r.hidden.requires_grad for r in captured)

            z = encoder(video.detach(), prompt_embeds)  # (b f*s e)
            loss, breakdown = head(
                captured, z, tokens_per_frame=wan_tokens_per_frame(student, latents), return_breakdown=True
            )
            assert breakdown["segments"] == [0, 1, 2]  # call order, or the one call split
            assert torch.isfinite(loss)
            loss.backward()
            assert len(captured) == 0  # read and cleared by the head; the recomputation was not recorded
    assert captured.location == f"WanTransformer3DModel.blocks[{STUDENT_LAYER}]"
    assert all_hooks(student) == 0

    for i, block in enumerate(student.blocks):
        grads = [p.grad for p in block.parameters()]
        if i <= STUDENT_LAYER:
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        else:
            assert all(g is None for g in grads)
    assert all(p.grad is None for p in student.proj_out.parameters()) and student.scale_shift_table.grad is None

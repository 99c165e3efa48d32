"""The package on the real upstream models: hook capture and early-exit encoder against the
official ``return_hidden_at_layer`` tensors, and the whole foresight term against the official
loss and its gradients into the generator.

Needs upstream checkouts (skipped otherwise, see ``checkouts.py``):
``MIRAI_VIDEO_MIRAI_DIR`` (official Video-Mirai) and ``MIRAI_SELF_FORCING_DIR`` (Self-Forcing).
Each check runs in its own Python process: the checkouts share top-level package
names (``model``, ``utils``, ``pipeline``) and cannot be imported side by side.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from checkouts import source

HERE = Path(__file__).resolve().parent
STUDENT_LAYER, ENCODER_LAYER = 3, 5
RECIPE = dict(  # the official keys of the Stage-3 recipe, with the tiny models' layers
    foresight_weight=0.2,
    foresight_student_layer=STUDENT_LAYER,
    foresight_teacher_layer=ENCODER_LAYER,
    foresight_delta=1,
    foresight_include_current=True,
    foresight_delta_mean_pool=True,
    foresight_projector_type="dit",
    projection_layers_num=3,
    foresight_loss_type="cosine",
    num_frame_per_block=3,
)


def _run_in_subprocess(check: str, upstream: str) -> None:
    root = source(upstream)  # imported in place, read-only
    result = subprocess.run(
        [sys.executable, str(Path(__file__)), check, str(root)], capture_output=True, text=True, cwd=HERE.parent,
        timeout=600,
    )
    assert result.returncode == 0, f"{check} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def test_capture_encoder_and_term_match_official_video_mirai():
    _run_in_subprocess("official_video_mirai", "video-mirai")


def test_capture_on_the_unmodified_self_forcing_rollout():
    _run_in_subprocess("self_forcing_rollout", "self-forcing")


# ---------------------------------------------------------------- checks (run as a script)


def _setup(root: str, **foresight):
    import torch

    sys.path.insert(0, str(HERE))
    import upstream

    up = upstream.import_upstream(root)
    torch.manual_seed(0)
    student = upstream.tiny_causal_wan(dim=16, num_heads=4, ffn_dim=32, num_layers=6)
    encoder = upstream.tiny_wan(dim=24, num_heads=4, ffn_dim=48, num_layers=8)
    student.requires_grad_(True)
    encoder.requires_grad_(False)
    gen = upstream.tiny_diffusion_wrapper(student, True, timestep_shift=5.0)
    enc = upstream.tiny_diffusion_wrapper(encoder, False)
    prompt = torch.randn(1, 512, 32)
    noise = torch.randn(1, 21, 16, 8, 8)
    extra = {}
    if foresight:
        projector = up.MiraiForesightDiTBlock(
            dim=16, num_heads=4, ffn_dim=64, num_layers=3, max_delta=1, qk_norm=True,
            use_cross_attn=False, timestep_cond=False, gate_init_value=0.0, delta_cond=False,
        )
        dim_proj = torch.nn.Linear(16, 24, bias=False)
        upstream.randomize_parameters(projector)
        upstream.randomize_parameters(dim_proj)
        extra = dict(ema_generator=enc, mirai_projector=projector, dim_proj=dim_proj, **foresight)
    pipe = upstream.tiny_training_pipeline(gen, **extra)
    return up, upstream, gen, enc, pipe, prompt, noise, extra


def official_video_mirai() -> None:
    import torch

    from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden

    official_keys = dict(
        foresight_student_layer=STUDENT_LAYER, foresight_teacher_layer=ENCODER_LAYER, foresight_delta=1,
        foresight_weight=0.2, foresight_projector_type="dit", foresight_loss_type="cosine",
        foresight_include_current=True, foresight_delta_mean_pool=True,
    )
    _up, _upstream, gen, enc, pipe, prompt, noise, extra = _setup(sys.argv[2], **official_keys)

    # Stash the official return_hidden_at_layer tensors by wrapping the wrappers' forward.
    official_student, official_encoder = {}, []

    def stash(module, store):
        original = module.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            if kwargs.get("return_hidden_at_layer") is not None:
                store(kwargs, out[2])
            return out

        module.forward = forward

    stash(gen, lambda kw, h: official_student.__setitem__(kw["current_start"] // 48, h))
    stash(enc, lambda kw, h: official_encoder.append(h))

    torch.manual_seed(1)
    with (
        capture_hidden(gen, STUDENT_LAYER - 1) as below,
        capture_hidden(gen, STUDENT_LAYER) as captured,
        capture_hidden(gen, STUDENT_LAYER + 1) as above,
    ):
        video, _, _, official_loss = pipe.inference_with_trajectory_and_foresight(noise=noise, prompt_embeds=prompt)

    # 1. capture == official hidden, bit for bit, one record per segment at its token offset
    assert sorted(official_student) == list(range(7)), sorted(official_student)
    assert [r.position for r in captured] == [k * 48 for k in range(7)]
    for k, record in enumerate(captured):
        assert torch.equal(record.hidden, official_student[k]), f"segment {k}"
    for off_by_one in (below, above):
        assert not any(torch.equal(r.hidden, official_student[k]) for k, r in enumerate(off_by_one))

    # 2. early-exit encoder == official teacher hidden
    conditional = {"prompt_embeds": prompt}
    z = FrozenEncoder(enc, ENCODER_LAYER)(video.detach(), conditional)
    assert len(official_encoder) == 1 and torch.equal(z, official_encoder[0])
    assert not torch.equal(FrozenEncoder(enc, ENCODER_LAYER + 1)(video.detach(), conditional), z)
    bare = FrozenEncoder(enc.model, ENCODER_LAYER)  # the WanModel call convention
    assert bare.convention == "wan_model"
    assert torch.equal(bare(video.detach(), prompt), z)

    # 3. the whole term == the official loss, and the same gradients reach the generator
    cfg = ForesightConfig.from_upstream(official_keys).replace(segment_frames=3)
    checkpoint = {"mirai_projector": extra["mirai_projector"].state_dict(),
                  "foresight_dim_proj": extra["dim_proj"].state_dict()}
    head = ForesightHead.load_official(checkpoint, config=cfg)
    ours = head(captured, z)
    assert abs(ours.item() - official_loss.item()) <= 1e-5, (ours.item(), official_loss.item())

    # Gradients are compared between two identical rollouts, each with its first backward:
    # a second backward through the same upstream graph differs (activation checkpointing
    # recomputes blocks that write the KV cache in place).
    params = list(gen.model.parameters())
    official_grads = torch.autograd.grad(official_loss, params, allow_unused=True)
    torch.manual_seed(1)
    with capture_hidden(gen, STUDENT_LAYER) as captured:
        video_again, *_ = pipe.inference_with_trajectory_and_foresight(noise=noise, prompt_embeds=prompt)
    assert torch.equal(video_again, video)
    our_grads = torch.autograd.grad(head(captured, z), params, allow_unused=True)
    worst = 0.0
    for a, b in zip(official_grads, our_grads):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= 1e-5, worst
    for i, block in enumerate(gen.model.blocks):
        reached = any(g is not None and g.abs().sum() > 0 for g, p in zip(our_grads, params)
                      if any(p is q for q in block.parameters()))
        assert reached == (i <= STUDENT_LAYER), f"block {i}"
    print(f"loss official {official_loss.item():.8f} ours {ours.item():.8f}; max generator grad diff {worst:.2e}")


def self_forcing_rollout() -> None:
    import torch

    from mirai_plugin import capture_hidden

    _, _, gen, _, pipe, prompt, noise, _ = _setup(sys.argv[2])
    calls = []
    counter = gen.model.blocks[STUDENT_LAYER].register_forward_hook(
        lambda m, a, o: calls.append(torch.is_grad_enabled())
    )
    torch.manual_seed(1)
    baseline = pipe.inference_with_trajectory(noise=noise, prompt_embeds=prompt)[0]
    first_run_calls = list(calls)
    calls.clear()
    keys = list(gen.state_dict())
    torch.manual_seed(1)
    with capture_hidden(gen, STUDENT_LAYER) as captured:
        video = pipe.inference_with_trajectory(noise=noise, prompt_embeds=prompt)[0]
    counter.remove()

    assert sum(first_run_calls) == 7, first_run_calls  # one grad-enabled call per segment
    assert len(captured) == 7 and [r.position for r in captured] == [k * 48 for k in range(7)]
    assert all(r.hidden.requires_grad for r in captured)
    assert torch.equal(baseline, video), "capture changed the rollout"
    assert list(gen.state_dict()) == keys
    assert sum(len(m._forward_hooks) for m in gen.modules()) == 0
    video.square().mean().backward()  # activation checkpointing recomputes blocks; nothing new is kept
    assert len(captured) == 7
    print(f"{len(first_run_calls)} calls of block {STUDENT_LAYER} in the rollout, 7 with grad enabled: all captured")


if __name__ == "__main__":
    {"official_video_mirai": official_video_mirai, "self_forcing_rollout": self_forcing_rollout}[sys.argv[1]]()

"""Write reference tensors computed by the OFFICIAL Video-Mirai code on tiny random models.

Run from the repository root (CPU, float32, deterministic; a few seconds):

    eval "$(../shared/upstreams/unpack /tmp/up)" && python tools/make_reference.py

It imports a fresh copy of the checkout named by ``MIRAI_VIDEO_MIRAI_DIR`` at the
pinned commit (``integration_tests/checkouts.py``).

For each case it builds a tiny official student (`CausalWanModel`), a tiny
official bidirectional encoder (`WanModel`, passed as `ema_generator` like the
official trainer passes its real score), the official projector
(`MiraiForesightDiTBlock`) plus the bias-free dimension projection, runs the
official `SelfForcingTrainingPipeline.inference_with_trajectory_and_foresight`,
backpropagates the foresight loss, then runs the official
`replay_foresight_loss()` from zero projector gradients. Tensors are captured
by wrapping methods from outside (generator / encoder wrapper `forward`,
projector `forward`, `pipeline._foresight_loss`); nothing upstream is edited.

Output: ``tests/data/official_<case>.safetensors`` (keys in tests/data/README.md),
metadata ``commit``, ``config``, ``segments``, ``offsets``, ``pairs``,
``grad_none`` (all JSON strings but ``commit``).

Legend: b batch, k segment, d offset, n tokens per segment, s tokens of the video.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from integration_tests import upstream  # noqa: E402
from integration_tests.checkouts import CheckoutMissing, checkout  # noqa: E402

# Batch 1: the official rollout cannot run B > 1 (its context re-noising
# multiplies a [B, 3] timestep by ones([B * 3])); the official config uses 1.
# Widths 16 / 24 rather than 64 / 96: at width 64 the projector alone has 251k
# parameters, about 3 MB per file for its weights, gradients and replay
# gradients. Heads, depths, layer indices, ffn ratios and shapes are as planned.
SETUP = {
    "seed_models": 0,          # student, encoder, projector, dim_proj, prompt, noise
    "seed_rollout": 1,         # exit step, re-noising inside the rollout
    "batch": 1, "frames": 21, "channels": 16, "height": 8, "width": 8,
    "tokens_per_frame": 16, "num_frame_per_block": 3,
    "denoising_steps": [1000, 750, 500, 250], "warp_denoising_step": True,
    "same_step_across_blocks": True, "context_noise": 0,
    "text_len": 512, "text_dim": 32, "freq_dim": 64,
    "student": {"dim": 16, "num_heads": 4, "ffn_dim": 32, "num_layers": 6, "timestep_shift": 5.0},
    "encoder": {"dim": 24, "num_heads": 4, "ffn_dim": 48, "num_layers": 8, "timestep_shift": 8.0},
    "foresight_student_layer": 3, "foresight_teacher_layer": 5,
    "projector": {"num_heads": 4, "ffn_dim": 64, "num_layers": 3, "qk_norm": True, "use_cross_attn": False,
                  "timestep_cond": False, "gate_init_value": 0.0, "max_timestep": 1000},
    "randomize": {"std": 0.05, "norm_std": 0.1},
    "foresight_weight": 0.2, "foresight_skip": 0, "foresight_projector_type": "dit",
    "foresight_loss_type": "cosine", "cache_foresight_pairs": True,
    "dtype": "float32", "device": "cpu", "torch_threads": 1,
}

CASES = {
    "official_mean": {"foresight_delta": 1, "foresight_include_current": True,
                      "foresight_delta_mean_pool": True, "delta_cond": False},
    "official_none": {"foresight_delta": 2, "foresight_include_current": True,
                      "foresight_delta_mean_pool": False, "delta_cond": False},
    "official_adaln": {"foresight_delta": 2, "foresight_include_current": True,
                       "foresight_delta_mean_pool": False, "delta_cond": True},
    "official_next": {"foresight_delta": 1, "foresight_include_current": False,
                      "foresight_delta_mean_pool": True, "delta_cond": False},
}


class Recorder:
    """What the official code passes around, captured by wrapping methods from outside."""

    def __init__(self, pipe, seg_tokens):
        self.active = True
        self.student = {}        # k -> student hidden [b, n, d_s], grad retained
        self.encoder = None      # [b, s, d_e]
        self.pending = None      # (k, d) of the projector call whose loss comes next
        self.pairs = []          # (k, d, projector_out [b, n, d_e], target [b, n, d_e]) in loss order
        self.exit_flags = None   # the official per-segment exit steps (index into the step list)
        gen, enc, proj = pipe.generator, pipe.ema_generator, pipe.mirai_projector

        def gen_forward(*args, _orig=gen.forward, **kwargs):
            out = _orig(*args, **kwargs)
            if self.active and kwargs.get("return_hidden_at_layer") is not None:
                hidden = out[2]  # (b n d_s)
                hidden.retain_grad()
                self.student[kwargs["current_start"] // seg_tokens] = hidden
            return out

        def enc_forward(*args, _orig=enc.forward, **kwargs):
            out = _orig(*args, **kwargs)
            if self.active and kwargs.get("return_hidden_at_layer") is not None:
                self.encoder = out[2]  # (b s d_e)
            return out

        def proj_forward(x, delta=1, *args, _orig=proj.forward, **kwargs):
            if self.active:
                ks = [k for k, h in self.student.items() if h is x]
                assert len(ks) == 1, "projector input is not a captured student hidden"
                self.pending = (ks[0], delta)
            return _orig(x, delta, *args, **kwargs)

        def foresight_loss(proj_flat, teacher_flat, _orig=pipe._foresight_loss):
            if self.active:
                b = self.encoder.shape[0]
                k, d = self.pending
                self.pairs.append((k, d, proj_flat.detach().reshape(b, -1, proj_flat.shape[-1]),
                                   teacher_flat.detach().reshape(b, -1, teacher_flat.shape[-1])))
                self.pending = None
            return _orig(proj_flat, teacher_flat)

        def exit_flags(*args, _orig=pipe.generate_and_sync_list, **kwargs):
            self.exit_flags = _orig(*args, **kwargs)
            return self.exit_flags

        gen.forward, enc.forward, proj.forward = gen_forward, enc_forward, proj_forward
        pipe.generate_and_sync_list = exit_flags
        pipe._foresight_loss = foresight_loss


def _grads(module, prefix):
    out, none = {}, []
    for name, p in module.named_parameters():
        if p.grad is None:  # parameter unused by this loss (delta embedder without delta_cond)
            none.append(name)
        out[f"{prefix}.{name}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    return out, none


def run_case(up, case: str, settings: dict) -> tuple[dict, dict]:
    S = SETUP
    b, f, c, h, w = S["batch"], S["frames"], S["channels"], S["height"], S["width"]
    nfpb, tpf = S["num_frame_per_block"], S["tokens_per_frame"]
    seg_tokens = nfpb * tpf
    text = {"text_dim": S["text_dim"], "text_len": S["text_len"], "freq_dim": S["freq_dim"]}

    torch.manual_seed(S["seed_models"])
    st, en, pr = S["student"], S["encoder"], S["projector"]
    student = upstream.tiny_causal_wan(dim=st["dim"], num_heads=st["num_heads"], ffn_dim=st["ffn_dim"],
                                       num_layers=st["num_layers"], **text)
    encoder = upstream.tiny_wan(dim=en["dim"], num_heads=en["num_heads"], ffn_dim=en["ffn_dim"],
                                num_layers=en["num_layers"], **text)
    # The official trainer freezes the real score and trains the generator.
    student.requires_grad_(True)
    encoder.requires_grad_(False)
    max_delta = S["foresight_skip"] + settings["foresight_delta"]
    projector = up.MiraiForesightDiTBlock(
        dim=st["dim"], num_heads=pr["num_heads"], ffn_dim=pr["ffn_dim"], num_layers=pr["num_layers"],
        max_delta=max_delta, qk_norm=pr["qk_norm"], use_cross_attn=pr["use_cross_attn"],
        timestep_cond=pr["timestep_cond"], max_timestep=pr["max_timestep"],
        gate_init_value=pr["gate_init_value"], delta_cond=settings["delta_cond"])
    dim_proj = torch.nn.Linear(st["dim"], en["dim"], bias=False)
    upstream.randomize_parameters(projector, **S["randomize"])
    upstream.randomize_parameters(dim_proj, **S["randomize"])
    prompt = torch.randn(b, S["text_len"], S["text_dim"])           # (b 512 text_dim)
    noise = torch.randn(b, f, c, h, w)                               # (b f c h w)

    gen = upstream.tiny_diffusion_wrapper(student, True, timestep_shift=st["timestep_shift"],
                                          num_frames=f, height=h, width=w)
    enc = upstream.tiny_diffusion_wrapper(encoder, False, timestep_shift=en["timestep_shift"],
                                          num_frames=f, height=h, width=w)
    pipe = upstream.tiny_training_pipeline(
        gen, denoising_steps=tuple(S["denoising_steps"]), warp_denoising_step=S["warp_denoising_step"],
        num_frame_per_block=nfpb, num_frames=f, height=h, width=w,
        same_step_across_blocks=S["same_step_across_blocks"], context_noise=S["context_noise"],
        dim_proj=dim_proj, cache_foresight_pairs=S["cache_foresight_pairs"],
        ema_generator=enc, mirai_projector=projector,
        foresight_student_layer=S["foresight_student_layer"], foresight_teacher_layer=S["foresight_teacher_layer"],
        foresight_delta=settings["foresight_delta"], foresight_weight=S["foresight_weight"],
        foresight_projector_type=S["foresight_projector_type"], foresight_loss_type=S["foresight_loss_type"],
        foresight_include_current=settings["foresight_include_current"], foresight_skip=S["foresight_skip"],
        foresight_delta_mean_pool=settings["foresight_delta_mean_pool"])
    rec = Recorder(pipe, seg_tokens)

    # ---- generator step: rollout + foresight loss + backward
    torch.manual_seed(S["seed_rollout"])
    video, _, _, loss = pipe.inference_with_trajectory_and_foresight(noise=noise, prompt_embeds=prompt)
    loss.backward()
    grads, grad_none = _grads(projector, "grad.projector")
    dp_grads, _ = _grads(dim_proj, "grad.dim_proj")

    # ---- projector replay (as on a critic step): zero grads, official replay
    rec.active = False
    projector.zero_grad(set_to_none=True)
    dim_proj.zero_grad(set_to_none=True)
    replay_loss = pipe.replay_foresight_loss()
    replay_grads, _ = _grads(projector, "replay_grad.projector")
    replay_dp, _ = _grads(dim_proj, "replay_grad.dim_proj")

    # ---- collect
    mean_pool = settings["foresight_delta_mean_pool"]
    offsets = ([0] if settings["foresight_include_current"] else []) + list(
        range(1 + S["foresight_skip"], settings["foresight_delta"] + 1 + S["foresight_skip"]))
    num_segments = f // nfpb
    segments = sorted(rec.student)
    t = {"rollout": video, "encoder_hidden": rec.encoder, "loss": loss, "replay_loss": replay_loss}
    for k in segments:
        t[f"student_hidden.{k}"] = rec.student[k]
        t[f"grad.student_hidden.{k}"] = rec.student[k].grad
    for k, d, proj_out, target in rec.pairs:
        key = f"{k}" if mean_pool else f"{k}.{d}"
        t[f"projector_out.{key}"], t[f"target.{key}"] = proj_out, target
    for name, value in projector.state_dict().items():
        t[f"projector.{name}"] = value
    t["dim_proj.weight"] = dim_proj.weight
    t.update({**grads, **dp_grads, **replay_grads, **replay_dp})
    t = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone() for k, v in t.items()}

    # ---- sanity checks
    enc_h = t["encoder_hidden"]
    assert enc_h.shape == (b, f * tpf, en["dim"]), enc_h.shape
    assert t["rollout"].shape == (b, f, c, h, w)
    expected_segments = [k for k in range(num_segments) if any(k + d < num_segments for d in offsets)]
    assert segments == expected_segments, (segments, expected_segments)

    def enc_seg(k):
        return enc_h[:, k * seg_tokens:(k + 1) * seg_tokens]            # (b n d_e)

    valid = {k: [d for d in offsets if k + d < num_segments] for k in segments}
    pairs = [[k, d] for k in segments for d in valid[k]]
    if mean_pool:
        assert [p[0] for p in rec.pairs] == segments
        for k in segments:
            fused = torch.stack([enc_seg(k + d) for d in valid[k]]).mean(0)   # (b n d_e)
            assert torch.equal(t[f"target.{k}"], fused), f"target.{k} is not the mean of encoder slices"
    else:
        assert [[k, d] for k, d, *_ in rec.pairs] == pairs, rec.pairs
        for k, d in pairs:
            assert torch.equal(t[f"target.{k}.{d}"], enc_seg(k + d)), f"target.{k}.{d}"
    keys = [f"{k}" for k in segments] if mean_pool else [f"{k}.{d}" for k, d in pairs]
    cos = torch.stack([torch.nn.functional.cosine_similarity(t[f"projector_out.{key}"], t[f"target.{key}"],
                                                             dim=-1).mean() for key in keys])
    weight = S["foresight_weight"]
    assert torch.allclose(t["loss"], -weight * cos.mean(), rtol=1e-5, atol=1e-7), (t["loss"], -weight * cos.mean())
    assert torch.allclose(t["replay_loss"], t["loss"], rtol=1e-5, atol=1e-7), (t["replay_loss"], t["loss"])
    lv = t["loss"].item()
    assert math.isfinite(lv) and abs(lv) > 1e-4 and abs(lv / weight + 1) > 1e-3, lv
    # Without delta_cond the AdaLN input is the zero vector: its weight gets an
    # exactly zero gradient (its bias does not), and the delta embedder none.
    zero = set(grad_none) | ({n for n, _ in projector.named_parameters() if "adaLN_modulation" in n
                              and n.endswith("weight")} if not settings["delta_cond"] else set())
    for key, value in t.items():
        assert torch.isfinite(value).all(), key
        if key.startswith(("grad.", "replay_grad.")):
            name = key.split(".", 2)[-1]
            assert bool(value.abs().sum() == 0) == (name in zero), f"{key}: zero gradient expected: {name in zero}"
            if key.startswith("replay_grad."):  # replay = same pairs, one backward per pair
                torch.testing.assert_close(value, t["grad." + key[len("replay_grad."):]], rtol=1e-4, atol=1e-7)
    expected_none = [] if settings["delta_cond"] else sorted(
        n for n, _ in projector.named_parameters() if n.startswith("delta_embedder."))
    assert sorted(grad_none) == expected_none, grad_none

    exit_index = rec.exit_flags[0]  # same_step_across_blocks: the first draw serves every segment
    config = {**SETUP, **settings, "case": case, "max_delta": max_delta, "exit_index": exit_index,
              "denoising_step_list": [float(x) for x in pipe.denoising_step_list],
              "exit_timestep": float(pipe.denoising_step_list[exit_index]),
              "num_segments": num_segments, "segment_tokens": seg_tokens}
    meta = {"commit": up.commit, "config": json.dumps(config, sort_keys=True),
            "segments": json.dumps(segments), "offsets": json.dumps(offsets),
            "pairs": json.dumps(pairs), "grad_none": json.dumps(sorted(grad_none))}
    return t, meta


def save_canonical(tensors: dict, path: Path, metadata: dict) -> None:
    """`save_file`, then rewrite its JSON header in a fixed key order.

    safetensors keeps `__metadata__` in a hash map, so its key order (and the
    file's bytes) change from run to run; the tensor data does not.
    """
    save_file(tensors, str(path), metadata=metadata)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    ordered = {"__metadata__": dict(sorted(meta.items())),
               **dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    assert len(text) <= n, "canonical header longer than the original"
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    try:
        repo = checkout("video-mirai", Path(tempfile.mkdtemp(prefix="mirai-reference-")) / "video-mirai")
    except CheckoutMissing as missing:
        sys.exit(str(missing))
    torch.set_num_threads(SETUP["torch_threads"])
    up = upstream.import_upstream(repo)
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        tensors, meta = run_case(up, case, CASES[case])
        path = args.out / f"{case}.safetensors"
        save_canonical(tensors, path, meta)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size} bytes, "
              f"loss {tensors['loss'].item():.6f}, replay {tensors['replay_loss'].item():.6f}, "
              f"segments {meta['segments']}, exit index {json.loads(meta['config'])['exit_index']}")


if __name__ == "__main__":
    main()

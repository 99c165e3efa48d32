"""What the shipped models carry and how they denoise, read on validation clips (never on the gate's clips).

    python tools/demo_diagnostics.py [--registration 2]

Diagnostics only: nothing here changes a registered setting or the demo's verdict, and nothing
reads the gate's clips: every reading is on the validation clips (``quality.Validation``, the
last ``gate.test_videos`` of them held out from the readouts). On wholly hidden segment k ->
reappearance k+1 pairs it reports the PSNR of the gate's readout (whole segment, and on the
tokens the returning object touches) from:
the fused target (what the gate uses), the encoder's view of k alone and of k+1 alone, the
pixels of k (the gate's reference) and of k+1 itself (what this readout can reach at best);
then the fused target and the pixels with 4x the readout steps; then each model's readings
(``quality.read``: validation loss and the returning object's colour error at several noise
levels); then the step-0 gradient ratio of the foresight arms on the shipped models (after the
registered fake-score warm-up), per seed.
"""

from __future__ import annotations

import argparse
import math

import torch

from mirai_plugin import ForesightHead, FrozenEncoder, capture_hidden, fuse_targets
from mirai_plugin.tooling.demo.dmd import dmd_loss, rollout
from mirai_plugin.tooling.demo.evaluation import segment_pixels
from mirai_plugin.tooling.demo.experiment import gradient_ratio, warm_up_fake
from mirai_plugin.tooling.demo.pretrained import NAMES
from mirai_plugin.tooling.demo.quality import Validation, read
from mirai_plugin.tooling.demo.reappearance import hidden_pairs
from mirai_plugin.tooling.demo.registration import CURRENT, load_config
from mirai_plugin.tooling.demo.store import load_models, shipped_folder
from mirai_plugin.tooling.probe import fit_readout


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registration", type=int, default=CURRENT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.registration)
    folder = shipped_folder(cfg.models)
    if folder is None:
        raise SystemExit(f"no shipped models match registration {args.registration} and this code")
    models = load_models(folder, cfg.models, "shipped")
    g, fcfg, n = cfg.gate, cfg.foresight_config(), cfg.segment_frames
    validation = Validation.render(cfg.world, 512, cfg.models.train_frames)
    scene = validation.scene
    video = scene.video
    z = FrozenEncoder(models.teacher, fcfg.encoder_layer)(video, torch.zeros(video.shape[0]))  # (v f*s e)
    fused = fuse_targets(z, segment_frames=n, tokens_per_frame=16, offsets=fcfg.offsets).target  # (v K t e)
    alone = z.view(video.shape[0], -1, n * 16, z.shape[-1])  # (v K t e)
    pixels = segment_pixels(video, n)  # (v K t p)
    alpha = segment_pixels(scene.alpha[:, :, None].expand(-1, -1, 3, -1, -1), n)  # (v K t p)
    rows = hidden_pairs(scene, n).nonzero()
    v, k = rows[:, 0], rows[:, 1]
    train = v < video.shape[0] - g.test_videos
    target = pixels[v, k + 1]  # (m t p)
    touched = (alpha[v, k + 1] > 0).any(dim=-1)  # (m t): tokens the returning object touches

    def readout(features: torch.Tensor, steps: int) -> tuple[float, float]:
        model = fit_readout(features[train].flatten(0, 1), target[train].flatten(0, 1), hidden=g.probe_hidden,
                            steps=steps, lr=g.probe_lr, batch=g.probe_batch, seed=g.seed)
        with torch.no_grad():
            error = (model(features[~train].flatten(0, 1)) - target[~train].flatten(0, 1)).square()  # (rows p)
        where = touched[~train].flatten()
        return psnr(error.mean().item()), psnr(error[where].mean().item())

    print(f"{int((~train).sum())} held-out pairs; the returning object touches {touched[~train].float().mean():.1%} "
          f"of the reappearance segment's tokens")
    print(f"{'readout input':44s} {'steps':>5s} {'segment dB':>10s} {'object tokens dB':>16s}")
    inputs = {
        "fused target mean(z_k, z_k+1) (the gate)": fused[v, k],
        "encoder view of k alone (z_k)": alone[v, k],
        "encoder view of k+1 alone (z_k+1)": alone[v, k + 1],
        "pixels of k (the gate's reference)": pixels[v, k],
        "pixels of k+1 (the readout's ceiling)": pixels[v, k + 1],
    }
    for name, features in inputs.items():
        print(f"{name:44s} {g.probe_steps:5d} "
              + " ".join(f"{x:10.2f}      " for x in readout(features, g.probe_steps)))
    for name in ("fused target mean(z_k, z_k+1) (the gate)", "pixels of k (the gate's reference)"):
        steps = 4 * g.probe_steps
        print(f"{name:44s} {steps:5d} " + " ".join(f"{x:10.2f}      " for x in readout(inputs[name], steps)))

    print("\neach model's readings on the validation clips (quality.read):")
    for name in NAMES:
        reading = read(getattr(models, name), validation, student=name == "student",
                       low_noise=cfg.models.low_noise(name))
        errors = ", ".join(f"t = {t}: {e:.2f}%" for t, e in reading["colour_error"].items())
        print(f"  {name:8s} validation loss {reading['loss']:.5f}; reappearance colour error of its x0 {errors}")

    print("\nstep-0 |grad of the weighted term| / |grad of DMD| on the shipped student (after the fake warm-up):")
    fake_state = warm_up_fake(cfg, models.base, models.student)
    d = cfg.dmd
    for seed in cfg.seeds or (0, 1, 2):  # before the pilot sizes the run: its first three seeds
        for arm in ("foresight", "control"):
            student, fake = cfg.models.student(), cfg.models.base()
            student.load_state_dict(models.student.state_dict())
            fake.load_state_dict(fake_state)
            student.train()
            torch.manual_seed(seed)  # as train_arm: the head's initialisation, then its data and noise
            head = ForesightHead(fcfg, student_dim=student.dim, encoder_dim=models.teacher.dim)
            encoder = FrozenEncoder(models.teacher, fcfg.encoder_layer)
            gen = torch.Generator().manual_seed(1_000 + seed)
            clip = cfg.world.render(d.batch, cfg.models.train_frames, seed=seed * 1_000_000).video
            exit_index = int(torch.randint(len(d.denoising_steps), (1,), generator=gen))
            with capture_hidden(student, fcfg.student_layer) as captured:
                generated = rollout(student, clip[:, :n], cfg.train_segments - 1, exit_index=exit_index, g=gen,
                                    levels=d.denoising_steps)
            loss = dmd_loss(generated, models.teacher, fake, given_frames=n, t_range=d.score_t_range, g=gen)
            seen = clip if arm == "control" else generated
            term = head(captured, encoder(seen.detach(), torch.zeros(d.batch)))
            ratio = gradient_ratio(student, loss, term)
            print(f"  seed {seed} {arm:9s}: ratio {ratio['ratio']:.3f}, cosine {ratio['cosine']:+.3f}, "
                  f"|grad DMD| {ratio['dmd_norm']:.3g}, |grad term| {ratio['term_norm']:.3g}")


if __name__ == "__main__":
    main()

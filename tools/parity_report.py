"""Print the max abs errors between mirai_plugin and the official reference tensors.

    python tools/parity_report.py

Reads the reference files as tests/test_official_parity.py does (tools/official_reference.py;
the tests assert <= 1e-5).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_reference as parity

from mirai_plugin import fuse_targets
from mirai_plugin.official.projector import official_to_head_state


def report(case: str) -> dict[str, float]:
    tensors, meta = parity.load(case)
    head = parity.official_head(tensors, meta)
    cfg = head.config
    per_offset = cfg.fusion != "mean"
    targets = fuse_targets(
        tensors["encoder_hidden"], segment_frames=parity.SEGMENT_FRAMES, tokens_per_frame=parity.TOKENS_PER_FRAME,
        offsets=cfg.offsets, fusion=cfg.fusion,
    )
    errors = {"target": 0.0, "projector_out": 0.0}
    for row, k in enumerate(meta["segments"]):
        for o, d in enumerate(cfg.offsets):
            suffix = f"{k}.{d}" if per_offset else f"{k}"
            if f"target.{suffix}" not in tensors:
                continue
            ours = targets.target[0, row, o] if per_offset else targets.target[0, row]
            errors["target"] = max(errors["target"], parity.max_err(ours, tensors[f"target.{suffix}"][0]))
            with torch.no_grad():
                out = head.predict(tensors[f"student_hidden.{k}"], d)
            errors["projector_out"] = max(
                errors["projector_out"], parity.max_err(out, tensors[f"projector_out.{suffix}"])
            )

    hidden, records = parity.student_records(tensors, meta)
    loss = head(records, tensors["encoder_hidden"])
    errors["loss"] = parity.max_err(loss, tensors["loss"])
    loss.backward()
    official = official_to_head_state(
        parity.group(tensors, "grad.projector."), {"weight": tensors["grad.dim_proj.weight"]}, cfg
    )[3]
    errors["grad_head"] = max(parity.max_err(p.grad, official[n]) for n, p in head.named_parameters())
    errors["grad_hidden"] = max(parity.max_err(h.grad, tensors[f"grad.student_hidden.{k}"]) for k, h in hidden.items())

    head.zero_grad()
    errors["replay_loss"] = parity.max_err(head.replay(step=False), tensors["replay_loss"])
    official = official_to_head_state(
        parity.group(tensors, "replay_grad.projector."), {"weight": tensors["replay_grad.dim_proj.weight"]}, cfg
    )[3]
    errors["replay_grad"] = max(parity.max_err(p.grad, official[n]) for n, p in head.named_parameters())
    return errors


if __name__ == "__main__":
    for case in parity.CASES:
        print(f"{case:15s}", "  ".join(f"{name} {value:.1e}" for name, value in report(case).items()))

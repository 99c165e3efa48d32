"""Record VBench's own consistency scores on fixed inputs, for tests/test_eval.py to compare against.

Run once, in an environment where the ``vbench`` package is installed (it pins numpy < 2 and
transformers 4.33, so not the project's environment), from the repository root:

    python tools/record_vbench_reference.py

Recorded with vbench 0.1.5 (the version is written into the output too).

What runs is VBench's own code, unchanged: ``subject_consistency``, ``background_consistency`` and
``temporal_flickering`` (``cal_score``, ``mae_seq``) from the installed package, each over three
videos. What is replaced is what lies before the formulas: the video decoding (``load_video``,
``get_frames``) returns the fixed inputs below, the image transforms are the identity, and the
feature extractors (DINO, CLIP) are the identity, so the per-frame features VBench scores are the
stored ones. No model weights are read. ``torchvision`` and ``clip`` are imported by those modules
but never called on this path: where they are not installed they are stubbed for the import only.

Inputs (fixed seeds, float32 features, uint8 frames; written to the same file):

- ``features.<v>``: per-frame features ``(t d)`` of video v, with 5, 8 and 3 frames of width 16;
  video 1 holds frames whose cosine to the first or previous frame is negative (VBench clamps to 0).
- ``frames.<v>``: ``(t h w c)`` uint8 frames of video v, 6 frames of 16x16x3; video 2 nearly static.

Output: ``tests/data/vbench_reference.safetensors`` (the inputs) and metadata ``vbench`` (the
version) and ``results`` (JSON: for each dimension VBench's ``[aggregate, per-video entries]``, the
layout of its ``<name>_eval_results.json``).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "vbench_reference.safetensors"
FRAME_COUNTS = (5, 8, 3)
VIDEOS = [f"/videos/video {v}-0.mp4" for v in range(3)]  # VBench's <prompt>-<seed>.mp4, one seed per prompt


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    tensors = {}
    for v, t in enumerate(FRAME_COUNTS):
        base = torch.randn(1, 16, generator=g)
        features = base + 0.6 * torch.randn(t, 16, generator=g)  # (t d)
        if v == 1:
            features[3] = -base[0] + 0.1 * torch.randn(16, generator=g)  # opposite to the first frame
            features[4] = -features[3]  # opposite to the previous one
        tensors[f"features.{v}"] = features.contiguous()
    for v in range(3):
        frames = torch.randint(0, 256, (6, 16, 16, 3), generator=g, dtype=torch.int64)
        if v == 2:
            frames = (frames[:1] + torch.randint(-3, 4, (6, 16, 16, 3), generator=g)).clamp(0, 255)
        tensors[f"frames.{v}"] = frames.to(torch.uint8).contiguous()
    return tensors


def _stub_unused_imports() -> None:
    """``torchvision`` and ``clip`` are imported by VBench's modules but not called on this path."""
    try:
        import torchvision.transforms
    except Exception:  # missing, or its compiled ops do not match this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        transforms = types.ModuleType("torchvision.transforms")
        for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "ToPILImage", "InterpolationMode"):
            setattr(transforms, name, type(name, (), {"BICUBIC": 3, "BILINEAR": 2}))
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms})
    try:
        import clip  # noqa: F401
    except Exception:
        sys.modules["clip"] = types.ModuleType("clip")


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x

    def encode_image(self, x):
        return x


def record(tensors: dict[str, torch.Tensor]) -> dict:
    _stub_unused_imports()
    import vbench.background_consistency as background
    import vbench.subject_consistency as subject
    import vbench.temporal_flickering as flickering

    by_path = {path: tensors[f"features.{v}"] for v, path in enumerate(VIDEOS)}
    frames = {path: [f.numpy() for f in tensors[f"frames.{v}"]] for v, path in enumerate(VIDEOS)}
    identity = lambda *args, **kwargs: (lambda x: x)
    subject.load_video = background.load_video = lambda path, *a, **k: by_path[path].clone()
    subject.dino_transform = background.clip_transform = identity
    flickering.get_frames = lambda path: frames[path]

    results = {}
    score, videos = subject.subject_consistency(_Identity(), VIDEOS, "cpu", read_frame=False)
    results["subject_consistency"] = [float(score), videos]
    score, videos = background.background_consistency(_Identity(), None, VIDEOS, "cpu", read_frame=False)
    results["background_consistency"] = [float(score), videos]
    score, videos = flickering.temporal_flickering(VIDEOS)
    results["temporal_flickering"] = [float(score), videos]
    return json.loads(json.dumps(results, default=float))  # numpy scalars -> floats


def main() -> None:
    torch.set_num_threads(1)
    np.random.seed(0)
    tensors = inputs()
    results = record(tensors)
    metadata = {"vbench": importlib.metadata.version("vbench"), "results": json.dumps(results, sort_keys=True)}
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT.relative_to(ROOT)} (vbench {metadata['vbench']})")
    for name, (score, videos) in results.items():
        print(f"{name}: {score:.9f}  per video {[round(v['video_results'], 9) for v in videos]}")


if __name__ == "__main__":
    main()

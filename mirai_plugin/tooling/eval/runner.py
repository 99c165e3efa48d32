"""A thin runner over the ``vbench`` package: check its weights first, then evaluate.

``vbench`` pins transformers 4.33 and numpy < 2: install it in its own environment
(docs/evaluation.md). Weights are read from ``VBENCH_CACHE_DIR`` (VBench's default
``~/.cache/vbench``); a missing file fails here, listing every missing path, instead
of VBench trying to download it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.eval.vbench_score import DIMENSIONS

# Files VBench loads per dimension, relative to its cache folder.
WEIGHTS = {
    "subject_consistency": ["dino_model/facebookresearch_dino_main", "dino_model/dino_vitbase16_pretrain.pth"],
    "background_consistency": ["clip_model/ViT-B-32.pt"],
    "temporal_flickering": [],
    "motion_smoothness": ["amt_model/amt-s.pth"],
    "dynamic_degree": ["raft_model/models/raft-things.pth"],
    "aesthetic_quality": ["aesthetic_model/emb_reader", "clip_model/ViT-L-14.pt"],
    "imaging_quality": ["pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"],
    "object_class": ["grit_model/grit_b_densecap_objectdet.pth"],
    "multiple_objects": ["grit_model/grit_b_densecap_objectdet.pth"],
    "color": ["grit_model/grit_b_densecap_objectdet.pth"],
    "spatial_relationship": ["grit_model/grit_b_densecap_objectdet.pth"],
    "human_action": ["umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth"],
    "scene": ["caption_model/tag2text_swin_14m.pth"],
    "appearance_style": ["clip_model/ViT-B-32.pt"],
    "temporal_style": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
    "overall_consistency": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
}
LONG_DIMENSIONS = ("subject_consistency", "background_consistency", "overall_consistency")


def cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def missing_weights(dimensions, cache: Path | None = None) -> list[str]:
    cache = cache or cache_dir()
    unknown = [d for d in dimensions if d not in WEIGHTS]
    if unknown:
        raise MiraiError(f"unknown VBench dimensions {unknown}; choose from {list(DIMENSIONS)}")
    return sorted({str(cache / f) for d in dimensions for f in WEIGHTS[d] if not (cache / f).exists()})


def run_vbench(videos: str | Path, *, mode: str, dimensions=None, output: str | Path, name: str,
               full_info: str | None = None, device: str = "cuda") -> Path:
    """Evaluate the videos in ``videos``; returns VBench's ``<name>_eval_results.json``.

    ``mode="standard"``: VBench's 16 dimensions on its prompt suite (``<prompt>-<seed>.mp4``).
    ``mode="long"``: the prompt-agnostic long-video protocol (subject, background and
    overall consistency), prompts read from the file names.
    """
    if mode not in ("standard", "long"):
        raise MiraiError(f"mode must be 'standard' or 'long', got {mode!r}")
    dimensions = list(dimensions or (DIMENSIONS if mode == "standard" else LONG_DIMENSIONS))
    if not Path(videos).is_dir():
        raise MiraiError(f"{videos} is not a folder of videos")
    if importlib.util.find_spec("vbench") is None:
        raise MiraiError(
            "the vbench package is not installed here; it pins transformers 4.33 and numpy<2, so install it in its "
            "own environment: python -m venv vbench-env && vbench-env/bin/pip install vbench /path/to/mirai-plugin"
        )
    missing = missing_weights(dimensions)
    if missing:
        raise MiraiError(
            f"VBench weights missing under {cache_dir()} (set VBENCH_CACHE_DIR to their folder): " + ", ".join(missing)
        )
    from vbench import VBench

    if full_info is None:
        import vbench

        full_info = str(Path(vbench.__file__).parent / "VBench_full_info.json")
    Path(output).mkdir(parents=True, exist_ok=True)
    VBench(device, full_info, str(output)).evaluate(
        videos_path=str(videos), name=name, dimension_list=dimensions, local=True,
        mode="vbench_standard" if mode == "standard" else "custom_input",
    )
    return Path(output) / f"{name}_eval_results.json"

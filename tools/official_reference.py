"""Reading the official reference tensors in tests/data (tools/make_reference.py writes them).

Used by tests/test_official_parity.py and tools/parity_report.py: the files, the config
and head the official run used, and its captured hidden states as ``capture_hidden`` records.
"""

import json
from pathlib import Path

from safetensors import safe_open

from mirai_plugin import ForesightConfig, ForesightHead, HiddenRecord

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = ["official_mean", "official_none", "official_adaln", "official_next"]
SEGMENT_FRAMES, TOKENS_PER_FRAME = 3, 16


def load(case):
    with safe_open(DATA / f"{case}.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return tensors, {k: json.loads(v) for k, v in meta.items() if k != "commit"} | {"commit": meta["commit"]}


def group(tensors, prefix):
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def config_for(meta, **changes):
    """The config the official run used, read from its own keys."""
    official = meta["config"]
    cfg = ForesightConfig.from_upstream(official).replace(
        offset_conditioning=official["delta_cond"], replay_device=None
    )
    assert cfg.offsets == tuple(meta["offsets"])
    return cfg.replace(**changes)


def official_head(tensors, meta, **changes):
    checkpoint = {"mirai_projector": group(tensors, "projector."), "foresight_dim_proj": group(tensors, "dim_proj.")}
    return ForesightHead.load_official(checkpoint, config=config_for(meta, **changes))


def student_records(tensors, meta):
    """Leaf copies of the official captured hidden states, positioned like capture_hidden records."""
    hidden = {k: tensors[f"student_hidden.{k}"].clone().requires_grad_(True) for k in meta["segments"]}
    records = [
        HiddenRecord(h, k * SEGMENT_FRAMES * TOKENS_PER_FRAME, i, h._version) for i, (k, h) in enumerate(hidden.items())
    ]
    return hidden, records


def max_err(a, b):
    return (a - b).abs().max().item()

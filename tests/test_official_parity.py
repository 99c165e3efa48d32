"""Parity with the official Video-Mirai code, from tensors it computed (tests/data/README.md).

Every comparison is float32 with max abs error <= 1e-5 (ATOL).
"""

import sys
from pathlib import Path

import pytest
import torch

from mirai_plugin import ForesightHead, HiddenRecord, MiraiError, fuse_targets
from mirai_plugin.official.projector import official_to_head_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from official_reference import (  # (the reader of tests/data, shared with tools/parity_report.py)
    CASES,
    SEGMENT_FRAMES,
    TOKENS_PER_FRAME,
    config_for,
    group,
    load,
    max_err,
    official_head,
    student_records,
)

ATOL = 1e-5


@pytest.mark.parametrize("case", CASES)
def test_reference_files_name_the_official_commit(case):
    _, meta = load(case)
    assert meta["commit"] == "281e47e46a0bb442437227fd8d664e8cb120d043"


@pytest.mark.parametrize("case", CASES)
def test_targets_match(case):
    tensors, meta = load(case)
    cfg = config_for(meta)
    targets = fuse_targets(
        tensors["encoder_hidden"],
        segment_frames=SEGMENT_FRAMES,
        tokens_per_frame=TOKENS_PER_FRAME,
        offsets=cfg.offsets,
        fusion=cfg.fusion,
    )
    assert targets.segments.tolist() == meta["segments"]
    for row, k in enumerate(meta["segments"]):
        if cfg.fusion == "mean":
            assert max_err(targets.target[0, row], tensors[f"target.{k}"][0]) <= ATOL
        else:
            for o, d in enumerate(cfg.offsets):
                assert bool(targets.valid[row, o]) == (f"target.{k}.{d}" in tensors)
                if targets.valid[row, o]:
                    assert max_err(targets.target[0, row, o], tensors[f"target.{k}.{d}"][0]) <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_projector_outputs_match(case):
    tensors, meta = load(case)
    head = official_head(tensors, meta)
    compared = set()
    with torch.no_grad():
        for k in meta["segments"]:
            for d in meta["offsets"]:
                name = f"projector_out.{k}" if meta["config"]["foresight_delta_mean_pool"] else f"projector_out.{k}.{d}"
                if name in tensors:
                    assert max_err(head.predict(tensors[f"student_hidden.{k}"], d), tensors[name]) <= ATOL
                    compared.add(name)
    assert compared and compared == {name for name in tensors if name.startswith("projector_out.")}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match(case):
    tensors, meta = load(case)
    head = official_head(tensors, meta)
    hidden, records = student_records(tensors, meta)
    loss = head(records, tensors["encoder_hidden"])
    assert max_err(loss, tensors["loss"]) <= ATOL
    loss.backward()

    cfg = head.config
    official_grads = official_to_head_state(
        group(tensors, "grad.projector."), {"weight": tensors["grad.dim_proj.weight"]}, cfg
    )[3]
    grads = dict(head.named_parameters())
    assert set(official_grads) == set(grads)
    for name, expected in official_grads.items():
        assert max_err(grads[name].grad, expected) <= ATOL, name
    for k, h in hidden.items():
        assert max_err(h.grad, tensors[f"grad.student_hidden.{k}"]) <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_replay_matches(case):
    tensors, meta = load(case)
    head = official_head(tensors, meta)
    _, records = student_records(tensors, meta)
    head(records, tensors["encoder_hidden"])
    head.zero_grad()
    replayed = head.replay(step=False)
    assert max_err(replayed, tensors["replay_loss"]) <= ATOL
    official_grads = official_to_head_state(
        group(tensors, "replay_grad.projector."), {"weight": tensors["replay_grad.dim_proj.weight"]}, head.config
    )[3]
    for name, p in head.named_parameters():
        assert max_err(p.grad, official_grads[name]) <= ATOL, name


@pytest.mark.parametrize(
    "case, wrong",
    [
        ("official_mean", dict(offsets=(1, 2))),  # window shifted by one
        ("official_mean", dict(offsets=(0,))),  # window one short
        ("official_none", dict(fusion="mean")),  # fused instead of per offset
        ("official_next", dict(offsets=(0, 1))),  # current segment wrongly included
    ],
)
def test_an_off_by_one_breaks_parity(case, wrong):
    tensors, meta = load(case)
    head = official_head(tensors, meta, **wrong)
    _, records = student_records(tensors, meta)
    loss = head(records, tensors["encoder_hidden"])
    assert max_err(loss, tensors["loss"]) > 100 * ATOL


def test_a_segment_shift_breaks_parity():
    tensors, meta = load("official_mean")
    head = official_head(tensors, meta)
    _hidden, records = student_records(tensors, meta)
    shifted = [
        HiddenRecord(r.hidden, r.position + SEGMENT_FRAMES * TOKENS_PER_FRAME, i, r.version)
        for i, r in enumerate(records[:-1])
    ]
    loss = head(shifted, tensors["encoder_hidden"])
    assert max_err(loss, tensors["loss"]) > 100 * ATOL


def test_load_official_names_missing_unexpected_and_misshaped_keys():
    tensors, meta = load("official_mean")
    projector, dim_proj = group(tensors, "projector."), group(tensors, "dim_proj.")
    cfg = config_for(meta)

    missing = {k: v for k, v in projector.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(MiraiError, match=r"missing \['predictor.blocks.1.ffn_out.bias'\]"):
        ForesightHead.load_official({"mirai_projector": missing, "foresight_dim_proj": dim_proj}, config=cfg)

    extra = {**projector, "timestep_embedder.mlp.0.weight": torch.zeros(16, 256)}
    with pytest.raises(MiraiError, match=r"does not implement: \['timestep_embedder.mlp.0.weight'\]"):
        ForesightHead.load_official({"mirai_projector": extra, "foresight_dim_proj": dim_proj}, config=cfg)

    misshaped = {**projector, "blocks.0.q.bias": torch.zeros(17)}
    with pytest.raises(
        MiraiError, match=r"wrong shapes \['predictor.blocks.0.to_q.bias: checkpoint \(17,\) vs head \(16,\)'\]"
    ):
        ForesightHead.load_official({"mirai_projector": misshaped, "foresight_dim_proj": dim_proj}, config=cfg)

    with pytest.raises(MiraiError, match="config disagrees with the official projector: predictor_depth=2"):
        ForesightHead.load_official({"mirai_projector": projector}, config=cfg.replace(predictor_depth=2))
    with pytest.raises(MiraiError, match="not an official DiT projector"):
        ForesightHead.load_official({"weight": torch.zeros(2, 2)})

    # FSDP-wrapped key names load too; without a dim projection the widths must already match
    wrapped = {f"_fsdp_wrapped_module.{k}": v for k, v in projector.items()}
    head = ForesightHead.load_official({"mirai_projector": wrapped}, config=cfg)
    assert head.project is None and head.encoder_dim == 16

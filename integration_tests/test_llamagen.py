"""LlamaGen's real class-conditional trainer (``autoregressive/train/train_c2i.py``, ``main(args)``) on a CPU
through ``llamagen_harness.py``: a tiny GPT on random image codes, single process and
``torchrun --nproc_per_node 2`` (gloo, DDP).

Needs a checkout (skipped otherwise, see ``checkouts.py``): ``MIRAI_LLAMAGEN_DIR``. Every run is its own process.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkouts import UPSTREAMS, checkout
from trainer_runs import assert_moved, assert_term_reaches_up_to

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "llamagen_harness.py"
pytestmark = pytest.mark.slow  # each test runs the real trainer in a subprocess (tens of seconds)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return checkout("llamagen", tmp_path_factory.mktemp("llamagen") / "LlamaGen")


def train(repo: Path, out: Path, *, steps: int, overrides=None, extra=(), nproc=1, expect_ok=True, grad_probe=False,
          model=None, data=None):
    args = [str(HARNESS), "--checkout", str(repo), "--steps", str(steps), "--out", str(out),
            "--overrides", json.dumps(overrides or {}), "--model", json.dumps(model or {}),
            "--data", json.dumps(data or {})]
    if grad_probe:
        args.append("--grad-probe")
    if extra:
        args += ["--", *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    result = subprocess.run(launcher + args, capture_output=True, text=True, cwd=HERE.parent, timeout=300)
    if not expect_ok:
        return result
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return torch.load(out / "result.pt", map_location="cpu", weights_only=True)


def losses(result: dict) -> list[float]:
    return [record["loss"] for record in result["losses"]]


def logged_losses(result: dict) -> list[float]:
    """The "Train Loss" the trainer logs (averaged over ranks, 4 decimals)."""
    return [float(line.split("Train Loss: ")[1].split(",")[0]) for line in result["logs"] if "Train Loss: " in line]


def changed(before: dict, after: dict) -> dict[str, bool]:
    assert before.keys() == after.keys()
    return {name: not torch.equal(before[name], after[name]) for name in before}


def test_three_steps_in_one_process(repo, tmp_path):
    result = train(repo, tmp_path / "run", steps=3, overrides={"max_grad_norm": 0.5},
                   extra=["--weight-decay", "0.04"])  # raw train_c2i.py arguments, after a bare --
    extra = result["extra"]
    assert extra["commit"] == UPSTREAMS["llamagen"].commit and extra["world_size"] == 1 and extra["final_step"] == 3
    # overrides and raw arguments both went through the trainer's own parser
    assert result["args"]["max_grad_norm"] == 0.5 and result["args"]["weight_decay"] == 0.04
    assert result["args"]["gpt_model"] == "GPT-tiny" and result["args"]["dist_backend"] == "gloo"
    assert result["args"]["mixed_precision"] == "bf16"  # upstream's default, as shipped

    # one backpropagated loss per iteration, finite, going down; it is the loss the trainer logs
    assert [(r["step"], r["index"]) for r in result["losses"]] == [(1, 0), (2, 0), (3, 0)]
    values = losses(result)
    assert all(math.isfinite(v) for v in values)
    assert values[0] == pytest.approx(math.log(64), abs=1e-4)  # upstream zero-initialises the output layer
    assert values[-1] < values[0] and len(set(values)) == 3
    assert logged_losses(result) == [round(v, 4) for v in values]

    # every parameter moved; the EMA moved towards the model; the optimizer took 3 steps
    assert all(changed(result["model_init"], result["model"]).values())
    assert any(changed(result["model_init"], result["ema"]).values())
    assert any(changed(result["ema"], result["model"]).values())
    assert {int(state["step"]) for state in result["optimizer"]["state"].values()} == {3}

    # the trainer's own checkpoint (local and "cloud") holds the same weights, after step 3
    assert [Path(p).name for p in result["checkpoints"]] == ["0000003.pt", "0000003.pt"]
    for path in result["checkpoints"]:
        saved = torch.load(path, map_location="cpu", weights_only=False)  # it pickles args
        assert saved["steps"] == 3
        assert not any(changed(result["model"], saved["model"]).values())
        assert not any(changed(result["ema"], saved["ema"]).values())


def test_two_ranks(repo, tmp_path):
    result = train(repo, tmp_path / "run", steps=3, nproc=2)
    assert result["extra"]["world_size"] == 2 and result["extra"]["final_step"] == 3
    assert result["args"]["global_batch_size"] == 4  # 2 per rank
    assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in losses(result))  # rank 0's
    assert len(logged_losses(result)) == 3 and all(math.isfinite(v) for v in logged_losses(result))  # averaged
    assert all(changed(result["model_init"], result["model"]).values())


@pytest.mark.parametrize("precision", ["none", "fp16"])
def test_mixed_precision(repo, tmp_path, precision):
    """``torch.cuda.amp.autocast`` / ``GradScaler`` run as their CPU versions (the other tests run upstream's
    default, bf16)."""
    result = train(repo, tmp_path / "run", steps=2, overrides={"mixed_precision": precision, "ema": False})
    assert result["args"]["mixed_precision"] == precision and result["ema"] is None
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in losses(result))
    assert any(changed(result["model_init"], result["model"]).values())
    default = train(repo, tmp_path / "default", steps=2, overrides={"ema": False})
    assert default["args"]["mixed_precision"] == "bf16"
    assert losses(default)[1] != losses(result)[1]  # step 1 is log 64 in any dtype (zero output layer)


def test_arguments_reach_the_trainers_parser_unchanged(repo, tmp_path):
    """An option the unpatched train_c2i.py does not have is refused by its own parser."""
    run = train(repo, tmp_path / "run", steps=1, extra=["--mirai-weight", "0.5"], expect_ok=False)
    assert run.returncode != 0
    assert "unrecognized arguments: --mirai-weight 0.5" in run.stderr


# ------------------------------------------------------- the mirai-plugin patch

MIRAI_E = ["--mirai", "E", "--mirai-layer", "1", "--mirai-projector-dim", "16"]


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    return checkout("llamagen", tmp_path_factory.mktemp("llamagen-patched") / "LlamaGen", "llamagen")


def block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_patched_trainer_with_mirai_off_is_the_unpatched_trainer(repo, patched, tmp_path):
    plain = train(repo, tmp_path / "plain", steps=3)
    off = train(patched, tmp_path / "off", steps=3)  # --mirai none is the default
    assert losses(off) == losses(plain)
    assert not any(changed(plain["model"], off["model"]).values())
    assert not any(changed(plain["ema"], off["ema"]).values())
    saved = torch.load(off["checkpoints"][0], map_location="cpu", weights_only=False)
    assert "foresight" not in saved and "mirai" not in saved


def test_mirai_e_term_reaches_blocks_up_to_its_layer_and_is_saved(patched, tmp_path):
    off = train(patched, tmp_path / "off", steps=2, grad_probe=True)
    on = train(patched, tmp_path / "on", steps=2, grad_probe=True, extra=MIRAI_E)
    assert all(math.isfinite(v) for v in losses(on)) and losses(on) != losses(off)
    assert any(re.search(r"Mirai: foresight_loss -?\d\.\d{4}, foresight_weight 2\.0000$", line) for line in on["logs"])
    # Step 1: LlamaGen zero-initialises its output layer, so the blocks' gradient is the term's alone.
    reached = {}
    for name, grad in on["grads"].items():
        index = block_index(name)
        if index is not None:
            reached[index] = reached.get(index, 0.0) + grad.abs().sum().item()
    assert reached[0] > 0 and reached[1] > 0 and reached[2] == 0 and reached[3] == 0, reached
    assert all(off["grads"][n].abs().sum() == 0 for n in off["grads"] if block_index(n) is not None)

    saved = torch.load(on["checkpoints"][0], map_location="cpu", weights_only=False)
    assert saved["model"].keys() == on["model"].keys() == off["model"].keys()  # the GPT's entries unchanged
    assert saved["foresight"]["head"]["steps_taken"] == 2 and "source" in saved["foresight"]
    assert len(saved["foresight"]["source"]) < len(saved["model"])  # the EMA copy keeps blocks 0..1 only
    assert_moved(on["extra"]["glue"]["head_init"], saved["foresight"]["head"]["head"])


# Nothing random between the batch and the loss: no dropout, no label drop, no flip; float32 throughout.
NO_RANDOMNESS = {"overrides": {"mixed_precision": "none", "dropout_p": 0.0, "token_dropout_p": 0.0},
                 "model": {"class_dropout_prob": 0.0}, "data": {"flip": False}}


def relative_distance(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over every tensor of two state dicts with the same keys (L2 norms)."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    difference = torch.cat([(a[k].double() - b[k].double()).flatten() for k in b]).norm()
    return (difference / torch.cat([b[k].double().flatten() for k in b]).norm()).item()


def head_update(result: dict) -> dict:
    """The head's weights after the run's last step minus its weights as built."""
    saved = torch.load(result["checkpoints"][0], map_location="cpu", weights_only=False)
    before = result["extra"]["glue"]["head_init"]
    return {k: saved["foresight"]["head"]["head"][k].float() - before[k].float() for k in before}


def mirai_lines(result: dict, after: int) -> list[str]:
    """The logged ``Mirai:`` lines of the steps after ``after``, without the logger's time stamp."""
    lines = [line[line.index("(step="):] for line in result["logs"] if "Mirai: " in line]
    return [line for line in lines if int(line[len("(step="):].split(")")[0]) > after]


def test_mirai_e_resumes_from_the_trainers_checkpoint(patched, tmp_path):
    """A run stopped after step 4 (the end of epoch 0: 16 images, 4 per step) and resumed for 2 steps equals a
    run of 6 steps straight: the GPT, the backpropagated losses (the term included), the logged term, the head
    and its AdamW state. Only at an epoch boundary: upstream resumes at the start of the checkpoint's epoch
    (``train_steps`` rounded down), so a run stopped inside an epoch trains on that epoch's first batches
    again. Nothing random in the step (``NO_RANDOMNESS``): upstream does not restore the global RNG that the
    flip, dropout and label drop draw from."""
    first = train(patched, tmp_path / "first", steps=4, extra=MIRAI_E, **NO_RANDOMNESS)
    checkpoint = first["checkpoints"][0]
    assert Path(checkpoint).name == "0000004.pt"
    resumed = train(patched, tmp_path / "resumed", steps=2, extra=[*MIRAI_E, "--gpt-ckpt", checkpoint], **NO_RANDOMNESS)
    straight = train(patched, tmp_path / "straight", steps=6, extra=MIRAI_E, **NO_RANDOMNESS)
    saved = torch.load(resumed["checkpoints"][0], map_location="cpu", weights_only=False)
    expected = torch.load(straight["checkpoints"][0], map_location="cpu", weights_only=False)
    assert saved["steps"] == expected["steps"] == 6
    assert saved["foresight"]["head"]["steps_taken"] == 6  # 4 restored + 2 more
    assert losses(resumed) == losses(straight)[4:]
    assert mirai_lines(resumed, 4) == mirai_lines(straight, 4) and len(mirai_lines(resumed, 4)) == 2
    assert not any(changed(resumed["model"], straight["model"]).values())
    assert not any(changed(saved["foresight"]["head"]["head"], expected["foresight"]["head"]["head"]).values())
    moments = [(key, state[key]) for state in saved["foresight"]["head"]["optimizer"]["state"].values()
               for key in sorted(state)]
    expected_moments = [(key, state[key]) for state in expected["foresight"]["head"]["optimizer"]["state"].values()
                        for key in sorted(state)]
    assert len(moments) == len(expected_moments) > 0
    assert all(k == j and torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for (k, a), (j, b) in zip(moments, expected_moments))
    # the control: the run without its checkpoint (2 steps from scratch) is not the straight run
    fresh = train(patched, tmp_path / "fresh", steps=2, extra=MIRAI_E, **NO_RANDOMNESS)
    assert losses(fresh) != losses(straight)[4:]

    # a checkpoint written before 0.2.0 holds the same entry under "mirai": it resumes the same way
    legacy = torch.load(checkpoint, map_location="cpu", weights_only=False)
    legacy["mirai"] = legacy.pop("foresight")
    torch.save(legacy, tmp_path / "legacy.pt")
    resumed = train(patched, tmp_path / "legacy", steps=2, extra=[*MIRAI_E, "--gpt-ckpt", str(tmp_path / "legacy.pt")],
                    **NO_RANDOMNESS)
    saved = torch.load(resumed["checkpoints"][0], map_location="cpu", weights_only=False)
    assert saved["foresight"]["head"]["steps_taken"] == 6 and "mirai" not in saved
    assert not any(changed(saved["foresight"]["head"]["head"], expected["foresight"]["head"]["head"]).values())


def test_mirai_e_on_two_ranks(patched, tmp_path):
    """DDP, two ranks: the term's gradient (step 1, where the blocks get only the term's: see above) reaches
    blocks 0..1 and none after, against the same seeds with Mirai off; the head moved."""
    result = train(patched, tmp_path / "run", steps=2, nproc=2, extra=MIRAI_E, grad_probe=True)
    assert result["extra"]["world_size"] == 2 and all(math.isfinite(v) for v in losses(result))
    assert any("Mirai: foresight_loss" in line for line in result["logs"])
    off = train(patched, tmp_path / "off", steps=1, nproc=2, grad_probe=True)
    assert_term_reaches_up_to(result["grads"], off["grads"], 1, index=block_index)
    saved = torch.load(result["checkpoints"][0], map_location="cpu", weights_only=False)
    assert_moved(result["extra"]["glue"]["head_init"], saved["foresight"]["head"]["head"])


def test_mirai_e_two_ranks_step_the_head_as_one_process_on_the_global_batch(patched, tmp_path):
    """Two ranks of 2 samples and one process of 4 (the same 4: the sampler's permutation does not depend on
    the number of ranks, rank r takes every other one) start from the same GPT and head (seed 0 on rank 0,
    broadcast) and, with nothing random in the step, must take the same step: the head's update (after -
    before, one AdamW step) and the GPT's gradient equal the one-process run's within float32 reduction
    order. One process on 2 samples (a rank stepping with its own gradient only) is the control."""
    two = train(patched, tmp_path / "two", steps=1, nproc=2, extra=MIRAI_E, grad_probe=True, **NO_RANDOMNESS)
    one = train(patched, tmp_path / "one", steps=1, extra=MIRAI_E, grad_probe=True, **NO_RANDOMNESS)
    half_overrides = {**NO_RANDOMNESS["overrides"], "global_batch_size": 2}
    half = train(patched, tmp_path / "half", steps=1, extra=MIRAI_E,
                 **{**NO_RANDOMNESS, "overrides": half_overrides})
    assert two["extra"]["world_size"] == 2 and one["extra"]["world_size"] == 1
    assert two["args"]["global_batch_size"] == one["args"]["global_batch_size"] == 4
    # the same start: the GPT as DDP holds it and the head as built
    assert relative_distance(two["model_init"], one["model_init"]) == 0
    assert relative_distance(two["extra"]["glue"]["head_init"], one["extra"]["glue"]["head_init"]) == 0
    # the same batch: the GPT's gradient (DDP's average; the term's share included) is the global batch's
    tolerance = 1e-4  # float32 sums in another order differ by ~1e-6 of the value
    assert relative_distance(two["grads"], one["grads"]) < tolerance
    expected = head_update(one)
    assert max(v.abs().max().item() for v in expected.values()) > 0  # the head stepped
    assert relative_distance(head_update(two), expected) < tolerance
    # the control: the update from half the batch alone is far outside the tolerance
    assert relative_distance(head_update(half), expected) > 100 * tolerance


def test_mirai_i_with_a_decoded_batch_and_a_frozen_encoder(patched, tmp_path):
    sys.path.insert(0, str(HERE))
    from mirai_standins import TinyPatchEncoder, TinyVQ

    torch.manual_seed(0)
    torch.save(TinyVQ(), tmp_path / "vq.pt")
    torch.save(TinyPatchEncoder(), tmp_path / "encoder.pt")
    extra = ["--mirai", "I", "--mirai-layer", "1", "--mirai-projector-dim", "16",
             "--mirai-vq-ckpt", str(tmp_path / "vq.pt"), "--mirai-encoder", str(tmp_path / "encoder.pt")]  # fmt: skip
    on = train(patched, tmp_path / "on", steps=2, grad_probe=True, extra=extra)
    assert all(math.isfinite(v) for v in losses(on))
    assert any("Mirai: foresight_loss" in line for line in on["logs"])
    reached = {
        block_index(n): g.abs().sum().item()
        for n, g in on["grads"].items()
        if block_index(n) is not None and n.endswith("wo.weight")
    }
    assert reached[0] > 0 and reached[1] > 0 and reached[2] == 0 and reached[3] == 0, reached

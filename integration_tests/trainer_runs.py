"""Running ``trainer_harness.py`` from the tests (each run its own process: the checkouts share top-level
package names) and reading what it wrote; the dtypes a recipe's run must have; the checks every run with
the term on makes (its gradient reaches blocks 0..l of the generator and nothing after, the head moved)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "trainer_harness.py"
LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}  # tiny models have 4 blocks
EMA_SOON = {"ema_start_step": 1}  # EMA built after step 1, updated on the generator step at 5
FLOAT32 = {"mixed_precision": False}  # a run in float32 where the recipe trains in bf16 (a test says why)


def train(repo: Path, config: str, out: Path, *, steps: int, overrides=None, nproc=1, trainer="dmd",
          grad_probe=False, rollout=None, rollout_frames=None, split_probe=False, seed=None) -> dict:
    args = [
        str(HARNESS), "--checkout", str(repo), "--trainer", trainer, "--config", config,
        "--steps", str(steps), "--out", str(out), "--overrides", json.dumps(overrides or {}),
    ]
    if grad_probe:
        args.append("--grad-probe")
    if seed is not None:  # the harness's --seed (default 1): the trainer's seed, rank r draws from seed + r
        args += ["--seed", str(seed)]
    if rollout is not None:  # Rolling Forcing: this rollout mode instead of the trainer's coin
        args += ["--rollout", rollout]
    if rollout_frames is not None:  # Rolling Forcing: rollouts of this length instead of the trainer's draw
        args += ["--rollout-frames", str(rollout_frames)]
    if split_probe:  # Rolling Forcing: each captured call rerun whole, next to the glue's per-block split
        args.append("--split-probe")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    result = subprocess.run(launcher + args, capture_output=True, text=True, cwd=HERE.parent, timeout=900)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return torch.load(out / "result.pt", map_location="cpu", weights_only=False)


def inference(repo: Path, config: str, saved: Path, out: Path, *, use_ema=False) -> torch.Tensor:
    """The checkout's inference pipeline on a checkpoint's generator (strict load), or its generator_ema."""
    args = [sys.executable, str(HARNESS), "--mode", "inference", "--checkout", str(repo), "--config", config,
            "--checkpoint", str(saved), "--noise-seed", "0", "--out", str(out)]
    done = subprocess.run(args + (["--use-ema"] if use_ema else []), capture_output=True, text=True, cwd=HERE.parent,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return torch.load(out / "inference.pt", weights_only=False)["video"]


def checkpoint_path(out: Path) -> Path:
    return sorted((out / "logs").glob("checkpoint_model_*/model.pt"))[-1]


def checkpoint(out: Path) -> dict:
    return torch.load(checkpoint_path(out), map_location="cpu", weights_only=False)


def logged(result: dict, key: str) -> list[float]:
    return [entry[key] for entry in result["logs"] if key in entry]


def generator_step(result: dict) -> dict:
    return next(r for r in result["losses"] if r["train_generator"])


def block_index(name: str) -> int | None:
    match = re.search(r"\bblocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def term_reach(on: dict, off: dict, *, index=block_index, names=None) -> dict[int, float]:
    """Per generator block: the largest ``|on - off|`` over its parameters' gradients, for two runs of the same
    seed with and without the term (``names``: only these parameters)."""
    assert on.keys() == off.keys(), sorted(on.keys() ^ off.keys())
    reached: dict[int, float] = {}
    for name in on if names is None else names:
        block = index(name)
        if block is not None:
            difference = (on[name].float() - off[name].float()).abs().max().item()
            reached[block] = max(reached.get(block, 0.0), difference)
    return reached


def assert_term_reaches_up_to(on: dict, off: dict, layer: int, *, index=block_index, names=None) -> dict[int, float]:
    """The term's gradient (``on - off``, same seed) is non-zero in every block 0..``layer`` and exactly zero
    in every block after it: it fails when the term is cut off from the generator (nothing differs) and when
    it reaches past the student layer."""
    reached = term_reach(on, off, index=index, names=names)
    assert max(reached) > layer, reached  # blocks after the layer are there to be checked
    assert all(reached.get(i, 0.0) > 0 for i in range(layer + 1)), reached
    assert all(reached[i] == 0.0 for i in reached if i > layer), reached
    return reached


def assert_moved(before: dict, after: dict) -> float:
    """The weights changed (an optimizer step was taken): returns the relative L2 size of the update."""
    assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())
    update = torch.cat([(after[k].float() - before[k].float()).flatten() for k in before])
    size = torch.cat([before[k].float().flatten() for k in before]).norm()
    assert update.abs().max() > 0, "the weights did not move"
    return (update.norm() / size.clamp_min(1e-12)).item()


def assert_bf16_recipe_dtypes(glue: dict, saved: dict | None = None, *, compute: str = "torch.bfloat16") -> None:
    """What a ``mixed_precision: true`` run hands the head and what it keeps (docs/scaling.md, "Precision"):
    the rollout, the captured states and the encoder output in bf16, the predictor computing in ``compute``
    over float32 weights, the replay cache in bf16; in the checkpoint, the head's weights and AdamW state in
    float32."""
    dtypes = glue["dtypes"]
    assert dtypes["captured"] and dtypes["encoder_output"], dtypes  # the head ran
    for key in ("video", "captured", "encoder_output", "replay_hidden", "replay_target"):
        assert set(dtypes[key]) <= {"torch.bfloat16"}, (key, dtypes[key])
    assert set(dtypes["prediction"]) == {compute}, dtypes["prediction"]
    assert set(dtypes["head_parameters"]) == {"torch.float32"}, dtypes["head_parameters"]
    if saved is not None:
        entry = saved["foresight"]
        assert {str(v.dtype) for v in entry["head"].values()} == {"torch.float32"}
        moments = [v for state in entry["optimizer"]["state"].values() for v in state.values()
                   if torch.is_tensor(v) and v.dim() > 0]
        assert moments and {str(v.dtype) for v in moments} == {"torch.float32"}


def assert_same_run(run: dict, baseline: dict) -> None:
    assert run["logs"] == baseline["logs"] and run["losses"] == baseline["losses"]
    for part in ("generator", "critic", "generator_init", "critic_init"):
        state, expected = run.get(part) or run["extra"][part], baseline.get(part) or baseline["extra"][part]
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected), part
    ema, expected = run["extra"]["ema"]["shadow"], baseline["extra"]["ema"]["shadow"]
    assert expected is not None and ema.keys() == expected.keys()
    assert all(torch.equal(ema[k], expected[k]) for k in expected)


def assert_restored(run: dict, unpatched: dict, entry: dict, *, generator: dict) -> None:
    """The term on: generator and critic as the unpatched trainer restores them, the head as saved."""
    for part in ("generator_init", "critic_init"):
        state, expected = run["extra"][part], unpatched["extra"][part]
        assert all(torch.equal(state[k], expected[k]) for k in expected), part
    assert all(torch.equal(run["extra"]["generator_init"][k], generator[k]) for k in generator)
    head = run["extra"]["head_init"]
    assert head["steps_taken"] == entry["steps_taken"] == 2  # generator steps 0 and 5
    assert all(torch.equal(head["head"][k], entry["head"][k]) for k in entry["head"])
    for name, state in entry["optimizer"]["state"].items():
        assert all(torch.equal(head["optimizer"]["state"][name][k], v) for k, v in state.items()), name

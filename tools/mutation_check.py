"""Deliberate breaks of the package, and the tests that must catch each one.

Each entry of ``MUTATIONS`` replaces one piece of text in one file of the package. For each, the script copies
the repository to a temporary folder (the working tree is never edited), applies the break there, runs the
named tests against the copy (``PYTHONPATH`` = the copy; the integration tests need the ``MIRAI_*_DIR``
checkouts, README.md in ``integration_tests/``), and reports every named test that failed (caught) or passed
(missed). A named test that is skipped counts as missed. First, every named test must pass on the unbroken
copy (exit status 2 otherwise). The exit status is 1 when any mutation was missed.

    python tools/mutation_check.py                 # every mutation, every named test
    python tools/mutation_check.py --fast          # only the named tests under tests/ (seconds to minutes)
    python tools/mutation_check.py --only head-not-stepped --list

Add a mutation by appending a ``Mutation`` to ``MUTATIONS``: ``old`` must occur exactly once in ``file``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IT = "integration_tests/"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # occurs exactly once in ``file``
    new: str
    tests: tuple[str, ...]  # pytest node ids, every one of them must fail


MUTATIONS: list[Mutation] = [
    Mutation(
        "term-detached-from-the-generator", "mirai_plugin/head.py",
        "torch.stack(list(group_hidden), dim=1),",
        "torch.stack([h.detach() for h in group_hidden], dim=1),",
        ("tests/test_term_reaches_the_generator.py",
         f"{IT}test_patched_trainers.py::test_self_forcing_generator_and_critic_steps[1]",
         f"{IT}test_patched_trainers.py::test_causal_forcing_dmd[chunkwise]",
         f"{IT}test_patched_trainers.py::test_causal_forcing_stage2_ode_with_ground_truth_future",
         f"{IT}test_longlive.py::test_longlive_lora_gradients"),
    ),
    Mutation(
        "image-term-detached-from-the-generator", "mirai_plugin/image/head.py",
        "pred = self.projectors[k](hidden[:, rows.to(hidden.device)].to(dtype))",
        "pred = self.projectors[k](hidden.detach()[:, rows.to(hidden.device)].to(dtype))",
        (f"{IT}test_llamagen.py::test_mirai_e_term_reaches_blocks_up_to_its_layer_and_is_saved",),
    ),
    Mutation(
        "head-not-stepped", "mirai_plugin/optimizer.py",
        "        self.optimizer.step()\n        self.optimizer.zero_grad(set_to_none=True)",
        "        self.optimizer.zero_grad(set_to_none=True)",
        ("tests/test_head.py::test_replay_matches_the_generator_step_and_touches_only_the_head",
         "tests/test_training_loop.py::test_stop_and_resume_matches_an_uninterrupted_run",
         f"{IT}test_patched_trainers.py::test_causal_forcing_dmd[chunkwise]",
         f"{IT}test_patched_trainers.py::test_causal_forcing_stage2_ode_with_ground_truth_future",
         f"{IT}test_longlive.py::test_longlive_t2v_generator_and_critic",
         f"{IT}test_longlive.py::test_longlive_gradient_accumulation"),
    ),
    Mutation(
        "i2v-first-block-mask-ignored", "mirai_plugin/integrations/longlive.py",
        'return holds_condition and self.i2v_first_block == "mask"',
        "return False",
        ("tests/test_longlive_glue.py::test_i2v_block_zero_is_supervised_unless_masked",
         f"{IT}test_longlive.py::test_longlive_i2v_generator_and_critic"),
    ),
    Mutation(
        "window-first-block-mask-ignored", "mirai_plugin/integrations/longlive.py",
        'if self.window_first_block == "mask" and k == 0:',
        "if False:",
        (f"{IT}test_longlive.py::test_longlive_rollout_longer_than_window",),
    ),
    Mutation(
        "scene-cut-ignored", "mirai_plugin/integrations/longlive.py",
        'cuts = conditional_dict.get("scene_cut_mask") if self.scene_cut == "mask" else None',
        "cuts = None",
        ("tests/test_longlive_glue.py::test_scene_cuts_split_the_window_into_shots",
         f"{IT}test_longlive.py::test_longlive_scene_cut"),
    ),
    Mutation(
        "accumulation-not-divided", "mirai_plugin/integrations/longlive.py",
        'self._logged["foresight_loss"] = torch.stack(self._terms).mean()',
        'self._logged["foresight_loss"] = torch.stack(self._terms).sum()',
        (f"{IT}test_longlive.py::test_longlive_gradient_accumulation",),
    ),
    Mutation(
        "flop-count-doubled", "mirai_plugin/tooling/flops.py",
        "extra = sum(extras.values())",
        "extra = 2 * sum(extras.values())",
        ("tests/test_flops.py",),
    ),
    Mutation(
        "weight-not-applied", "mirai_plugin/head.py",
        "        weighted = loss * weight\n",
        "        weighted = loss\n",
        ("tests/test_head.py::test_breakdown_names_segments_and_unweighted_losses",
         "tests/test_training_loop.py::test_head_follows_the_schedule_and_is_inert_while_off"),
    ),
    Mutation(
        "head-flops-doubled", "mirai_plugin/tooling/flops.py",
        "        head_step = 3 * (predictor + projection)  # forward + backward\n",
        "        head_step = 6 * (predictor + projection)  # forward + backward\n",
        ("tests/test_documented_numbers.py::test_the_flops_output_in_performance_md_is_what_the_command_prints",
         "tests/test_documented_numbers.py::test_the_longlive_cost_table_is_what_the_estimator_gives",
         "tests/test_documented_numbers.py::test_the_precision_comparison_rows_are_what_the_estimator_gives"),
    ),
    Mutation(
        "memory-of-the-adamw-moments-changed", "mirai_plugin/tooling/memory.py",
        '        "optimizer_state": 2 * per_rank * pb,\n',
        '        "optimizer_state": 3 * per_rank * pb,\n',
        ("tests/test_documented_numbers.py::test_the_memory_output_in_scaling_md_is_what_the_command_prints",
         "tests/test_documented_numbers.py::test_the_per_rank_memory_table_in_scaling_md_is_what_the_benchmark_prints",
         "tests/test_documented_numbers.py::test_the_precision_comparison_rows_are_what_the_estimator_gives"),
    ),
    Mutation(
        "bf16-compute-path-ignored", "mirai_plugin/head.py",
        "        dtype = self.compute_dtype\n        autocast = dtype",
        "        dtype = next(self.parameters()).dtype\n        autocast = dtype",
        ("tests/test_segmented.py::test_bfloat16_compute_keeps_float32_weights_and_a_close_loss",),
    ),
    Mutation(
        "capture-keeps-the-first-call-instead-of-the-last", "mirai_plugin/capture.py",
        "        self._records[key] = HiddenRecord(hidden, position, self._calls, hidden._version)\n",
        "        self._records.setdefault(key, HiddenRecord(hidden, position, self._calls, hidden._version))\n",
        ("tests/test_capture.py::test_grad_only_false_keeps_every_call_keyed_by_position",),
    ),
    Mutation(
        "temporal-flickering-off-by-one-frame-pair", "mirai_plugin/tooling/eval/consistency.py",
        "    return (255.0 - mae.mean(-1)) / 255.0\n",
        "    return (255.0 - mae[..., 1:].mean(-1)) / 255.0\n",
        ("tests/test_eval.py::test_consistency_formulas_match_vbench_on_recorded_inputs",),
    ),
    Mutation(
        "subject-consistency-without-the-clamp-of-negative-cosines", "mirai_plugin/tooling/eval/consistency.py",
        "    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1).clamp_min(0)\n",
        "    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1)\n",
        ("tests/test_eval.py::test_consistency_formulas_match_vbench_on_recorded_inputs",),
    ),
    Mutation(
        "wan-padding-trimmed-at-the-wrong-end", "mirai_plugin/encoder.py",
        "            hidden = hidden[:, :tokens]  # (b t e): drop Wan's padding to seq_len\n",
        "            hidden = hidden[:, -tokens:]  # (b t e): drop Wan's padding to seq_len\n",
        ("tests/test_encoder.py::test_wan_wrapper_trims_padding",),
    ),
    Mutation(
        "diffusers-timestep-passed-as-a-fraction-of-1000", "mirai_plugin/encoder.py",
        "            timestep=timestep,\n            encoder_hidden_states=encoder_hidden_states,\n",
        "            timestep=timestep / 1000,\n            encoder_hidden_states=encoder_hidden_states,\n",
        ("tests/test_diffusers.py::test_frozen_encoder_passes_timestep_and_extra_keywords",),
    ),
    Mutation(
        "two-rank-head-gradients-not-averaged", "mirai_plugin/collectives.py",
        "    dist.all_reduce(flat)\n    flat /= world()[1]\n",
        "",
        (f"{IT}test_llamagen.py::test_mirai_e_two_ranks_step_the_head_as_one_process_on_the_global_batch",),
    ),
    Mutation(
        "llamagen-ema-target-not-broadcast", "mirai_plugin/integrations/llamagen.py",
        "            broadcast_module(self.source.model)\n",
        "",
        (f"{IT}test_llamagen.py::test_mirai_e_two_ranks_step_the_head_as_one_process_on_the_global_batch",),
    ),
    Mutation(
        "image-head-adamw-state-not-restored", "mirai_plugin/image/head.py",
        'restore_state(self.optimization, state["head"], state.get("optimizer"), what="training state",',
        'restore_state(self.optimization, state["head"], None, what="training state",',
        (f"{IT}test_llamagen.py::test_mirai_e_resumes_from_the_trainers_checkpoint",),
    ),
    Mutation(
        "llamagen-ema-target-not-restored", "mirai_plugin/integrations/llamagen.py",
        "        if source is not None:\n            self.source.load_state_dict(source)\n",
        "",
        (f"{IT}test_llamagen.py::test_mirai_e_resumes_from_the_trainers_checkpoint",),
    ),
    Mutation(
        "replay-does-not-step-the-head", "mirai_plugin/replay.py",
        "        if step:\n            optimization.clip_and_step()\n        return total / local_pairs",
        "        return total / local_pairs",
        ("tests/test_distributed.py::test_two_ranks_equal_one_process_on_the_global_batch[fsdp-fsdp-True]",),
    ),
    Mutation(
        "rolling-window-blocks-reversed-inside-a-call", "mirai_plugin/integrations/rolling_forcing.py",
        "for j, view in enumerate(record.hidden.split(n, dim=1)):",
        "for j, view in enumerate(reversed(record.hidden.split(n, dim=1))):",
        ("tests/test_rolling_forcing_term.py",
         f"{IT}test_rolling_forcing.py::test_generator_and_critic_steps[rolling-forcing-rolling-21]",
         f"{IT}test_rolling_forcing.py::test_generator_and_critic_steps[causal-forcing-long-video-rolling-27]"),
    ),
    Mutation(
        "rolling-term-logged-but-not-added", "mirai_plugin/integrations/rolling_forcing.py",
        "        return loss + term\n",
        "        return loss + 0 * term\n",
        ("tests/test_rolling_forcing_term.py::test_generator_step_replay_checkpoint_and_logging",
         f"{IT}test_rolling_forcing.py::test_generator_and_critic_steps[rolling-forcing-self_forcing-27]",
         f"{IT}test_rolling_forcing.py::test_generator_and_critic_steps[causal-forcing-long-video-self_forcing-21]"),
    ),
]

# The copy's ``mirai_plugin.patches`` (an editable install elsewhere maps that package to its own tree).
_SITECUSTOMIZE = '''
import importlib.abc, importlib.util, os, sys
_root = os.environ["MIRAI_MUTATION_TREE"]
class _Patches(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mirai_plugin.patches":
            folder = os.path.join(_root, "patches")
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
        return None
sys.meta_path.insert(0, _Patches())
'''


def selected(mutation: Mutation, fast: bool) -> tuple[str, ...]:
    return tuple(t for t in mutation.tests if not (fast and t.startswith(IT)))


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: the text to replace occurs {count} times in {mutation.file} "
                         f"(must be once): {mutation.old!r}")
    path.write_text(text.replace(mutation.old, mutation.new))


def copy_tree(dest: Path) -> Path:
    """The repository's files as git sees them (tracked and untracked, not ignored) into ``dest``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def run_tests(tree: Path, tests: tuple[str, ...], shim: Path, timeout: int) -> dict[str, str]:
    """pytest on the copy: each node id -> ``passed`` / ``failed`` / ``skipped`` / ``error``."""
    report = tree / ".mutation-report.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(tree)]), "MIRAI_MUTATION_TREE": str(tree),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("MIRAI_REQUIRE_UPSTREAMS", None)  # a skip is reported here, not turned into a failure
    env.pop("MIRAI_UPSTREAM_REPORT", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
               f"--junitxml={report}", *tests]
    try:
        subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict.fromkeys(tests, "timeout")
    return outcomes(report, tests)


def outcomes(report: Path, tests: tuple[str, ...]) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    if not report.exists():
        return dict.fromkeys(tests, "error")
    per_test: dict[str, list[str]] = {t: [] for t in tests}
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{module}::{case.get('name')}"
        result = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        result = {"failure": "failed"}.get(result, result)
        for test in tests:
            if node == test or node.startswith(test.rstrip("/") + "::") or (
                    "::" not in test and module.startswith(test.rstrip("/"))):
                per_test[test].append(result)
    return {t: ("failed" if {"failed", "error"} & set(r) else "skipped" if not r or set(r) == {"skipped"}
                else "passed") for t, r in per_test.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the named tests under tests/")
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per mutation's test run")
    opts = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not opts.only or m.name in opts.only]
    if opts.only and len(chosen) != len(set(opts.only)):
        parser.error(f"unknown mutation in {opts.only}; known: {[m.name for m in MUTATIONS]}")
    chosen = [m for m in chosen if selected(m, opts.fast)]
    if opts.list:
        for m in chosen:
            print(f"{m.name}  ({m.file})\n" + "".join(f"    {t}\n" for t in selected(m, opts.fast)))
        return 0
    missed = []
    with tempfile.TemporaryDirectory(prefix="mirai-mutation-") as scratch:
        shim = Path(scratch) / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        pristine = copy_tree(Path(scratch) / "pristine")
        # The control: unbroken, every named test passes on the copy (else a failure below says nothing).
        every = tuple(dict.fromkeys(t for m in chosen for t in selected(m, opts.fast)))
        baseline = run_tests(pristine, every, shim, opts.timeout)
        broken = {t: r for t, r in baseline.items() if r != "passed"}
        if broken:
            print(f"the unbroken copy does not pass the named tests: {broken}")
            return 2
        for m in chosen:
            tree = Path(scratch) / m.name
            shutil.copytree(pristine, tree)
            apply(m, tree)
            started = time.perf_counter()
            results = run_tests(tree, selected(m, opts.fast), shim, opts.timeout)
            seconds = time.perf_counter() - started
            shutil.rmtree(tree)  # restore: the next mutation starts from the pristine copy
            caught = all(r == "failed" for r in results.values())
            print(f"{'caught' if caught else 'MISSED'}  {m.name}  ({m.file}, {seconds:.0f} s)")
            for test, result in results.items():
                print(f"    {'caught' if result == 'failed' else 'missed'} ({result}): {test}")
            sys.stdout.flush()
            if not caught:
                missed.append(m.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

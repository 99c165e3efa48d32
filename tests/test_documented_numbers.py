"""The numbers docs/ prints from `mirai-plugin flops` and `mirai-plugin memory` are what those commands print now.

Each number is read from the doc (a pasted output block or a table cell) and compared with the estimator at the
precision the doc prints it, so a change in either the estimator or the doc fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from docs_tables import DOCS, block_after, row
from test_longlive_glue import CAUSAL, flatten_longlive

from mirai_plugin import ForesightConfig
from mirai_plugin.integrations.longlive import resolve_longlive
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.flops import CycleShape, cycle_for, dmd_cycle, rolling_rollout

ENCODER = "encoder forward to block l (one pass, t = 0)"


def printed(capsys, *args: str) -> list[str]:
    assert main(list(args)) == 0
    return capsys.readouterr().out.rstrip("\n").splitlines()


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def tflop(flops: float) -> str:
    return f"{flops / 1e12:,.1f}"


def head_flops(result: dict) -> float:
    """The head's matmuls: every foresight term but the encoder pass."""
    return result["foresight"] - result["foresight_terms"][ENCODER]


def longlive() -> tuple[dict, dict]:
    resolved = resolve_longlive(flatten_longlive(CAUSAL))
    cycle = cycle_for(resolved)
    return (dmd_cycle(cycle, resolved.foresight.replace(compute_dtype="bfloat16")),
            dmd_cycle(cycle, resolved.foresight.replace(compute_dtype="float32")))


def test_the_flops_output_in_performance_md_is_what_the_command_prints(capsys):
    assert printed(capsys, "flops") == block_after("performance.md", "`mirai-plugin flops`:")


def test_the_memory_output_in_scaling_md_is_what_the_command_prints(capsys):
    marker = "(`mirai-plugin memory --world-size 8 --accumulation 8`)"
    assert printed(capsys, "memory", "--world-size", "8", "--accumulation", "8") == block_after("scaling.md", marker)


def test_the_per_rank_memory_table_in_scaling_md_is_what_the_benchmark_prints(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_memory.py"
    spec = importlib.util.spec_from_file_location("scaling_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tables()
    table = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (1|8) \|", line)]
    documented = [line for line in (DOCS / "scaling.md").read_text().splitlines() if re.match(r"\| (1|8) \| ", line)]
    assert len(table) == 8 and table == documented


def test_the_longlive_cost_table_is_what_the_estimator_gives():
    bf16, _ = longlive()
    terms = bf16["foresight_terms"]
    expected = {
        "baseline DMD cycle": tflop(bf16["baseline"]),
        "+ encoder forward to block 15": tflop(terms[ENCODER]),
        "+ predictor and projection, forward and backward": tflop(terms["predictor + projection forward and backward"]),
        "+ recomputation under the activation budget": tflop(terms["recomputation under the activation budget"]),
        "+ projector replay (4 critic-only iterations)": tflop(terms["projector replay (critic steps)"]),
        "+ replay recomputation": tflop(terms["replay recomputation under the activation budget"]),
        "**foresight overhead**": f"**{percent(bf16['overhead'])}**",
    }
    assert {label: row("longlive.md", label)[0] for label in expected} == expected


def test_the_precision_comparison_rows_are_what_the_estimator_gives(capsys):
    """docs/scaling.md and docs/self-forcing.md: the head's TFLOP, the time shares of a float32 and a bf16 head,
    and the memory of a float32 head (the `memory` command's default) per rank."""
    recipe = {dtype: dmd_cycle(CycleShape(), ForesightConfig(compute_dtype=dtype)) for dtype in ("float32", "bfloat16")}
    bf16, float32 = longlive()
    assert row("scaling.md", "`mirai-plugin flops`: the head's matmuls")[:2] == [
        f"{tflop(head_flops(recipe['float32']))} TFLOP", f"{tflop(head_flops(bf16))} TFLOP"]
    flop_shares = f"(FLOPs alone: {percent(recipe['bfloat16']['overhead'])}, {percent(bf16['overhead'])})"
    shares = row("scaling.md", f"the term's share of a cycle at tensor-core rates, float32 / bf16 head {flop_shares}")
    assert shares[:2] == [
        f"{percent(recipe['float32']['time_overhead'])} / {percent(recipe['bfloat16']['time_overhead'])}",
        f"{percent(float32['time_overhead'])} / {percent(bf16['time_overhead'])}"]
    label = f"`mirai-plugin flops`: the term's share of a DMD cycle at tensor-core rates (FLOPs: " \
            f"{percent(recipe['bfloat16']['overhead'])})"
    assert row("self-forcing.md", label)[:2] == [percent(recipe["float32"]["time_overhead"]),
                                                 percent(recipe["bfloat16"]["time_overhead"])]

    table = {line[:86].strip(): line[86:].strip() for line in printed(capsys, "memory")}
    gib = [f"{float(table[name].replace(',', '')) / 1024:.2f}" for name in
           ("GPU, generator step (upper bound)", "GPU, critic step (replay)")]
    assert row("self-forcing.md", "`mirai-plugin memory`: generator / critic step per rank")[0] == " / ".join(gib) + \
        " GiB"
    assert row("scaling.md", "`mirai-plugin memory` at peak per rank")[0].startswith(f"{gib[0]} / ")


def rolling_recipes() -> list:
    """The resolved runs of the shipped rolling_forcing_dmd.yaml of each checkout plus the recipe's foresight keys,
    over default_config.yaml's num_training_frames: 27 (Rolling Forcing L = 5, Causal-Forcing long_video/ L = 4)."""
    from omegaconf import OmegaConf
    from test_rolling_forcing_tools import FORESIGHT, SHIPPED

    from mirai_plugin.integrations.resolve import resolve_rolling_forcing

    runs = []
    for upstream, steps in (("rolling-forcing", None), ("causal-forcing-long-video", [1000, 750, 500, 250])):
        config = OmegaConf.merge(OmegaConf.create({"num_training_frames": 27}), OmegaConf.create(SHIPPED),
                                 OmegaConf.create(FORESIGHT), OmegaConf.create({"foresight_compute_dtype": "bfloat16"}))
        if steps is not None:
            config.denoising_step_list = steps
        runs.append(resolve_rolling_forcing(config, upstream=upstream))
    return runs


def test_the_rolling_forcing_cost_table_is_what_the_estimator_gives():
    columns = [dmd_cycle(cycle_for(run), run.foresight) for run in rolling_recipes()]
    term = lambda name: lambda r: tflop(r["terms"][name])
    for label, value in (
        ("generator rollout, generator step (TFLOP)", term("generator rollout (generator step)")),
        ("generator backward", term("generator backward")),
        ("real score forwards", term("real score forwards (cond + uncond)")),
        ("generator rollouts, critic steps", term("generator rollouts (critic steps, no grad)")),
        ("baseline DMD cycle", lambda r: tflop(r["baseline"])),
        ("+ encoder forward to block 20", lambda r: tflop(r["foresight_terms"][ENCODER])),
        ("+ head (predictor, projection, replay, recomputation)", lambda r: tflop(head_flops(r))),
        ("**foresight overhead per cycle**", lambda r: f"**{percent(r['overhead'])}**"),
    ):
        assert row("rolling-forcing.md", label)[:2] == [value(r) for r in columns], label


def test_the_rolling_forcing_per_mode_numbers_are_what_the_estimator_gives():
    runs = rolling_recipes()
    cycles = [cycle_for(run) for run in runs]
    pair = lambda a, b: f"{a / 1e12:.0f} ({b / 1e12:.0f})"
    plain = [dmd_cycle(dataclasses.replace(c, rolling_window_blocks=None))["terms"] for c in cycles]
    (forward5, grad5), (forward4, grad4) = (rolling_rollout(c) for c in cycles)
    short = [dmd_cycle(dataclasses.replace(c, frames=21), run.foresight) for c, run in zip(cycles, runs)]
    text = " ".join((DOCS / "rolling-forcing.md").read_text().split())
    rollout, backward = "generator rollout (generator step)", "generator backward"
    assert (f"forwards {pair(forward5, forward4)} TFLOP in rolling mode against "
            f"{pair(plain[0][rollout], plain[1][rollout])} in self-forcing mode") in text
    assert f"grad calls {pair(grad5, grad4)} against {pair(plain[0][backward] / 3, plain[1][backward] / 3)}" in text
    assert f"overhead is {percent(short[0]['overhead'])} ({percent(short[1]['overhead'])})" in text

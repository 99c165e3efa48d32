"""The ``mirai-plugin`` command.

    mirai-plugin demo [--quick] [--registration N] [--train-models] [--steps N] [--seeds N] [--offsets 0 1]
                      [--layer L] [--workers N] [--out DIR]
    mirai-plugin demo --image [--quick] [--steps N] [--seeds N] [--layer L] [--out DIR]
    mirai-plugin probe FEATURES.safetensors [--horizons 1 2 3] [--test-videos N] [--peak P] [--json]
    mirai-plugin score RESULTS.json [...] [--json]
    mirai-plugin compare BASELINE CANDIDATE [--bootstrap 10000] [--seed 0] [--json]
    mirai-plugin vbench VIDEOS_DIR --mode standard|long [--dimensions ...] --out DIR --name NAME
    mirai-plugin flops [CONFIG.yaml] [--upstream NAME] [--no-defaults] [--json]
    mirai-plugin memory [CONFIG.yaml] [--upstream NAME] [--no-defaults] [--world-size N]
                        [--head-sharding S | --sharded] [--batch B] [--accumulation A] [--json]
    mirai-plugin config check CONFIG.yaml [--upstream NAME] [--stage dmd|ode] [--no-defaults] [--json]
    mirai-plugin patch list
    mirai-plugin patch check  --upstream self-forcing PATH
    mirai-plugin patch apply  --upstream self-forcing PATH
    mirai-plugin patch revert --upstream self-forcing PATH

A user error (a bad flag value, a missing or malformed file, a config that does not
check) prints one line ``error: ...`` on stderr and exits with status 2, without a
traceback; ``--debug`` or ``MIRAI_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mirai_plugin.errors import MiraiError


def _patch_command(args: argparse.Namespace) -> int:
    from mirai_plugin.tooling.patching import PATCHES, apply_patch, inspect_checkout, parse_patch, revert_patch

    if args.action == "list":
        width = max(len(name) for name in PATCHES)
        for patch in PATCHES.values():
            print(f"{patch.name:{width}s} {patch.repository} @ {patch.commit[:12]}  {patch.description}")
        return 0
    action = {"check": inspect_checkout, "apply": apply_patch, "revert": revert_patch}[args.action]
    state = action(args.upstream, args.path)
    patch = state.patch
    print(f"{patch.repository} at {patch.commit[:12]}: {state.path}")
    if args.action == "check":
        if state.applied and state.lacking:
            print(f"patch is applied, except in {list(state.lacking)}: {state.lacking_details()}. "
                  f"`mirai-plugin patch revert --upstream {args.upstream} {state.path}` removes the rest")
        else:
            print("patch is applied" if state.applied else "patch applies cleanly (not applied yet)")
        return 0
    verb = "added" if args.action == "apply" else "removed"
    for change in parse_patch(patch.text()):
        if change.path in state.lacking:  # revert skipped it
            print(f"  skipped: {change.path} ({'deleted' if change.path in state.deleted else 'restored'} since)")
            continue
        what = "new file" if change.new_file else f"{len(change.added)} line(s)"
        print(f"  {verb}: {change.path} ({what})")
    return 0


def _at_least(flag: str, value: Any, minimum: int, fix: str = "") -> None:
    if value is not None and value < minimum:
        raise MiraiError(f"{flag} must be an int >= {minimum}, got {value}" + (f"; {fix}" if fix else ""))


def _check_demo_flags(args: argparse.Namespace) -> None:
    """Every numeric flag of the demo, checked before anything runs."""
    _at_least("--steps", args.steps, 1, "leave it out for the default")
    _at_least("--seeds", args.seeds, 1, "give at least one seed, or leave it out for the default of 3")
    _at_least("--layer", args.layer, 0, "a 0-based block index")
    _at_least("--registration", args.registration, 1, "the registrations are numbered from 1")
    _at_least("--workers", args.workers, 1, "leave it out for one per CPU")
    for offset in args.offsets or ():
        _at_least("--offsets", offset, 0, "0 is the current segment, 1 the next")
    if args.offsets and len(set(args.offsets)) != len(args.offsets):
        raise MiraiError(f"--offsets has duplicates: {args.offsets}; give each offset once")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise MiraiError(f"--out {args.out} is a file; the demo writes results.json and figure.png into a folder")


def _require_extra(extra: str, module: str, package: str) -> None:
    """A tooling command whose extra is not installed stops here, naming the install (exit 2)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MiraiError(f"this command needs {package}, which the core install leaves out: "
                         f"pip install 'mirai-plugin[{extra}]' (or pip install {package})")


def _demo_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    _require_extra("demo", "PIL", "pillow")  # the figure; checked before anything trains
    _check_demo_flags(args)
    if args.image:
        return _image_demo_command(args)
    from mirai_plugin.tooling.demo.registration import CURRENT
    from mirai_plugin.tooling.demo.run import default_registration, make_config, run_demo

    registration = args.registration
    if registration is None and args.quick:
        registration = CURRENT  # a smoke test of the current registration: its tiny models train on the spot
    if registration is None:
        registration, note = default_registration()
        if note:
            print(note)
    cfg = make_config(
        registration=registration,
        quick_run=args.quick,
        steps=args.steps,
        seeds=args.seeds,
        offsets=tuple(args.offsets) if args.offsets else None,
        layer=args.layer,
    )
    # Stopping at the encoder gate is a registered outcome, not an error; results.json records it.
    run_demo(cfg, Path(args.out or "mirai-demo"), workers=args.workers, train_models=args.train_models)
    return 0


def _image_demo_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mirai_plugin.tooling.demo.image import make_image_config, run_image_demo

    video_only = [flag for flag, value in (("--offsets", args.offsets), ("--workers", args.workers),
                                           ("--registration", args.registration),
                                           ("--train-models", args.train_models or None)) if value is not None]
    if video_only:
        raise MiraiError(f"{' and '.join(video_only)} apply to the video demo only; drop them with --image")
    cfg = make_image_config(
        quick=args.quick,
        steps=args.steps,
        seeds=tuple(range(args.seeds)) if args.seeds is not None else None,
        layer=args.layer,
    )
    run_image_demo(cfg, Path(args.out or "mirai-demo-image"))
    return 0


def _probe_command(args: argparse.Namespace) -> int:
    import json

    from mirai_plugin.files import read_safetensors
    from mirai_plugin.tooling.probe import probe

    tensors, _ = read_safetensors(args.features, what="probe features")
    if "targets" not in tensors:
        raise MiraiError(f"{args.features} has no 'targets' tensor (videos, segments, tokens, values)")
    sets = {k.partition(".")[2] or "features": v for k, v in tensors.items() if k.split(".")[0] == "features"}
    if not sets:
        raise MiraiError(
            f"{args.features} has no 'features' or 'features.<name>' tensor (videos, segments, tokens, width)"
        )
    results = {
        name: probe(feats, tensors["targets"], horizons=args.horizons, test_videos=args.test_videos, peak=args.peak,
                    steps=args.steps)
        for name, feats in sets.items()
    }
    if args.json:
        print(json.dumps({name: {str(h): r for h, r in res.items()} for name, res in results.items()}, indent=2))
        return 0
    print(f"{'features':20s} " + " ".join(f"{'h=' + str(h) + ' PSNR':>12s}" for h in args.horizons))
    for name, res in results.items():
        print(f"{name:20s} " + " ".join(f"{res[h]['psnr']:12.2f}" for h in args.horizons))
    return 0


def _result_files(path: str) -> list:
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir():
        files = sorted(folder.glob("*_eval_results.json"))
        if not files:
            raise MiraiError(f"{folder} holds no *_eval_results.json files")
        return files
    if not folder.exists():
        raise MiraiError(f"no such file or folder: {folder}")
    return [folder]


def _read_json(path: str, what: str) -> Any:
    import json
    from pathlib import Path

    from mirai_plugin.tooling.eval.results import unique_keys

    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MiraiError(f"{path} is not {what} (not JSON: {error})") from None


def _read_percent_csv(path: str) -> dict[str, Any]:
    """``dimension,percent`` rows (a header row starting with ``dimension`` is skipped)."""
    from pathlib import Path

    table: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lower().startswith("dimension"):
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != 2:
            raise MiraiError(f"{path} line {number}: expected 'dimension,percent', got {line!r}")
        if cells[0] in lines:
            raise MiraiError(f"{path}: {cells[0]!r} appears twice, on lines {lines[cells[0]]} and {number}; keep one")
        lines[cells[0]] = number
        try:
            table[cells[0]] = float(cells[1])
        except ValueError:
            raise MiraiError(f"{path} line {number}: the score of {cells[0]!r} is not a number: {cells[1]!r}") from None
    return table


def _scores_of(paths: list[str]) -> dict[str, float]:
    from pathlib import Path

    from mirai_plugin.tooling.eval import load_aggregates, scores_from_percent

    if len(paths) == 1 and Path(paths[0]).is_file():
        if paths[0].endswith(".csv"):
            return scores_from_percent(_read_percent_csv(paths[0]))
        data = _read_json(paths[0], "a VBench result file or a table of the 16 dimensions in percent")
        if isinstance(data, dict) and data and not any(isinstance(v, list) for v in data.values()):
            return scores_from_percent(data)  # a table of the 16 dimensions in percent
    return load_aggregates([f for path in paths for f in _result_files(path)])


def _score_command(args: argparse.Namespace) -> int:
    import json

    from mirai_plugin.tooling.eval import DIMENSIONS, final_scores

    scores = _scores_of(args.results)
    totals = final_scores(scores)
    rows = [(name, 100 * scores[name]) for name in DIMENSIONS]
    rows += [(part, 100 * totals[part]) for part in ("quality", "semantic", "total")]
    if args.json:
        print(json.dumps({name: value for name, value in rows}, indent=2))
    else:
        for name, value in rows:
            print(f"{name:24s} {value:8.2f}")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    import json
    import time

    from mirai_plugin.tooling.eval import compare, load_results

    _at_least("--bootstrap", args.bootstrap, 2, "10000 is the usual count")
    _at_least("--seed", args.seed, 0)
    if not 0 < args.level < 1:
        raise MiraiError(f"--level must be a confidence level in (0, 1), got {args.level}; 0.95 for a 95% interval")
    frames = _read_json(args.frames, "a JSON object {video file name: frames}") if args.frames else None
    if frames is not None and not isinstance(frames, dict):
        raise MiraiError(f"--frames {args.frames} must hold a JSON object {{video file name: frames}}, "
                         f"got {type(frames).__name__}")
    baseline = load_results(_result_files(args.baseline), frames=frames)
    candidate = load_results(_result_files(args.candidate), frames=frames)
    start = time.perf_counter()
    rows = compare(baseline, candidate, replicates=args.bootstrap, seed=args.seed, level=args.level)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps([{**row.__dict__, "significant": row.significant} for row in rows], indent=2))
        return 0
    percent = int(round(100 * args.level))
    print(f"{'dimension':24s} {'baseline':>9s} {'candidate':>9s} {'diff':>8s} {'se':>7s}  {percent}% CI")
    for row in rows:
        mark = " *" if row.significant else ""
        print(f"{row.name:24s} {row.baseline:9.2f} {row.candidate:9.2f} {row.difference:+8.2f} "
              f"{row.standard_error:7.2f}"
              f"  [{row.low:+.2f}, {row.high:+.2f}]{mark}")
    print(f"\n* CI excludes 0. Paired prompt-level bootstrap, {args.bootstrap} replicates, seed {args.seed}, "
          f"{seconds:.1f}s.")
    return 0


def _vbench_command(args: argparse.Namespace) -> int:
    from mirai_plugin.tooling.eval.runner import run_vbench

    path = run_vbench(args.videos, mode=args.mode, dimensions=args.dimensions, output=args.out, name=args.name,
                      device=args.device)
    print(f"wrote {path}")
    return 0


def _trainer_config(args: argparse.Namespace, *, text: bool) -> Any:
    """The config file of ``args`` read by its upstream's resolver; the detection is the first line printed."""
    from mirai_plugin.tooling.trainer_config import load_trainer_config

    loaded = load_trainer_config(args.config, upstream=args.upstream, stage=getattr(args, "stage", None),
                                 defaults=not getattr(args, "no_defaults", False))
    if text:
        print(loaded.detection.line())
    return loaded


def _cycle_of(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """``(loaded config or None, CycleShape, ForesightConfig, why)``: of the config file, else the official
    recipe. The config's ``compute_dtype`` is what the head computes in, and ``why`` says where it comes from: an
    FSDP head under ``mixed_precision`` computes in FSDP's bfloat16 parameter dtype whatever the key says."""
    from mirai_plugin import ForesightConfig
    from mirai_plugin.tooling.flops import CycleShape, cycle_for

    if not args.config:
        if args.upstream:
            raise MiraiError("--upstream names the reader of a config file: pass the config too")
        return None, CycleShape(), ForesightConfig(), "the default foresight_compute_dtype"
    loaded = _trainer_config(args, text=not args.json)
    cycle, foresight = cycle_for(loaded.resolved), loaded.resolved.foresight
    if not foresight.enabled:
        foresight = foresight.replace(weight=ForesightConfig().weight)  # estimate the recipe's term anyway
    why = "foresight_compute_dtype"
    sharding = getattr(args, "head_sharding", None) or loaded.resolved.glue.get("foresight_head_sharding")
    if sharding == "fsdp" and cycle.mixed_precision and foresight.compute_dtype != "bfloat16":
        foresight, why = foresight.replace(compute_dtype="bfloat16"), "an FSDP head: FSDP's bfloat16 param dtype"
    return loaded, cycle, foresight, why


def _flops_command(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from mirai_plugin.tooling.flops import dmd_cycle, report

    loaded, cycle, foresight, why = _cycle_of(args)
    result = dmd_cycle(cycle, foresight)
    if args.json:
        if loaded is not None:
            result.update(upstream=loaded.detection.to_dict(), resolved=loaded.resolved.to_dict(), cycle=asdict(cycle))
        print(json.dumps(result, indent=2))
    else:
        print(report(result, why=why))
    return 0


def _memory_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from mirai_plugin.tooling.memory import memory_for_cycle

    loaded, cycle, foresight, _ = _cycle_of(args)
    sharding, batch, accumulation, mixed_precision = "replicate", 1, 1, True  # the official recipe
    if loaded is not None:
        run = loaded.resolved.trainer
        sharding, batch, accumulation = loaded.resolved.glue["foresight_head_sharding"], run.batch_per_rank, \
            run.accumulation_steps
        mixed_precision = run.mixed_precision
    sharding = "fsdp" if args.sharded else (args.head_sharding or sharding)
    compute_dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else (
        torch.bfloat16 if mixed_precision else torch.float32)
    memory = memory_for_cycle(
        cycle, foresight, batch_per_rank=args.batch if args.batch is not None else batch,
        world_size=args.world_size, sharded=sharding == "fsdp",  # ddp keeps the whole head on every rank
        compute_dtype=compute_dtype,
        accumulation_steps=args.accumulation if args.accumulation is not None else accumulation,
    )
    if args.json:
        report = memory.to_dict()
        if loaded is not None:
            report.update(upstream=loaded.detection.to_dict(), resolved=loaded.resolved.to_dict(),
                          head_sharding=sharding)
        print(json.dumps(report, indent=2))
    else:
        print(memory.report())
    return 0


def _config_command(args: argparse.Namespace) -> int:
    import json

    loaded = _trainer_config(args, text=not args.json)
    resolved = loaded.resolved
    if args.json:
        print(json.dumps({**resolved.to_dict(), "upstream": loaded.detection.to_dict()}, indent=2))
        return 0
    over = f" (merged over {loaded.merged_over}, as the trainer does)" if loaded.merged_over else ""
    print(f"{args.config}{over}: stage {resolved.stage}")
    foresight = resolved.foresight
    state = f"ON, weight {foresight.weight:g}" if foresight.enabled else "OFF (foresight_weight is 0 or absent)"
    print(f"foresight term: {state}")
    for name, value in foresight.to_dict().items():
        print(f"  {name:24s} {value}")
    for key, value in resolved.glue.items():
        print(f"  {key:24s} {value}")
    print("the trainer runs:")
    for key, value in resolved.to_dict()["trainer"].items():
        print(f"  {key:24s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mirai_plugin.tooling.patching import PATCHES  # light: the names the readers take too

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (or set MIRAI_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="mirai-plugin", parents=[common],
                                     description="Video-Mirai foresight loss for causal video diffusion trainers.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], **kwargs)

    demo = command(commands, "demo",
                   help="the method on a toy video world (or --image: a token AR image model), on a CPU")
    demo.add_argument("--image", action="store_true",
                      help="Mirai on a tiny raster-order token AR image model: baseline, Mirai-E, Mirai-I")
    demo.add_argument("--quick", action="store_true",
                      help="every stage at a tiny size, its tiny models trained on the spot (about a minute; the CI "
                           "smoke test)")
    demo.add_argument("--registration", type=int,
                      help="video: the registration whose settings and models run (default: the newest one "
                           "whose models are shipped and whose size is fixed, and the newest with --quick; 1 "
                           "reproduces the first registration's run, which stops at its encoder gate)")
    demo.add_argument("--train-models", action="store_true",
                      help="video: train the teacher, base and student when neither shipped nor cached models match "
                           "(hours on a CPU); without it the demo says what it would train and stops")
    demo.add_argument("--steps", type=int, help="student training steps (video: DMD generator steps)")
    demo.add_argument("--seeds", type=int, help="number of seeds (default: the pre-registered 3)")
    demo.add_argument("--offsets", type=int, nargs="+", help="foresight offsets (default 0 1)")
    demo.add_argument("--layer", type=int, help="student block whose output is aligned (video default: 2 of 4)")
    demo.add_argument("--workers", type=int, help="video: (seed, arm) tasks run side by side (default: one per CPU)")
    demo.add_argument("--out", help="output folder (results.json, figure.png); default mirai-demo or mirai-demo-image")
    demo.set_defaults(run=_demo_command)

    probe = command(commands, "probe", help="train readouts from frozen features to future segments, report PSNR")
    probe.add_argument("features", help="safetensors file: 'targets' and 'features' or 'features.<name>'")
    probe.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 3])
    probe.add_argument("--test-videos", type=int, help="held-out videos (default a quarter)")
    probe.add_argument("--peak", type=float, default=1.0, help="value range of the targets, for PSNR")
    probe.add_argument("--steps", type=int, default=400, help="readout training steps")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(run=_probe_command)
    score = command(commands, "score", help="VBench Quality/Semantic/Total from result files or a percent table")
    score.add_argument("results", nargs="+",
                       help="*_eval_results.json files or folders, or one table (JSON/CSV, percent)")
    score.add_argument("--json", action="store_true")
    score.set_defaults(run=_score_command)

    comp = command(commands, "compare", help="paired prompt-level bootstrap of the VBench difference")
    comp.add_argument("baseline", help="result file or folder of *_eval_results.json")
    comp.add_argument("candidate", help="result file or folder of *_eval_results.json")
    comp.add_argument("--bootstrap", type=int, default=10_000, help="replicates")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--level", type=float, default=0.95, help="confidence level of the percentile CI")
    comp.add_argument("--frames", help="JSON {video file name: frames} for frame-weighting subject consistency")
    comp.add_argument("--json", action="store_true")
    comp.set_defaults(run=_compare_command)

    vb = command(commands, "vbench", help="run VBench (needs the vbench package and its weights)")
    vb.add_argument("videos")
    vb.add_argument("--mode", choices=("standard", "long"), default="standard")
    vb.add_argument("--dimensions", nargs="+")
    vb.add_argument("--out", required=True)
    vb.add_argument("--name", required=True)
    vb.add_argument("--device", default="cuda")
    vb.set_defaults(run=_vbench_command)

    upstream_help = (f"which trainer's reader applies: {', '.join(PATCHES)} (the names `patch` takes); "
                     f"default: detected from the config, and the detection printed (never rolling-forcing or "
                     f"causal-forcing-long-video, whose configs look like Self-Forcing's: name them)")
    no_defaults_help = ("Self-Forcing layout: do not merge default_config.yaml (./configs/, else next to the config), "
                        "which the trainers merge")
    flops = command(commands, "flops", help="FLOPs of one DMD cycle with and without the foresight term")
    flops.add_argument("config", nargs="?", help="an upstream config (default: the official recipe)")
    flops.add_argument("--upstream", help=upstream_help)
    flops.add_argument("--no-defaults", action="store_true", help=no_defaults_help)
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(run=_flops_command)

    memory = command(commands, "memory", help="memory the foresight term adds per rank, by component")
    memory.add_argument("config", nargs="?", help="an upstream config (default: the official recipe)")
    memory.add_argument("--upstream", help=upstream_help)
    memory.add_argument("--no-defaults", action="store_true", help=no_defaults_help)
    memory.add_argument("--world-size", type=int, default=1, help="ranks (default 1)")
    memory.add_argument("--head-sharding", choices=("replicate", "ddp", "fsdp"),
                        help="the head's sharding (default: the config's foresight_head_sharding, else replicate)")
    memory.add_argument("--sharded", action="store_true", help="the head sharded with FSDP: --head-sharding fsdp")
    memory.add_argument("--batch", type=int,
                        help="videos per rank per micro-step (default: the config's batch_size, else 1)")
    memory.add_argument("--accumulation", type=int,
                        help="gradient-accumulation micro-steps (default: the config's gradient_accumulation_steps, "
                             "else 1)")
    memory.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the generator and encoder tensors (default: bfloat16 with mixed_precision)")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(run=_memory_command)

    config = command(commands, "config", help="check a trainer config's foresight keys before a run")
    config_actions = config.add_subparsers(dest="action", required=True)
    check = command(config_actions, "check", help="print the resolved foresight settings, or the errors")
    check.add_argument("config", help="the trainer's YAML config")
    check.add_argument("--upstream", help=upstream_help)
    check.add_argument("--stage", choices=("dmd", "ode"),
                       help="Self-Forcing layout: Stage 3 DMD or Stage 2 ODE glue (default: from the config's trainer "
                            "key, else ode when foresight_encoder_name is set)")
    check.add_argument("--no-defaults", action="store_true", help=no_defaults_help)
    check.add_argument("--json", action="store_true")
    check.set_defaults(run=_config_command)

    patch = command(commands, "patch", help="splice mirai_plugin into an upstream trainer checkout")
    actions = patch.add_subparsers(dest="action", required=True)
    command(actions, "list", help="the patches and the upstream commits they target").set_defaults(run=_patch_command)
    for action, text in (
        ("check", "verify the commit and the tree, say whether the patch is applied"),
        ("apply", "apply the patch with git"),
        ("revert", "remove the patch with git"),
    ):
        sub = command(actions, action, help=text)
        sub.add_argument("--upstream", required=True, help="which upstream (see `mirai-plugin patch list`)")
        sub.add_argument("path", help="the upstream git checkout")
        sub.set_defaults(run=_patch_command)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that come from the user's input (files, values), not from a bug: reported in one line."""
    import json

    errors: list[type[BaseException]] = [MiraiError, OSError, UnicodeError, json.JSONDecodeError]
    # Only if loaded: importing them here would slow every command down.
    for module, name in (("yaml", "YAMLError"), ("omegaconf.errors", "OmegaConfBaseException"),
                         ("safetensors", "SafetensorError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    return text if isinstance(error, MiraiError) else f"{text or type(error).__name__} ({type(error).__name__})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MIRAI_DEBUG", "").lower() not in ("", "0", "false", "no")
    try:
        return args.run(args)
    except _user_errors() as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

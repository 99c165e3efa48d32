"""The ``mirai-plugin`` command.

    mirai-plugin demo [--quick] [--steps N] [--seeds N] [--offsets 0 1] [--layer L] [--workers N] [--out DIR]
    mirai-plugin demo --image [--quick] [--steps N] [--seeds N] [--layer L] [--out DIR]
    mirai-plugin probe FEATURES.safetensors [--horizons 1 2 3] [--test-videos N] [--peak P] [--json]
    mirai-plugin score RESULTS.json [...] [--json]
    mirai-plugin compare BASELINE CANDIDATE [--bootstrap 10000] [--seed 0] [--json]
    mirai-plugin vbench VIDEOS_DIR --mode standard|long [--dimensions ...] --out DIR --name NAME
    mirai-plugin flops [CONFIG.yaml] [--json]
    mirai-plugin memory [CONFIG.yaml] [--world-size N] [--sharded] [--batch B] [--accumulation A] [--json]
    mirai-plugin patch list
    mirai-plugin patch check  --upstream self-forcing PATH
    mirai-plugin patch apply  --upstream self-forcing PATH
    mirai-plugin patch revert --upstream self-forcing PATH
"""

from __future__ import annotations

import argparse
import sys

from mirai_plugin.errors import MiraiError


def _patch_command(args: argparse.Namespace) -> int:
    from mirai_plugin.patching import PATCHES, apply_patch, inspect_checkout, parse_patch, revert_patch

    if args.action == "list":
        for patch in PATCHES.values():
            print(f"{patch.name:20s} {patch.repository} @ {patch.commit[:12]}  {patch.description}")
        return 0
    action = {"check": inspect_checkout, "apply": apply_patch, "revert": revert_patch}[args.action]
    state = action(args.upstream, args.path)
    patch = state.patch
    print(f"{patch.repository} at {patch.commit[:12]}: {state.path}")
    if args.action == "check":
        print("patch is applied" if state.applied else "patch applies cleanly (not applied yet)")
        return 0
    verb = "added" if args.action == "apply" else "removed"
    for change in parse_patch(patch.text()):
        what = "new file" if change.new_file else f"{len(change.added)} line(s)"
        print(f"  {verb}: {change.path} ({what})")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.image:
        return _image_demo_command(args)
    from mirai_plugin.demo.run import make_config, run_demo

    if args.workers is not None and args.workers < 1:
        raise MiraiError(f"--workers must be >= 1, got {args.workers}")
    cfg = make_config(
        quick_run=args.quick,
        steps=args.steps,
        seeds=args.seeds,
        offsets=tuple(args.offsets) if args.offsets else None,
        layer=args.layer,
    )
    results = run_demo(cfg, Path(args.out or "mirai-demo"), workers=args.workers)
    return 0 if results["status"] == "complete" else 3


def _image_demo_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mirai_plugin.demo.image import make_image_config, run_image_demo

    video_only = [flag for flag, value in (("--offsets", args.offsets), ("--workers", args.workers))
                  if value is not None]
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

    from safetensors.torch import load_file

    from mirai_plugin.probe import probe

    tensors = load_file(args.features)
    if "targets" not in tensors:
        raise MiraiError(f"{args.features} has no 'targets' tensor (videos, segments, tokens, values)")
    sets = {k.partition(".")[2] or "features": v for k, v in tensors.items() if k.split(".")[0] == "features"}
    if not sets:
        raise MiraiError(f"{args.features} has no 'features' or 'features.<name>' tensor (videos, segments, tokens, width)")
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
    return [folder]


def _scores_of(paths: list[str]) -> dict[str, float]:
    import json
    from pathlib import Path

    from mirai_plugin.eval import load_results, scores_from_percent

    if len(paths) == 1 and Path(paths[0]).is_file():
        text = Path(paths[0]).read_text()
        if paths[0].endswith(".csv"):
            rows = [line.split(",") for line in text.splitlines() if line.strip() and not line.startswith("dimension")]
            return scores_from_percent({name: float(value) for name, value in rows})
        data = json.loads(text)
        if isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
            return scores_from_percent(data)  # a table of the 16 dimensions in percent
    files = [f for path in paths for f in _result_files(path)]
    return {name: result.reported for name, result in load_results(files).items()}


def _score_command(args: argparse.Namespace) -> int:
    import json

    from mirai_plugin.eval import DIMENSIONS, final_scores

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

    from mirai_plugin.eval import compare, load_results

    frames = json.loads(open(args.frames).read()) if args.frames else None
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
        print(f"{row.name:24s} {row.baseline:9.2f} {row.candidate:9.2f} {row.difference:+8.2f} {row.standard_error:7.2f}"
              f"  [{row.low:+.2f}, {row.high:+.2f}]{mark}")
    print(f"\n* CI excludes 0. Paired prompt-level bootstrap, {args.bootstrap} replicates, seed {args.seed}, "
          f"{seconds:.1f}s.")
    return 0


def _vbench_command(args: argparse.Namespace) -> int:
    from mirai_plugin.eval.runner import run_vbench

    path = run_vbench(args.videos, mode=args.mode, dimensions=args.dimensions, output=args.out, name=args.name,
                      device=args.device)
    print(f"wrote {path}")
    return 0


def _flops_command(args: argparse.Namespace) -> int:
    import json

    from mirai_plugin import ForesightConfig
    from mirai_plugin.flops import CycleShape, cycle_from_upstream, dmd_cycle, report

    if args.config:
        try:
            from omegaconf import OmegaConf
        except ImportError:
            raise MiraiError("reading a YAML config needs omegaconf: pip install omegaconf") from None
        cycle, foresight = cycle_from_upstream(OmegaConf.load(args.config))
        if not foresight.enabled:
            foresight = foresight.replace(weight=ForesightConfig().weight)  # estimate the recipe's term anyway
    else:
        cycle, foresight = CycleShape(), ForesightConfig()
    result = dmd_cycle(cycle, foresight)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def _memory_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from mirai_plugin import ForesightConfig
    from mirai_plugin.flops import CycleShape, cycle_from_upstream
    from mirai_plugin.memory import memory_for_cycle

    mixed_precision = True
    if args.config:
        try:
            from omegaconf import OmegaConf
        except ImportError:
            raise MiraiError("reading a YAML config needs omegaconf: pip install omegaconf") from None
        upstream = OmegaConf.load(args.config)
        cycle, foresight = cycle_from_upstream(upstream)
        if not foresight.enabled:
            foresight = foresight.replace(weight=ForesightConfig().weight)  # estimate the recipe's term anyway
        mixed_precision = bool(upstream.get("mixed_precision", True))
    else:
        cycle, foresight = CycleShape(), ForesightConfig()
    compute_dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else (
        torch.bfloat16 if mixed_precision else torch.float32)
    memory = memory_for_cycle(
        cycle, foresight, batch_per_rank=args.batch, world_size=args.world_size, sharded=args.sharded,
        compute_dtype=compute_dtype, accumulation_steps=args.accumulation,
    )
    print(json.dumps(memory.to_dict(), indent=2) if args.json else memory.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirai-plugin", description="Video-Mirai foresight loss for causal video diffusion trainers.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the method on a toy video world (or --image: a token AR image model), on a CPU")
    demo.add_argument("--image", action="store_true",
                      help="Mirai on a tiny raster-order token AR image model: baseline, Mirai-E, Mirai-I")
    demo.add_argument("--quick", action="store_true", help="every stage at a tiny size (about a minute; the CI smoke test)")
    demo.add_argument("--steps", type=int, help="student training steps (video: DMD generator steps)")
    demo.add_argument("--seeds", type=int, help="number of seeds (default: the pre-registered 3)")
    demo.add_argument("--offsets", type=int, nargs="+", help="foresight offsets (default 0 1)")
    demo.add_argument("--layer", type=int, help="student block whose output is aligned (video default: 2 of 4)")
    demo.add_argument("--workers", type=int, help="video: (seed, arm) tasks run side by side (default: one per CPU)")
    demo.add_argument("--out", help="output folder (results.json, figure.png); default mirai-demo or mirai-demo-image")
    demo.set_defaults(run=_demo_command)

    probe = commands.add_parser("probe", help="train readouts from frozen features to future segments, report PSNR")
    probe.add_argument("features", help="safetensors file: 'targets' and 'features' or 'features.<name>'")
    probe.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 3])
    probe.add_argument("--test-videos", type=int, help="held-out videos (default a quarter)")
    probe.add_argument("--peak", type=float, default=1.0, help="value range of the targets, for PSNR")
    probe.add_argument("--steps", type=int, default=400, help="readout training steps")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(run=_probe_command)
    score = commands.add_parser("score", help="VBench Quality/Semantic/Total from result files or a percent table")
    score.add_argument("results", nargs="+", help="*_eval_results.json files or folders, or one table (JSON/CSV, percent)")
    score.add_argument("--json", action="store_true")
    score.set_defaults(run=_score_command)

    comp = commands.add_parser("compare", help="paired prompt-level bootstrap of the VBench difference")
    comp.add_argument("baseline", help="result file or folder of *_eval_results.json")
    comp.add_argument("candidate", help="result file or folder of *_eval_results.json")
    comp.add_argument("--bootstrap", type=int, default=10_000, help="replicates")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--level", type=float, default=0.95, help="confidence level of the percentile CI")
    comp.add_argument("--frames", help="JSON {video file name: frames} for frame-weighting subject consistency")
    comp.add_argument("--json", action="store_true")
    comp.set_defaults(run=_compare_command)

    vb = commands.add_parser("vbench", help="run VBench (needs the vbench package and its weights)")
    vb.add_argument("videos")
    vb.add_argument("--mode", choices=("standard", "long"), default="standard")
    vb.add_argument("--dimensions", nargs="+")
    vb.add_argument("--out", required=True)
    vb.add_argument("--name", required=True)
    vb.add_argument("--device", default="cuda")
    vb.set_defaults(run=_vbench_command)

    flops = commands.add_parser("flops", help="FLOPs of one DMD cycle with and without the foresight term")
    flops.add_argument("config", nargs="?", help="an upstream config (default: the official recipe)")
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(run=_flops_command)

    memory = commands.add_parser("memory", help="memory the foresight term adds per rank, by component")
    memory.add_argument("config", nargs="?", help="an upstream config (default: the official recipe)")
    memory.add_argument("--world-size", type=int, default=1, help="ranks (default 1)")
    memory.add_argument("--sharded", action="store_true", help="the head sharded with FSDP (default: replicated)")
    memory.add_argument("--batch", type=int, default=1, help="videos per rank per micro-step (default 1)")
    memory.add_argument("--accumulation", type=int, default=1, help="gradient-accumulation micro-steps (default 1)")
    memory.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the generator and encoder tensors (default: bfloat16 with mixed_precision)")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(run=_memory_command)

    patch = commands.add_parser("patch", help="splice mirai_plugin into an upstream trainer checkout")
    actions = patch.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the patches and the upstream commits they target").set_defaults(run=_patch_command)
    for action, text in (
        ("check", "verify the commit and the tree, say whether the patch is applied"),
        ("apply", "apply the patch with git"),
        ("revert", "remove the patch with git"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--upstream", required=True, help="which upstream (see `mirai-plugin patch list`)")
        sub.add_argument("path", help="the upstream git checkout")
        sub.set_defaults(run=_patch_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MiraiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

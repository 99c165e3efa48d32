"""The ``mirai-plugin`` command.

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirai-plugin", description="Video-Mirai foresight loss for causal video diffusion trainers.")
    commands = parser.add_subparsers(dest="command", required=True)
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

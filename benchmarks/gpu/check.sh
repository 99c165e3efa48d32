#!/usr/bin/env bash
# The GPU check (see check.py): one CUDA GPU, under 5 minutes, one table. --smoke: reduced sizes on a CPU.
# PYTHON picks the interpreter (the tests pass their own, which need not be the `python` on the PATH).
# The official projector's row needs the Video-Mirai checkout: MIRAI_VIDEO_MIRAI_DIR, else the pinned archives
# beside the project (../shared/upstreams) are unpacked into a temporary folder for the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${MIRAI_VIDEO_MIRAI_DIR:-}" ] && [ -f ../shared/upstreams/unpack ]; then
  upstreams=$(mktemp -d "${TMPDIR:-/tmp}/mirai-gpu-check-XXXXXX")
  trap 'rm -rf "$upstreams"' EXIT
  eval "$(bash ../shared/upstreams/unpack "$upstreams")"
fi
"${PYTHON:-python}" benchmarks/gpu/check.py "$@"

#!/usr/bin/env bash
# The GPU check (see check.py): one CUDA GPU, under 5 minutes, one table. --smoke: reduced sizes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python benchmarks/gpu/check.py "$@"

#!/usr/bin/env bash
# The GPU check (see check.py): one CUDA GPU, under 5 minutes, one table. --smoke: reduced sizes on a CPU.
# PYTHON picks the interpreter (the tests pass their own, which need not be the `python` on the PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" benchmarks/gpu/check.py "$@"

#!/usr/bin/env bash
# The GPU checks in one run with torch alone (benchmarks/gpu_checks.py says what each part does):
# at most 8 minutes on one H100 (--quick: 3); without CUDA a small CPU smoke.
# Usage: benchmarks/gpu.sh [--out OUT.json] [--official DIR] [--quick]   (OUT.md gets the table)
# Exit: 0 all ran and passed, 1 a part failed or did not run, 2 no CUDA (the CUDA-only parts).
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || command -v "$python" >/dev/null || python=python3
limit=570  # a backstop past the plan's own limit: the parts stop at 480 s, and each writes its rows
for arg in "$@"; do [ "$arg" = "--quick" ] && limit=270; done
exec timeout "$limit" "$python" benchmarks/gpu_checks.py "$@"

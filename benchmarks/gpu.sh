#!/usr/bin/env bash
# The GPU checks in one run, at most 8 minutes on one H100/H200 (torch only): the official fixture
# on CUDA in fp32 (1e-4), FPS and peak memory at 480p (1 and 5 objects, fp32 and bf16, every:5 and
# recurrent:5:C, 100 frames) and the paper recipe's training steps/s. Without CUDA it runs the CPU
# checks and says what it skipped. Usage: benchmarks/gpu.sh [OUT.json] [--official DIR] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu.json}"
shift || true
python=".venv/bin/python"
[ -x "$python" ] || python=python3
exec timeout 480 "$python" benchmarks/gpu_checks.py --json "$out" "$@"

#!/usr/bin/env bash
# One-shot GPU check (see bench/gpu_check.py): bash bench/gpu_check.sh [--peak-tflops N] [--smoke]
# Runs gpu_check.py with $PYTHON, else with the python on PATH (an activated venv).
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python}"
if ! "$python" -c "import retrofit" 2>/dev/null; then
    echo "gpu_check.sh: '$python' cannot import retrofit: activate its venv or set PYTHON=/path/to/venv/bin/python" >&2
    exit 1
fi
exec "$python" gpu_check.py "$@"

#!/usr/bin/env bash
# One-shot GPU check (see bench/gpu_check.py): bash bench/gpu_check.sh [--peak-tflops N] [--smoke]
set -euo pipefail
cd "$(dirname "$0")"
exec python gpu_check.py "$@"

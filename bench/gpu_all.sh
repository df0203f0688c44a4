#!/usr/bin/env bash
# Every GPU measurement of the project in one command (kernels, then export and latency, then the
# training comparison against the official-style loop at full SD1.5 and SDXL size):
#     bash bench/gpu_all.sh
# then commit bench/results/*-<GPU>.json and the re-rendered bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
bash bench/gpu_kernels.sh || status=1
bash bench/gpu_export.sh || status=1
bash bench/gpu_training.sh || status=1
exit $status

#!/usr/bin/env bash
# Kernel tests and benchmarks on a CUDA machine in one command:   bash bench/gpu_kernels.sh
# Runs the Triton-on-CUDA tests (real Triton, not the interpreter tests/conftest.py defaults to), the
# block-size sweep behind _backend.block_size (bench/results/kernels-<GPU>-block-sweep.md), then
# `tdm-fast bench kernels`, which writes bench/results/kernels-<GPU>.json and re-renders
# bench/RESULTS.md with the ratios, device-time bandwidth and the card's name.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
unset TDM_FAST_KERNELS
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
mkdir -p bench/results
id=$("$PY" -c "from tdm_fast.perf.bench_report import machine_id; print(machine_id())")
"$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -rs -k "Cuda" 2>&1 | tee "bench/results/kernels-$id-tests.log"
# the training iteration never waits for the device between log steps (CUDA's sync debug mode)
"$PY" -m pytest tests/test_trainer.py -q -p no:cacheprovider -rs -k "cuda_iteration" 2>&1 | tee -a "bench/results/kernels-$id-tests.log"
(cd bench && "$PY" gpu_block_sweep.py) | tee "bench/results/kernels-$id-block-sweep.md"
"$PY" -m tdm_fast bench kernels --project-record

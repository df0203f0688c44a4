#!/usr/bin/env bash
# Issue 15's training comparison on a CUDA machine:   bash bench/gpu_training.sh
# The whole TDM iteration (K = 4) of the official-style loop (bench/official_loop.py: three full copies,
# separate teacher cond/uncond passes, the fake update's unused teacher pass, per-iteration .item()),
# tdm-fast's plain path (full copies; LoRA roles) and tdm-fast with every option, at the CPU's scaled
# SD1.5-architecture size and at full SD1.5 (64x64 latents, batch $TDM_BENCH_SD15_BATCH, default 16)
# and SDXL (128x128 latents, batch $TDM_BENCH_SDXL_BATCH, default 2) size, bf16 autocast, random
# weights. Writes bench/results/training-<GPU>.json (the other rows of the training suite too) and
# re-renders bench/RESULTS.md with the comparison table. The full sizes run one configuration at a time
# (four copies of SDXL's official-style state do not fit one GPU); the scaled size is interleaved.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
unset TDM_FAST_KERNELS
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
export TDM_BENCH_COMPARISON_SIZES=${TDM_BENCH_COMPARISON_SIZES:-scaled,sd15,sdxl}
export TDM_BENCH_COMPARISON_ROUNDS=${TDM_BENCH_COMPARISON_ROUNDS:-5}
"$PY" -m tdm_fast bench training --project-record

#!/usr/bin/env bash
# Export parity and sampling latency on a CUDA machine in one command:   bash bench/gpu_export.sh
#     TENSORRT_WHEEL=/path/tensorrt-*.whl   installs TensorRT first (our GPU machines have none);
#     TDM_BENCH_COMPILE_MODE=max-autotune   the compile mode (default here: reduce-overhead, CUDA
#                                           graphs without autotuning, which compiles in seconds).
# Writes bench/results/latency-<GPU>-parity.log and, through `tdm-fast bench latency`,
# bench/results/latency-<GPU>.json and bench/RESULTS.md. ONNX Runtime rows are left to the CPU runs
# (the onnxruntime wheel here has only the CPU provider).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TDM_BENCH_COMPILE_MODE=${TDM_BENCH_COMPILE_MODE:-reduce-overhead}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
mkdir -p bench/results
id=$("$PY" -c "from tdm_fast.perf.bench_report import machine_id; print(machine_id())")
if [[ -n "${TENSORRT_WHEEL:-}" ]]; then
  "$PY" -m pip install --no-deps --no-index "$TENSORRT_WHEEL" || echo "could not install $TENSORRT_WHEEL; TensorRT rows will be skipped"
fi

# Parity on the GPU for the tiny SD-shaped UNet: compiled (CUDA graphs) vs eager at K = 1, 2, 4, and
# TensorRT fp16 when it is installed. perf_hints logs "skipping cudagraphs due to ..." if Inductor
# falls back to plain launches (a compiled batch-1 UNet step took ~1 ms on an H200, suspiciously slow).
TORCH_LOGS=perf_hints "$PY" - <<'EOF_PY' 2>&1 | tee "bench/results/latency-$id-parity.log"
import os, sys, tempfile, torch
sys.path.insert(0, "bench")
from bench_latency import build_model
from tdm_fast.sampling import sample_student
from tdm_fast.export.cli import relative_error
from tdm_fast.export.sampler import compile_sampler
from tdm_fast.export.tensorrt import tensorrt_available
mode = os.environ["TDM_BENCH_COMPILE_MODE"]
den, noise, cond = build_model("unet")
ok, reason = tensorrt_available()
print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, compile mode {mode}")
# cuDNN convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32): eager and compiled
# graphs then differ by TF32 rounding (~1e-3 per op), not by the compilation. Both are reported;
# the fp32 tolerance (1e-4) applies to the run with TF32 off.
print(f"TF32 defaults: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
      f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
for tf32 in (True, False):
    torch._dynamo.reset()  # CUDA graphs captured under one setting would replay its kernels
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    for k in (1, 2, 4):
        with torch.no_grad():
            ref = sample_student(den, noise, cond, k)
            sampler = compile_sampler(den, k, mode=mode)
            first, second = sampler(noise, cond), sampler(noise, cond)
        print(f"TF32 {'on ' if tf32 else 'off'} K={k} compile vs eager: max rel. error {relative_error(second, ref):.2e} "
              f"(first call {relative_error(first, ref):.2e})")
torch._dynamo.reset()
torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
for k in (1, 2, 4):
    with torch.no_grad():
        ref = sample_student(den, noise, cond, k)
    if k == 4:
        with torch.no_grad():
            plain = compile_sampler(den, k, mode=mode, channels_last=False)(noise, cond)
        print(f"K=4 compile without channels_last vs eager: max rel. error {relative_error(plain, ref):.2e}")
    if ok:
        from tdm_fast.export.onnx import export_sampler_onnx
        from tdm_fast.export.tensorrt import TensorRTRunner, build_engine
        path = os.path.join(tempfile.mkdtemp(), f"unet_k{k}.onnx")
        export_sampler_onnx(den, path, k, noise, cond)
        engine = build_engine(path, batch=(1, 1, 4), fp16=True)
        print(f"K={k} tensorrt fp16 vs eager: {relative_error(TensorRTRunner(engine)(noise, cond), ref):.2e}")
    else:
        print(f"K={k} tensorrt skipped: {reason}")
EOF_PY

# The SD1.5-sized UNet runs eager only: Inductor needs minutes per sampler graph of that size.
if "$PY" -c "import tensorrt" 2>/dev/null; then
  "$PY" -m tdm_fast bench latency --project-record --pytest-args "-k 'not onnx and not (sd15 and compile)'"
else
  "$PY" -m tdm_fast bench latency --project-record --pytest-args "-k 'not onnx and not tensorrt and not (sd15 and compile)'"
fi

#!/usr/bin/env bash
# The GPU measurements that settle what a CPU cannot, in one call of at most 10 minutes on one H100/H200:
#     bash bench/gpu_all.sh              # then commit bench/results/*-<GPU>.json and bench/RESULTS.md
#     bash bench/gpu_all.sh --dry-run    # on a CPU: tiny sizes, the same commands (not the compiled row), into a temp folder
# 1. the real-size training rows (bench/bench_realsize.py) at bf16: SD1.5 at batch $TDM_BENCH_SD15_BATCH
#    (default 8) and SDXL at batch $TDM_BENCH_SDXL_BATCH (default 2): official-style loop, plain full copies,
#    plain LoRA roles, all options (a configuration whose `tdm-fast plan` exceeds 90 % of the card is listed
#    as not run), each with ms/iteration, passes, tensor peak vs plan and FLOPs measured vs modelled;
# 2. the kernels suite (bench/bench_kernels.py: fused ops vs eager vs compiled reference at SDXL's latent shape);
# 3. the latency suite of the real-size samplers (bench/bench_latency.py, the SD1.5-size UNet: teacher
#    50-step CFG vs the K-step student eager, and the exported K = 4 sampler: torch.compile, TensorRT where
#    it is installed).
# Each part has its own time limit (the sum is 10 minutes); a part that runs out is reported and the
# others still run. The real-size rows run one process each and are recorded as each finishes, so a row cut
# off by the limit, or killed for memory, loses only itself (listed as not recorded in RESULTS.md). Results
# go to the project's record (`tdm-fast bench --project-record`: bench/results/<suite>-<GPU>.json and
# bench/RESULTS.md) with the parts' wall times in
# bench/results/realsize-<GPU>-gpu_all.log. The dry run writes the same files under
# $TDM_BENCH_DRY_RUN_DIR (default: a new temporary folder) and is run by tests/test_gpu_all.py.
# The older per-area scripts (gpu_kernels.sh: Triton tests and block sweep; gpu_export.sh: export parity;
# gpu_training.sh: the interleaved comparison) stay for longer sessions.
set -uo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "usage: bash bench/gpu_all.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ $dry_run == 1 ]]; then
  results=${TDM_BENCH_DRY_RUN_DIR:-$(mktemp -d)}/results
  record=(--results-dir "$results")
  export TDM_BENCH_REAL_SIZES=tiny TDM_BENCH_REAL_ITERATIONS=1 OMP_NUM_THREADS=1
  # without the compiled row: Inductor's compilation alone takes minutes on a CPU (its path is tested by
  # tests/test_compile_iteration.py)
  realsize_args="-k 'not all'"
  kernels_args="-k 'sd15 and generator_loss and eager'"
  latency_args="-k 'test_latency and unet-eager-student1'"
  limits=(300 120 120) last_row_s=0  # limits that only stop a hung dry run
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
  results=bench/results
  record=(--project-record)
  export TRITON_INTERPRET=0 TDM_BENCH_REAL_SIZES=sd15,sdxl
  export TDM_BENCH_SD15_BATCH=${TDM_BENCH_SD15_BATCH:-8} TDM_BENCH_SDXL_BATCH=${TDM_BENCH_SDXL_BATCH:-2}
  # the exported real-size samplers; Inductor's max-autotune would take the whole budget for one graph
  export TDM_BENCH_COMPILE_MODE=${TDM_BENCH_COMPILE_MODE:-reduce-overhead}
  realsize_args=""
  kernels_args="-k sdxl"
  # the SD1.5-size sampler eager, and exported (torch.compile; TensorRT where installed) at K = 4: Inductor
  # takes a minute or more per graph of that size
  latency_args="-k 'sd15 and (eager or student4) and not onnx'"
  limits=(360 90 150) last_row_s=90  # the time a real-size row may still take when it starts
  unset TDM_FAST_KERNELS
fi
mkdir -p "$results"
id=$("$PY" -c "from tdm_fast.perf.bench_report import machine_id; print(machine_id())")
log="$results/realsize-$id-gpu_all.log"
: > "$log"
status=0
part() {  # part NAME LIMIT_S SUITE PYTEST_ARGS
  local start=$SECONDS rc
  # rows of the real-size suite that would start in the last $last_row_s s of its limit are skipped (and written)
  TDM_BENCH_REAL_DEADLINE=$(( $(date +%s) + $2 - last_row_s )) \
    timeout "$2" "$PY" -m tdm_fast bench "$3" "${record[@]}" --pytest-args "-rs $4" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "$1: $((SECONDS - start)) s, exit $rc$([[ $rc == 124 ]] && echo " (ran out of its $2 s)")" | tee -a "$log"
  [[ $rc == 0 ]] || status=1
}
part "real-size training rows" "${limits[0]}" realsize "$realsize_args"
part "kernels suite" "${limits[1]}" kernels "$kernels_args"
part "latency suite" "${limits[2]}" latency "$latency_args"
echo "total: $SECONDS s" | tee -a "$log"
"$PY" -m tdm_fast bench --render-only "${record[@]}" > /dev/null || status=1
echo "results: $results, $(dirname "$results")/RESULTS.md"
exit $status

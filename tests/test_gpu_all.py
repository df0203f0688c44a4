"""``bench/gpu_all.sh --dry-run``: the GPU script's commands on the CPU at tiny sizes, so that the script
cannot rot between the rare sessions that have a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_all_dry_run_writes_every_part(tmp_path):
    record = REPO / "bench" / "RESULTS.md"
    before = record.stat().st_mtime_ns if record.exists() else None
    env = {**os.environ, "TDM_BENCH_DRY_RUN_DIR": str(tmp_path), "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_all.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = tmp_path / "results"
    realsize = [json.loads(p.read_text()) for p in results.glob("realsize-*.json") if not p.name.endswith(".prev.json")]
    assert len(realsize) == 1
    rows = {b["extra_info"]["config"]: b["extra_info"] for b in realsize[0]["benchmarks"]}
    assert set(rows) == {"official", "plain-full", "plain-lora"}  # the compiled row is left to the GPU run
    for row in rows.values():
        assert row["size"] == "tiny" and row["flops_measured"] > 0 and row["tensor_peak_memory_mb"] > 0
        assert 0.5 < row["tensor_peak_vs_plan"] < 2.0
    assert all(0.9 < rows[name]["flops_measured_vs_model"] < 1.2 for name in ("plain-full", "plain-lora"))
    for suite in ("kernels", "latency"):
        assert list(results.glob(f"{suite}-*.json")), f"no {suite} result"
    log = next(results.glob("realsize-*-gpu_all.log")).read_text()
    assert all(part in log for part in ("real-size training rows", "kernels suite", "latency suite", "total"))
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Real size: one TDM iteration of `tiny`" in report and "gpu_all.log" in report
    assert (record.stat().st_mtime_ns if record.exists() else None) == before, "the dry run wrote the project's record"

"""bench_report: regression rule, rendering of a synthetic pytest-benchmark JSON, the StepProfiler."""
import json

import pytest

from tdm_fast.perf.bench_report import compare, load_results, machine_info, plot_suite, render


def _bench(name, median, iqr, extra=None):
    return {"name": name, "fullname": f"bench/bench_x.py::{name}", "group": None, "params": {},
            "stats": {"min": median - iqr, "max": median + iqr, "mean": median, "stddev": iqr, "rounds": 5, "median": median,
                      "iqr": iqr, "q1": median - iqr / 2, "q3": median + iqr / 2, "iterations": 1},
            "extra_info": extra or {}}


def _json(benches, when="2025-01-01T00:00:00"):
    return {"machine_info": {"tdm_cpu_model": "Test CPU 9000", "tdm_cpu_cores": 2, "tdm_torch": "2.13.0", "tdm_triton": "3.9.0",
                             "tdm_gpu": None, "python_version": "3.11"},
            "commit_info": {"id": "abcdef1234567890"}, "benchmarks": benches, "datetime": when, "version": "5.2"}


def test_regression_rule_uses_the_spread():
    old = _json([_bench("test_a", 10e-3, 1e-3), _bench("test_b", 10e-3, 0.1e-3), _bench("test_c", 10e-3, 0.1e-3),
                 _bench("test_gone", 1e-3, 0)])
    new = _json([_bench("test_a", 12e-3, 1e-3),   # +2 ms < 1.5 x (1 + 1) ms: noise
                 _bench("test_b", 12e-3, 0.1e-3),  # +2 ms > max(0.3 ms, 0.3 ms): regression
                 _bench("test_c", 8e-3, 0.1e-3),   # faster
                 _bench("test_new", 1e-3, 0)])
    rows = {r["name"]: r for r in compare(old, new, k=1.5, min_rel=0.03)}
    assert rows["test_a"]["status"] == "within noise"
    assert rows["test_b"]["status"] == "regression"
    assert rows["test_c"]["status"] == "improvement"
    assert rows["test_new"]["status"] == "new" and rows["test_gone"]["status"] == "gone"
    # zero IQR (one round): the relative floor decides
    rows = compare(_json([_bench("t", 1.0, 0)]), _json([_bench("t", 1.02, 0)]))
    assert rows[0]["status"] == "within noise"


def test_a_time_that_is_no_speed_gets_no_verdict(tmp_path):
    why = "the sweep trains only what is missing"
    old = _json([_bench("test_sweep", 3000.0, 0), _bench("test_speed", 1.0, 0)])
    new = _json([_bench("test_sweep", 9.0, 0, {"time_not_compared": why, "pipeline": "sd15"}), _bench("test_speed", 2.0, 0)])
    rows = {r["name"]: r for r in compare(old, new)}
    assert rows["test_sweep"]["status"] == "not compared" and rows["test_sweep"]["why"] == why
    assert rows["test_speed"]["status"] == "regression"
    results = tmp_path / "results"
    results.mkdir()
    (results / "sweep-Test-CPU-9000-2c.json").write_text(json.dumps(new))
    (results / "sweep-Test-CPU-9000-2c.prev.json").write_text(json.dumps(old))
    render(results, plots=False)
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"| not compared: {why} |" in md and "1 regression(s)" in md
    assert md.count(why) == 1  # the reason is not also a column of the table


def test_a_suite_draws_its_own_figure_and_no_bar_of_a_time_that_is_no_speed(tmp_path):
    import matplotlib.pyplot as plt

    data = _json([_bench("test_sweep", 9.0, 0, {"time_not_compared": "a sweep"})])
    seen = []

    def figure(benchmarks):
        seen.append([b["name"] for b in benchmarks])
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        return fig

    written = plot_suite(data, "sweep-Test-CPU", tmp_path, figure)
    assert seen == [["test_sweep"]]
    assert [p.name for p in written] == ["sweep-Test-CPU-summary.png"] and written[0].stat().st_size > 0
    assert plot_suite(data, "sweep-Test-CPU", tmp_path / "none", lambda benchmarks: None) == []


def test_render_generic_tables_plots_and_comparison(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    extra = {"teacher": "toy", "batch": 64, "outside_network_pct": 12.5,
             "breakdown_ms": {"student fwd": 3.0, "optimizer": 1.0},
             "swd_vs_iteration": {"iteration": [0, 25, 50], "swd": [0.9, 0.5, 0.2]}, "best_nfe_matched_baseline_swd": 0.4}
    new = _json([_bench("test_step[toy-fused]", 5e-3, 0.1e-3, extra), _bench("test_step[toy-reference]", 4e-3, 0.1e-3, extra)])
    old = _json([_bench("test_step[toy-fused]", 4e-3, 0.1e-3), _bench("test_step[toy-reference]", 4e-3, 0.1e-3)], "2024-12-31")
    (results / "training-Test-CPU-9000-2c.json").write_text(json.dumps(new))
    (results / "training-Test-CPU-9000-2c.prev.json").write_text(json.dumps(old))
    (results / "kernels-Test-CPU-9000-2c.md").write_text("not json")  # ignored
    assert set(load_results(results)) == {("training", "Test-CPU-9000-2c")}
    text, comparisons = render(results)
    md = (tmp_path / "RESULTS.md").read_text()
    assert md == text and "do not edit by hand" in md and "tdm-fast bench" in md
    assert "Test CPU 9000, 2 usable cores" in md and "torch 2.13.0, triton 3.9.0" in md and "no GPU" in md
    assert "| test_step[toy-fused] | 5 |" in md  # median in ms
    assert "outside_network_pct" in md and "teacher = toy" in md  # varying column; constant hoisted
    assert "| student fwd | 3 (75.0 %) | 3 (75.0 %) |" in md  # dict-valued extra_info -> table
    assert "**SLOWER**" in md and "1 regression(s)" in md
    assert [r["status"] for r in comparisons["training-Test-CPU-9000-2c"]] == ["regression", "within noise"]
    pngs = sorted(p.name for p in (results / "plots").glob("*.png"))
    assert pngs == ["training-Test-CPU-9000-2c-breakdown-ms.png", "training-Test-CPU-9000-2c-swd-vs-iteration.png",
                    "training-Test-CPU-9000-2c.png"]
    assert "](results/plots/training-Test-CPU-9000-2c.png)" in md


def test_machine_info_is_hostname_independent():
    import socket

    info = machine_info()
    assert info["tdm_cpu_cores"] >= 1 and info["tdm_torch"]
    assert socket.gethostname() not in info["tdm_machine_id"] or socket.gethostname() in info["tdm_cpu_model"]


def test_step_profiler_breakdown_adds_up_and_restores_the_trainer():
    from tdm_fast.perf.step_profiler import CATEGORIES, StepProfiler, make_trainer

    trainer = make_trainer("toy", "reference", batch=32)
    ops = trainer.ops
    with StepProfiler(trainer) as profiler:
        for _ in range(2):
            profiler.step()
        s = profiler.summary()
    assert set(s["breakdown_ms"]) == set(CATEGORIES)
    for c in ("student fwd (rollout, no grad)", "teacher fwd (cond+uncond, 2B)", "fake bwd", "student bwd",
              "TDM kernels (renoise, ddim_jump, losses)", "optimizer (step, zero_grad, lr, clip, EMA)"):
        assert s["breakdown_ms"][c] > 0, c
    assert s["step_ms"] == pytest.approx(s["wall_step_ms"], rel=0.05)
    assert 0 < s["outside_network_share"] < 1
    assert trainer.ops is ops and "train_step" not in vars(trainer) and "step" not in vars(trainer.opt_f)
    assert not trainer.teacher._forward_hooks and not trainer.student_core._forward_pre_hooks
    trainer.train_step()  # still trains


def test_render_inlines_attachments_and_the_suite_summary(tmp_path):
    """``<suite>-<machine>-*.md`` is inlined, ``-*.log`` linked; bench/bench_<suite>.py's summarize() runs."""
    results = tmp_path / "results"
    results.mkdir()
    params = [{"op": "renoise", "shape_name": "sd15", "impl": impl} for impl in ("fused", "eager", "compiled_ref")]
    benches = []
    for p, median in zip(params, (1e-4, 4e-4, 2e-4)):
        b = _bench(f"test_bench[renoise-sd15-{p['impl']}]", median, 1e-6,
                   {"peak_extra_inputs": 1.0, "bw_fraction_of_copy": 0.1, "calls_per_round": 1})
        b["params"] = p
        benches.append(b)
    data = _json(benches)
    data["commit_info"]["dirty"] = True
    (results / "kernels-GPU-X.json").write_text(json.dumps(data))
    (results / "kernels-GPU-X-block-sweep.md").write_text("| sweep | table |")
    (results / "kernels-GPU-X-tests.log").write_text("17 passed")
    md, _ = render(results, plots=False)
    assert "| sweep | table |" in md and "[kernels-GPU-X-tests.log](results/kernels-GPU-X-tests.log)" in md
    assert "plus uncommitted changes" in md
    assert "| renoise | sd15 | 0.100 | 0.400 | 0.200 | **4.00x** | 2.00x |" in md


def test_latency_summary_explains_a_ratio_below_20x(tmp_path):
    """A launch-bound GPU row (a CFG step of batch 2 costs what a student step of batch 1 costs)
    gets the per-step costs that explain it; a compute-bound row does not."""
    def row(model, kind, steps, ms, batch):
        return _bench(f"test_latency[{model}-eager-{kind}{steps}]", ms / 1e3, 1e-6,
                      {"model": model, "backend": "eager", "kind": kind, "steps": steps, "nfe": steps * (2 if kind == "teacher" else 1),
                       "batch": batch, "median_ms_per_batch": ms, "median_ms_per_image": ms / batch, "device": "GPU X"})
    benches = [row("unet", "teacher", 50, 50.0, 1), row("unet", "student", 4, 4.0, 1),    # 12.5x
               row("toy", "teacher", 50, 100.0, 8), row("toy", "student", 4, 4.0, 8)]    # 25x
    results = tmp_path / "results"
    results.mkdir()
    (results / "latency-GPU-X.json").write_text(json.dumps(_json(benches)))
    md, _ = render(results, plots=False)
    assert "unet/eager: student K=4 is 12.5x faster" in md and "toy/eager: student K=4 is 25.0x faster" in md
    assert md.count("why below 20x") == 1
    assert "a teacher step (CFG, batch 2) takes 1 ms, a student step (batch 1) 1 ms (1.00x)" in md


def test_bench_writes_a_users_folder_unless_the_project_record_is_asked_for(tmp_path, monkeypatch):
    """`tdm-fast bench` in a clone must not overwrite the tracked bench/results/ and bench/RESULTS.md."""
    import argparse

    from tdm_fast.cli.tools import cmd_bench
    from tdm_fast.perf import bench_report

    parser = argparse.ArgumentParser()
    bench_report.add_bench_arguments(parser)
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["--render-only"])
    assert cmd_bench(args) == 0
    assert (tmp_path / "runs" / "bench" / "RESULTS.md").is_file()
    record = bench_report.PROJECT_RESULTS_DIR
    assert bench_report._results_dir(None, True) == record and record.parent.name == "bench"
    with pytest.raises(ValueError, match="--project-record"):
        bench_report._results_dir(str(tmp_path), True)
    monkeypatch.setattr(bench_report, "CLONE", None)  # installed from a wheel: there is no project record to write
    with pytest.raises(ValueError, match="wheel"):
        bench_report._results_dir(None, True)


def test_a_suite_of_one_process_per_test_keeps_the_rows_before_a_killed_one(tmp_path):
    """The real-size rows take minutes and gigabytes each: one killed for memory must not take the others with it."""
    from tdm_fast.perf.bench_report import exit_reason, run_suite

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_rows.py").write_text(
        "import os, signal\nimport pytest\nONE_PROCESS_PER_TEST = True\n\n"
        "@pytest.mark.parametrize('row', ['first', 'killed', 'skipped', 'left-out'])\n"
        "def test_row(benchmark, row):\n"
        "    if row == 'killed':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    if row == 'skipped':\n        pytest.skip('does not fit')\n"
        "    benchmark.extra_info['row'] = row\n    benchmark.pedantic(lambda: None, rounds=1)\n")
    rc, out = run_suite("rows", tmp_path / "results", ["-rs", "-k", "not left"], bench_dir=bench)
    data = json.loads(out.read_text())
    assert rc == 1
    assert [b["extra_info"]["row"] for b in data["benchmarks"]] == ["first"]
    assert data["not_recorded"] == [{"test": "test_row[killed]", "exit": -9, "why": exit_reason(-9)}]
    assert "out-of-memory" in exit_reason(-9)
    text, _ = render(tmp_path / "results", plots=False)
    assert "`test_row[killed]` (killed by SIGKILL" in text
    assert not list((tmp_path / "results").glob(".*part.json"))
    # a later run of other rows keeps this one's rows, each saying when it was measured
    first = data["benchmarks"][0]
    rc, out = run_suite("rows", tmp_path / "results", ["-k", "left"], bench_dir=bench)
    data = json.loads(out.read_text())
    assert rc == 0 and data["not_recorded"] == []
    assert [b["extra_info"]["row"] for b in data["benchmarks"]] == ["first", "left-out"]
    assert data["benchmarks"][0] == first  # carried as it was measured, its stamp included
    assert all(b["extra_info"]["recorded"].count(" ") == 1 for b in data["benchmarks"])

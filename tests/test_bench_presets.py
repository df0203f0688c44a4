"""``tdm-fast bench presets`` reads its runs back: one folder per pipeline, seed and length (a flow preset's
rates decay to the run's end), and with ``TDM_PRESETS_FINISHED_ONLY`` a table of the runs finished so far."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_presets.py"


@pytest.fixture
def presets(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_presets_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ITERATIONS", (1000, 2000))
    return module


def _finished_run(folder: Path, ratios: dict, accuracy_gap: float) -> None:
    folder.mkdir(parents=True)
    comparisons = {k: {"fid_ratio": r, "baseline": "ddim2-cfg-student-times", "accuracy_gap_to_teacher": accuracy_gap}
                   for k, r in ratios.items()}
    (folder / "metrics.json").write_text(json.dumps({"comparisons": comparisons, "distill_argv": ["--preset", "sd15"]}))


def test_finished_only_tables_the_runs_there_and_trains_nothing(presets, tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "FINISHED_ONLY", True)
    from tdm_fast.demos import t2i_demo

    def no_training(*args, **kwargs):
        raise AssertionError("a finished-only table trained a run")

    monkeypatch.setattr(t2i_demo, "run_t2i_demo", no_training)
    _finished_run(tmp_path / "runs" / "sd15-s0-1000", {"K=1": 0.1, "K=2": 0.2, "K=4": 0.6}, 0.01)
    _finished_run(tmp_path / "runs" / "sd15-s1-1000", {"K=1": 0.1, "K=2": 0.2, "K=4": 0.9}, 0.0)
    _finished_run(tmp_path / "runs" / "sd15-s0-2000", {"K=1": 0.1, "K=2": 0.2, "K=4": 0.7}, -0.03)
    runs = [row for seed in (0, 1) for row in presets.run_one("sd15", seed, tmp_path)]
    assert [(r["seed"], r["iterations"]) for r in runs] == [(0, 1000), (0, 2000), (1, 1000)]
    table = {(row["pipeline"], row["iterations"]): row for row in presets.checks(runs)}
    assert table["sd15", 1000]["seeds"] == 2 and table["sd15", 1000]["K=4"] == pytest.approx((0.75, 0.9))
    assert not table["sd15", 1000]["pass"]  # seed 1's K = 4 is over 0.8
    assert not table["sd15", 2000]["pass"]  # 3 points of accuracy lost

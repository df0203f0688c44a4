"""``tdm-fast bench presets`` trains and reads back its runs: one run per length where a flow preset's rates decay
to the run's end, one run per seed scored on the way where an ε preset's stay constant, runs carried from an
earlier record (``TDM_PRESETS_CARRY``), pipelines given by path, and with ``TDM_PRESETS_FINISHED_ONLY`` a table of
the runs finished so far."""
import importlib.util
import json
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_presets.py"


@pytest.fixture
def presets(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_presets_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ITERATIONS", (1000, 2000))
    return module


def _finished_run(folder: Path, ratios: dict, accuracy_gap: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
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
    fig = presets.figure([{"extra_info": {"presets": {"runs": runs}}}])
    k1, _, k4 = fig.axes

    def colours(ax):
        return [tuple(points.get_facecolor()[0]) for points in ax.collections]

    assert colours(k4) == [to_rgba("tab:red"), to_rgba("tab:blue")]  # 1,000 iterations: seed 1 over the limit
    assert colours(k1) == [to_rgba("tab:blue")] * 2
    assert presets.figure([{"extra_info": {}}]) is None


def _recorded_training(monkeypatch, calls: list):
    """``run_t2i_demo`` replaced by one that records its call and writes each length's scores where the real one
    does."""
    from tdm_fast.demos import t2i_demo

    def fake_run(kind, out, iterations, score_at=(), **kwargs):
        calls.append((kind, Path(out).name, iterations, tuple(score_at)))
        for n in (*score_at, iterations):
            folder = t2i_demo.length_folder(Path(out), n, iterations)
            _finished_run(folder, {"K=1": 0.1, "K=2": 0.2, "K=4": 0.5}, 0.0)

    monkeypatch.setattr(t2i_demo, "run_t2i_demo", fake_run)


def test_constant_rate_lengths_are_one_run_scored_on_the_way(presets, tmp_path, monkeypatch):
    calls = []
    _recorded_training(monkeypatch, calls)
    runs = presets.run_one("sd15", 0, tmp_path)  # the ε preset keeps its rates constant after warm-up
    assert calls == [("sd15", "sd15-s0-2000", 2000, (1000,))]
    assert [r["iterations"] for r in runs] == [1000, 2000]
    assert presets.finished_folder(tmp_path, "sd15", 0, 1000) == tmp_path / "runs" / "sd15-s0-2000" / "iterations-1000"


def test_decaying_rate_lengths_are_a_run_each(presets, tmp_path, monkeypatch):
    calls = []
    _recorded_training(monkeypatch, calls)
    presets.run_one("sd3", 0, tmp_path)  # the flow preset decays its rates to the run's end
    assert calls == [("sd3", "sd3-s0-1000", 1000, ()), ("sd3", "sd3-s0-2000", 2000, ())]


def test_carried_runs_stand_for_missing_folders_and_are_named(presets, tmp_path, monkeypatch):
    calls = []
    _recorded_training(monkeypatch, calls)
    _finished_run(tmp_path / "runs" / "sd3-s0-1000", {"K=1": 0.1, "K=2": 0.2, "K=4": 0.5}, 0.0)
    scores = {"fid_ratio": 0.3, "baseline": "euler2", "accuracy_gap_points": 0.0}
    recorded = {"pipeline": "sd3", "seed": 0, "distill_argv": ["--preset", "sd3"], **dict.fromkeys(("K=1", "K=2", "K=4"), scores)}
    record = {"datetime": "2026-12-07T20:24:37", "commit_info": {"id": "8247426144abc"}, "benchmarks": [
        {"extra_info": {"presets": {"runs": [{**recorded, "iterations": 1000}, {**recorded, "iterations": 2000}]}}}]}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    runs = presets.run_one("sd3", 0, tmp_path, presets.carried_runs(str(path)))
    assert calls == []  # the folder's run is read back, the record's stands for the missing one
    assert [("carried_from" in r, r["K=4"]["fid_ratio"]) for r in runs] == [(False, 0.5), (True, 0.3)]
    table = presets.summarize([{"extra_info": {"presets": {"runs": runs}}}])
    assert "2026-12-07, commit 8247426: sd3 s0 2000" in table


def test_a_pipeline_folder_built_elsewhere_is_taken_by_path(presets, tmp_path):
    from tdm_fast.demos import t2i

    shipped = t2i.shipped_pipeline("sd3")
    assert presets.pipeline_folder(str(shipped), tmp_path) == ("sd3", shipped)
    name = presets.run_name(str(shipped), 1, 1000)
    assert name.startswith("sd3-") and name.endswith("-s1-1000") and name != presets.run_name("/elsewhere/sd3", 1, 1000)
    with pytest.raises(ValueError, match="not a shipped pipeline"):
        presets.pipeline_folder(str(tmp_path), tmp_path)


@pytest.mark.parametrize("text", ["1k", "", "1000 -5", "0"])
def test_a_bad_length_knob_is_refused_by_name(presets, monkeypatch, text):
    monkeypatch.setenv("TDM_PRESETS_ITERATIONS", text)
    with pytest.raises(ValueError, match="TDM_PRESETS_ITERATIONS must list whole numbers"):
        presets.whole_numbers("TDM_PRESETS_ITERATIONS", "1000 2000", least=1)

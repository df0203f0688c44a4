"""``tdm-fast bench``: run the benchmark suites, render ``bench/RESULTS.md`` + plots, flag regressions.

Suites are the files ``bench/bench_<suite>.py`` (kernels, latency, training, … — a new file is a new
suite, no code here changes). Each runs under pytest-benchmark in a subprocess and writes
``bench/results/<suite>-<machine>.json``, where ``<machine>`` is a hostname-independent id: the GPU
name when CUDA is present, else the CPU model and the number of usable cores. The JSON it replaces
is kept as ``<suite>-<machine>.prev.json`` and is what the new run is compared against.

Regression rule (per benchmark present in both runs, same machine id): with medians m and
inter-quartile ranges q of the per-round times,

    slower  if  m_new − m_old > max(k · (q_old + q_new),  r · m_old)
    faster  if  m_old − m_new > the same threshold

k = 1.5 by default (``--k``) — the spread of both runs, so a benchmark that is noisy on this
machine needs a larger change to count — and r = 3 % (``--min-rel``), a floor for benchmarks run
with too few rounds to have an IQR. Everything else is "within noise". A benchmark whose time is not
a speed (a sweep that trains only what is missing on disk) says why in ``extra_info["time_not_compared"]``
and gets no verdict.

RESULTS.md is generated from *all* JSON files present in ``bench/results`` (several machines side
by side) and never hand-edited. Per suite and machine it gives the machine details, a generic table
(name, median, IQR, rounds, every scalar ``extra_info`` entry), one table per dict-valued
``extra_info`` entry (e.g. the training breakdown), the comparison with the previous run, and PNG
plots: medians with IQR bars, stacked bars for dict-of-number entries, and curves for dict-of-list
entries (first key = x axis).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ..atomic import atomic_file

PACKAGE = Path(__file__).resolve().parents[1]
# In a clone (editable install) the suites are the clone's bench/; from a wheel, the packaged tdm_fast/bench/.
CLONE = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() and (PACKAGE.parent / "bench").is_dir() else None
REPO = CLONE or PACKAGE
BENCH_DIR = REPO / "bench"
# The project's own record (tracked in the clone) is written only with --project-record; a user's runs go to
# RESULTS_DIR, relative to the folder they run in.
PROJECT_RESULTS_DIR = BENCH_DIR / "results"
RESULTS_DIR = Path("runs") / "bench" / "results"
REGEN_COMMAND = "tdm-fast bench [suite ...]   (re-measure);   tdm-fast bench --render-only   (re-render from bench/results/*.json)"
DEFAULT_K = 1.5
DEFAULT_MIN_REL = 0.03
NOT_COMPARED = "time_not_compared"  # extra_info key: why this benchmark's time is no speed to compare


# -- which machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9]+", "-", text)).strip("-")


def machine_info() -> dict:
    """What measured the numbers: CPU model, usable cores, torch/triton versions, GPU name (or None)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = usable_cores()
    ident = _slug(gpu) if gpu else _slug(f"{cpu_model()}-{cores}c")
    return {"tdm_machine_id": ident, "tdm_cpu_model": cpu_model(), "tdm_cpu_cores": cores, "tdm_torch": torch.__version__,
            "tdm_triton": triton_version, "tdm_gpu": gpu, "tdm_cuda": torch.version.cuda if gpu else None}


def machine_id() -> str:
    return machine_info()["tdm_machine_id"]


# -- running -------------------------------------------------------------------------------------
def available_suites(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def result_path(suite: str, machine: str, results_dir: Path = RESULTS_DIR) -> Path:
    return Path(results_dir) / f"{suite}-{machine}.json"


def run_suite(suite: str, results_dir: Path = RESULTS_DIR, pytest_args=(), bench_dir: Path = BENCH_DIR) -> tuple[int, Path]:
    """Runs one suite under pytest-benchmark; the previous JSON of this machine becomes ``.prev.json``. A suite
    that declares ``ONE_PROCESS_PER_TEST = True`` runs each test in its own pytest process (:func:`_run_isolated`)."""
    suites = available_suites(bench_dir)
    if suite not in suites:
        raise ValueError(f"unknown suite {suite!r}; available: {', '.join(suites)}")
    out = result_path(suite, machine_id(), Path(results_dir).resolve())  # absolute: pytest runs in the suites' folder
    out.parent.mkdir(parents=True, exist_ok=True)
    # a suite is its own pytest session: run from inside a pytest-xdist worker (our test suite), the worker's
    # variables would make pytest-benchmark disable itself and record nothing
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    if _declares_one_process_per_test(suites[suite]):
        return _run_isolated(suites[suite], out, pytest_args, env), out
    with atomic_file(out) as tmp:  # an interrupted or failed suite leaves the previous result in place
        cmd = [sys.executable, "-m", "pytest", str(suites[suite]), "-q", "-p", "no:cacheprovider", f"--benchmark-json={tmp}",
               *pytest_args]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=bench_dir, env=env)
        if tmp.exists() and "benchmarks" not in _json_or_none(tmp):
            tmp.unlink()  # no result to replace the previous one with
        if tmp.exists() and out.exists():
            _keep_as_previous(out)
    return rc, out


def _keep_as_previous(out: Path) -> None:
    with atomic_file(out.with_suffix(".prev.json")) as prev:  # the baseline of the regression check
        shutil.copyfile(out, prev)


def _declares_one_process_per_test(path: Path) -> bool:
    # read, not imported: the suites import torch and build networks at import time
    return re.search(r"^ONE_PROCESS_PER_TEST\s*=\s*True\b", path.read_text(), re.MULTILINE) is not None


def _run_isolated(path: Path, out: Path, pytest_args, env: dict) -> int:
    """Each test of the suite in its own pytest process, the record rewritten after each one. Its rows take minutes
    and gigabytes: a row killed for memory, or the whole run stopped by a time limit (``bench/gpu_all.sh``), then
    loses only itself, and a killed row is written down as such (``not_recorded``) instead of vanishing. Rows of the
    previous record that this run does not select are carried over, so that rows measured in separate runs (one
    size per session) make one record; every row says when and at which commit it was measured (``recorded``)."""
    collected = subprocess.run([sys.executable, "-m", "pytest", str(path), "-q", "--collect-only", "-p", "no:cacheprovider",
                                *pytest_args], cwd=path.parent, env=env, capture_output=True, text=True)
    tests = [line.split("::", 1)[1] for line in collected.stdout.splitlines()
             if line.split("::", 1)[0].endswith(path.name) and " " not in line]
    if not tests:
        print(collected.stdout + collected.stderr, flush=True)
        return collected.returncode or 5
    part = out.with_name(f".{out.stem}.part.json")
    previous = _json_or_none(out)
    carried = [_stamped(b, previous) for b in previous.get("benchmarks", []) if b.get("name") not in tests]
    rc, merged, not_recorded = 0, None, []
    for test in tests:
        part.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", f"{path}::{test}", "-q", "-p", "no:cacheprovider", f"--benchmark-json={part}",
               *_without_selection(pytest_args)]
        print("$ " + " ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=path.parent, env=env)
        data = _json_or_none(part)
        rows = data.get("benchmarks")
        if code not in (0, 5):
            rc = rc or (code if code > 0 else 1)
            if not rows:
                not_recorded.append({"test": test, "exit": code, "why": exit_reason(code)})
        if rows:
            if merged is None:  # the first row of this run: the last run's record becomes the baseline
                merged = {**data, "benchmarks": carried}
                if out.exists():
                    _keep_as_previous(out)
            merged["benchmarks"] += [_stamped(b, data) for b in rows]
        if merged is not None:
            with atomic_file(out) as tmp:
                tmp.write_text(json.dumps({**merged, "not_recorded": not_recorded}, indent=2))
        part.unlink(missing_ok=True)
    if not_recorded:
        print("not recorded: " + "; ".join(f"{r['test']} ({r['why']})" for r in not_recorded), flush=True)
    return rc


def _stamped(benchmark: dict, record: dict) -> dict:
    """The benchmark with the date and commit of the run that measured it (kept when it was stamped before)."""
    when = f"{str(record.get('datetime', '?'))[:16]} {str(record.get('commit_info', {}).get('id', '?'))[:10]}"
    return {**benchmark, "extra_info": {"recorded": when, **benchmark.get("extra_info", {})}}


def _without_selection(pytest_args) -> list[str]:
    """The run's pytest arguments without its selection (``-k``/``-m`` and their values): the node id already
    selects."""
    kept, skip = [], False
    for arg in pytest_args:
        if skip:
            skip = False
        elif arg in ("-k", "-m"):
            skip = True
        elif not arg.startswith(("-k=", "-m=")):
            kept.append(arg)
    return kept


def exit_reason(code: int) -> str:
    """What a pytest process's exit status says: a negative status is the signal that killed it."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (": on Linux most likely the out-of-memory killer" if name == "SIGKILL" else "")
    return f"exit {code}: its output above holds the failure"


def _json_or_none(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# -- reading -------------------------------------------------------------------------------------
def load_results(results_dir: Path = RESULTS_DIR) -> dict[tuple[str, str], dict]:
    """{(suite, machine): benchmark JSON} for every current (not .prev/.new) pytest-benchmark JSON."""
    found = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.name.endswith((".prev.json", ".new.json")) or path.name.startswith(".") or "-" not in path.stem:
            continue
        data = _json_or_none(path)
        if "benchmarks" not in data:
            continue
        suite, machine = path.stem.split("-", 1)
        data["_path"] = str(path)
        found[(suite, machine)] = data
    return found


def compare(old: dict, new: dict, k: float = DEFAULT_K, min_rel: float = DEFAULT_MIN_REL) -> list[dict]:
    """Per benchmark: old/new median and IQR, the threshold and a status (see the module docstring)."""
    before = {b["fullname"]: b["stats"] for b in old.get("benchmarks", [])}
    rows = []
    for b in new.get("benchmarks", []):
        s, name = b["stats"], b["fullname"]
        if name not in before:
            rows.append({"name": b["name"], "status": "new", "new_median": s["median"]})
            continue
        o = before.pop(name)
        why = b.get("extra_info", {}).get(NOT_COMPARED)
        if why:
            rows.append({"name": b["name"], "status": "not compared", "why": why, "old_median": o["median"],
                         "new_median": s["median"]})
            continue
        delta = s["median"] - o["median"]
        threshold = max(k * (o["iqr"] + s["iqr"]), min_rel * o["median"])
        status = "regression" if delta > threshold else "improvement" if -delta > threshold else "within noise"
        rows.append({"name": b["name"], "status": status, "old_median": o["median"], "new_median": s["median"],
                     "old_iqr": o["iqr"], "new_iqr": s["iqr"], "delta": delta, "threshold": threshold,
                     "ratio": s["median"] / o["median"] if o["median"] else float("inf")})
    for name, o in before.items():
        rows.append({"name": name.split("::")[-1], "status": "gone", "old_median": o["median"]})
    return rows


# -- rendering -----------------------------------------------------------------------------------
def _unit(seconds: list[float]) -> tuple[str, float]:
    m = max((abs(x) for x in seconds if x is not None), default=1.0)
    if m < 1e-3:
        return "µs", 1e6
    if m < 1.0:
        return "ms", 1e3
    return "s", 1.0


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v).replace("|", "\\|")


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) or (isinstance(v, (list, tuple)) and len(v) <= 4
                                                                     and all(isinstance(x, (int, float, str)) for x in v))


def _is_table(v) -> bool:
    return isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values())


def _is_curve(v) -> bool:
    return (isinstance(v, dict) and len(v) >= 2 and all(isinstance(x, list) for x in v.values())
            and len({len(x) for x in v.values()}) == 1)


def machine_line(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("tdm_cpu_model") or (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or "?"
    cores = m.get("tdm_cpu_cores") or (m.get("cpu") or {}).get("count") or "?"
    parts = [f"CPU {cpu}, {cores} usable cores"]
    parts.append(f"GPU {m['tdm_gpu']} (CUDA {m.get('tdm_cuda')})" if m.get("tdm_gpu") else "no GPU")
    parts.append(f"torch {m.get('tdm_torch', '?')}, triton {m.get('tdm_triton', '?')}, Python {m.get('python_version', '?')}")
    info = data.get("commit_info") or {}
    commit = info.get("id")
    when = data.get("datetime", "?")
    at = f" at commit {commit[:10]}" + (" plus uncommitted changes" if info.get("dirty") else "") if commit else ""
    return "; ".join(parts) + f". Measured {when}{at}."


def suite_tables(data: dict) -> str:
    benches = data["benchmarks"]
    unit, scale = _unit([b["stats"]["median"] for b in benches])
    scalar_keys, dict_keys = [], []
    for b in benches:
        for key, v in b.get("extra_info", {}).items():
            if key == NOT_COMPARED:  # said once, in the comparison with the previous run
                continue
            if _is_scalar(v) and key not in scalar_keys:
                scalar_keys.append(key)
            elif _is_table(v) and key not in dict_keys:
                dict_keys.append(key)
    # entries equal in every row go into one line above the table
    common = {key: benches[0]["extra_info"].get(key) for key in scalar_keys
              if len(benches) > 1 and all(key in b.get("extra_info", {}) and b["extra_info"][key] == benches[0]["extra_info"][key] for b in benches)}
    columns = [k for k in scalar_keys if k not in common]
    lines = []
    if common:
        lines += ["Common to all rows: " + ", ".join(f"{k} = {_cell(v)}" for k, v in common.items()), ""]
    lines.append(f"| benchmark | median ({unit}) | IQR ({unit}) | rounds | " + " | ".join(columns) + (" |" if columns else ""))
    lines.append("|---|---|---|---|" + "---|" * len(columns))
    for b in benches:
        s, extra = b["stats"], b.get("extra_info", {})
        cells = [_cell(extra.get(k, "")) for k in columns]
        lines.append(f"| {b['name']} | {s['median'] * scale:.4g} | {s['iqr'] * scale:.3g} | {s['rounds']} | " + " | ".join(cells)
                     + (" |" if cells else ""))
    for key in dict_keys:
        holders = [b for b in benches if _is_table(b.get("extra_info", {}).get(key))]
        rows = list(dict.fromkeys(r for b in holders for r in b["extra_info"][key]))
        lines += ["", f"`{key}` (share of the column's sum in brackets):", "",
                  "| | " + " | ".join(_short(b["name"]) for b in holders) + " |", "|---|" + "---|" * len(holders)]
        sums = [sum(b["extra_info"][key].values()) or 1.0 for b in holders]
        for r in rows:
            cells = [f"{b['extra_info'][key].get(r, 0):.4g} ({100 * b['extra_info'][key].get(r, 0) / t:.1f} %)" for b, t in zip(holders, sums)]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("| **sum** | " + " | ".join(f"**{t:.4g}**" for t in sums) + " |")
    return "\n".join(lines)


def attachments(results_dir: Path, stem: str, base: Path) -> list[str]:
    """Markdown for the files a run left beside its JSON (``<suite>-<machine>-*.md`` is inlined,
    ``<suite>-<machine>-*.log`` linked): block sweeps, test logs, parity checks of the GPU scripts."""
    lines = []
    for path in sorted(Path(results_dir).glob(f"{stem}-*.md")):
        lines += [f"From `{_rel(path)}`:", "", path.read_text().strip(), ""]
    logs = sorted(Path(results_dir).glob(f"{stem}-*.log"))
    if logs:
        lines += ["Logs of the same run: " + ", ".join(f"[{p.name}]({_rel(p, base)})" for p in logs), ""]
    return lines


def suite_module(suite: str, bench_dir: Path = BENCH_DIR):
    """``bench/bench_<suite>.py`` as a module, for its optional hooks: ``summarize(benchmarks) -> str`` (ratios,
    acceptance lines) and ``figure(benchmarks) -> matplotlib Figure | None`` (what the suite measures, drawn);
    None for a suite that is not there."""
    path = available_suites(bench_dir).get(suite)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(f"_tdm_bench_{suite}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _short(name: str) -> str:
    m = re.search(r"\[(.*)\]", name)
    return m.group(1) if m else name


def comparison_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    unit, scale = _unit([r.get("new_median") or r.get("old_median") for r in rows])
    lines = [f"| benchmark | previous ({unit}) | now ({unit}) | change | threshold ({unit}) | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] in ("new", "gone"):
            lines.append(f"| {r['name']} | {r.get('old_median', 0) * scale:.4g} | {r.get('new_median', 0) * scale:.4g} | | | {r['status']} |")
            continue
        if r["status"] == "not compared":
            lines.append(f"| {r['name']} | {r['old_median'] * scale:.4g} | {r['new_median'] * scale:.4g} | | | not compared: {r['why']} |")
            continue
        verdict = {"regression": "**SLOWER**", "improvement": "faster"}.get(r["status"], "within noise")
        lines.append(f"| {r['name']} | {r['old_median'] * scale:.4g} | {r['new_median'] * scale:.4g} | {100 * (r['ratio'] - 1):+.1f} % "
                     f"| {r['threshold'] * scale:.3g} | {verdict} |")
    return "\n".join(lines)


def plot_suite(data: dict, stem: str, plots_dir: Path, suite_figure=None) -> list[Path]:
    """The suite's own figure (``suite_figure(benchmarks)``, see :func:`suite_module`); medians with IQR bars of the
    benchmarks whose time is a speed; stacked bars of dict-of-number entries; curves of dict-of-list entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    benches = data["benchmarks"]
    written = []

    def save(fig, path: Path) -> None:
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written.append(path)
    fig = suite_figure(benches) if suite_figure else None
    if fig is not None:
        save(fig, plots_dir / f"{stem}-summary.png")
    timed = [b for b in benches if not b.get("extra_info", {}).get(NOT_COMPARED)]
    if timed:
        unit, scale = _unit([b["stats"]["median"] for b in timed])
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(timed) + 1.2))
        names = [b["name"] for b in timed][::-1]
        med = [b["stats"]["median"] * scale for b in timed][::-1]
        err = [[(b["stats"]["median"] - b["stats"]["q1"]) * scale for b in timed][::-1],
               [(b["stats"]["q3"] - b["stats"]["median"]) * scale for b in timed][::-1]]
        ax.barh(names, med, xerr=err, color="tab:blue", alpha=0.8)
        if med and min(med) > 0 and max(med) / min(med) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(f"median ({unit}), bars: IQR")
        ax.set_title(stem)
        ax.tick_params(axis="y", labelsize=7)
        save(fig, plots_dir / f"{stem}.png")

    keys = list(dict.fromkeys(k for b in benches for k, v in b.get("extra_info", {}).items() if _is_table(v)))
    for key in keys:
        holders = [b for b in benches if _is_table(b.get("extra_info", {}).get(key))]
        cats = list(dict.fromkeys(c for b in holders for c in b["extra_info"][key]))
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(holders) + 2.5))
        left = [0.0] * len(holders)
        cmap = plt.get_cmap("tab20")
        for i, c in enumerate(cats):
            vals = [b["extra_info"][key].get(c, 0.0) for b in holders]
            ax.barh([_short(b["name"]) for b in holders], vals, left=left, label=c, color=cmap(i % 20))
            left = [a + v for a, v in zip(left, vals)]
        ax.set_xlabel(key)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
        ax.set_title(f"{stem}: {key}")
        save(fig, plots_dir / f"{stem}-{_slug(key)}.png")

    keys = list(dict.fromkeys(k for b in benches for k, v in b.get("extra_info", {}).items() if _is_curve(v)))
    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        xlabel = ylabel = None
        for b in benches:
            v = b.get("extra_info", {}).get(key)
            if not _is_curve(v):
                continue
            (xlabel, xs), *ys = list(v.items())
            for ylabel, y in ys:
                ax.plot(xs, y, marker="o", ms=3, label=f"{_short(b['name'])}: {ylabel}")
            ref = {k2: v2 for k2, v2 in b["extra_info"].items() if "baseline" in k2 and isinstance(v2, (int, float))}
            for k2, v2 in ref.items():
                ax.axhline(v2, ls="--", color="gray", label=k2)
        ax.set_xlabel(xlabel)
        # a long curve name goes in the title (wrapped), not on the axis, where it would be clipped
        ax.set_ylabel(ylabel if len(ys) == 1 else ("value" if len(key) > 40 else key))
        ax.legend(fontsize=7)
        ax.set_title(textwrap.fill(f"{stem}: {key}", 70), fontsize=9)
        save(fig, plots_dir / f"{stem}-{_slug(key)}.png")
    return written


def render(results_dir: Path = RESULTS_DIR, out: Path | None = None, k: float = DEFAULT_K, min_rel: float = DEFAULT_MIN_REL,
           plots: bool = True) -> tuple[str, dict]:
    """Writes RESULTS.md (default: beside ``results_dir``) and plots; returns (markdown, {stem: comparison rows})."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir.parent / "RESULTS.md"
    plots_dir = results_dir / "plots"
    results = load_results(results_dir)
    lines = [
        "# Benchmark results",
        "",
        "<!-- GENERATED by tdm_fast/perf/bench_report.py — do not edit by hand. -->",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the pytest-benchmark JSON files in "
        f"`{_rel(results_dir)}`. Regenerate: `{REGEN_COMMAND}`.",
        "",
        f"Regression rule: slower if median_new − median_old > max({k} × (IQR_old + IQR_new), {min_rel:.0%} × median_old), "
        "compared with the previous run of the same suite on the same machine id (`<suite>-<machine>.prev.json`).",
        "",
    ]
    if not results:
        lines.append("No results yet: run `tdm-fast bench`.")
    comparisons = {}
    for (suite, machine), data in sorted(results.items()):
        stem = f"{suite}-{machine}"
        lines += [f"## {suite} — {machine}", "", f"Machine: {machine_line(data)}", "",
                  f"Source: `{_rel(Path(data['_path']))}`", ""]
        module = suite_module(suite)
        summarize = getattr(module, "summarize", None)
        summary = summarize(data["benchmarks"]) if summarize else ""
        if summary:
            lines += [summary, "", "All benchmarks:", ""]
        lines += [suite_tables(data), ""]
        if data.get("not_recorded"):
            lines += ["Rows of this run that ended without a record: " + "; ".join(
                f"`{r['test']}` ({r['why']}" + (f", {r['when']} UTC)" if r.get("when") else ")") for r in data["not_recorded"]) + ".", ""]
        lines += attachments(results_dir, stem, out.parent)
        prev = Path(data["_path"]).with_suffix(".prev.json")
        if prev.exists():
            previous = _json_or_none(prev)  # a damaged baseline compares as no rows, not a traceback
            try:
                rows = compare(previous, data, k, min_rel)
            except (KeyError, TypeError):
                rows = []
            comparisons[stem] = rows
            n_reg = sum(r["status"] == "regression" for r in rows)
            lines += [f"Compared with the previous run ({previous.get('datetime', '?')}): "
                      f"{n_reg} regression(s).", "", comparison_table(rows), ""]
        if plots:
            for path in plot_suite(data, stem, plots_dir, getattr(module, "figure", None)):
                lines += [f"![{path.stem}]({_rel(path, out.parent)})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    return text, comparisons


def _rel(path: Path, base: Path | None = None) -> str:
    """``path`` relative to ``base``; by default to the clone for the project's record, else to the current folder."""
    path = Path(path).resolve()
    if base is None:
        base = CLONE if CLONE is not None and path.is_relative_to(CLONE) else Path.cwd()
    try:
        return os.path.relpath(path, Path(base).resolve())
    except ValueError:
        return str(path)


# -- tdm-fast bench plan --------------------------------------------------------------------------
def _check_plan_args(steps, mfu: str | None, peak_tflops: float | None, gpu: str) -> None:
    """``bench plan``'s flags that argparse's types cannot check alone, before any model is built."""
    from .flops import device_peak
    from ..sampling import stage_times

    for k in steps:
        try:
            stage_times(k, 900)
        except ValueError as exc:
            raise ValueError(f"--steps {k}: {exc}") from None
    if mfu is not None and mfu != "measure":
        try:
            fraction = float(mfu)
        except ValueError:
            fraction = float("nan")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--mfu {mfu}: expected a utilisation in (0, 1], or 'measure'")
    if peak_tflops is None:
        try:
            device_peak(gpu)
        except ValueError as exc:
            raise ValueError(f"--gpu: {exc}") from None


def real_size_rows(results_dir: Path = PROJECT_RESULTS_DIR) -> list[dict]:
    """Every row of the real-size benchmark in the project's record (bench/results/realsize-*.json), for the
    projection's measured inputs; none from a wheel's install."""
    return [b["extra_info"] for (suite, _), data in sorted(load_results(results_dir).items()) if suite == "realsize"
            for b in data["benchmarks"]]


def bench_plan(preset: str = "sdxl", steps: tuple[int, ...] = (4,), batch: int = 16, iters: int = 2000, gpu: str = "a800",
               peak_tflops: float | None = None, mfu: str | None = None, resolution: int | None = None,
               num_frames: int = 49, lora: bool = False, checkpointing: bool = False, fake_updates: int = 1,
               exact_backward: bool = False) -> dict:
    """FLOPs per TDM iteration of a real preset, projected GPU-hours, and the paper's figures. ``mfu``: a
    utilisation fraction (as text), ``"measure"`` to measure it here, or None for the assumed default."""
    from .flops import DEFAULT_UTILISATION, UTILISATION_SOURCE, format_flops_plan, plan_flops

    _check_plan_args(steps, mfu, peak_tflops, gpu)
    plan = plan_flops(preset, steps=tuple(steps), batch=batch, resolution=resolution, num_frames=num_frames, lora=lora,
                      fake_updates=fake_updates, checkpointing=checkpointing, exact_backward=exact_backward)
    if mfu == "measure":
        from .flops import measure_utilisation
        from .step_profiler import make_trainer

        import torch

        trainer = make_trainer("digits", "fused", mixed_precision="bf16" if torch.cuda.is_available() else "no")
        m = measure_utilisation(trainer)
        util = m["utilisation"]
        source = (f"measured here: TDM step on the digits UNet, {m['achieved_flops'] / 1e9:,.1f} GFLOP/s of "
                  f"{m['peak_flops'] / 1e9:,.1f} ({m['peak_source']})")
    elif mfu is None:
        util, source = DEFAULT_UTILISATION, UTILISATION_SOURCE
    else:
        util, source = float(mfu), "given by --mfu"
    peak = peak_tflops * 1e12 if peak_tflops else None
    print(format_flops_plan(plan, iters, gpu, util, source, peak, real_size_rows()))
    plan.update(iterations=iters, gpu=gpu, utilisation=util)
    return plan


# -- CLI -----------------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tdm-fast bench [suite ...]`` and ``tdm-fast bench plan ...``."""
    from ..argtypes import non_negative_float, positive_float, positive_int

    parser.add_argument("suites", nargs="*", metavar="suite",
                        help=f"suites to run (default: all of {', '.join(available_suites()) or 'bench/bench_*.py'}), "
                             "or 'plan' for the FLOP/GPU-hour projection")
    parser.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md and plots from the JSON present")
    parser.add_argument("--results-dir", default=None,
                        help=f"where the JSON goes, RESULTS.md beside it (default: {RESULTS_DIR} under the current folder)")
    parser.add_argument("--project-record", action="store_true",
                        help="write the project's tracked record, bench/results/ and bench/RESULTS.md of this clone")
    parser.add_argument("--k", type=non_negative_float, default=DEFAULT_K, help="regression threshold in units of IQR_old + IQR_new")
    parser.add_argument("--min-rel", type=non_negative_float, default=DEFAULT_MIN_REL, help="relative floor of the regression threshold")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a benchmark got slower")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. \"-k toy\")")
    plan = parser.add_argument_group("bench plan (FLOPs and projected GPU-hours of a real backbone)")
    plan.add_argument("--preset", choices=["sd15", "sdxl", "pixart", "sd3", "cogvideox"], default="sdxl")
    plan.add_argument("--steps", type=positive_int, nargs="+", default=[4], help="K, or several for a unify student")
    plan.add_argument("--batch", type=positive_int, default=16, help="batch per iteration (all GPUs together)")
    plan.add_argument("--iters", type=positive_int, default=2000)
    plan.add_argument("--gpu", default="a800", help="a100, a800, h100, h100-pcie, h800, h200, b200, l40s, a10g, v100")
    plan.add_argument("--peak-tflops", type=positive_float, help="override the GPU's peak (TFLOP/s)")
    plan.add_argument("--mfu", default=None, help="utilisation: a fraction, or 'measure' (here); default 0.35 assumed")
    plan.add_argument("--resolution", type=positive_int, help="pixels (default: the preset's)")
    plan.add_argument("--num-frames", type=positive_int, default=49)
    plan.add_argument("--lora", action="store_true", help="LoRA: frozen base, backward = input gradients only")
    plan.add_argument("--checkpointing", action="store_true", help="gradient checkpointing: one recomputed forward per backward")
    plan.add_argument("--fake-updates", type=positive_int, default=1)
    plan.add_argument("--exact-backward", action="store_true", help="measure the backward FLOPs on the meta model (slower)")


def _results_dir(results_dir: str | None, project_record: bool) -> Path:
    if project_record:
        if results_dir is not None:
            raise ValueError("--project-record writes bench/results/ of the clone: give it or --results-dir, not both")
        if CLONE is None:
            raise ValueError("--project-record needs a clone of tdm-fast (an editable install); this one is installed from a wheel")
        return PROJECT_RESULTS_DIR
    return Path(results_dir) if results_dir is not None else RESULTS_DIR


def run_bench(suites: tuple[str, ...] = (), render_only: bool = False, results_dir: str | None = None,
              project_record: bool = False, k: float = DEFAULT_K, min_rel: float = DEFAULT_MIN_REL,
              fail_on_regression: bool = False, pytest_args: str = "") -> int:
    """``tdm-fast bench``: runs the suites (default: all), renders RESULTS.md and plots; returns the exit code."""
    from ..usage import check_output_path

    suites = list(suites)
    results_dir = check_output_path(_results_dir(results_dir, project_record), "--results-dir")
    check_output_path(results_dir.parent / "RESULTS.md", "--results-dir", folder=False)
    rc = 0
    if not render_only:
        available = available_suites()
        unknown = [s for s in suites if s not in available]
        if unknown:
            raise ValueError(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(available)}")
        for suite in suites or list(available):
            code, _ = run_suite(suite, results_dir, shlex.split(pytest_args))
            rc = rc or (code if code not in (0, 5) else 0)
    text, comparisons = render(results_dir, k=k, min_rel=min_rel)
    machine = machine_id()
    current = load_results(results_dir)
    for suite in suites or []:
        data = current.get((suite, machine))
        if data is not None:
            print(f"\n## {suite} on {machine}\n\n{suite_tables(data)}")
    regressions = [(stem, r["name"]) for stem, rows in comparisons.items() for r in rows if r["status"] == "regression"]
    for stem, name in regressions:
        print(f"REGRESSION {stem}: {name}")
    print(f"\nwrote {_rel(results_dir.parent / 'RESULTS.md')} ({len(current)} suite/machine result(s))")
    if regressions and fail_on_regression:
        rc = rc or 1
    return rc

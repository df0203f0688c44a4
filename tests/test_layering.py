"""The package's structure, counted from its own source by tools/import_graph.py (issue 31): no import
loops, imports one way down the layers, Namespaces read only by the command line, short functions;
and ``tdm-fast --version`` answers without importing torch."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report() -> dict:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.report()


def test_no_import_loops_and_few_imports_against_the_layering():
    report = _report()
    assert report["loops"] == []
    assert len(report["against_layering"]) <= 3, report["against_layering"]


def test_only_the_command_line_reads_a_namespace():
    """No ``args.``/``getattr(args`` under demos/ eval/ perf/ backbones/ export/ (export/cli.py is a face); the
    ``python -m`` mains allowed to read the argv they parse each say why."""
    report = _report()
    assert report["namespace_reads"] == []
    assert all(why.strip() for why in report["namespace_mains"].values())


def test_no_long_functions():
    """No function over 80 lines under tdm_fast/, kernels/, export/ unless the allow-list says why."""
    long = [f for f in _report()["long_functions"] if not f["allowed"]]
    assert long == [], long


def test_version_answers_without_torch():
    code = ("import sys\nfrom tdm_fast.cli import main\ncode = main(['--version'])\n"
            "assert code == 0, code\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tdm-fast "), done.stdout
    cli = subprocess.run([sys.executable, "-m", "tdm_fast", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0 and cli.stdout.startswith("tdm-fast "), cli.stdout + cli.stderr

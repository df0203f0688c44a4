"""Shared by the benchmark suites in bench/ (tests/conftest.py does not apply here).

- Every --benchmark-json records *which machine* measured it: ``machine_info`` gains the
  hostname-independent ``tdm_machine_id`` and the CPU model, usable cores, torch/triton versions
  and GPU name (see ``tdm_fast.perf.bench_report.machine_info``), so bench/RESULTS.md can say so.
- accelerate keeps one process-wide state; reset it after each benchmark that built a trainer.

Suites add their own fixtures in their files; add shared ones here (do not replace this file).
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    from tdm_fast.perf.bench_report import machine_info as tdm_machine_info

    machine_info.update(tdm_machine_info())


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

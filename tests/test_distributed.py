import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "ddp_toy.py"
RESUME_SCRIPT = Path(__file__).parent / "scripts" / "ddp_resume.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, *args, fsdp: bool = False) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu` starts a single process unless MPI is installed; torchrun's launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU gives real 2-process DDP over gloo on a CPU-only machine.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *(["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]),
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_cpu_processes_keep_identical_students(tmp_path):
    result = _launch(SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    with safe_open(tmp_path / "rank0.safetensors", "pt") as f:
        assert f.metadata()["world_size"] == "2"
    # each rank drew its own noise, yet DDP kept the weights in lock-step
    assert not torch.equal(ranks[0].pop("first_noise"), ranks[1].pop("first_noise"))
    # a 4-iteration warm-up takes 4 iterations whatever the process count (accelerate would step a
    # prepared scheduler once per process)
    warm = torch.tensor([2 / 4, 3 / 4, 4 / 4], dtype=torch.float64) * 1e-3 * 0.2
    for rank in ranks:
        torch.testing.assert_close(rank.pop("lrs"), warm)
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert (tmp_path / "checkpoints").is_dir() and len(list((tmp_path / "checkpoints").glob("step-*/rank-*.safetensors"))) == 2


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_two_ranks_resume_exactly_after_sigkill_with_accumulation(tmp_path, fsdp):
    """Rank 1 is SIGKILLed in iteration 5 (after the step-4 checkpoint); the resumed run ends where an
    uninterrupted one does: students, fake scores, EMA and optimizer moments bit-identical (under FSDP
    each rank's shards, from sharded checkpoints)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = _launch(RESUME_SCRIPT, straight, 8, 0, fsdp=fsdp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _launch(RESUME_SCRIPT, killed, 8, 5, fsdp=fsdp).returncode != 0
    assert [p.name for p in sorted((killed / "checkpoints").glob("step-*"))][-1] == "step-00000004"
    assert not (killed / "rank0.safetensors").exists()
    result = _launch(RESUME_SCRIPT, killed, 8, 0, fsdp=fsdp)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (load_file(straight / f"rank{rank}.safetensors") for rank in (0, 1))
    students = [k for k in first if k.startswith("student.")]
    # data parallel: every rank holds the whole student; FSDP: each its own shard
    assert all(torch.equal(first[k], second[k]) for k in students) != fsdp
    for rank in (0, 1):
        a, b = load_file(straight / f"rank{rank}.safetensors"), load_file(killed / f"rank{rank}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("opt_f.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

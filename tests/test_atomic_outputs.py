"""Nothing lost, nothing half-written (issue 33): every writer is stopped at the moment its main file
is open (SIGINT, SIGTERM, a full file system) and must leave its previous artifact as it was, no
temporary behind and a state that the same command (``--resume`` for distill) completes.

A new writer joins by adding a row to WRITERS. Each case runs the real command in a subprocess
(tests/scripts/stop_at_write.py); the previous artifact is made in-process first. The full file
system is a small tmpfs where this machine lets us mount one, else a write that fails with ENOSPC.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdm_fast.cli import main

SCRIPT = Path(__file__).parent / "scripts" / "stop_at_write.py"
TINY = "--batch-size 16 --fake-lr 1e-3 --cfg-scale 3 --kernels reference --quiet"
DISTILL = f"distill --teacher {{T}} --out {{O}} --checkpoint-every 2 {TINY}"
CACHE = ("import torch; from tdm_fast.prompts import cached_embeddings; "
         "cached_embeddings('{O}/cache', '{key}', lambda: dict(cond=torch.ones(2, 3)))")

# id, the command that writes the previous artifact, the command stopped (then run again to completion),
# the file at whose opening it is stopped, the artifacts that must stay as they were
WRITERS = [
    ("teacher-toy2d", "--quiet teacher train --dataset toy2d --out {O} --iterations 3 --hidden 8",
     "--quiet teacher train --dataset toy2d --out {O} --iterations 3 --hidden 8 --seed 1",
     "*diffusion_pytorch_model.safetensors", ["."]),
    ("teacher-digits", "--quiet teacher train --dataset digits --out {O} --iterations 2 --batch-size 8",
     "--quiet teacher train --dataset digits --out {O} --iterations 2 --batch-size 8 --seed 1",
     "*denoiser.safetensors", ["."]),
    ("teacher-digits-t2i",
     "--quiet teacher train --dataset digits-t2i --pipeline sd15 --out {O} --iterations 2 --vae-iterations 2 --batch-size 8 --threads 1",
     "--quiet teacher train --dataset digits-t2i --pipeline sd15 --out {O} --iterations 2 --vae-iterations 2 --batch-size 8 "
     "--threads 1 --seed 1", "*build.json", ["."]),
    ("distill-checkpoint", f"{DISTILL} --iterations 2", f"{DISTILL} --iterations 4 --resume", "*state.json",
     ["checkpoints", "student"]),
    ("distill-final-student", f"{DISTILL} --iterations 2", f"{DISTILL} --iterations 4 --resume",
     "*diffusion_pytorch_model.safetensors", ["student"]),
    ("export-onnx", "export --checkpoint {S} --out {O} --steps 1", "export --checkpoint {S} --out {O} --steps 1 --batch-size 3",
     "*sampler_k1_fp32.onnx", ["."]),
    ("export-compile", "export --format compile --checkpoint {S} --out {O} --steps 1 --no-verify",
     "export --format compile --checkpoint {S} --out {O} --steps 1 --batch-size 3 --no-verify", "*sampler_k1_fp32.pt2", ["."]),
    ("sample", "sample --checkpoint {S} --out {O}/s --num 4 --steps 1", "sample --checkpoint {S} --out {O}/s --num 4 --steps 1 --seed 1",
     "*s.png", ["."]),
    ("bench-results", "bench --render-only --results-dir {O}/results", "bench --render-only --results-dir {O}/results",
     "*RESULTS.md", ["."]),
    ("embedding-cache", "-c " + shlex.quote(CACHE.replace("{key}", "old")), "-c " + shlex.quote(CACHE.replace("{key}", "new")),
     "*new.safetensors", ["."]),
    # the model_index.json layout: prompt encoder, VAE decoder and sampler graphs, the tokenizer and the manifest
    # that names them (written last, where it is stopped)
    ("export-pipeline", "export --checkpoint {L}/student --pipeline {P} --out {O} --steps 1 --exporter torchscript --no-verify",
     "export --checkpoint {L}/student --pipeline {P} --out {O} --steps 1 --batch-size 3 --exporter torchscript --no-verify",
     "*manifest.json", ["."]),
    # TensorRT builds need a CUDA device and the tensorrt package: skipped cleanly elsewhere
    ("export-tensorrt", "export --format tensorrt --checkpoint {S} --out {O} --steps 1",
     "export --format tensorrt --checkpoint {S} --out {O} --steps 1 --batch-size 3", "*sampler_k1_fp32.engine", ["."]),
]
NEEDS_TENSORRT = {"export-tensorrt"}
ROWS = [pytest.param(*w, id=w[0], marks=[pytest.mark.gpu, pytest.mark.skipif(
            importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt package")] if w[0] in NEEDS_TENSORRT else [])
        for w in WRITERS]
STOPS = [("SIGINT", 130, "tdm-fast: interrupted by SIGINT"), ("SIGTERM", 143, "tdm-fast: interrupted by SIGTERM"),
         ("full-disk", 1, "tdm-fast: error: no space left on device")]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A toy run's student (K ∈ {1, 2, 4}): what export and sample read."""
    from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser

    root = tmp_path_factory.mktemp("student")
    toy_denoiser(ToyMLP(hidden=16, depth=1)).save_pretrained(root / "teacher")
    assert main(["distill", "--teacher", str(root / "teacher"), "--out", str(root / "run"), "--iterations", "2",
                 "--steps", "1", "2", "4", *TINY.split()]) == 0
    return root / "run" / "student"


@pytest.fixture
def volume(tmp_path):
    """A 32 MiB tmpfs to fill (None where mounting is not allowed: the full disk is then simulated)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    yield mount if done.returncode == 0 else None
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _argv(template: str, paths: dict) -> list[str]:
    return [part.format(**paths) for part in shlex.split(template)]


def _run_here(argv: list[str]) -> int:
    if argv[0] == "-c":
        exec(argv[1], {"__name__": "__main__"})
        return 0
    return main(argv)


def _tree(root: Path) -> dict:
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-")) or ".tmp" in p.name]


def _stop(action: str, pattern: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TDM_FAST_DEBUG": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), action, pattern, "--", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A random-weight LoRA student of the shipped tiny SD1.5 pipeline (``{L}``) and that pipeline (``{P}``)."""
    from _lora_student import random_lora_run

    model, run = random_lora_run("sd15", tmp_path_factory.mktemp("pipeline-run"), steps=(1,))
    return {"P": model, "L": run}


def _paths(out: Path, writer: str, request) -> dict:
    """The command's {O}, {T}, {S}; {P} and {L} only for the row that reads a pipeline (its fixture is costly)."""
    paths = {"O": out, "T": request.getfixturevalue("teacher_dir"), "S": request.getfixturevalue("student_dir")}
    if writer == "export-pipeline":
        paths.update(request.getfixturevalue("pipeline_run"))
    return paths


@pytest.fixture(scope="module")
def previous_artifacts(tmp_path_factory, request):
    """Each writer's previous artifact, made once (in-process) and copied into every case of that writer."""
    made = {}

    def previous(writer: str, template: str) -> Path:
        if writer not in made:
            root = tmp_path_factory.mktemp(f"previous-{writer}")
            cwd = os.getcwd()
            os.chdir(root)
            try:
                assert _run_here(_argv(template, _paths(root / "out", writer, request))) == 0
            finally:
                os.chdir(cwd)
            made[writer] = root / "out"
        return made[writer]

    return previous


@pytest.mark.parametrize("stop, code, line", STOPS, ids=[s[0] for s in STOPS])
@pytest.mark.parametrize("writer, previous, command, pattern, artifacts", ROWS)
def test_a_stopped_writer_leaves_the_previous_artifact(writer, previous, command, pattern, artifacts, stop, code, line,
                                                       previous_artifacts, tmp_path, volume, monkeypatch, request):
    root = volume if (stop == "full-disk" and volume is not None) else tmp_path / "work"
    root.mkdir(exist_ok=True)
    monkeypatch.chdir(root)
    paths = _paths(root / "out", writer, request)
    shutil.copytree(previous_artifacts(writer, previous), root / "out", symlinks=True)
    before = {name: _tree(root / "out" / name) for name in artifacts}
    action = stop if stop != "full-disk" else (f"fill:{root / 'filler'}" if volume is not None else "enospc")

    done = _stop(action, pattern, _argv(command, paths), root)
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and lines[-1].startswith(line), done.stderr
    assert sum(x.startswith("tdm-fast:") for x in lines) == 1, done.stderr
    (root / "filler").unlink(missing_ok=True)
    for name in artifacts:
        assert _tree(root / "out" / name) == before[name], f"{writer}: {name} changed"
    assert not _leftovers(root), f"{writer}: temporaries left"

    if stop != "SIGINT":  # SIGINT leaves what SIGTERM does (one handler); completing after it adds nothing
        assert _run_here(_argv(command, paths)) == 0  # the same command (distill: --resume) completes
        assert not _leftovers(root) and all((root / "out" / name).exists() for name in artifacts)


def test_the_table_covers_every_writer():
    ids = [w[0] for w in WRITERS]
    assert len(set(ids)) == len(ids)
    for family in ("teacher-toy2d", "teacher-digits", "teacher-digits-t2i", "distill-checkpoint", "distill-final-student",
                   "export-onnx", "export-compile", "export-pipeline", "export-tensorrt", "sample", "bench-results", "embedding-cache"):
        assert family in ids


# -- a re-export that fails its checks keeps the previous export ------------------------------------------
def _tiny_vae_folder(path: Path) -> Path:
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16).save_pretrained(path)
    return path


def test_a_reexport_refused_by_its_checks_keeps_the_previous_graph(student_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(student_dir), "--out", str(out), "--steps", "1"]) == 0
    before = _tree(out)
    vae = _tiny_vae_folder(tmp_path / "vae")  # decodes 4-channel latents; the toy student samples 2-D points
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(student_dir), "--out", str(out), "--steps", "1", "--vae", str(vae)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tdm-fast: error:") and "VAE" in err[0]
    assert _tree(out) == before and not _leftovers(tmp_path)
    assert main(["export", "--checkpoint", str(student_dir), "--out", str(tmp_path / "new"), "--steps", "1", "--vae", str(vae)]) == 2
    assert not (tmp_path / "new").exists()  # an export that created its folder and failed removes it


# -- the helpers themselves -------------------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_writers_are_removed_and_a_parked_folder_put_back(tmp_path):
    from tdm_fast.atomic import atomic_file, atomic_folder

    dead = _dead_pid()
    (tmp_path / f".tmp-{dead}-teacher").mkdir()
    (tmp_path / f".old-{dead}-teacher").mkdir()  # killed between its two renames: only the previous folder is left
    (tmp_path / f".old-{dead}-teacher" / "denoiser.json").write_text("previous")
    (tmp_path / f".tmp-{dead}-x.json").write_text("partial")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".tmp-{live.pid}-x.json").write_text("being written")
        with atomic_file(tmp_path / "x.json") as tmp:
            tmp.write_text("new")
        assert (tmp_path / f".tmp-{live.pid}-x.json").exists()  # a running writer's temporary is not touched
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "x.json").read_text() == "new" and not (tmp_path / f".tmp-{dead}-x.json").exists()

    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "teacher") as folder:
            (folder / "denoiser.json").write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "teacher" / "denoiser.json").read_text() == "previous"  # put back, then kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))) == [f".tmp-{live.pid}-x.json"]


def test_teacher_train_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--quiet", "teacher", "train", "--out", str(tmp_path), "--iterations", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "holds other files" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_sigterm_while_running_ends_with_one_line_and_143(teacher_dir, tmp_path):
    """A signal that arrives mid-training (not at a write): one line, exit 143, and --resume goes on."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "tdm_fast", "distill", "--teacher", str(teacher_dir), "--out", str(run),
            "--iterations", "100000", "--checkpoint-every", "2", *TINY.split()]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((run / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert [x for x in err.splitlines() if x.strip()][-1].startswith("tdm-fast: interrupted by SIGTERM")
    assert not _leftovers(run)
    done = int(sorted((run / "checkpoints").glob("step-*"))[-1].name[5:])
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", str(done + 1),
                 "--checkpoint-every", "2", "--resume", *TINY.split()]) == 0

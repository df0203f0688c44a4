"""A resume is checked against the run's own record (issue 33): a checkpoint holds a fingerprint of its
teacher's weight files and each tensor file records the digest of ``state.json``, so another teacher, an
edited ``state.json`` or a checkpoint of another architecture is refused with one ``tdm-fast: error:`` line,
exit 2, before anything is written; a checkpoint of an older version (no record) still resumes, with a
warning that its teacher cannot be checked."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tdm_fast.checkpoint import DIGEST_KEY, checkpoint_dirs
from tdm_fast.cli import main
from tdm_fast.demos import t2i
from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser
from tdm_fast.training.resume_record import KEY, weights_fingerprint

TINY = ["--batch-size", "8", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "reference", "--quiet",
        "--steps", "1", "2", "--checkpoint-every", "1"]


def _toy_teacher(folder, hidden=32, seed=0):
    torch.manual_seed(seed)
    toy_denoiser(ToyMLP(hidden=hidden, depth=1)).save_pretrained(folder)
    return folder


def _tree(root):
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _refused(argv, needle, run, capsys):
    before = _tree(run)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("tdm-fast: error: ") and needle in lines[0], err
    assert _tree(run) == before, "the refused resume wrote into the run"


def _as_older_version(checkpoint):
    """What a checkpoint written before the record looks like: no teacher fingerprint, no state digest."""
    state = json.loads((checkpoint / "state.json").read_text())
    del state["meta"]["__dict__"][KEY]
    (checkpoint / "state.json").write_text(json.dumps(state))
    for file in checkpoint.glob("*.safetensors"):
        if not file.name.startswith("rank-"):
            save_file(load_file(file), file)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-record")
    teacher = _toy_teacher(root / "teacher")
    assert main(["distill", "--teacher", str(teacher), "--out", str(root / "run"), "--iterations", "2", *TINY]) == 0
    return root


@pytest.fixture
def run(toy_run, tmp_path):
    shutil.copytree(toy_run / "run", tmp_path / "run")
    return tmp_path / "run"


def test_the_checkpoint_records_the_teacher_and_a_moved_teacher_resumes(toy_run, run, tmp_path):
    state = json.loads((checkpoint_dirs(run / "checkpoints")[-1] / "state.json").read_text())
    assert state["meta"]["__dict__"][KEY] == weights_fingerprint(toy_run / "teacher")
    shutil.copytree(toy_run / "teacher", tmp_path / "moved")  # the content counts, not the path
    assert main(["distill", "--teacher", str(tmp_path / "moved"), "--out", str(run), "--resume", "--iterations", "3",
                 "--quiet"]) == 0


def test_another_teacher_is_refused(run, tmp_path, capsys):
    other = _toy_teacher(tmp_path / "other", seed=1)  # the same architecture, other weights
    _refused(["distill", "--teacher", other, "--out", run, "--resume", "--iterations", "3"], "trained from another teacher",
             run, capsys)


@pytest.mark.parametrize("edit", ["step", "field-removed", "meta-removed"])
def test_an_edited_state_json_is_refused(edit, run, toy_run, capsys):
    file = checkpoint_dirs(run / "checkpoints")[-1] / "state.json"
    state = json.loads(file.read_text())
    if edit == "step":
        state["meta"]["__dict__"]["step"] = 1
    elif edit == "field-removed":
        del state["meta"]["__dict__"]["elapsed_s"]
    else:
        del state["meta"]
    file.write_text(json.dumps(state, indent=2))
    _refused(["distill", "--teacher", toy_run / "teacher", "--out", run, "--resume", "--iterations", "3"],
             "does not match the tensors written with it", run, capsys)


def test_a_checkpoint_of_an_older_version_resumes_with_a_warning(run, toy_run):
    _as_older_version(checkpoint_dirs(run / "checkpoints")[-1])
    with pytest.warns(UserWarning, match="records no teacher fingerprint"):
        assert main(["distill", "--teacher", str(toy_run / "teacher"), "--out", str(run), "--resume", "--iterations", "3",
                     "--quiet"]) == 0
    newest = checkpoint_dirs(run / "checkpoints")[-1]
    assert json.loads((newest / "state.json").read_text())["meta"]["__dict__"][KEY] == weights_fingerprint(toy_run / "teacher")
    with safe_open(newest / "student.safetensors", framework="pt") as handle:  # recorded from now on
        assert DIGEST_KEY in handle.metadata()


def test_an_older_checkpoint_of_another_architecture_is_one_line(run, tmp_path, capsys):
    """No fingerprint to refuse it by: the networks' load itself is said in one line."""
    _as_older_version(checkpoint_dirs(run / "checkpoints")[-1])
    wider = _toy_teacher(tmp_path / "wider", hidden=64)
    with pytest.warns(UserWarning, match="records no teacher fingerprint"):
        _refused(["distill", "--teacher", wider, "--out", run, "--resume", "--iterations", "3"],
                 "holds a student of another architecture", run, capsys)


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset-record")
    (root / "prompts.txt").write_text("a handwritten digit seven\n")
    shutil.copytree(t2i.shipped_pipeline("sd15"), root / "model")
    assert main(["distill", "--preset", "sd15", "--model", str(root / "model"), "--prompts", str(root / "prompts.txt"),
                 "--out", str(root / "run"), "--iterations", "1", "--embedding-cache", str(root / "cache"), "--lora-rank", "2", *TINY]) == 0
    return root


def test_a_preset_run_resumed_on_other_weights_is_refused(preset_run, tmp_path, capsys):
    other = tmp_path / "model"
    shutil.copytree(preset_run / "model", other)
    weights = next((other / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"] * 1.01  # a fine-tune: same names, shapes and file size
    save_file(tensors, weights)
    _refused(["distill", "--preset", "sd15", "--model", other, "--out", preset_run / "run", "--resume", "--prompts", preset_run / "prompts.txt", "--iterations", "2",
              "--quiet"], "trained from another teacher", preset_run / "run", capsys)


def test_a_lora_checkpoint_of_another_rank_is_one_line(preset_run, capsys):
    _refused(["distill", "--preset", "sd15", "--model", preset_run / "model", "--out", preset_run / "run", "--resume",
              "--prompts", preset_run / "prompts.txt", "--iterations", "2", "--lora-rank", "4",
              "--embedding-cache", preset_run / "cache", "--quiet"], "holds a student of another architecture",
             preset_run / "run", capsys)

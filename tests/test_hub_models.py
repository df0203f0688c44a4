"""Issue 35 item 4: a Hugging Face Hub model id wherever a pipeline folder is taken (``distill --model``,
``export --pipeline``/``--vae``, ``convert --base``), resolved as diffusers resolves it, with ``--revision``,
``--variant``, ``--cache-dir`` and ``HF_HUB_OFFLINE=1``; ``distill --push-to-hub`` refused up front where it
cannot upload. The Hub here is a cache on disk in the Hub's own layout (``models--org--name/blobs``,
``snapshots/<commit>`` of links to the blobs, ``refs/main``), built from the shipped tiny SD1.5 pipeline."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdm_fast.cli import main
from tdm_fast.demos import t2i

REPO = "tiny-org/tiny-sd15"
VARIANT_REPO = "tiny-org/tiny-sd15-fp16"  # its weights only as *.fp16.safetensors
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TRAIN = ["--resolution", "32", "--iterations", "1", "--batch-size", "2", "--lora-rank", "4", "--embedding-cache", "none",
         "--kernels", "reference", "--quiet"]


def add_to_cache(cache: Path, repo: str, source: Path, variant: str | None = None) -> Path:
    """``source``'s files as the snapshot ``COMMIT`` of ``repo`` in the Hub cache ``cache`` (what
    ``snapshot_download`` leaves: content in ``blobs/``, links in ``snapshots/``); ``variant`` renames every
    ``*.safetensors`` to ``*.<variant>.safetensors``. Returns the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(source.rglob("*")):
        if not file.is_file() or file.name == "build.json":
            continue
        relative = file.relative_to(source)
        if variant and file.suffix == ".safetensors":
            relative = relative.with_name(f"{file.stem}.{variant}.safetensors")
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    add_to_cache(cache, REPO, t2i.shipped_pipeline("sd15"))
    add_to_cache(cache, VARIANT_REPO, t2i.shipped_pipeline("sd15"), variant="fp16")
    return cache


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """HF_HUB_OFFLINE=1 with ``hub_cache`` as the default cache (HF_HUB_CACHE), for this process:
    huggingface_hub read both variables when it was imported, so its constants are set too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def prompts(tmp_path) -> Path:
    return t2i.write_prompt_file(tmp_path / "prompts.txt")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tdm-fast: error: "), err
    return err[0]


def test_hub_id_distils_exports_and_samples_offline(offline, tmp_path, capsys):
    """The acceptance: `--model org/name` from the on-disk cache (--cache-dir) distils; `export --pipeline
    org/name` (the default cache, HF_HUB_CACHE) exports; the export samples prompts; the run records the Hub id."""
    run, onnx = tmp_path / "run", tmp_path / "onnx"
    assert main(["distill", "--preset", "sd15", "--model", REPO, "--cache-dir", str(offline), "--prompts",
                 str(prompts(tmp_path)), "--steps", "1", "--out", str(run), *TRAIN]) == 0
    source = json.loads((run / "student" / "model" / "lora_role.json").read_text())["source"]
    assert source["hub"] == {"repo_id": REPO, "revision": COMMIT}
    assert "base_model: tiny-org/tiny-sd15" in (run / "lora" / "README.md").read_text()  # the card names the id, not the cache
    assert main(["--quiet", "export", "--checkpoint", str(run / "student"), "--pipeline", REPO, "--out", str(onnx),
                 "--steps", "1", "--device", "cpu", "--exporter", "torchscript", "--no-verify"]) == 0
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["model"]["pipeline_folder"] == REPO  # named by its id, not by the cache's path
    images = tmp_path / "images"
    assert main(["--quiet", "sample", "--prompt", "a handwritten digit seven", "--backend", "onnx", "--engine", str(onnx),
                 "--steps", "1", "--out", str(images)]) == 0
    assert images.with_suffix(".png").is_file() and images.with_suffix(".safetensors").is_file()


def test_variant_loads_the_variant_weight_files(offline, tmp_path, capsys):
    """--variant fp16 loads `*.fp16.safetensors` (denoiser, text encoder, VAE, and the LoRA base reloaded);
    without it, a repository holding only those files is refused in one line."""
    run = tmp_path / "run"
    argv = ["distill", "--preset", "sd15", "--model", VARIANT_REPO, "--prompts", str(prompts(tmp_path)), "--steps", "1", *TRAIN]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 2
    assert "cannot load the UNet2DConditionModel" in one_error_line(capsys)
    assert not (tmp_path / "plain").exists()
    assert main([*argv, "--variant", "fp16", "--out", str(run)]) == 0
    source = json.loads((run / "student" / "model" / "lora_role.json").read_text())["source"]
    assert source["variant"] == "fp16" and source["hub"]["repo_id"] == VARIANT_REPO
    from tdm_fast.denoiser import load_denoiser

    load_denoiser(run / "student")  # the base reloads from the variant files alone
    assert main(["--quiet", "export", "--checkpoint", str(run / "student"), "--vae", VARIANT_REPO, "--variant", "fp16",
                 "--out", str(tmp_path / "onnx"), "--steps", "1", "--device", "cpu", "--exporter", "torchscript",
                 "--no-verify"]) == 0
    assert (tmp_path / "onnx" / "vae_decoder_fp32.onnx").is_file()


def test_convert_takes_a_hub_base(offline, tmp_path):
    from test_convert import kohya_release

    file, _, _ = kohya_release(tmp_path, ".safetensors", std=0.1)
    out = tmp_path / "release"
    assert main(["--quiet", "convert", "--checkpoint", str(file), "--base", REPO, "--recipe", "tdm-dreamshaper",
                 "--out", str(out)]) == 0
    assert "base_model: tiny-org/tiny-sd15" in (out / "README.md").read_text()


@pytest.mark.parametrize("verb", ["distill", "export", "convert"])
def test_unknown_id_and_uncached_revision_offline_are_one_line(verb, offline, tmp_path, capsys):
    """Nothing in the cache for the id, or for the revision: one line naming the flag, the offline look-up and
    what to do; nothing written."""
    out = tmp_path / "out"
    argv = {
        "distill": lambda model: ["distill", "--preset", "sd15", "--model", model, "--prompts", str(prompts(tmp_path)), *TRAIN],
        "export": lambda model: ["export", "--checkpoint", str(tmp_path), "--pipeline", model],
        "convert": lambda model: ["convert", "--checkpoint", str(tmp_path), "--base", model, "--recipe", "tdm-dreamshaper"],
    }[verb]
    flag = {"distill": "--model", "export": "--pipeline", "convert": "--base"}[verb]
    assert main([*argv("nobody/nothing"), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"{flag} nobody/nothing" in line and "HF_HUB_OFFLINE=1" in line and str(offline) in line
    assert main([*argv(REPO), "--revision", "f" * 40, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"at revision {'f' * 40}" in line and "HF_HUB_OFFLINE=1" in line
    assert not out.exists()


def test_local_folders_and_non_ids(tmp_path, capsys):
    """--revision/--cache-dir with a local folder do nothing: refused; a path that is neither a folder nor an id."""
    argv = ["distill", "--preset", "sd15", "--prompts", str(prompts(tmp_path)), "--out", str(tmp_path / "run"), *TRAIN]
    assert main([*argv, "--model", str(t2i.shipped_pipeline("sd15")), "--revision", "main"]) == 2
    assert "--revision" in one_error_line(capsys)
    assert main([*argv, "--model", str(tmp_path / "missing" / "pipe")]) == 2
    assert "is not a folder, nor a Hub model id" in one_error_line(capsys)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "onnx"), "--variant", "fp16"]) == 2
    assert "--pipeline or --vae" in one_error_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "onnx").exists()


def test_a_real_offline_process_refuses_an_uncached_id(tmp_path):
    """The variables as a user sets them, in a fresh process (huggingface_hub reads them at import)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tdm_fast", "distill", "--preset", "sd15", "--model", "nobody/nothing",
                           "--prompts", str(prompts(tmp_path)), "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1" in lines[0] and "nobody/nothing" in lines[0], lines
    assert not out.exists()


def test_push_to_hub_is_refused_before_training(offline, monkeypatch, tmp_path, capsys):
    """Offline, or without a token: one line before the run starts (not after hours of training)."""
    from huggingface_hub import constants

    argv = ["distill", "--preset", "sd15", "--model", REPO, "--prompts", str(prompts(tmp_path)), "--out", str(tmp_path / "run"),
            "--push-to-hub", "me/tdm-student", *TRAIN]
    assert main(argv) == 2
    assert "--push-to-hub me/tdm-student: HF_HUB_OFFLINE=1" in one_error_line(capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(argv) == 2
    assert "no Hugging Face token" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_push_folder_uploads_through_hf_api(monkeypatch, tmp_path):
    """The upload goes through HfApi (create_repo, upload_folder): against an endpoint nothing listens on it
    fails as one ValueError that keeps the folder and says how to upload it by hand."""
    from huggingface_hub import constants

    from tdm_fast.hub import push_folder

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with pytest.raises(ValueError, match=r"me/tdm-student failed .*hf upload me/tdm-student"):
        push_folder(folder, "me/tdm-student", "test")
    assert (folder / "README.md").read_text() == "card"

"""Damaged pipeline folders, one row per component (issue 33): each damage of the shipped tiny SD 1.5 and SD3
pipelines is refused by ``distill --preset`` and, where the export reads the component, by ``export --pipeline``
with one ``tdm-fast: error:`` line naming the file, exit 2, before ``--out`` or the embedding cache exist.

A new component or damage joins by adding a row to ``DAMAGED``.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tdm_fast.cli import main
from tdm_fast.demos import t2i


def _edit_tensors(file, change):
    """Rewrites a safetensors file with ``change(tensors)`` applied (its metadata kept: transformers reads it)."""
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, file, metadata=metadata)


def _weights(folder):
    return next(folder.glob("*.safetensors"))


def nan_in(key):
    def damage(folder):
        _edit_tensors(_weights(folder), lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    return damage


def integer(key):
    def damage(folder):
        _edit_tensors(_weights(folder), lambda t: t.__setitem__(key, t[key].to(torch.int64)))
    return damage


def without_tensor(key):
    def damage(folder):
        _edit_tensors(_weights(folder), lambda t: t.pop(key))
    return damage


def without_file(name):
    def damage(folder):
        (folder / name).unlink()
    return damage


def config_without(file, key):
    def damage(folder):
        data = json.loads((folder / file).read_text())
        del data[key]
        (folder / file).write_text(json.dumps(data))
    return damage


def config_with(file, **changes):
    def damage(folder):
        (folder / file).write_text(json.dumps({**json.loads((folder / file).read_text()), **changes}))
    return damage


def garbage(name):
    def damage(folder):
        (folder / name).write_text("{ not json")
    return damage


# (pipeline, component ("." is the pipeline folder itself), damage, what the error line says, export --pipeline reads it)
DAMAGED = [
    ("sd15", ".", garbage("model_index.json"), "model_index.json is not valid JSON", True),
    ("sd15", "tokenizer", without_file("tokenizer.json"), "holds no tokenizer files", True),
    ("sd15", "text_encoder", nan_in("final_layer_norm.weight"), "final_layer_norm.weight holds NaN", True),
    ("sd15", "text_encoder", integer("final_layer_norm.weight"), "final_layer_norm.weight holds I64", True),
    ("sd15", "text_encoder", without_tensor("final_layer_norm.weight"), "lacks the tensor final_layer_norm.weight", True),
    ("sd15", "text_encoder", garbage("config.json"), "config.json is not valid JSON", True),
    ("sd15", "unet", without_tensor("conv_in.weight"), "lacks the tensor conv_in.weight", False),
    ("sd15", "unet", nan_in("conv_in.weight"), "conv_in.weight holds NaN", False),
    ("sd15", "unet", integer("conv_in.bias"), "conv_in.bias holds I64", False),
    ("sd15", "unet", config_without("config.json", "in_channels"), "lacks 'in_channels'", False),
    ("sd15", "vae", config_without("config.json", "block_out_channels"), "lacks 'block_out_channels'", True),
    ("sd15", "vae", nan_in("decoder.conv_out.weight"), "decoder.conv_out.weight holds NaN", True),
    ("sd15", "scheduler", config_with("scheduler_config.json", prediction_type="banana"), "prediction_type 'banana'", False),
    ("sd3", ".", garbage("model_index.json"), "model_index.json is not valid JSON", True),
    ("sd3", "tokenizer_2", without_file("tokenizer.json"), "holds no tokenizer files", True),
    ("sd3", "text_encoder_2", without_tensor("text_model.final_layer_norm.weight"), "lacks the tensor", True),
    ("sd3", "text_encoder_3", nan_in("encoder.final_layer_norm.weight"), "holds NaN", True),
    ("sd3", "transformer", without_tensor("pos_embed.proj.weight"), "lacks the tensor pos_embed.proj.weight", False),
    ("sd3", "transformer", nan_in("pos_embed.proj.weight"), "pos_embed.proj.weight holds NaN", False),
    ("sd3", "scheduler", garbage("scheduler_config.json"), "scheduler_config.json is not valid JSON", False),
]


def _row_id(row):
    return f"{row[0]}-{row[1].strip('.') or 'index'}-{row[2].__qualname__.split('.')[0]}-{DAMAGED.index(row)}"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """One damaged copy of a shipped pipeline per row, a prompt file and a saved denoiser for export."""
    from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser

    root = tmp_path_factory.mktemp("damaged")
    for number, (pipeline, component, damage, _, _) in enumerate(DAMAGED):
        copy = root / f"row{number}"
        shutil.copytree(t2i.shipped_pipeline(pipeline), copy)
        damage(copy / component)
    (root / "prompts.txt").write_text("a handwritten digit seven\n")
    toy_denoiser(ToyMLP(hidden=8, depth=1)).save_pretrained(root / "denoiser")
    return root


def _tree(root):
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _refused(argv, needle, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(folder)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("tdm-fast: error: "), err
    assert needle in lines[0] and str(folder) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "written before the damage was found"
    assert _tree(folder) == before


@pytest.mark.parametrize("row", DAMAGED, ids=_row_id)
def test_distill_preset_refuses(row, damaged, tmp_path, capsys, monkeypatch):
    pipeline, _, _, needle, _ = row
    folder = damaged / f"row{DAMAGED.index(row)}"
    _refused(["distill", "--preset", pipeline, "--model", str(folder), "--prompts", str(damaged / "prompts.txt"),
              "--out", str(tmp_path / "out"), "--embedding-cache", str(tmp_path / "cache"), "--iterations", "1", "--quiet"],
             needle, folder, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("row", [r for r in DAMAGED if r[4]], ids=_row_id)
def test_export_pipeline_refuses(row, damaged, tmp_path, capsys, monkeypatch):
    folder = damaged / f"row{DAMAGED.index(row)}"
    _refused(["export", "--checkpoint", str(damaged / "denoiser"), "--out", str(tmp_path / "out"), "--pipeline", str(folder),
              "--quiet"], row[3], folder, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("row", [r for r in DAMAGED if r[1] == "vae"], ids=_row_id)
def test_export_vae_refuses(row, damaged, tmp_path, capsys, monkeypatch):
    folder = damaged / f"row{DAMAGED.index(row)}"
    _refused(["export", "--checkpoint", str(damaged / "denoiser"), "--out", str(tmp_path / "out"), "--vae", str(folder / "vae"),
              "--quiet"], row[3], folder, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("pipeline", ["sd15", "sd3"])
def test_the_shipped_pipelines_pass(pipeline):
    """No false alarm: the undamaged folders (the naming and tying of real transformers checkpoints) pass."""
    from tdm_fast.backbones.validate import check_pipeline_folder

    check_pipeline_folder(t2i.shipped_pipeline(pipeline))


def test_cached_embeddings_spare_the_text_encoders(damaged, tmp_path):
    """A run whose prompt embeddings are cached never loads the text encoders, so their files are not read at
    start-up either: a NaN written into them after the cache was filled (same size and time, the cache still
    hits) does not stop the run."""
    import os

    folder = tmp_path / "sd15"
    shutil.copytree(t2i.shipped_pipeline("sd15"), folder)
    argv = ["distill", "--preset", "sd15", "--model", str(folder), "--prompts", str(damaged / "prompts.txt"),
            "--embedding-cache", str(tmp_path / "cache"), "--iterations", "1", "--batch-size", "2", "--lora-rank", "2",
            "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    weights = _weights(folder / "text_encoder")
    stat = weights.stat()
    nan_in("final_layer_norm.weight")(folder / "text_encoder")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0

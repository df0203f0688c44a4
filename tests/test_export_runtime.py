"""Issue 18: prompt → image through exported graphs only (tokenizers, prompt encoder, K-step sampler, VAE
decoder) with ONNX Runtime and numpy, torch blocked; checked against the stock diffusers pipeline with
TDMScheduler and the student's LoRA, on the shipped tiny sd15 and sd3 pipelines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from _lora_student import random_lora_run  # noqa: E402
from tdm_fast.cli import main  # noqa: E402
from tdm_fast.demos import t2i, t2i_demo  # noqa: E402

STEPS = (1, 2, 4)  # what the students are trained for
EXPORTED = {"sd15": (1, 4), "sd3": (2,)}  # what the tests export (each sampler graph costs seconds); all three: bench/bench_t2i_runtime.py
# one prompt longer than the tokenizers' 16 tokens: truncated by the pipeline and by the runtime alike
PROMPTS = ["a handwritten digit seven", "the number 3", "THE  Number 8!", " ".join(["handwritten 5"] * 10)]

BLOCK_TORCH = '''
import sys


class _NoTorch:  # a deployment without torch: any import of it fails
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is not available here")


sys.meta_path.insert(0, _NoTorch)
'''

RUN_ORT = '''
import json, sys, warnings
import numpy as np
from tdm_fast.export.runtime import TextToImage

folder, work = sys.argv[1], sys.argv[2]
prompts = json.load(open(f"{work}/prompts.json"))
latents = np.load(f"{work}/latents.npy")
out, said = {}, []
for binding in (False, True):
    runner = TextToImage(folder, io_binding=binding)
    for k in runner.samplers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[f"k{k}_{binding}"] = runner(prompts, steps=k, latents=latents, output_type="np").arrays
        said += [str(w.message) for w in caught]
np.savez(f"{work}/images.npz", **out)
print(json.dumps({"torch_imported": "torch" in sys.modules, "warnings": said}))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per pipeline: (pipeline folder, run folder, export folder written by `tdm-fast export --pipeline`). The
    export reads a copy of the pipeline inside the run folder, so that moving the run folder takes every source away."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model, run = random_lora_run(kind, tmp_path_factory.mktemp(f"run-{kind}"), STEPS)
            out = run / "onnx"
            shutil.copytree(model, run / "pipeline")
            # --no-verify: the test compares with the stock pipeline itself (the prompt encoder is checked regardless)
            assert main(["--quiet", "export", "--checkpoint", str(run / "student"), "--pipeline", str(run / "pipeline"), "--out", str(out),
                         "--steps", *map(str, EXPORTED[kind]), "--device", "cpu", "--exporter", "torchscript", "--no-verify"]) == 0
            cache[kind] = model, run, out
        return cache[kind]

    return get


def _run_without_torch(tmp_path, folder, prompts, latents) -> tuple[dict, dict]:
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_TORCH)
    (tmp_path / "run_ort.py").write_text(RUN_ORT)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    np.save(tmp_path / "latents.npy", latents)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "block"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(tmp_path / "run_ort.py"), str(folder), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(tmp_path / "images.npz"))


@pytest.mark.parametrize("kind", t2i.PIPELINES)
def test_prompt_to_image_without_torch_matches_the_stock_pipeline(exported, kind, tmp_path):
    model, run, folder = exported(kind)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pipeline"] == kind
    assert set(manifest["graphs"]) == {"prompt_encoder", "vae_decoder", *(f"sampler_k{k}" for k in EXPORTED[kind])}
    assert len(manifest["tokenizers"]) == (1 if kind == "sd15" else 3)
    latents = torch.randn(len(PROMPTS), *manifest["sample_shape"], generator=torch.Generator().manual_seed(1))
    report, images = _run_without_torch(tmp_path, folder, PROMPTS, latents.numpy())
    assert report["torch_imported"] is False
    assert report["warnings"] and all("truncated as the pipeline truncates it" in w for w in report["warnings"])
    extra = {"max_sequence_length": t2i.T5_LENGTH} if kind == "sd3" else {}
    for k in EXPORTED[kind]:
        pipe = t2i_demo.load_student_pipeline(model, run / "lora", k)  # stock pipeline + TDMScheduler + LoRA + K embedding
        with torch.no_grad():
            ref = pipe(prompt=PROMPTS, latents=latents.clone(), num_inference_steps=k, guidance_scale=1.0, height=t2i.IMAGE_SIZE,
                       width=t2i.IMAGE_SIZE, output_type="pt", **extra).images.numpy()
        for binding in (False, True):  # plain session.run, and OrtValues handed from graph to graph
            got = images[f"k{k}_{binding}"]
            assert got.shape == ref.shape == (len(PROMPTS), *manifest["image_shape"])
            assert np.abs(got - ref).max() <= 1e-3, (k, binding, np.abs(got - ref).max())
        if k == max(EXPORTED[kind]):  # the LoRA and the K embedding are in the graphs: the base model draws something else
            base = t2i_demo.load_stock(model)
            base.scheduler = t2i_demo._scheduler(base, "tdm")
            with torch.no_grad():
                plain = base(prompt=PROMPTS, latents=latents.clone(), num_inference_steps=k, guidance_scale=1.0, height=t2i.IMAGE_SIZE,
                             width=t2i.IMAGE_SIZE, output_type="pt", **extra).images.numpy()
            assert np.abs(plain - ref).max() > 0.05


def test_sample_cli_serves_prompts_and_refuses_broken_folders(exported, tmp_path, capsys):
    """`sample --prompt` writes images; a folder missing a graph, holding another model's graph, or without a
    manifest is refused in one line, exit code 2, nothing written."""
    model, run, folder = exported("sd15")
    out = tmp_path / "samples" / "digits"
    argv = ["sample", "--backend", "onnx", "--steps", "4", "--prompt", "the number 3", PROMPTS[-1], "--out", str(out)]
    assert main([*argv, "--engine", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("tdm-fast: warning:") == 1 and "22 tokens" in err and "dropping 'handwritten 5 handwritten 5 handwritten 5'" in err
    from safetensors.numpy import load_file

    assert load_file(out.with_suffix(".safetensors"))["images"].shape == (2, 1, 16, 16) and out.with_suffix(".png").is_file()

    def refused(engine, match):
        target = tmp_path / "refused" / "x"
        assert main([*argv[:-1], str(target), "--engine", str(engine)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tdm-fast: error:") and "\n" not in err and match in err, err
        assert not (tmp_path / "refused").exists()

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vae_decoder" / "model.onnx").unlink()
    refused(broken, "lists vae_decoder as vae_decoder/model.onnx, which")
    _, _, other = exported("sd3")
    shutil.copy(other / "vae_decoder" / "model.onnx", broken / "vae_decoder" / "model.onnx")  # a graph of another model
    refused(broken, "is not the vae_decoder this manifest was written for")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]["prompt_encoder"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    refused(broken, "lists no prompt_encoder graph")
    (broken / "manifest.json").unlink()
    refused(broken, "has no manifest.json")
    assert main([*argv[:-1], str(tmp_path / "k3"), "--engine", str(folder), "--steps", "3"]) == 2
    assert "not K=3" in capsys.readouterr().err


def test_export_folder_is_laid_out_per_component_and_serves_from_anywhere(exported, tmp_path):
    """Issue 35 item 10: the folder has diffusers' ONNX layout (model_index.json, one folder per component), its
    manifest names files relative to it and no local path; copied elsewhere with its pipeline and run folders gone,
    it still serves prompts, as PIL images with the arrays beside them."""
    from PIL import Image

    from tdm_fast.export.runtime import TextToImage

    model, run, folder = exported("sd15")
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"model_index.json", "manifest.json", "text_encoder/model.onnx", "vae_decoder/model.onnx",
                     "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                     *(f"sampler/sampler_k{k}_fp32.onnx" for k in EXPORTED["sd15"])}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "TextToImage" and index["tokenizer"] == ["tokenizers", "Tokenizer"]
    assert {"text_encoder", "sampler", "vae_decoder", "scheduler"} <= set(index)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "TDMScheduler" and scheduler["trained_steps"] == list(STEPS)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["model"]["pipeline_folder"] == "pipeline"
    for name in files:  # no file records where the sources or the export lived
        assert str(run).encode() not in (folder / name).read_bytes(), name

    latents = np.random.default_rng(0).standard_normal((2, *manifest["sample_shape"]), dtype=np.float32)
    expected = TextToImage(folder, steps=4)(PROMPTS[:2], latents=latents)
    moved = tmp_path / "deploy" / "digits"
    shutil.copytree(folder, moved)
    away = run.with_name(run.name + "-gone")
    run.rename(away)  # the run folder holds the student, the pipeline copy and the original export
    try:
        runtime = TextToImage(moved, steps=4)
        output = runtime(PROMPTS[:2], latents=latents)
    finally:
        away.rename(run)
    np.testing.assert_array_equal(output.arrays, expected.arrays)
    assert output.arrays.shape == (2, *manifest["image_shape"]) and output.arrays.dtype == np.float32
    assert len(output.images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) and i.mode == "L" for i in output.images)
    np.testing.assert_array_equal(np.asarray(output.images[1]), np.round(output.arrays[1, 0] * 255).astype(np.uint8))
    assert np.asarray(output) is output.arrays  # numpy callers of the array TextToImage used to return keep working
    np.testing.assert_array_equal(runtime(PROMPTS[:2], latents=latents, output_type="np").images, output.arrays)
    with pytest.raises(ValueError, match="output_type must be 'pil' or 'np'"):
        runtime(PROMPTS[:2], latents=latents, output_type="pt")


def test_flat_export_folders_of_manifest_version_1_still_serve(exported, tmp_path):
    """A folder as the first exports wrote it (every graph at the top, absolute source paths, no model_index.json)
    loads and gives the same images as the component layout."""
    from tdm_fast.export.runtime import TextToImage

    model, run, folder = exported("sd15")
    manifest = json.loads((folder / "manifest.json").read_text())
    old = tmp_path / "v1"
    (old / "tokenizer").mkdir(parents=True)
    for name, entry in manifest["graphs"].items():
        entry["file"] = shutil.copy(folder / entry["file"], old / f"{name}_fp32.onnx").name  # sampler_k1_fp32.onnx...
    shutil.copy(folder / "tokenizer" / "tokenizer.json", old / "tokenizer" / "tokenizer.json")
    del manifest["scheduler"]
    manifest.update(version=1, model={**manifest["model"], "pipeline_folder": str(model), "checkpoint": str(run / "student")})
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert manifest["graphs"]["prompt_encoder"]["file"] == "prompt_encoder_fp32.onnx"
    latents = np.random.default_rng(1).standard_normal((3, *manifest["sample_shape"]), dtype=np.float32)
    got = TextToImage(old)(PROMPTS[:3], steps=1, latents=latents, output_type="np")
    np.testing.assert_array_equal(got.images, TextToImage(folder)(PROMPTS[:3], steps=1, latents=latents).arrays)


def test_export_refuses_text_encoders_the_student_was_not_trained_with(exported, tmp_path, capsys):
    """A pipeline folder whose text encoder differs from the student's base: refused before any sampler is
    exported (the empty prompt's condition is not the student's unconditional one), nothing left behind."""
    model, run, _ = exported("sd15")
    other = tmp_path / "other"
    shutil.copytree(model, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "text_encoder" / "model.safetensors")
    save_file({k: v * 1.1 if v.is_floating_point() else v for k, v in weights.items()}, other / "text_encoder" / "model.safetensors")
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(run / "student"), "--pipeline", str(other), "--out", str(out), "--steps", "1",
                 "--device", "cpu", "--exporter", "torchscript"]) == 2
    assert "do not give the empty-prompt condition this student was distilled with" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", "--checkpoint", str(run / "student"), "--pipeline", str(t2i.shipped_pipeline("sd3")), "--out", str(out),
                 "--steps", "1", "--device", "cpu"]) == 2
    assert "not the CLIP tokens" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--format", "compile", "--checkpoint", str(run / "student"), "--pipeline", str(model), "--out", str(out)]) == 2
    assert "--pipeline does nothing in export --format compile" in capsys.readouterr().err


@pytest.mark.parametrize("kind", t2i.PIPELINES)
def test_saved_tokenizers_tokenize_as_the_pipeline(kind, tmp_path):
    """The tokenizers library on the saved tokenizer.json gives the pipeline tokenizer's ids (padding, truncation,
    case, spacing), and says when it truncates."""
    from tdm_fast.export.text import load_text_pipeline, max_lengths, pipeline_token_ids, save_tokenizers
    from tdm_fast.export.tokenizer import PromptTokenizer

    pipe = load_text_pipeline(t2i.shipped_pipeline(kind))
    lengths = max_lengths(pipe, kind, t2i.T5_LENGTH)
    entries = save_tokenizers(pipe, kind, tmp_path, lengths)
    prompts = [*PROMPTS, "", "  seven   eight  ", "Zebra!"]
    for name, e in entries.items():
        ours = PromptTokenizer(tmp_path / e["file"], e["max_length"], e["pad_id"], e["pad_token"], name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = ours(prompts)
        np.testing.assert_array_equal(ids, pipeline_token_ids(getattr(pipe, name), prompts, e["max_length"]).numpy())
        assert len(caught) == 1 and "handwritten 5" in str(caught[0].message)


def test_runtime_imports_without_torch_and_public_names_still_resolve(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = textwrap.dedent("""
        import sys, tdm_fast, tdm_fast.export
        from tdm_fast.export import TextToImage, load_manifest, PromptTokenizer
        from tdm_fast.export.runtime import OrtSampler, OrtDecoder
        assert "torch" not in sys.modules
        try:
            tdm_fast.TDMScheduler
        except ImportError:
            print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    import tdm_fast

    assert tdm_fast.TDMScheduler.__name__ == "TDMScheduler" and "TDMTrainer" in dir(tdm_fast)
    with pytest.raises(AttributeError):
        tdm_fast.NotAName


def _cuda_ort() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ort(), reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")
def test_io_binding_on_cuda_keeps_buffers_on_the_device(exported):
    """CUDA provider: TextToImage chains OrtValues on the GPU; OrtSampler/OrtDecoder take and return torch CUDA
    tensors bound by address. Same images as the CPU path."""
    from tdm_fast.export.runtime import OrtDecoder, OrtSampler, TextToImage

    _, _, folder = exported("sd15")
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    cpu = TextToImage(folder, steps=4, providers=["CPUExecutionProvider"])(PROMPTS[:2], latents=latents).arrays
    gpu = TextToImage(folder, steps=4, providers=["CUDAExecutionProvider"])
    assert gpu.io_binding and gpu.encoder.device == ("cuda", 0)
    assert np.abs(gpu(PROMPTS[:2], latents=latents).arrays - cpu).max() <= 1e-3
    cond = torch.from_numpy(gpu.encode(PROMPTS[:2])["encoder_hidden_states"]).cuda()
    x0 = OrtSampler(folder / "sampler" / "sampler_k4_fp32.onnx", providers=["CUDAExecutionProvider"])(torch.from_numpy(latents).cuda(), cond)
    images = OrtDecoder(folder / "vae_decoder" / "model.onnx", providers=["CUDAExecutionProvider"])(x0)
    assert x0.is_cuda and images.is_cuda
    assert float((images.cpu() - torch.from_numpy(cpu)).abs().max()) <= 1e-3

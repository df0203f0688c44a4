"""Prompt → image latency of a distilled student: the torch pipeline vs the exported graphs in ONNX Runtime.

For each shipped tiny pipeline (sd15, sd3) a student is distilled for a few iterations
(``tdm-fast distill --preset``, K ∈ {1, 2, 4}) and exported with ``tdm-fast export --pipeline``; then,
for K = 1, 2, 4 and a batch of 8 prompts with fixed latents, one call of the whole path is timed:

- ``torch``: the stock diffusers pipeline with ``TDMScheduler``, the LoRA and the K embedding
  (``tdm_fast.demos.t2i_demo.load_student_pipeline``), guidance 1, ``output_type="pt"``;
- ``onnx``: :class:`tdm_fast.export.runtime.TextToImage` (tokenizers, prompt-encoder graph, sampler
  graph, VAE decoder graph; ONNX Runtime's CPU provider with as many threads as torch).

Both include tokenisation, text encoding, the K steps and decoding. ``extra_info`` records ms per
batch and per image and the max |Δ| between the two paths' images.

    python -m pytest bench/bench_t2i.py --benchmark-json=out.json      # or: tdm-fast bench t2i
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from tdm_fast.demos import t2i, t2i_demo  # noqa: E402

STEPS = (1, 2, 4)
BATCH = 8
ROUNDS = 10
EXPORTER = os.environ.get("TDM_BENCH_EXPORTER", "torchscript")  # the dynamo exporter takes minutes per UNet graph here
_BUILT: dict = {}


def _build(kind: str, root: Path) -> tuple[Path, Path]:
    """(run folder, export folder) of a student distilled for 3 iterations from the shipped pipeline."""
    from tdm_fast.cli import main

    model = t2i.shipped_pipeline(kind)
    prompts = t2i.write_prompt_file(root / "prompts.txt")
    argv = t2i_demo.preset_argv(kind, model, prompts, "none", rank=4)
    assert main(["--quiet", "distill", *argv, "--iterations", "3", "--steps", *map(str, STEPS), "--steps-conditioning",
                 "--batch-size", "4", "--kernels", "reference", "--out", str(root / "run")]) == 0
    assert main(["--quiet", "export", "--checkpoint", str(root / "run" / "student"), "--pipeline", str(model), "--out",
                 str(root / "onnx"), "--steps", *map(str, STEPS), "--device", "cpu", "--exporter", EXPORTER]) == 0
    return root / "run", root / "onnx"


def _paths(kind: str):
    if kind not in _BUILT:
        from tdm_fast.export.runtime import TextToImage

        run, folder = _build(kind, Path(tempfile.mkdtemp(prefix=f"bench-t2i-{kind}-")))
        prompts = [t2i.prompt_table()[0][i * 7 % 80] for i in range(BATCH)]
        latents = torch.randn(BATCH, 4, t2i.LATENT_SIZE, t2i.LATENT_SIZE, generator=torch.Generator().manual_seed(0))
        ort = TextToImage(folder, threads=torch.get_num_threads())
        pipes = {k: t2i_demo.load_student_pipeline(t2i.shipped_pipeline(kind), run / "lora", k) for k in STEPS}
        extra = {"max_sequence_length": t2i.T5_LENGTH} if kind == "sd3" else {}

        def torch_path(k):
            with torch.no_grad():
                return pipes[k](prompt=prompts, latents=latents.clone(), num_inference_steps=k, guidance_scale=1.0,
                                height=t2i.IMAGE_SIZE, width=t2i.IMAGE_SIZE, output_type="pt", **extra).images.numpy()

        def onnx_path(k):
            return ort(prompts, steps=k, latents=latents.numpy(), output_type="np").arrays

        _BUILT[kind] = {"torch": torch_path, "onnx": onnx_path}
    return _BUILT[kind]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("path", ("torch", "onnx"))
@pytest.mark.parametrize("kind", t2i.PIPELINES)
def test_prompt_to_image(benchmark, kind, path, steps):
    paths = _paths(kind)
    fn = lambda: paths[path](steps)  # noqa: E731
    fn()  # warm-up: first-call allocations and ORT's lazy kernel set-up
    benchmark.group = f"t2i-{kind}"
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    other = paths["torch" if path == "onnx" else "onnx"](steps)
    benchmark.extra_info.update(pipeline=kind, path=path, steps=steps, batch=BATCH, ms_per_batch=1e3 * median,
                                ms_per_image=1e3 * median / BATCH, exporter=EXPORTER,
                                max_abs_diff_to_other_path=float(np.abs(fn() - other).max()))

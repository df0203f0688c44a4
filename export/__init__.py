"""Fast deterministic sampling: torch.compile, ONNX, ONNX Runtime and TensorRT.

- :func:`compile_sampler` — ``torch.compile`` of the unrolled K-step sampler (:class:`StudentSampler`);
  :func:`export_sampler_program` — the same sampler saved as a ``torch.export`` program (``.pt2``), which
  :class:`ProgramSampler` loads and compiles (``tdm-fast sample --backend compile --engine``).
- :func:`export_sampler_onnx` — the whole K-step sampler as one ONNX graph (K network copies, no
  loop; times and α/σ baked in); :func:`export_denoiser_onnx` — one network evaluation;
  :func:`export_vae_decoder_onnx` — the VAE decoder (latents to images) as its own graph.
- :func:`export_prompt_encoder_onnx` — the pipeline's text encoders and its prompt-embedding
  assembly (``encode_prompt``) as one graph: token ids in, the denoiser's text conditions out.
- :class:`OrtSampler` / :class:`OrtDenoiser` / :class:`OrtDecoder` — ONNX Runtime with the torch
  call signatures; :class:`TextToImage` — prompt → image from a ``tdm-fast export --pipeline``
  folder (:func:`load_manifest`) with ONNX Runtime, numpy and ``tokenizers`` only; its output
  (:class:`TextToImageOutput`) holds PIL images and their arrays.
- :mod:`tdm_fast.export.tensorrt` — engines, a CUDA-graph runner, and TensorRT-readiness checks.
- :func:`export_student` — ``tdm-fast export`` from Python (settings: :class:`ExportOptions`).
- :mod:`tdm_fast.export.cli` — ``add_export_arguments``/``run_export``/``load_runner`` for the CLI.

Imports are lazy so that ``import tdm_fast.export`` needs neither onnx nor tensorrt, and so that
``tdm_fast.export.runtime`` imports without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "StudentSampler": "sampler",
    "DenoiserStep": "sampler",
    "CompiledSampler": "sampler",
    "CondSpec": "sampler",
    "compile_sampler": "sampler",
    "compile_denoiser_step": "sampler",
    "fuse_lora": "sampler",
    "ddim_loop": "sampler",
    "export_sampler_onnx": "onnx",
    "export_denoiser_onnx": "onnx",
    "read_metadata": "onnx",
    "count_ops": "onnx",
    "UnsupportedOperatorError": "onnx",
    "OrtSampler": "runtime",
    "OrtDenoiser": "runtime",
    "OrtDecoder": "runtime",
    "TextToImage": "runtime",
    "TextToImageOutput": "runtime",
    "ProgramSampler": "program",
    "export_sampler_program": "program",
    "PromptTokenizer": "tokenizer",
    "load_manifest": "manifest",
    "ManifestError": "manifest",
    "export_prompt_encoder_onnx": "text",
    "LatentDecoder": "vae",
    "export_vae_decoder_onnx": "vae",
    "load_vae": "vae",
    "build_engine": "tensorrt",
    "TensorRTRunner": "tensorrt",
    "check_tensorrt_compatible": "tensorrt",
    "TENSORRT_SUPPORTED_OPS": "tensorrt",
    "export_student": "student",
    "ExportOptions": "student",
    "load_runner": "cli",
    "add_export_arguments": "cli",
    "run_export": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

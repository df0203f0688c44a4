"""A pipeline's prompt path as one ONNX graph, and its tokenizers as files, for ``export --pipeline``.

:class:`PromptEncoder` is the diffusers pipeline's ``encode_prompt`` (no CFG, no clip skip) written over
its text encoders, so that the graph traced from it returns exactly the conditions the denoiser was
trained on:

- ``sd15`` (``StableDiffusionPipeline``): ``CLIPTextModel``'s last hidden state → ``encoder_hidden_states``.
- ``sd3`` (``StableDiffusion3Pipeline``): the penultimate hidden states of both
  ``CLIPTextModelWithProjection``s concatenated along channels, zero-padded to the T5 width, and the
  ``T5EncoderModel``'s last hidden state (zeros when the folder has no T5) concatenated after them along
  the sequence → ``encoder_hidden_states``; both CLIPs' projected pooled outputs concatenated →
  ``pooled_projections``.

One graph rather than one per encoder: the assembly (concatenation, padding) then runs inside ONNX
Runtime too, so under IO binding the conditions go from the encoders to the sampler graph without
leaving the device. Inputs: one int64 ``(batch, max_length)`` token-id tensor per tokenizer
(``input_ids``, ``input_ids_2``, ``input_ids_3``).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .onnx import DEFAULT_OPSET, _run_exporter, _set_metadata, _version, dtype_name, resolve_dtype

PIPELINE_KINDS = {"StableDiffusionPipeline": "sd15", "StableDiffusion3Pipeline": "sd3"}
# prompts the export tokenizes both ways (the pipeline's tokenizer and PromptTokenizer) and encodes both
# ways (encode_prompt and the graph): case, punctuation, spacing, an unknown word and an over-long prompt
PROBE_PROMPTS = ("", "a handwritten digit seven", "The  NUMBER 7, drawn!", "zebra crossing at night",
                 " ".join(["a handwritten digit seven"] * 30))


def pipeline_kind(folder: str | Path) -> str:
    """``sd15`` or ``sd3`` from the folder's ``model_index.json``; ValueError for any other pipeline."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"--pipeline {folder} is not a diffusers pipeline folder (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_KINDS:
        raise ValueError(f"--pipeline {folder} is a {name}; the prompt-to-image export supports "
                         f"{', '.join(PIPELINE_KINDS)} folders")
    return PIPELINE_KINDS[name]


def load_text_pipeline(folder: str | Path, variant: str | None = None):
    """The pipeline with its tokenizers and text encoders only (no denoiser, no VAE), on the CPU; ``variant``:
    the text encoders' weight variant."""
    from ..backbones.presets import _pipeline_for_text, get_preset

    return _pipeline_for_text(get_preset(pipeline_kind(folder)), str(folder), None, torch.device("cpu"), variant)


def tokenizer_names(pipe) -> list[str]:
    return [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, n, None) is not None]


def input_name(tokenizer: str) -> str:
    return "input_ids" + tokenizer.removeprefix("tokenizer")


class PromptEncoder(nn.Module):
    """``forward(*input_ids) -> conditions``: the pipeline's ``encode_prompt`` over its text encoders
    (see the module docstring), outputs cast to ``dtype``."""

    def __init__(self, pipe, kind: str, max_sequence_length: int | None = None, joint_width: int | None = None,
                 dtype=torch.float32):
        super().__init__()
        self.kind, self.dtype = kind, dtype
        self.text_encoder = copy.deepcopy(pipe.text_encoder)
        if kind == "sd3":
            self.text_encoder_2 = copy.deepcopy(pipe.text_encoder_2)
            self.text_encoder_3 = copy.deepcopy(pipe.text_encoder_3) if pipe.text_encoder_3 is not None else None
            self.max_sequence_length, self.joint_width = max_sequence_length, joint_width
        self.eval().requires_grad_(False)

    def output_names(self) -> tuple[str, ...]:
        return ("encoder_hidden_states",) if self.kind == "sd15" else ("encoder_hidden_states", "pooled_projections")

    def forward(self, *input_ids):
        if self.kind == "sd15":
            return self.text_encoder(input_ids[0])[0].to(self.dtype)
        clip = [encoder(ids, output_hidden_states=True) for encoder, ids in
                zip((self.text_encoder, self.text_encoder_2), input_ids[:2])]
        clip_embeds = torch.cat([out.hidden_states[-2] for out in clip], dim=-1)
        pooled = torch.cat([out[0] for out in clip], dim=-1)
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3(input_ids[2])[0]
        else:  # what the pipeline feeds without T5
            t5 = clip_embeds.new_zeros(clip_embeds.shape[0], self.max_sequence_length, self.joint_width)
        clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5], dim=-2).to(self.dtype), pooled.to(self.dtype)


@contextlib.contextmanager
def _quiet_truncation():
    """The over-long probe prompt is truncated on purpose: no pipeline or tokenizer warning for it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def pipeline_embeddings(pipe, kind: str, prompts: list[str], max_sequence_length: int | None = None) -> dict:
    """The conditions of ``prompts`` from the pipeline's own ``encode_prompt`` (the reference)."""
    with torch.no_grad(), _quiet_truncation():
        if kind == "sd15":
            return {"encoder_hidden_states": pipe.encode_prompt(prompts, "cpu", 1, False)[0]}
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def pipeline_token_ids(tokenizer, prompts, max_length: int) -> torch.Tensor:
    """The ids of the pipeline's tokenizer call (``padding="max_length"``, ``truncation=True``)."""
    with _quiet_truncation():
        return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids


def max_lengths(pipe, kind: str, max_sequence_length: int | None) -> dict[str, int]:
    """Per tokenizer the length the pipeline pads to: the CLIPs' ``model_max_length`` (SD3 pads both
    CLIPs to the first one's), ``max_sequence_length`` for T5."""
    lengths = {"tokenizer": int(pipe.tokenizer.model_max_length)}
    if kind == "sd3":
        lengths["tokenizer_2"] = lengths["tokenizer"]
        if getattr(pipe, "tokenizer_3", None) is not None:
            lengths["tokenizer_3"] = int(max_sequence_length)
    return lengths


def save_tokenizers(pipe, kind: str, out: Path, lengths: dict[str, int]) -> dict:
    """Each tokenizer's backend as ``<out>/<name>/tokenizer.json`` and its manifest entry; refuses a
    tokenizer whose saved form does not reproduce the pipeline's ids on :data:`PROBE_PROMPTS`."""
    import warnings

    from .tokenizer import PromptTokenizer

    entries = {}
    for name, length in lengths.items():
        tokenizer = getattr(pipe, name)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"the pipeline's {name} ({type(tokenizer).__name__}) has no tokenizers backend to save; "
                             "the torch-free runtime needs a fast tokenizer")
        file = out / name / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        backend.save(str(file))
        entry = {"file": f"{name}/tokenizer.json", "input": input_name(name), "max_length": length,
                 "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token),
                 "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side}
        ours = PromptTokenizer(file, length, entry["pad_id"], entry["pad_token"], name, entry["padding_side"],
                               entry["truncation_side"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long probe prompt is truncated on purpose
            got = ours(PROBE_PROMPTS)
        want = pipeline_token_ids(tokenizer, PROBE_PROMPTS, length).numpy()
        if got.shape != want.shape or (got != want).any():
            raise ValueError(f"the saved {name} does not tokenize as the pipeline's {type(tokenizer).__name__} does "
                             "(its class adds steps the tokenizers backend lacks); the torch-free runtime cannot serve it")
        entries[name] = entry
    return entries


def export_prompt_encoder_onnx(pipe, kind: str, path: str | Path, lengths: dict[str, int], max_sequence_length=None,
                               joint_width=None, dtype="fp32", opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> dict:
    """Export :class:`PromptEncoder` as one graph (dynamic batch); returns its metadata. SD3 without T5:
    ``max_sequence_length`` and ``joint_width`` size the zeros the pipeline puts in its place."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
    encoder = PromptEncoder(pipe, kind, max_sequence_length, joint_width, dtype)
    names = [input_name(n) for n in lengths]
    example = tuple(pipeline_token_ids(getattr(pipe, n), PROBE_PROMPTS[1:3], lengths[n]) for n in lengths)
    _run_exporter(encoder, example, path, names, encoder.output_names(), [{0: "batch"}] * len(names), opset, exporter)
    with torch.no_grad():
        outputs = encoder(*example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    meta = {
        "graph": "prompt_encoder",
        "pipeline": kind,
        "text_encoders": [type(m).__name__ for m in (encoder.text_encoder, getattr(encoder, "text_encoder_2", None),
                                                      getattr(encoder, "text_encoder_3", None)) if m is not None],
        "dtype": dtype_name(dtype),
        "inputs": [{"name": n, "shape": ["batch", lengths[t]], "dtype": "int64"} for n, t in zip(names, lengths)],
        "outputs": [{"name": n, "shape": ["batch", *o.shape[1:]], "dtype": str(o.dtype).replace("torch.", "")}
                    for n, o in zip(encoder.output_names(), outputs)],
        "opset": opset,
        "exporter": exporter,
        "tdm_fast_version": _version(),
        "torch_version": torch.__version__,
    }
    return _set_metadata(path, meta)


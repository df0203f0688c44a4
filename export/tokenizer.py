"""Tokenisation of prompts from a pipeline's saved ``tokenizer.json``, with the ``tokenizers`` library only.

transformers' tokenizer classes import torch (``tokenizers`` does not), so a torch-free deployment
cannot use them. The export writes each pipeline tokenizer's own backend (``backend_tokenizer.save``),
its length and padding to the manifest, and checks on probe prompts that this module produces exactly the
ids of the pipeline's call ``tokenizer(prompt, padding="max_length", max_length=L, truncation=True)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class PromptTokenizer:
    """``PromptTokenizer(file, max_length, pad_id, pad_token)(prompts) -> int64 (B, max_length)``.

    A prompt longer than ``max_length`` tokens is truncated the way the pipeline truncates it (the
    special tokens kept, the tail of the text dropped) and a ``UserWarning`` names the dropped text,
    as the diffusers pipelines log it.
    """

    def __init__(self, file: str | Path, max_length: int, pad_id: int, pad_token: str, name: str = "tokenizer",
                 padding_side: str = "right", truncation_side: str = "right"):
        from tokenizers import Tokenizer

        self.name, self.max_length = name, int(max_length)
        self.untruncated = Tokenizer.from_file(str(file))
        self.untruncated.no_truncation()
        self.untruncated.no_padding()
        self.tokenizer = Tokenizer.from_file(str(file))
        self.tokenizer.enable_truncation(self.max_length, direction=truncation_side)
        self.tokenizer.enable_padding(direction=padding_side, pad_id=int(pad_id), pad_token=pad_token, length=self.max_length)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(prompts))
        for prompt, encoding in zip(prompts, encodings):
            full = self.untruncated.encode(prompt)
            if len(full.ids) > self.max_length:
                # the dropped text from the prompt itself: offsets of the first text token not kept
                kept = sum(1 for special, used in zip(encoding.special_tokens_mask, encoding.attention_mask) if used and not special)
                text_offsets = [o for o, special in zip(full.offsets, full.special_tokens_mask) if not special]
                dropped = prompt[text_offsets[kept][0]:].strip()
                warnings.warn(f"prompt {prompt[:40]!r}... has {len(full.ids)} tokens; the {self.name} takes "
                              f"{self.max_length}, so it was truncated as the pipeline truncates it, dropping {dropped!r}",
                              UserWarning, stacklevel=3)
        return np.array([e.ids for e in encodings], dtype=np.int64)

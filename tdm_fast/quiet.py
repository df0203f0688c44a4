"""Third-party log lines that tell a tdm-fast user nothing they can act on, dropped at the command line.

Library users keep every line: only ``tdm-fast``'s ``main`` calls :func:`drop_third_party_noise`. Each entry
names the logger and a fragment of the one message it drops, so nothing else from that logger is lost.
"""
from __future__ import annotations

import logging

# (logger, message fragment); the comment above each says why a user cannot act on it
NOISE = (
    # diffusers' pipelines import CLIP/Siglip image processors for safety checkers we never run; torchvision
    # from PyPI does not load beside the CPU torch wheel, so "install torchvision" is not advice to follow.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _DropFragment(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def drop_third_party_noise() -> None:
    for name, fragment in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFragment) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropFragment(fragment))

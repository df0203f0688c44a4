"""What every layer needs to refuse a user's mistake the same way: :class:`UsageError` (one line
``tdm-fast: error: …``, exit code 2, before anything is written), output-path checks, atomic text
writes and the argparse error format. A leaf: it imports nothing of the package (and not torch), so
the command line, the tools and the library may all use it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


class UsageError(Exception):
    """A mistake in the command line or its inputs, reported as one line."""


def check_output_path(path: str | Path, flag: str, folder: bool = True) -> Path:
    """Refuses an output path that cannot be created, before anything is written: a path under a
    regular file, a folder given where a file is (or the reverse), a parent that is not writable."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        raise UsageError(f"{flag} {path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}")
    parent = path if folder else path.parent  # an existing file may be replaced: what matters is its folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so nothing can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")
    return path


def check_allocation(flag: str, count: int, item_shape, copies: int = 2) -> None:
    """Refuses a count whose float32 tensors (``copies`` of ``count`` items of ``item_shape``: the noise
    and the result, at least) cannot fit in this machine's memory, saying how much they would need."""
    item = 1
    for size in item_shape:
        item *= int(size)
    need = count * item * 4 * copies
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise UsageError(f"{flag} {count}: its tensors alone would need {need / 2**30:,.0f} GiB, more than this machine's "
                         f"{memory / 2**30:,.0f} GiB of memory; use a smaller {flag}")


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never a part (written beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing or unknown flag, a value of the wrong type or out of range)
    in the format of every other user error: one line ``tdm-fast: error: ...``, exit code 2 (no usage block;
    ``--help`` shows it)."""

    def error(self, message: str):
        where = f" (see {self.prog} --help)" if self.prog != "tdm-fast" else ""
        self.exit(2, f"tdm-fast: error: {' '.join(message.split())}{where}\n")


def add_once(parser, *flags, **kwargs) -> None:
    """add_argument unless the verb already defines the flag (the CLI shares --out/--iterations/--seed)."""
    if not any(f in parser._option_string_actions for f in flags):
        parser.add_argument(*flags, **kwargs)


def require_module(module: str, extra: str, needed_for: str) -> None:
    """An optional dependency checked before any work: one line naming the extra that installs it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{needed_for} needs the Python module {module!r}, which is not installed: "
                         f"pip install 'tdm-fast[{extra}]'")


# accelerate's trackers and the packages that provide them (tensorboard: either of two)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                    "mlflow": ("mlflow",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",)}


def check_tracker(name: str | None, flag: str = "--report-to") -> None:
    """A tracker whose package is missing is refused before anything is written (accelerate would only warn
    and train without it)."""
    import importlib.util

    if name is None or name == "all" or name not in TRACKER_PACKAGES:
        return  # no tracker, whichever are installed, or an unknown name that TDMConfig refuses
    packages = TRACKER_PACKAGES[name]
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise UsageError(f"{flag} {name} needs the {' or '.join(packages)} package, which is not installed: "
                         f"pip install {packages[0]}")

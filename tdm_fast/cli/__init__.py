"""``tdm-fast``: distil, sample, export, convert, demo, eval, bench and the built-in teachers.

One module per verb group builds its parser, reads the Namespace and calls one library function:
:mod:`.distill` (distill, plan), :mod:`.sample` (sample, export, convert), :mod:`.tools` with :mod:`.digits` (demo,
eval, classifier, bench, teacher). Nothing below the command line imports it.

Errors a user can fix (bad flags, bad configs, missing or corrupt checkpoints) end in one line
``tdm-fast: error: …`` and exit code 2, before anything on disk is touched. This module imports nothing
heavy at the top, so that ``tdm-fast --version`` answers without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..usage import Parser, UsageError, check_output_path, require_module

# names older code imports from here (tdm_fast.cli was one module), and the module each now lives in
_MOVED = {"load_denoiser": "..denoiser", "config_from_args": ".distill"}
__all__ = ["UsageError", "build_parser", "check_output_path", "config_from_args", "load_denoiser", "main"]


def __getattr__(name):
    if name in _MOVED and _MOVED[name]:
        return getattr(importlib.import_module(_MOVED[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Verbs:
    """Sub-command factory that gives every verb the common flags (so ``--quiet`` goes anywhere)."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self.subparsers, self.common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=[self.common], **kwargs)


def _verb(run):
    """A verb whose work is ``run(args)``; what ``run`` returns is a report, not an exit code."""

    def call(args) -> int:
        run(args)
        return 0

    return call


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tdm-fast")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _top_parser(**kwargs) -> Parser:
    parser = Parser(prog="tdm-fast", description="Trajectory Distribution Matching: few-step distillation", **kwargs)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .distill import add_distill_parser
    from .sample import add_sample_parsers
    from .tools import add_tool_parsers

    parser = _top_parser()
    common = Parser(add_help=False)
    # SUPPRESS: a verb without --quiet must not reset a --quiet given before it
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    verbs = _Verbs(parser.add_subparsers(dest="verb", required=True), common)

    def nested(group: argparse.ArgumentParser, dest: str) -> _Verbs:
        return _Verbs(group.add_subparsers(dest=dest, required=True), common)

    add_distill_parser(verbs)
    add_sample_parsers(verbs)
    add_tool_parsers(verbs, nested, _verb)
    return parser


def _answer_version(argv: list[str]) -> None:
    """``--version`` among the flags before the verb: answered by the top parser alone, before the verbs'
    parsers (which import torch) are built."""
    leading = []
    for token in argv:
        if not token.startswith("-"):
            break
        leading.append(token)
    if "--version" in leading:
        _top_parser(add_help=False).parse_args(leading)


def _check_environment() -> None:
    """Variables the run would read only at its first use (mid-run, after --out is written), checked first."""
    import os

    from ..kernels import _triton
    from ..kernels._backend import BACKENDS, ENV

    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise UsageError(f"{ENV}={forced} is not a kernel backend: set it to one of {', '.join(BACKENDS)}, or unset it")
    if forced == "triton" and not _triton.available():
        raise UsageError(f"{ENV}=triton: {_triton.MISSING}; set {ENV} to native, compile or torch, or unset it")


def _check_extras(args) -> None:
    """Optional packages the verb will need (pyproject's extras), checked before anything is written."""
    if args.verb in ("demo", "eval", "classifier", "teacher") and getattr(args, "dataset", "digits") != "toy2d":
        require_module("sklearn", "digits", "the digits data (sklearn.datasets.load_digits)")


def _check_modes(parser, args, argv: list[str]) -> None:
    """A flag that the chosen mode does not read (:mod:`.modes`' table) is refused before the verb runs."""
    from .modes import refuse_unread_flags

    verb, verb_parser = args.verb, parser._subparsers._group_actions[0].choices[args.verb]
    group_verb = getattr(args, f"{args.verb}_verb", None)  # a verb of a group: ``teacher train``
    if group_verb is not None:
        verb, verb_parser = f"{verb} {group_verb}", verb_parser._subparsers._group_actions[0].choices[group_verb]
    refuse_unread_flags(verb, args, verb_parser, argv)  # the flags before the verb are --quiet's alone


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _answer_version(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's one-line error: an exit code, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    from ..quiet import drop_third_party_noise

    drop_third_party_noise()
    from ..atomic import report_stop, sigterm_raises
    from ..checkpoint import CheckpointError
    from ..runlock import RunLockedError
    from ..trainer import NonFiniteError

    try:
        with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: the atomic writers remove their temporaries
            _check_environment()
            _check_extras(args)
            _check_modes(parser, args, argv)
            return args.func(args)
    except (UsageError, CheckpointError, ValueError, FileNotFoundError, RunLockedError, NonFiniteError) as exc:
        print(f"tdm-fast: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BaseException as exc:  # a signal or a full disk: one line and exit 130/143/1; anything else is a bug
        code = report_stop(exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())

"""Atomic replacement of output files and folders, and signals that let the cleanups run.

Every artifact is written under a temporary name in its own folder (``.tmp-<pid>-<name>``: the name
keeps its suffix, which PIL and matplotlib read the format from), flushed to disk, and renamed into
place only when complete. An exception, Ctrl-C or SIGTERM removes the temporary and leaves the
previous artifact as it was; a temporary left by a killed process (SIGKILL, power loss) is removed
by the next write of the same name once its process is gone. A folder being replaced is kept
under ``.old-<pid>-<name>`` between its two renames, and put back by the next write if the process
died there.

Leaf module: nothing from tdm_fast is imported.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import threading
from pathlib import Path

NEW, OLD = ".tmp-", ".old-"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt, so that ``finally`` and
    the cleanups here run before the process ends."""


def _raise_terminated(signum, frame):
    raise Terminated("terminated by SIGTERM")


@contextlib.contextmanager
def sigterm_raises():
    """Inside the block SIGTERM raises :class:`Terminated` (only the main thread may install handlers;
    elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM arriving inside the block are re-raised after it, so a group of renames is
    never cut in half. Python runs signal handlers in the main thread whichever thread the kernel
    chose, so swapping the handlers is enough (blocking the signal in one thread would not be)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def disk_full(exc: BaseException) -> bool:
    """A write that failed because the file system is full (safetensors reports it in its own error type)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, Exception) and ("No space left on device" in str(exc) or "os error 28" in str(exc))


STOPPED_BY = {KeyboardInterrupt: ("SIGINT", 130), Terminated: ("SIGTERM", 143)}


def report_stop(exc: BaseException) -> int | None:
    """For a command stopped by SIGINT/SIGTERM or a full disk: prints its one line (the traceback
    too with ``TDM_FAST_DEBUG=1``) and returns the exit code (130, 143, 1); None for anything else."""
    import sys

    if type(exc) in STOPPED_BY:
        name, code = STOPPED_BY[type(exc)]
        line = (f"tdm-fast: interrupted by {name}: every output is the previous one or complete, nothing is half-written "
                "(a distill run continues with --resume)")
    elif disk_full(exc):
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        line = (f"tdm-fast: error: no space left on device{where}: free some space and run again "
                "(nothing half-written was left; a distill run continues with --resume)")
        code = 1
    else:
        return None
    if os.environ.get("TDM_FAST_DEBUG") == "1":
        import traceback

        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return code


def temporary_path(path: str | Path, prefix: str = NEW) -> Path:
    path = Path(path)
    return path.with_name(f"{prefix}{os.getpid()}-{path.name}")


def _owner(temporary: Path, name: str) -> int | None:
    """The pid in ``.tmp-<pid>-<name>`` / ``.old-<pid>-<name>``, None for any other name."""
    for prefix in (NEW, OLD):
        if temporary.name.startswith(prefix):
            pid, _, rest = temporary.name[len(prefix):].partition("-")
            if pid.isdigit() and rest == name:
                return int(pid)
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> None:
    """Removes what writers of ``path`` that are no longer running left beside it; a previous folder
    parked under ``.old-`` while its replacement was renamed in is put back if ``path`` is missing."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(f"*-{glob.escape(path.name)}"):
        pid = _owner(entry, path.name)
        if pid is None or (pid != os.getpid() and _running(pid)):
            continue
        if entry.name.startswith(OLD) and not path.exists():
            os.replace(entry, path)
        else:
            _remove(entry)


def _fsync(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full_disk_as_oserror(exc: Exception, path: Path):
    if disk_full(exc) and not isinstance(exc, OSError):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yields a temporary path beside ``path`` to write; when the block ends normally the file is
    flushed to disk and renamed to ``path`` (if the block wrote nothing, nothing is replaced). On any
    exception, KeyboardInterrupt and :class:`Terminated` included, the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.exists():
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync_folder(path.parent)
    except BaseException as exc:
        _remove(tmp)
        _full_disk_as_oserror(exc, path)
        raise


@contextlib.contextmanager
def atomic_files(paths):
    """:func:`atomic_file` for files that belong together (a sample and its image): all are renamed
    into place, in the order given, only once every one is written, with SIGINT/SIGTERM held off
    between the renames. Yields the temporary paths."""
    paths = [Path(p) for p in paths]
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_file(p)) for p in paths]
        yield temporaries
        for tmp in temporaries:
            _fsync(tmp)
        with signals_deferred():
            for tmp, path in zip(temporaries, paths):
                os.replace(tmp, path)


def refuse_foreign_folder(path: str | Path, flag: str, markers: tuple[str, ...]) -> None:
    """Before a command that replaces the folder ``path`` as a whole (:func:`atomic_folder`): refuses a
    folder holding files that are not a previous output of its kind (one of ``markers`` present), which
    the replacement would delete (``--out .``, ``--out ~``)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not any((path / marker).exists() for marker in markers):
        raise ValueError(f"{flag} {path} holds other files, and this command replaces the folder as a whole: "
                         f"give a new or empty folder, or a previous output (with {' or '.join(markers)}) to replace")


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yields a fresh temporary folder beside ``path``; when the block ends normally its files are
    flushed to disk and it replaces ``path`` as a whole (the previous folder is parked under ``.old-``
    for the two renames, with SIGINT/SIGTERM held off, then removed). On any exception the temporary
    folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp, old = temporary_path(path), temporary_path(path, OLD)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync(tmp)
        with signals_deferred():
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_folder(path.parent)
            _remove(old)  # a signal held off until here must not leave the parked folder behind
    except BaseException as exc:
        _remove(tmp)
        _full_disk_as_oserror(exc, path)
        raise


@contextlib.contextmanager
def staged_files(folder: str | Path):
    """Yields a staging folder inside ``folder`` to write files under their final relative names;
    when the block ends normally each staged file replaces its namesake in ``folder`` (other files
    there are kept), with SIGINT/SIGTERM held off until all are moved. On any exception the staging
    folder is removed and ``folder`` keeps every file it had."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(folder / "staging")
    remove_stale_temporaries(folder / "staging")
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        _fsync(staging)
        # the JSON files name the others (manifest.json its graphs, <engine>.json its engine): they go last
        files = sorted((p.relative_to(staging) for p in staging.rglob("*") if p.is_file()),
                       key=lambda name: (name.suffix == ".json", str(name)))
        with signals_deferred():
            for name in files:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, folder / name)
            _fsync_folder(folder)
    except BaseException as exc:
        _full_disk_as_oserror(exc, folder)
        raise
    finally:
        _remove(staging)

"""One writer per run folder: an exclusive ``fcntl`` lock on ``<run>/.lock``, held for the whole run.

The kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a lock
file left behind by a killed run is stale by construction: the next run takes it. The file names
its holder (pid, host, start time), so a second process can say who holds the folder. Within one
process the lock is re-entrant (the CLI takes it before validating the folder, the trainer again
for the run it writes).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


_held: dict[Path, list] = {}  # resolved folder -> [file object, depth]


def _busy(folder: Path, file) -> RunLockedError:
    """The error naming the holder that the lock file describes."""
    file.seek(0)
    try:
        info = json.loads(file.read() or "{}")
        holder = f"process {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"
    except ValueError:
        holder = "another process"
    return RunLockedError(f"{folder} is in use by {holder}: wait for it to finish, or choose another --out")


def acquire(folder: str | Path) -> Path:
    """Takes the lock of ``folder`` (created if needed); raises :class:`RunLockedError` naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return key
    file = open(key / LOCK_FILE, "a+")
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _busy(folder, file)
        file.close()
        raise error from None
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    file.flush()
    _held[key] = [file, 1]
    return key


def check_free(folder: str | Path) -> None:
    """Raises :class:`RunLockedError` if another process holds ``folder``; writes nothing."""
    key = Path(folder).resolve()
    if (key / LOCK_FILE).exists() and not (key / LOCK_FILE).is_file():  # a folder there: open() would fail mid-start
        raise RunLockedError(f"{key / LOCK_FILE} is not a file: it is the run's lock file; remove it, or choose another --out")
    if key in _held or not (key / LOCK_FILE).is_file():
        return
    with open(key / LOCK_FILE) as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder, file) from None


def release(folder: str | Path) -> None:
    key = Path(folder).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
        entry[0].close()


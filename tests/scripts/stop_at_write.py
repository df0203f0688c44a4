"""Run by tests/test_atomic_outputs.py: ``python stop_at_write.py ACTION PATTERN -- ARGV...``.

Runs ``tdm-fast ARGV`` (or, for ``-- -c CODE``, the Python code) and stops it the first time a file
whose name matches the glob PATTERN is opened for writing (``open``) or saved (safetensors, which
writes from Rust: the file is created first, as the save would): ACTION ``SIGINT`` / ``SIGTERM``
sends that signal to the process itself; ``fill:PATH`` fills the file system of PATH (a small
tmpfs) with PATH, so the write that follows runs out of space; ``enospc`` makes the open fail with
ENOSPC where no tmpfs could be mounted.
"""
import builtins
import errno
import fnmatch
import io
import os
import signal
import sys
from pathlib import Path

# A process started in the background by a non-interactive shell (CI runners, `cmd &`) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C this script stands for needs it.
signal.signal(signal.SIGINT, signal.default_int_handler)
action, pattern = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]
state = {"done": False}


def fill(path: str) -> None:
    with open(path, "ab") as f:
        block = b"\0" * 4096
        while True:
            try:
                f.write(block)
                f.flush()
            except OSError:
                return


def trigger(name) -> None:
    if state["done"] or not fnmatch.fnmatch(Path(str(name)).name, pattern):
        return
    state["done"] = True
    if action.startswith("SIG"):
        os.kill(os.getpid(), getattr(signal, action))
    elif action.startswith("fill:"):
        fill(action[len("fill:"):])
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))


real_open = builtins.open


def open_for_write(file, mode="r", *args, **kwargs):
    writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
    if writing and action == "enospc":
        trigger(file)
    f = real_open(file, mode, *args, **kwargs)
    if writing:
        trigger(file)
    return f


builtins.open = io.open = open_for_write

import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402


def saver(original):
    def save_file(tensors, filename, *args, **kwargs):
        with open_for_write(filename, "wb"):
            pass
        return original(tensors, filename, *args, **kwargs)

    return save_file


safetensors.torch.save_file = saver(safetensors.torch.save_file)
safetensors.numpy.save_file = saver(safetensors.numpy.save_file)

if argv[:1] == ["-c"]:
    from tdm_fast.atomic import report_stop, sigterm_raises

    try:
        with sigterm_raises():
            exec(argv[1], {"__name__": "__main__"})
        code = 0
    except BaseException as exc:
        code = report_stop(exc)
        if code is None:
            raise
    sys.exit(code)
from tdm_fast.cli import main  # noqa: E402

sys.exit(main(argv))

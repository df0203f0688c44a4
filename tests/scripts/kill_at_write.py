"""Run by tests/test_reliability.py: ``python kill_at_write.py KILLED_ROOT distill ARGS... --out RUN``.

Trains as the CLI does. At the final save it forks once per file event of that save (a file opened
for writing, a safetensors save, a rename, a folder removal): child n carries on with the save and
SIGKILLs itself at its n-th event; the parent waits, moves what the child left in RUN to
``KILLED_ROOT/killed-<n>`` and puts back the folder as it was before the save. It stops when a child
finishes the save without reaching its event, then saves itself (the uninterrupted run) and prints
``events=<count>``. Forking keeps the dozen kills to one interpreter start-up.
"""
import builtins
import io
import os
import shutil
import signal
import sys
from pathlib import Path

import safetensors.torch
import torch

from tdm_fast import trainer as trainer_module
from tdm_fast.cli import main

torch.set_num_threads(1)  # no OpenMP pool to inherit across fork
killed_root = Path(sys.argv[1])
argv = sys.argv[2:]
run = Path(argv[argv.index("--out") + 1])
state = {"armed": False, "events": 0, "kill_at": -1}
real_replace, real_rmtree = os.replace, shutil.rmtree


def event() -> None:
    if not state["armed"]:
        return
    if state["events"] == state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    state["events"] += 1


def counted(fn):
    def wrapped(*args, **kwargs):
        event()
        return fn(*args, **kwargs)

    return wrapped


def open_for_write(fn):
    def wrapped(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            event()
        return fn(file, mode, *args, **kwargs)

    return wrapped


builtins.open = io.open = open_for_write(builtins.open)
os.replace, os.rename, shutil.rmtree = counted(os.replace), counted(os.rename), counted(shutil.rmtree)
original_save_file = safetensors.torch.save_file
original_save_checkpoint = trainer_module.TDMTrainer.save_checkpoint


def save_checkpoint(self):
    if self.step != self.config.iterations:
        return original_save_checkpoint(self)
    hooked = counted(original_save_file)
    for module in list(sys.modules.values()):  # also the names bound by `from safetensors.torch import save_file`
        if getattr(module, "save_file", None) is original_save_file:
            module.save_file = hooked
    pristine = killed_root / "pristine"
    shutil.copytree(run, pristine, ignore=shutil.ignore_patterns(".lock"))
    n = 0
    while True:
        pid = os.fork()
        if pid == 0:
            state.update(armed=True, kill_at=n)
            original_save_checkpoint(self)
            os._exit(0)  # the save ended before event n: every event has had its kill
        _, status = os.waitpid(pid, 0)
        target = killed_root / (f"killed-{n}" if os.WIFSIGNALED(status) else "unkilled")
        target.mkdir()
        for item in run.iterdir():
            if item.name != ".lock":
                real_replace(item, target / item.name)
        for item in pristine.iterdir():
            if item.is_dir():
                shutil.copytree(item, run / item.name)
            else:
                shutil.copy2(item, run / item.name)
        if not os.WIFSIGNALED(status):
            break
        n += 1
    real_rmtree(pristine)
    real_rmtree(killed_root / "unkilled")
    state.update(armed=True, kill_at=-1)
    return original_save_checkpoint(self)


trainer_module.TDMTrainer.save_checkpoint = save_checkpoint
code = main(argv)
print(f"events={state['events']}")
sys.exit(code)

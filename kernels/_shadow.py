"""Give the top-level name ``kernels`` back to the package installed under it.

The clone keeps this folder at its root (packaged as ``tdm_fast.kernels``). Any command started from the
root with ``python -m`` or ``accelerate launch -m`` has the root as ``sys.path[0]``, so a plain
``import kernels`` — which transformers runs to reach Hugging Face's kernel hub — finds this folder first.
``hand_over`` replaces the module being imported with the one the rest of ``sys.path`` provides; the
import statement then returns that module, because Python reads the result back from ``sys.modules``.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _same_folder(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), folder)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    clone_root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [entry for entry in sys.path if not _same_folder(entry, clone_root)]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {os.path.dirname(init_file)} is tdm-fast's own kernels, "
            "importable as tdm_fast.kernels)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise

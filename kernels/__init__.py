"""TDM training ops: fused kernels with the pure-torch reference as the definition.

One file per op (``generator_loss``, ``fake_score_loss``, ``renoise``, ``ddim_jump``) holds its Triton
kernel, its native and Inductor launchers, its PyTorch custom operator (``torch.ops.tdm_fast.*``, with
its fake implementation and autograd formula) and the public function; ``reference`` is their
pure-torch twin. The public function validates its arguments (``_validate``), asks ``_backend`` once
for the call's backend (CUDA -> Triton; CPU -> the native C++ loops, else the Inductor-compiled fused
formulation, or the reference for calls too small to amortise a fused call;
``TDM_FAST_KERNELS=triton|native|compile|torch`` overrides) and runs the reference for ``torch``, the
custom operator otherwise, so that ``torch.compile`` traces a whole training step through the fused
ops without graph breaks. Under ``torch.compile`` the operator makes the choice when it runs. Triton
is imported on the first Triton launch only (``_triton``): without it the other backends work. Results
match the reference up to float rounding (tests/test_kernels.py states the tolerances).
"""

# From a clone's root (``python -m …`` puts it first on sys.path) this folder is also importable as a
# top-level ``kernels``: the name of Hugging Face's kernel-hub package, which transformers imports. Under that
# name the folder hands the import over to the first ``kernels`` found elsewhere on sys.path, so that
# transformers gets the real package; loading our ops under that name would register
# ``torch.ops.tdm_fast.*`` a second time.
if __name__ == "tdm_fast.kernels":
    from . import reference
    from ._backend import BACKENDS, select_backend
    from .ddim_jump import ddim_jump
    from .fake_score_loss import fake_score_loss
    from .generator_loss import tdm_generator_loss
    from .reference import importance_weights
    from .renoise import renoise

    __all__ = [
        "BACKENDS",
        "ddim_jump",
        "fake_score_loss",
        "importance_weights",
        "reference",
        "renoise",
        "select_backend",
        "tdm_generator_loss",
    ]
else:
    from ._shadow import hand_over as _hand_over

    _hand_over(__name__, __file__)

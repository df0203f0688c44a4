"""TDM training ops: fused kernels with the pure-torch reference as the definition.

Each public op validates its arguments (``_validate``), picks a backend (``_backend.select``:
CUDA -> Triton; CPU -> the native C++ loops, else the Inductor-compiled fused formulation, or the
reference for calls too small to amortise a fused call; ``TDM_FAST_KERNELS=triton|native|compile|torch``
overrides) and runs it through its PyTorch custom operator (``torch.ops.tdm_fast.*``, see ``_ops``),
so that ``torch.compile`` traces a whole training step through the fused ops without graph breaks;
``TDM_FAST_KERNELS=torch`` runs ``tdm_fast.kernels.reference``. Under ``torch.compile`` the choice is
made by the operator at run time. Results match the reference up to float rounding
(tests/test_kernels.py states the tolerances).
"""

# From a clone's root (on sys.path) this folder is also importable as a top-level ``kernels``: the name of
# Hugging Face's kernel-hub package, which transformers imports to probe for it. Under that name the folder
# stays empty, because loading it would register ``torch.ops.tdm_fast.*`` again and reroute them to copies
# of these modules.
if __name__ == "tdm_fast.kernels":
    from .dispatch import (
        BACKENDS,
        ddim_jump,
        fake_score_loss,
        importance_weights,
        reference,
        renoise,
        select_backend,
        tdm_generator_loss,
    )
    from .dispatch import __all__

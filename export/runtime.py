"""ONNX Runtime runners with the torch call signatures.

:class:`OrtSampler` runs an exported sampler graph: ``runner(noise, cond) -> x̂0`` in one
``session.run`` call. :class:`OrtDenoiser` runs a per-network graph:
``runner(x_t, t, cond) -> (x0, eps)``; :class:`OrtDecoder` a VAE decoder graph:
``runner(latents) -> images``. Inputs are checked against the graph's declared shapes and
dtypes before the call, and a mismatch raises ``ValueError`` naming the input and what it expects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .onnx import read_metadata
from .sampler import CondSpec

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _require_ort():
    try:
        import onnxruntime as ort
    except ImportError as error:  # pragma: no cover - an optional dependency
        raise ImportError("ONNX Runtime is not installed: pip install 'tdm-fast[export]' (or onnxruntime-gpu)") from error
    return ort


def default_providers() -> list[str]:
    ort = _require_ort()
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"input {name!r} must be a torch.Tensor or numpy array, got {type(value).__name__}")


class _OrtRunner:
    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_options=None):
        ort = _require_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        options = session_options or ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers or default_providers())
        self.meta = read_metadata(self.path)
        self.inputs = {i.name: (list(i.shape), i.type) for i in self.session.get_inputs()}
        self.input_order = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        kind = self.meta.get("cond_kind")
        cond_names = tuple(n for n in self.input_order if n not in ("noise", "x_t", "t"))
        self.cond_spec = CondSpec(kind or ("dict" if len(cond_names) > 1 else "tensor"), cond_names)
        self.run_count = 0  # number of session.run calls (tests check one call per sample)

    def expected(self, name: str) -> str:
        shape, kind = self.inputs[name]
        return f"shape {tuple(d if isinstance(d, int) else str(d) for d in shape)} dtype {_ORT_TO_NUMPY.get(kind, kind).__name__ if kind in _ORT_TO_NUMPY else kind}"

    def _feed(self, values: dict) -> dict:
        feed = {}
        bound: dict[str, int] = {}
        for name in self.input_order:
            if name not in values:
                raise ValueError(f"missing input {name!r} ({self.expected(name)})")
            array = _to_numpy(values[name], name)
            shape, kind = self.inputs[name]
            want = _ORT_TO_NUMPY.get(kind)
            if want is not None and array.dtype != want:
                raise ValueError(
                    f"input {name!r} has dtype {array.dtype}, expected {np.dtype(want).name} ({self.expected(name)})"
                )
            ok = array.ndim == len(shape)
            if ok:
                for actual, dim in zip(array.shape, shape):
                    if isinstance(dim, int):
                        ok &= actual == dim
                    elif dim:  # a named symbolic dimension must agree across inputs
                        ok &= bound.setdefault(dim, actual) == actual
            if not ok:
                raise ValueError(
                    f"input {name!r} has shape {tuple(array.shape)}, expected {self.expected(name)}"
                    + (f" with {', '.join(f'{k}={v}' for k, v in bound.items())}" if bound else "")
                )
            feed[name] = array
        return feed

    def _run(self, feed: dict, device):
        self.run_count += 1
        outputs = self.session.run(self.output_names, feed)
        return [torch.from_numpy(o).to(device) for o in outputs]


class OrtSampler(_OrtRunner):
    """``OrtSampler(path)(noise, cond) -> x̂0``: a whole-sampler graph in one ``session.run``."""

    def __init__(self, path, providers=None, threads=None, session_options=None):
        super().__init__(path, providers, threads, session_options)
        if self.meta.get("graph", "sampler") != "sampler" or "noise" not in self.inputs:
            raise ValueError(f"{self.path} is not a sampler graph (inputs {self.input_order}); use OrtDenoiser")
        self.steps = self.meta.get("steps")
        self.times = self.meta.get("timesteps")
        self.solver = self.meta.get("solver", "ddim")  # graphs exported before the solver choice are DDIM

    def __call__(self, noise, cond) -> torch.Tensor:
        device = noise.device if isinstance(noise, torch.Tensor) else torch.device("cpu")
        values = {"noise": noise, **dict(zip(self.cond_spec.names, self.cond_spec.flatten(cond)))}
        return self._run(self._feed(values), device)[0]


class OrtDenoiser(_OrtRunner):
    """``OrtDenoiser(path)(x_t, t, cond) -> (x0, eps)``: one network evaluation per call."""

    def __init__(self, path, providers=None, threads=None, session_options=None):
        super().__init__(path, providers, threads, session_options)
        if "t" not in self.inputs:
            raise ValueError(f"{self.path} is not a per-network graph (inputs {self.input_order}); use OrtSampler")

    def __call__(self, x_t, t, cond):
        device = x_t.device if isinstance(x_t, torch.Tensor) else torch.device("cpu")
        t = torch.as_tensor(t).long().reshape(-1).expand(x_t.shape[0])
        values = {"x_t": x_t, "t": t, **dict(zip(self.cond_spec.names, self.cond_spec.flatten(cond)))}
        x0, eps = self._run(self._feed(values), device)
        return x0, eps


class OrtDecoder(_OrtRunner):
    """``OrtDecoder(path)(latents) -> images`` in [0, 1]: an exported VAE decoder graph
    (:func:`tdm_fast.export.vae.export_vae_decoder_onnx`)."""

    def __init__(self, path, providers=None, threads=None, session_options=None):
        super().__init__(path, providers, threads, session_options)
        if self.meta.get("graph") != "vae_decoder":
            raise ValueError(f"{self.path} is not a VAE decoder graph (inputs {self.input_order}); use OrtSampler")

    def __call__(self, latents) -> torch.Tensor:
        device = latents.device if isinstance(latents, torch.Tensor) else torch.device("cpu")
        return self._run(self._feed({"latents": latents}), device)[0]

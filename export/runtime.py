"""ONNX Runtime runners, and prompt → image through exported graphs only; no torch needed.

:class:`OrtSampler` runs an exported sampler graph: ``runner(noise, cond) -> x̂0`` in one
``session.run`` call. :class:`OrtDenoiser` runs a per-network graph:
``runner(x_t, t, cond) -> (x0, eps)``; :class:`OrtDecoder` a VAE decoder graph:
``runner(latents) -> images``. Inputs are checked against the graph's declared shapes and
dtypes before the call, and a mismatch raises ``ValueError`` naming the input and what it expects.
Outputs come back as the inputs came: numpy in, numpy out; torch tensors in, torch tensors out on the
inputs' device (torch is only touched when the caller passes its tensors, so this module imports
without it).

:class:`TextToImage` chains a ``tdm-fast export --pipeline`` folder: tokenizers (the ``tokenizers``
library) → prompt-encoder graph → sampler graph → VAE decoder graph, with ONNX Runtime and numpy only, and
returns PIL images (Pillow) with the arrays beside them (:class:`TextToImageOutput`).

On the CUDA and TensorRT execution providers the runners use IO binding: torch CUDA tensors are bound
by address and the outputs written into torch CUDA tensors, and :class:`TextToImage` hands each graph's
outputs to the next as ``OrtValue``s on the device, so nothing crosses to the host but the final images.
On the CPU provider the path is the plain ``session.run``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .condspec import CondSpec
from .manifest import decode_metadata, load_manifest, sampler_key, steps_of
from .tokenizer import PromptTokenizer

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
# providers whose inputs and outputs live in device memory: IO binding keeps them there
DEVICE_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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


def _torch_tensor(value) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor can only exist once torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


def _ortvalue(value) -> bool:
    return type(value).__name__ == "OrtValue"


def _shape_dtype(value, name: str) -> tuple[tuple[int, ...], np.dtype]:
    if isinstance(value, np.ndarray):
        return value.shape, value.dtype
    if _torch_tensor(value):
        return tuple(value.shape), np.dtype(str(value.dtype).removeprefix("torch."))
    if _ortvalue(value):
        return tuple(value.shape()), np.dtype(_ORT_TO_NUMPY[value.data_type()])
    raise TypeError(f"input {name!r} must be a numpy array, torch.Tensor or OrtValue, got {type(value).__name__}")


def _to_numpy(value) -> np.ndarray:
    if _torch_tensor(value):
        return value.detach().cpu().contiguous().numpy()
    if _ortvalue(value):
        return value.numpy()
    return np.ascontiguousarray(value)


class _OrtRunner:
    """One graph in one session. ``io_binding``: None binds on the CUDA/TensorRT providers only."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 session_options=None, io_binding: bool | None = None):
        ort = _require_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        options = session_options or ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers or default_providers())
        self.meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = {i.name: (list(i.shape), i.type) for i in self.session.get_inputs()}
        self.input_order = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_types = [_ORT_TO_NUMPY[o.type] for o in self.session.get_outputs()]
        provider = self.session.get_providers()[0]
        self.device = ("cuda", int(self.session.get_provider_options()[provider].get("device_id", 0))) \
            if provider in DEVICE_PROVIDERS else ("cpu", 0)
        self.io_binding = provider in DEVICE_PROVIDERS if io_binding is None else io_binding
        kind = self.meta.get("cond_kind")
        cond_names = tuple(n for n in self.input_order if n not in ("noise", "x_t", "t"))
        self.cond_spec = CondSpec(kind or ("dict" if len(cond_names) > 1 else "tensor"), cond_names)
        self.run_count = 0  # number of session.run calls (tests check one call per sample)

    def expected(self, name: str) -> str:
        shape, kind = self.inputs[name]
        return f"shape {tuple(d if isinstance(d, int) else str(d) for d in shape)} dtype {_ORT_TO_NUMPY.get(kind, kind).__name__ if kind in _ORT_TO_NUMPY else kind}"

    def check(self, values: dict) -> None:
        """Every graph input present, of its dtype and declared shape (named dims agreeing across inputs)."""
        bound: dict[str, int] = {}
        for name in self.input_order:
            if name not in values:
                raise ValueError(f"missing input {name!r} ({self.expected(name)})")
            actual_shape, actual_dtype = _shape_dtype(values[name], name)
            shape, kind = self.inputs[name]
            want = _ORT_TO_NUMPY.get(kind)
            if want is not None and actual_dtype != want:
                raise ValueError(
                    f"input {name!r} has dtype {actual_dtype}, expected {np.dtype(want).name} ({self.expected(name)})"
                )
            ok = len(actual_shape) == len(shape)
            if ok:
                for actual, dim in zip(actual_shape, shape):
                    if isinstance(dim, int):
                        ok &= actual == dim
                    elif dim:  # a named symbolic dimension must agree across inputs
                        ok &= bound.setdefault(dim, actual) == actual
            if not ok:
                raise ValueError(
                    f"input {name!r} has shape {tuple(actual_shape)}, expected {self.expected(name)}"
                    + (f" with {', '.join(f'{k}={v}' for k, v in bound.items())}" if bound else "")
                )

    def output_shapes(self, values: dict) -> list[tuple[int, ...] | None]:
        """The output shapes for these inputs where the graph declares them (batch from the first
        input), None where only running tells; subclasses that know better override this."""
        batch = _shape_dtype(values[self.input_order[0]], self.input_order[0])[0][0]
        shapes = []
        for output in self.session.get_outputs():
            dims = [batch if d == "batch" else d for d in output.shape]
            shapes.append(tuple(dims) if all(isinstance(d, int) for d in dims) else None)
        return shapes

    def run(self, values: dict) -> list:
        """The outputs for the named inputs, of the inputs' kind: numpy arrays, torch tensors (on the
        inputs' device), or OrtValues on this runner's device (IO binding)."""
        self.check(values)
        self.run_count += 1
        first = values[self.input_order[0]]
        if not self.io_binding:
            outputs = self.session.run(self.output_names, {n: _to_numpy(values[n]) for n in self.input_order})
            if _torch_tensor(first):
                import torch

                return [torch.from_numpy(o).to(first.device) for o in outputs]
            return outputs
        return self._run_bound(values, first)

    def _run_bound(self, values: dict, first) -> list:
        binding = self.session.io_binding()
        device, index = self.device
        keep = []  # contiguous copies bound by address stay alive until the run ends
        for name in self.input_order:
            value = values[name]
            if _ortvalue(value):
                binding.bind_ortvalue_input(name, value)
            elif _torch_tensor(value) and value.device.type == device:
                value = value.contiguous()
                keep.append(value)
                binding.bind_input(name, device, index, _shape_dtype(value, name)[1], tuple(value.shape), value.data_ptr())
            else:
                binding.bind_cpu_input(name, _to_numpy(value))
        torch_out = None
        if _torch_tensor(first):
            import torch

            shapes = self.output_shapes(values)
            if all(s is not None for s in shapes):  # written in place: no copy to the host and back
                torch_out = [torch.empty(s, dtype=getattr(torch, np.dtype(t).name), device=first.device)
                             for s, t in zip(shapes, self.output_types)]
        for i, name in enumerate(self.output_names):
            if torch_out is not None and first.device.type == device:
                out = torch_out[i]
                binding.bind_output(name, device, index, self.output_types[i], tuple(out.shape), out.data_ptr())
            else:
                binding.bind_output(name, device, index)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if _ortvalue(first):
            return binding.get_outputs()
        if not _torch_tensor(first):
            return binding.copy_outputs_to_cpu()
        if torch_out is not None and first.device.type == device:
            return torch_out
        import torch

        return [torch.from_numpy(o).to(first.device) for o in binding.copy_outputs_to_cpu()]


class OrtSampler(_OrtRunner):
    """``OrtSampler(path)(noise, cond) -> x̂0``: a whole-sampler graph in one ``session.run``."""

    def __init__(self, path, providers=None, threads=None, session_options=None, io_binding=None):
        super().__init__(path, providers, threads, session_options, io_binding)
        if self.meta.get("graph", "sampler") != "sampler" or "noise" not in self.inputs:
            raise ValueError(f"{self.path} is not a sampler graph (inputs {self.input_order}); use OrtDenoiser")
        self.steps = self.meta.get("steps")
        self.times = self.meta.get("timesteps")
        self.solver = self.meta.get("solver", "ddim")  # graphs exported before the solver choice are DDIM

    def output_shapes(self, values):
        return [_shape_dtype(values["noise"], "noise")[0]]

    def __call__(self, noise, cond):
        return self.run({"noise": noise, **dict(zip(self.cond_spec.names, self.cond_spec.flatten(cond)))})[0]


class OrtDenoiser(_OrtRunner):
    """``OrtDenoiser(path)(x_t, t, cond) -> (x0, eps)``: one network evaluation per call."""

    def __init__(self, path, providers=None, threads=None, session_options=None, io_binding=None):
        super().__init__(path, providers, threads, session_options, io_binding)
        if "t" not in self.inputs:
            raise ValueError(f"{self.path} is not a per-network graph (inputs {self.input_order}); use OrtSampler")

    def output_shapes(self, values):
        return [_shape_dtype(values["x_t"], "x_t")[0]] * 2

    def __call__(self, x_t, t, cond):
        batch = _shape_dtype(x_t, "x_t")[0][0]
        if _torch_tensor(x_t):
            import torch

            t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(batch)
        else:
            t = np.broadcast_to(np.asarray(t, dtype=np.int64).reshape(-1), (batch,))
        x0, eps = self.run({"x_t": x_t, "t": t, **dict(zip(self.cond_spec.names, self.cond_spec.flatten(cond)))})
        return x0, eps


class OrtDecoder(_OrtRunner):
    """``OrtDecoder(path)(latents) -> images`` in [0, 1]: an exported VAE decoder graph
    (:func:`tdm_fast.export.vae.export_vae_decoder_onnx`)."""

    def __init__(self, path, providers=None, threads=None, session_options=None, io_binding=None):
        super().__init__(path, providers, threads, session_options, io_binding)
        if self.meta.get("graph") != "vae_decoder":
            raise ValueError(f"{self.path} is not a VAE decoder graph (inputs {self.input_order}); use OrtSampler")

    def output_shapes(self, values):
        b, _, h, w = _shape_dtype(values["latents"], "latents")[0]
        channels = self.session.get_outputs()[0].shape[1]
        up = int(self.meta.get("upscale", 0))
        return [(b, channels, h * up, w * up) if isinstance(channels, int) and up else None]

    def __call__(self, latents):
        return self.run({"latents": latents})[0]


class TextToImageOutput:
    """What :class:`TextToImage` returns, as a diffusers pipeline's output: ``images`` — a list of
    ``PIL.Image`` (``output_type="pil"``, the default) or the float32 array (``output_type="np"``) — and
    ``arrays``, always the float32 (B, C, H, W) array in [0, 1] the decoder graph gave. numpy functions take
    the output as that array (``np.asarray(output)``), as they took what ``TextToImage`` returned before."""

    def __init__(self, arrays: np.ndarray, output_type: str):
        self.arrays = arrays
        self.images = to_pil(arrays) if output_type == "pil" else arrays

    def __array__(self, dtype=None, copy=None):
        return self.arrays if dtype is None else self.arrays.astype(dtype)


class TextToImage:
    """Prompt → image from a ``tdm-fast export --pipeline`` folder, with ONNX Runtime and numpy only.

    ``TextToImage(folder)(["a photo of a cat"], steps=4).images -> [PIL.Image]``; ``.arrays`` holds them as
    float32 (B, C, H, W) in [0, 1] (:class:`TextToImageOutput`; ``output_type="np"`` skips the PIL images): the
    manifest's tokenizers give the token ids, the prompt-encoder graph the denoiser's text conditions
    (what the diffusers pipeline's ``encode_prompt`` returns), the K-step sampler graph the latents and
    the VAE decoder graph the images. The folder may have been moved or copied anywhere: the manifest
    names every file relative to it. ``steps`` (an int or a list) chooses which sampler graphs get a
    session (default: every K in the manifest). ``verify`` hashes every listed file against the manifest.
    ``io_binding``: default on for the CUDA/TensorRT providers (``OrtValue``s stay on the device
    between graphs), off on the CPU.
    """

    def __init__(self, folder: str | Path, steps=None, providers: list[str] | None = None, threads: int | None = None,
                 io_binding: bool | None = None, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, verify=verify)
        exported = steps_of(self.manifest)
        wanted = exported if steps is None else sorted({int(k) for k in (steps if isinstance(steps, (list, tuple)) else [steps])})
        absent = [k for k in wanted if k not in exported]
        if absent:
            raise ValueError(f"{self.folder} has sampler graphs for K in {exported}, not K={absent[0]}: "
                             f"re-export with tdm-fast export --steps {' '.join(map(str, sorted(set(exported + absent))))}")
        graphs = self.manifest["graphs"]
        options = dict(providers=providers, threads=threads, io_binding=io_binding)
        self.tokenizers = {
            entry["input"]: PromptTokenizer(self.folder / entry["file"], entry["max_length"], entry["pad_id"],
                                            entry["pad_token"], name, entry["padding_side"], entry["truncation_side"])
            for name, entry in self.manifest["tokenizers"].items()
        }
        self.encoder = _OrtRunner(self.folder / graphs["prompt_encoder"]["file"], **options)
        self.samplers = {k: OrtSampler(self.folder / graphs[sampler_key(k)]["file"], **options) for k in wanted}
        self.decoder = OrtDecoder(self.folder / graphs["vae_decoder"]["file"], **options)
        self.sample_shape = tuple(self.manifest["sample_shape"])
        self.noise_dtype = _ORT_TO_NUMPY[next(iter(self.samplers.values())).inputs["noise"][1]]
        self._check_chain()

    def _check_chain(self) -> None:
        """The graphs fit together: the encoder's outputs are the sampler's conditions (names, shapes as
        the export recorded them: exporters may leave a graph's own output shapes symbolic)."""
        encoder_out = {o["name"]: o["shape"] for o in self.manifest["graphs"]["prompt_encoder"]["outputs"]}
        for k, sampler in self.samplers.items():
            for name in sampler.cond_spec.names:
                if not _same_shape(encoder_out.get(name), sampler.inputs[name][0]):
                    raise ValueError(f"the prompt encoder of {self.folder} gives {name} of shape {encoder_out.get(name)}, "
                                     f"but the K={k} sampler takes {sampler.inputs[name][0]}: the graphs come from different models")
        if set(self.tokenizers) != set(self.encoder.input_order):
            raise ValueError(f"the manifest's tokenizers feed {sorted(self.tokenizers)}, the prompt encoder takes {self.encoder.input_order}")

    @property
    def io_binding(self) -> bool:
        return self.encoder.io_binding

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {name: tokenizer(prompts) for name, tokenizer in self.tokenizers.items()}

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The denoiser's text conditions of ``prompts`` (e.g. ``encoder_hidden_states``), as numpy arrays."""
        return dict(zip(self.encoder.output_names, _numpy_all(self.encoder.run(self._inputs(self.tokenize(prompts))))))

    def noise(self, batch: int, seed: int = 0) -> np.ndarray:
        """Initial latents from numpy's generator (torch's generator is not available here; pass
        ``latents`` to reproduce a torch pipeline's draw)."""
        return np.random.default_rng(seed).standard_normal((batch, *self.sample_shape), dtype=np.float32).astype(self.noise_dtype)

    def __call__(self, prompts, steps: int | None = None, latents: np.ndarray | None = None, seed: int = 0,
                 output_type: str = "pil") -> TextToImageOutput:
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if steps is None:
            steps = max(self.samplers)
        if steps not in self.samplers:
            raise ValueError(f"steps={steps}: this TextToImage holds sampler graphs for K in {sorted(self.samplers)}")
        latents = self.noise(len(prompts), seed) if latents is None else np.ascontiguousarray(latents, dtype=self.noise_dtype)
        if latents.shape != (len(prompts), *self.sample_shape):
            raise ValueError(f"latents of shape {latents.shape}: expected {(len(prompts), *self.sample_shape)}")
        cond = dict(zip(self.encoder.output_names, self.encoder.run(self._inputs(self.tokenize(prompts)))))
        sampler = self.samplers[steps]
        x0 = sampler.run({**self._inputs({"noise": latents}), **{n: cond[n] for n in sampler.cond_spec.names}})[0]
        return TextToImageOutput(_numpy_all(self.decoder.run({"latents": x0}))[0], output_type)

    def _inputs(self, arrays: dict[str, np.ndarray]) -> dict:
        """Host arrays as the chain's inputs: OrtValues on the device under IO binding, else as they are."""
        if not self.io_binding:
            return arrays
        ort = _require_ort()
        device, index = self.encoder.device
        return {n: ort.OrtValue.ortvalue_from_numpy(a, device, index) for n, a in arrays.items()}


def _same_shape(a, b) -> bool:
    """Declared shapes agree: same rank, equal sizes where both are concrete."""
    return a is not None and len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def _numpy_all(values: list) -> list[np.ndarray]:
    return [v.numpy() if _ortvalue(v) else v for v in values]


def _pil(pixels: np.ndarray):
    """One image (C, H, W) in [0, 1] as a PIL image: grey for one channel, RGB for three."""
    from PIL import Image

    pixels = np.round(np.clip(np.asarray(pixels, dtype=np.float32), 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def to_pil(images: np.ndarray) -> list:
    """Images (B, C, H, W) in [0, 1] as PIL images (Pillow, no torch)."""
    return [_pil(image) for image in np.asarray(images)]


def save_png(images: np.ndarray, path: str | Path) -> Path:
    """Images (B, C, H, W) in [0, 1] as one PNG row (Pillow, no torch)."""
    _pil(np.concatenate(list(np.asarray(images)), axis=-1)).save(path)  # (C, H, B*W)
    return Path(path)

"""TensorRT engines from the exported ONNX graphs, built and run through polygraphy.

Building (:func:`build_engine`) and running (:class:`TensorRTRunner`) go through
``polygraphy.backend.trt`` (``network_from_onnx_path``, ``CreateConfig`` with one ``Profile``,
``engine_from_network``, ``TrtRunner``) rather than TensorRT's raw builder and execution-context
API, which leaves this module the project's own parts: the checks, the profiles, the engine's
identity and the torch call signatures. Needs a CUDA GPU, the ``tensorrt`` Python package (TensorRT
10) and ``polygraphy``; without them, building or running raises ``ImportError``/``RuntimeError``
with an install hint. What TensorRT needs from the
graph is checked without TensorRT by :func:`check_tensorrt_compatible`: the ONNX checker, an
opset TensorRT 10 parses, operators from :data:`TENSORRT_SUPPORTED_OPS`, no float64 tensors, and
shape inference with concrete shapes at each optimization profile's min/opt/max. Running the
graph in ONNX Runtime at those shapes (:func:`check_profiles_run`) covers the rest.

Engines are specific to one GPU model/compute capability and one TensorRT version; the metadata
JSON written beside the engine records both and :class:`TensorRTRunner` refuses a mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tdm_fast.atomic import atomic_files

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'tdm-fast[tensorrt]' (tensorrt>=10 and polygraphy; a CUDA GPU and a "
    "matching NVIDIA driver are required). ONNX Runtime (--backend onnx) runs the same graph without it."
)

# TensorRT 10.0 parses ONNX opsets 9..20 (10.15 goes to 24); we export at 18.
TENSORRT_MIN_OPSET = 9
TENSORRT_MAX_OPSET = 20

# ONNX operators marked supported ("Y") in onnx-tensorrt's docs/operators.md for TensorRT 10.x
# (github.com/onnx/onnx-tensorrt, "TensorRT 10.15 supports operators in the inclusive range of
# opset 9 to opset 24"). Operators that first appear in ONNX opsets above 20 (Attention,
# RMSNormalization, RotaryEmbedding, TensorScatter) are left out: TensorRT 10.0 cannot parse them.
# Unsupported there, and so absent here: AffineGrid, Bernoulli, BitShift, Bitwise*, Col2Im,
# CenterCropPad, Compress, ConcatFromSequence, ConvInteger, DFT, Det, DynamicQuantizeLinear,
# ImageDecoder, MatMulInteger, MaxRoiPool, MaxUnpool, MelWeightMatrix, Multinomial,
# NegativeLogLikelihoodLoss, Optional*, QLinearConv, QLinearMatMul, RegexFullMatch, Sequence*,
# SoftmaxCrossEntropyLoss, SplitToSequence, String*, TfIdfVectorizer, Unique.
TENSORRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose
    Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp
    Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
    Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round STFT
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
    Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

ENGINE_SUFFIX = ".engine"
ENGINE_META_SUFFIX = ".engine.json"


class TensorRTCompatibilityError(ValueError):
    """The ONNX graph uses something TensorRT 10 cannot build; ``problems`` lists what."""

    def __init__(self, problems: list[str]):
        super().__init__("the ONNX graph is not TensorRT-ready:\n  - " + "\n  - ".join(problems))
        self.problems = problems


def require_tensorrt():
    """Import ``tensorrt`` (and check for ``polygraphy``) or raise ImportError with the install hint."""
    try:
        import polygraphy  # noqa: F401 - the builder and runner below
        import tensorrt as trt
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} (missing: {error.name})") from error
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise ImportError(f"TensorRT {trt.__version__} found; tdm-fast needs TensorRT >= 10. {INSTALL_HINT}")
    return trt


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
    return torch


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when engines can be built here, else (False, the reason)."""
    try:
        require_tensorrt()
        require_cuda()
    except (ImportError, RuntimeError) as error:
        return False, str(error)
    return True, ""


# -- checks without TensorRT --------------------------------------------------------------------


def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    return onnx.load(str(path_or_model))


def default_profiles(path_or_model, batch=(1, 1, 8), resolution=None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Optimization profiles ``{input: (min, opt, max)}`` from the graph's declared input shapes.

    ``batch`` is (min, opt, max) for the symbolic ``batch`` dim; ``resolution`` is
    ((h_min, w_min), (h_opt, w_opt), (h_max, w_max)) for symbolic ``height``/``width`` dims
    (graphs exported with ``dynamic_resolution=True``).
    """
    model = _load(path_or_model)
    init = {i.name for i in model.graph.initializer}
    profiles = {}
    for value in model.graph.input:
        if value.name in init:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes = []
        for level in range(3):
            shape = []
            for d in dims:
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif d.dim_param == "batch":
                    shape.append(batch[level])
                elif d.dim_param in ("height", "width"):
                    if resolution is None:
                        raise ValueError(f"input {value.name!r} has a symbolic {d.dim_param}; pass resolution")
                    shape.append(resolution[level][0 if d.dim_param == "height" else 1])
                else:
                    raise ValueError(f"input {value.name!r} has an unknown symbolic dim {d.dim_param!r}")
            shapes.append(tuple(shape))
        profiles[value.name] = tuple(shapes)
    return profiles


def _with_shapes(model, shapes: dict[str, tuple[int, ...]]):
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[value.name]):
                d.Clear()
                d.dim_value = int(n)
    for value in fixed.graph.output:  # let inference fill the outputs in
        value.type.tensor_type.ClearField("shape")
    # The exporter's intermediate annotations carry symbolic (sometimes placeholder) shapes that
    # strict inference would compare against; infer every intermediate afresh.
    del fixed.graph.value_info[:]
    return fixed


def check_tensorrt_compatible(path_or_model, profiles: dict | None = None, raise_on_error: bool = True) -> dict:
    """Everything TensorRT needs from the graph that can be checked without TensorRT.

    Returns a report ``{"ok", "problems", "warnings", "opset", "ops", "profiles": {level: output shapes}}``;
    raises :class:`TensorRTCompatibilityError` listing the problems when ``raise_on_error``.
    """
    import onnx
    from onnx import TensorProto, shape_inference

    model = _load(path_or_model)
    problems, warnings = [], []
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # noqa: BLE001 - the checker raises several types
        problems.append(f"ONNX checker: {error}")
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TENSORRT_MIN_OPSET <= opset <= TENSORRT_MAX_OPSET:
        problems.append(f"opset {opset} is outside TensorRT 10's range {TENSORRT_MIN_OPSET}..{TENSORRT_MAX_OPSET}")
    ops: dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            ops[key] = ops.get(key, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    unsupported = sorted(op for op in ops if op not in TENSORRT_SUPPORTED_OPS)
    if unsupported:
        problems.append(f"operators TensorRT cannot parse: {unsupported}")
    doubles = [i.name for i in model.graph.initializer if i.data_type == TensorProto.DOUBLE]
    if doubles:
        warnings.append(f"float64 initializers (TensorRT casts them to float32): {doubles[:5]}")
    profile_report = {}
    if profiles:
        for level, label in enumerate(("min", "opt", "max")):
            shapes = {name: tuple(p[level]) for name, p in profiles.items()}
            try:
                inferred = shape_inference.infer_shapes(
                    _with_shapes(model, shapes), check_type=True, strict_mode=True, data_prop=True
                )
            except Exception as error:  # noqa: BLE001
                problems.append(f"shape inference at the {label} profile {shapes} failed: {error}")
                continue
            outs = {}
            for value in inferred.graph.output:
                dims = value.type.tensor_type.shape.dim
                shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
                if not dims or None in shape:
                    problems.append(f"output {value.name!r} has no concrete shape at the {label} profile: {shape}")
                outs[value.name] = shape
            for value in list(inferred.graph.value_info):
                if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
                    warnings.append(f"float64 intermediate {value.name!r} at the {label} profile")
                    break
            profile_report[label] = outs
    report = {"ok": not problems, "problems": problems, "warnings": warnings, "opset": opset, "ops": ops,
              "profiles": profile_report}
    if problems and raise_on_error:
        raise TensorRTCompatibilityError(problems)
    return report


def check_profiles_run(path, profiles: dict, providers=None) -> dict:
    """Run the graph in ONNX Runtime at each profile's min/opt/max shapes; returns output shapes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    shapes_out = {}
    for level, label in enumerate(("min", "opt", "max")):
        feed = {}
        for name, p in profiles.items():
            shape = tuple(p[level])
            if types[name] == "tensor(int64)":
                feed[name] = rng.integers(0, 2, size=shape).astype(np.int64)
            elif types[name] == "tensor(float16)":
                feed[name] = rng.standard_normal(shape).astype(np.float16)
            else:
                feed[name] = rng.standard_normal(shape).astype(np.float32)
        outputs = session.run(None, feed)
        if not all(np.isfinite(o).all() for o in outputs):
            raise ValueError(f"non-finite outputs at the {label} profile")
        shapes_out[label] = [list(o.shape) for o in outputs]
    return shapes_out


# -- building -----------------------------------------------------------------------------------


def gpu_identity() -> dict:
    torch = require_cuda()
    trt = require_tensorrt()
    index = torch.cuda.current_device()
    return {
        "gpu_name": torch.cuda.get_device_name(index),
        "compute_capability": list(torch.cuda.get_device_capability(index)),
        "tensorrt_version": str(trt.__version__),
    }


def build_engine(
    onnx_path,
    engine_path=None,
    profiles: dict | None = None,
    batch=(1, 1, 8),
    resolution=None,
    fp16: bool = True,
    bf16: bool = False,
    workspace_gb: float = 8.0,
    timing_cache=None,
    strongly_typed: bool = False,
    check: bool = True,
) -> Path:
    """Build and serialize a TensorRT engine from an exported graph (sampler, per-network or VAE decoder).

    Writes ``engine_path`` (default: the ONNX path with ``.engine``) and ``<engine>.json`` with
    the GPU name, compute capability, TensorRT version, profiles, precision and the ONNX
    metadata. ``fp16``/``bf16`` allow those precisions where TensorRT finds them faster
    (``strongly_typed``: the ONNX types decide instead, e.g. for an fp16 export). ``timing_cache``
    is a file reused across builds (created when missing).
    """
    trt = require_tensorrt()
    require_cuda()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    from .onnx import read_metadata

    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(ENGINE_SUFFIX)
    profiles = profiles or default_profiles(onnx_path, batch, resolution)
    if check:  # our own checks first: their messages name the operator or the profile at fault
        check_tensorrt_compatible(onnx_path, profiles)
    profile = Profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    cache = Path(timing_cache) if timing_cache else None
    config = CreateConfig(
        fp16=fp16 and not strongly_typed, bf16=bf16 and not strongly_typed, profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
        load_timing_cache=str(cache) if cache and cache.is_file() else None,
    )
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed)  # resolves external weights
    try:
        engine = engine_from_network(network, config=config, save_timing_cache=str(cache) if cache else None)
    except Exception as error:  # polygraphy raises its own error types with TensorRT's log
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}: {error}") from error
    meta = {
        **gpu_identity(),
        # relative to the engine's folder: the export builds in a staging folder and moves both files out of it
        "onnx": os.path.relpath(onnx_path, engine_path.parent),
        "onnx_metadata": read_metadata(onnx_path),
        "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
        "precision": "strongly_typed" if strongly_typed else ("bf16" if bf16 else "fp16" if fp16 else "fp32"),
    }
    # an engine without its .json (or with another build's) is refused by TensorRTRunner: the two replace the old pair together
    with atomic_files([engine_path, Path(str(engine_path) + ".json")]) as (engine_file, meta_file):
        save_engine(engine, str(engine_file))
        meta_file.write_text(json.dumps(meta, indent=2))
    return engine_path


# -- running ------------------------------------------------------------------------------------


def check_engine_compatible(meta: dict) -> None:
    """Refuse an engine built for another GPU or another TensorRT version."""
    here = gpu_identity()
    if list(meta.get("compute_capability", [])) != here["compute_capability"] or meta.get("gpu_name") != here["gpu_name"]:
        raise RuntimeError(
            f"this engine was built for {meta.get('gpu_name')} (compute capability "
            f"{meta.get('compute_capability')}) but this GPU is {here['gpu_name']} ({here['compute_capability']}); "
            "rebuild it here: tdm-fast export --format tensorrt"
        )
    if meta.get("tensorrt_version") != here["tensorrt_version"]:
        raise RuntimeError(
            f"this engine was built with TensorRT {meta.get('tensorrt_version')} but TensorRT "
            f"{here['tensorrt_version']} is installed; rebuild it: tdm-fast export --format tensorrt"
        )


class TensorRTRunner:
    """``TensorRTRunner(engine)(noise, cond) -> x̂0`` (``(x_t, t, cond) -> (x0, eps)`` for a per-network
    engine, ``(latents) -> images`` for a VAE decoder engine) through polygraphy's ``TrtRunner``: torch
    CUDA tensors in, torch CUDA tensors out (bound by address, never copied to the host)."""

    def __init__(self, engine_path):
        require_tensorrt()
        torch = require_cuda()
        from polygraphy.backend.common import bytes_from_path
        from polygraphy.backend.trt import TrtRunner, engine_from_bytes

        from .condspec import CondSpec

        self.torch = torch
        self.engine_path = Path(engine_path)
        meta_path = Path(str(self.engine_path) + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"no engine metadata {meta_path}; rebuild with tdm_fast.export.tensorrt.build_engine")
        self.meta = json.loads(meta_path.read_text())
        check_engine_compatible(self.meta)
        onnx_meta = self.meta.get("onnx_metadata", {})
        self.graph = onnx_meta.get("graph", "sampler")
        self.per_network = self.graph == "denoiser"
        self.inputs = [i["name"] for i in onnx_meta.get("inputs", [])]
        self.outputs = [o["name"] for o in onnx_meta.get("outputs", [])]
        lead = {"denoiser": ("x_t", "t"), "vae_decoder": ("latents",)}.get(self.graph, ("noise",))
        names = tuple(n for n in self.inputs if n not in lead)
        self.cond_spec = CondSpec(onnx_meta.get("cond_kind", "dict" if len(names) > 1 else "tensor"), names)
        self.profiles = self.meta.get("profiles", {})
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.runner = TrtRunner(engine_from_bytes(bytes_from_path(str(self.engine_path))))
        self.runner.activate()

    def _check(self, name, tensor):
        if name in self.profiles:
            lo, _, hi = self.profiles[name]
            if len(tensor.shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(tensor.shape, lo, hi)):
                raise ValueError(f"input {name!r} has shape {tuple(tensor.shape)}, expected between {tuple(lo)} and {tuple(hi)} (the engine's profile)")

    def _execute(self, feed: dict):
        feed = {n: v.to(self.device).contiguous() for n, v in feed.items()}
        for n, t in feed.items():
            self._check(n, t)
        outputs = self.runner.infer(feed, copy_outputs_to_host=False)  # polygraphy checks the dtypes too
        return [outputs[n].clone() for n in self.outputs]  # the runner reuses its output buffers

    def __call__(self, *args):
        torch = self.torch
        if self.graph == "vae_decoder":
            (latents,) = args
            return self._execute({"latents": latents})[0]
        if self.per_network:
            x_t, t, cond = args
            t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x_t.shape[0])
            lead = {"x_t": x_t, "t": t}
        else:
            noise, cond = args
            lead = {"noise": noise}
        out = self._execute({**lead, **dict(zip(self.cond_spec.names, self.cond_spec.flatten(cond)))})
        return tuple(out) if self.per_network else out[0]

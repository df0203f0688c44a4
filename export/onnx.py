"""ONNX export: the whole K-step sampler as one graph, or one network evaluation.

The sampler graph takes the initial noise and the condition tensors and returns the final x̂0;
the K stages are unrolled (K copies of the network, no Loop node), the stage times and α/σ are
constants. Inputs: ``noise`` (B, …), then ``class_labels`` (int64, (B,)) for class-conditional
teachers, ``encoder_hidden_states`` (B, L, C) for text teachers, or the keys of an SDXL dict
condition (``encoder_hidden_states``, ``text_embeds``, ``time_ids``). Output: ``x0``.

The per-network graph (:func:`export_denoiser_onnx`) takes ``x_t``, ``t`` (int64, (B,)) and the
condition and returns ``x0`` and ``eps``; it serves many-step teacher samplers.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (default; exports ToyMLP, diffusers
UNet2DConditionModel and the steps-embedding forward hook) or the legacy TorchScript exporter
(``exporter="torchscript"``, faster to export, deprecated upstream).
"""
from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path

import torch

from tdm_fast.denoiser import Denoiser

from .manifest import META_PREFIX, decode_metadata
from .sampler import CondSpec, DenoiserStep, FlatInputs, StudentSampler, _param_device, cast_cond, prepare_for_export

DEFAULT_OPSET = 18
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class UnsupportedOperatorError(RuntimeError):
    """The network uses an operator the ONNX exporter cannot express; ``op`` names it."""

    def __init__(self, op: str, message: str):
        super().__init__(message)
        self.op = op


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.:]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"No ONNX function found for ([\w.:]+)"),
)


def _unsupported_op(error: BaseException) -> str | None:
    """The operator name in an exporter error (or its causes), e.g. ``aten._linalg_svd.default``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                return ".".join(g for g in m.groups() if g and g != "default") if len(m.groups()) > 1 else m.group(1)
        if type(error).__name__ == "UnsupportedOperatorError":
            return text
        error = error.__cause__ or error.__context__
    return None


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tdm-fast")
    except Exception:  # pragma: no cover
        return "unknown"


def _example_noise(noise, batch: int):
    if isinstance(noise, torch.Tensor):
        return noise
    return torch.randn(batch, *noise)


def _run_exporter(module, args, path: Path, input_names, output_names, dynamic_dims, opset, exporter):
    """Calls ``torch.onnx.export``; ``dynamic_dims[i]`` maps the axes of input i to names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                dims = {}
                shapes = []
                for axes in dynamic_dims:
                    spec = {}
                    for axis, name in axes.items():
                        if name not in dims:
                            dims[name] = torch.export.Dim(name, min=1, max=4096) if name == "batch" else torch.export.Dim(name, min=8, max=4096)
                        spec[axis] = dims[name]
                    shapes.append(spec or None)
                shapes = tuple(shapes)
                if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
                    shapes = (shapes,)  # forward(*tensors): torch.export sees one tuple argument
                program = _dynamo_export(module, tuple(args), shapes, input_names=list(input_names),
                                         output_names=list(output_names), opset_version=opset)
                import onnx

                model = program.model_proto
                _drop_noop_squeezes(model)
                onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_800_000_000)
            elif exporter == "torchscript":
                axes = {name: {a: n for a, n in d.items()} for name, d in zip(input_names, dynamic_dims) if d}
                if "batch" in {n for d in dynamic_dims for n in d.values()}:
                    for name in output_names:
                        axes[name] = {0: "batch"}
                torch.onnx.export(
                    module, tuple(args), str(path), dynamo=False, input_names=list(input_names),
                    output_names=list(output_names), dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                )
            else:
                raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
        except ValueError:
            raise
        except Exception as error:  # the exporters raise many types; find the operator if one is named
            op = _unsupported_op(error)
            if op:
                raise UnsupportedOperatorError(
                    op, f"ONNX export failed: the operator {op!r} has no ONNX translation (opset {opset}). "
                    f"Replace it in the network, or register a custom translation with torch.onnx."
                ) from error
            raise


def _dynamo_export(module, args: tuple, shapes, **options):
    """``torch.onnx.export(dynamo=True)``, retried from a plain ``torch.export`` when its own capture fails.

    Each capture traces models the other cannot: the exporter's (deferred runtime asserts) fails on
    PixArt's attention-mask reshape with a symbolic batch, plain ``torch.export`` succeeds there and
    instead bounds the batch of the VAE decoder's attention (<= 63), which the exporter's does not.
    """
    options.update(dynamo=True, dynamic_shapes=shapes, verbose=False, optimize=True)
    try:
        return torch.onnx.export(module, args, None, **options)
    except Exception as error:  # noqa: BLE001 - retried only when the capture itself failed
        if type(error).__name__ != "TorchExportError":
            raise
        try:
            exported = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except Exception:  # noqa: BLE001 - the first capture's error is the one to report
            raise error from None
        return torch.onnx.export(exported, args, None, **options)


def _drop_noop_squeezes(model) -> int:
    """Turn every ``Squeeze`` of axes whose size is known and not 1 into ``Identity`` (in place, in
    an ``onnx.ModelProto``); returns how many.

    ``torch.squeeze(x, dim)`` leaves a dimension that is not 1 alone, but the exporter translates it
    into an ONNX ``Squeeze`` of that axis, which the checker rejects (PixArt's ``squeeze(1)`` on its
    (B, tokens, C) output).
    """
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.value_info)}
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "Squeeze" or len(node.input) < 2 or node.input[1] not in constants or node.input[0] not in shapes:
            continue
        shape = shapes[node.input[0]]
        axes = [int(a) for a in constants[node.input[1]].reshape(-1)]
        if shape and all(shape[a] is not None and shape[a] != 1 for a in axes):
            node.op_type = "Identity"
            del node.input[1:]
            dropped += 1
    return dropped


def _check_runs(fn, dtype, noise, cond):
    """Run the cast module once in torch: a network that mixes dtypes fails here, clearly, instead
    of producing an ONNX graph that the checker rejects."""
    try:
        with torch.no_grad():
            fn(noise[:1], {k: v[:1] for k, v in cond.items()} if isinstance(cond, dict) else cond[:1])
    except RuntimeError as error:
        raise TypeError(
            f"the network does not run in {dtype_name(dtype)} in torch ({error}); it probably creates float32 "
            f"tensors internally (e.g. timestep features) - cast them to the input dtype, or export fp32"
        ) from error


_DOC_STRINGS = {"sampler": "tdm-fast deterministic few-step sampler", "denoiser": "tdm-fast denoiser",
                "vae_decoder": "tdm-fast VAE decoder (latents to images in [0, 1])",
                "prompt_encoder": "tdm-fast prompt encoder (token ids to the denoiser's text conditions)"}


def _set_metadata(path: Path, meta: dict) -> dict:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    model.doc_string = _DOC_STRINGS[meta["graph"]]
    external = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(path), save_as_external_data=external)
    onnx.checker.check_model(str(path), full_check=True)
    return meta


def read_metadata(path_or_model) -> dict:
    """The ``tdm_fast.*`` metadata_props of an exported model, JSON values decoded."""
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    return decode_metadata({entry.key: entry.value for entry in model.metadata_props})


def _io_meta(names, tensors, dynamic_dims):
    out = []
    for name, tensor, axes in zip(names, tensors, dynamic_dims):
        shape = [axes.get(i, int(s)) for i, s in enumerate(tensor.shape)]
        out.append({"name": name, "shape": shape, "dtype": str(tensor.dtype).replace("torch.", "")})
    return out


def _dynamic_axes(noise: torch.Tensor, n_cond: int, dynamic_batch: bool, dynamic_resolution: bool, extra_leading: int = 0):
    batch = {0: "batch"} if dynamic_batch else {}
    noise_axes = dict(batch)
    if dynamic_resolution and noise.dim() == 4:
        noise_axes.update({2: "height", 3: "width"})
    return [noise_axes] + [dict(batch)] * extra_leading + [dict(batch)] * n_cond


def export_sampler_onnx(
    student: Denoiser,
    path: str | Path,
    steps: int,
    noise: torch.Tensor | tuple[int, ...],
    cond,
    total_steps: int = 900,
    dtype="fp32",
    dynamic_batch: bool = True,
    dynamic_resolution: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    device=None,
    solver: str = "ddim",
    scheduler=None,
) -> dict:
    """Export the whole K-step sampler of ``student`` as one ONNX graph; returns its metadata.

    Args:
        noise: an example noise tensor, or a per-sample shape (e.g. ``(4, 32, 32)``).
        cond: an example condition with the same batch (tensor, int64 labels or SDXL dict).
        dtype: ``fp32`` or ``fp16`` (network weights, noise and float conditions; the DDIM
            arithmetic runs in float32 inside the graph as in the torch sampler).
        dynamic_batch: the batch dimension is symbolic (``batch``).
        dynamic_resolution: height and width of 4-D noise are symbolic (for TensorRT profiles).
        solver: the trajectory, ``ddim`` or ``dpmsolver`` (recorded in the metadata as ``solver``).
        scheduler: a converted release's :class:`~tdm_fast.TDMScheduler`, whose times, σ and solver the
            graph follows (:class:`~tdm_fast.export.sampler.StudentSampler`).
    LoRA adapters are merged into the weights (on a copy) before export.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype)
    model, spec, noise, conds = _export_inputs(student, noise, cond, dtype, dynamic_batch, device)
    sampler = StudentSampler(model, steps, total_steps, solver, scheduler).eval()
    flat = FlatInputs(sampler, spec, leading=1).eval()
    if dtype != torch.float32:
        _check_runs(sampler, dtype, noise, spec.unflatten(conds))
    input_names = ("noise",) + spec.names
    dyn = _dynamic_axes(noise, len(conds), dynamic_batch, dynamic_resolution)
    _run_exporter(flat, (noise,) + conds, path, input_names, ("x0",), dyn, opset, exporter)
    meta = {
        **_common_meta("sampler", model, sampler.backbone, dtype, spec, input_names, (noise,) + conds, dyn, ("x0",), opset, exporter),
        "steps": steps,
        "total_steps": total_steps,
        "solver": sampler.solver,
        "timesteps": list(sampler.times),
        "alphas": list(sampler.alphas),
        "sigmas": list(sampler.sigmas),
    }
    return _set_metadata(path, meta)


def export_denoiser_onnx(
    denoiser: Denoiser,
    path: str | Path,
    noise: torch.Tensor | tuple[int, ...],
    cond,
    steps: int | None = None,
    dtype="fp32",
    dynamic_batch: bool = True,
    dynamic_resolution: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    device=None,
) -> dict:
    """Export one network evaluation ``(x_t, t, cond) -> (x0, eps)`` (t: int64, shape (B,)).

    The schedule's α/σ tables are constants of the graph; for a steps-aware student ``steps``
    fixes the K embedding. Used for the teacher's many-step CFG sampler on ONNX Runtime/TensorRT.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype)
    model, spec, noise, conds = _export_inputs(denoiser, noise, cond, dtype, dynamic_batch, device)
    step = DenoiserStep(model, steps).eval()
    flat = FlatInputs(step, spec, leading=2).eval()
    if dtype != torch.float32:
        _check_runs(lambda x, c: step(x, torch.full((x.shape[0],), 500, device=x.device), c), dtype, noise,
                    spec.unflatten(conds))
    # Distinct example times so the tracer cannot fold them.
    t = torch.linspace(10, 990, noise.shape[0]).long().to(noise.device)
    input_names = ("x_t", "t") + spec.names
    dyn = _dynamic_axes(noise, len(conds), dynamic_batch, dynamic_resolution, extra_leading=1)
    _run_exporter(flat, (noise, t) + conds, path, input_names, ("x0", "eps"), dyn, opset, exporter)
    meta = {
        **_common_meta("denoiser", model, step.backbone, dtype, spec, input_names, (noise, t) + conds, dyn, ("x0", "eps"),
                       opset, exporter),
        "steps": steps,
        "schedule": model.schedule.config.to_dict(),
        "null_cond_available": model.null_cond is not None,
    }
    return _set_metadata(path, meta)


def _export_inputs(denoiser: Denoiser, noise, cond, dtype, dynamic_batch: bool, device):
    """The denoiser prepared for export and example inputs on its device: (model, spec, noise, conds)."""
    spec = CondSpec.of(cond)
    batch = next(iter(spec.flatten(cond))).shape[0]
    noise = _example_noise(noise, batch)
    if batch == 1 and dynamic_batch:
        # An example batch of 1 lets the tracer specialise the batch to 1; trace with 2.
        noise = torch.cat([noise, noise])
        cond = {k: torch.cat([v, v]) for k, v in cond.items()} if isinstance(cond, dict) else torch.cat([cond, cond])
    model = prepare_for_export(denoiser, dtype=dtype, device=device)
    check_traceable = getattr(model.model, "check_traceable", None)  # a backbone's known tracing limits
    if check_traceable is not None:
        check_traceable(tuple(noise.shape))
    dev = _param_device(model) if device is None else torch.device(device)
    conds = tuple(cast_cond(c, dtype, dev) for c in spec.flatten(cond))
    return model, spec, noise.to(device=dev, dtype=dtype), conds


def _common_meta(graph, model, backbone, dtype, spec, input_names, inputs, dyn, output_names, opset, exporter) -> dict:
    out_shape = [dyn[0].get(i, int(s)) for i, s in enumerate(inputs[0].shape)]
    return {
        "graph": graph,
        "backbone": backbone,
        "prediction_type": model.prediction_type,
        "dtype": dtype_name(dtype),
        "cond_kind": spec.kind,
        "inputs": _io_meta(input_names, inputs, dyn),
        "outputs": [{"name": n, "shape": out_shape, "dtype": str(dtype).replace("torch.", "")} for n in output_names],
        "opset": opset,
        "exporter": exporter,
        "steps_aware": model.steps_set is not None,
        "tdm_fast_version": _version(),
        "torch_version": torch.__version__,
    }


def count_ops(path_or_model) -> dict[str, int]:
    """Histogram of node op types in the main graph and its local functions."""
    import onnx
    from collections import Counter

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    counts = Counter(n.op_type for n in model.graph.node)
    for fn in model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(counts)

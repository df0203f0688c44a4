"""FLOP model of one TDM iteration on real backbones, and projected training hours.

How the count is made
---------------------
* One forward pass of the denoiser is counted by :func:`count_flops` (torch's FLOP formulas, those of
  ``torch.utils.flop_counter.FlopCounterMode``) on a
  **meta-device** model built from the real published config (``tdm_fast.perf.plan.PLAN_CONFIGS``: SD1.5
  UNet, SDXL UNet, PixArt-α 1024, SD3-medium, CogVideoX-2B) — no weights, no memory, a few seconds.
  The counter counts matmuls, convolutions and attention (``scaled_dot_product_attention``) as
  2·M·N·K per product; elementwise ops, norms and softmax are not counted (they are < 1–2 % of the
  FLOPs of these networks, but not of their time — that is what utilisation absorbs).
* The networks are counted once per shape (batch B, resolution, frames) and composed (spec §3):

  ==========================  ============================================================
  rollout                     (K − 1) student forwards, no grad            (mean over K for unify)
  fake-score update  × U      student forward (no grad) on the last-stage draws only (1/K of the
                              batch: the rollout already holds the other stages' x̂0, ε̂) + fake
                              forward + fake backward
  generator update            student forward + student backward + teacher forward at 2B
                              (cond + uncond in one batch) + fake forward (no grad)
  ==========================  ============================================================

  with U = ``fake_updates``. Backward ≈ 2 × forward for full fine-tuning (input gradients +
  weight gradients; ``measure_backward_ratio`` measures 3.00× for forward+backward on all five
  presets) and ≈ 1 × forward for LoRA (the frozen base needs input gradients only). A LoRA's
  adapters add their own arithmetic to every pass of the student and the fake score (not the
  teacher's, whose adapters are off): forward a·F, backward 2·a·F (input and weight gradients), where
  a = :func:`lora_adapter_flops` / F — 11 % on SD1.5's UNet at rank 64 on every linear/conv layer of
  the blocks, 3 % at rank 16. Gradient checkpointing adds one recomputed forward per backward. The teacher at batch 2B costs exactly 2·F(B): every op of these networks is per-sample.
  Text encoders are precomputed and not counted; neither is the VAE (data-free training never
  decodes).

Projected time = FLOPs/iteration × iterations ÷ (peak × utilisation). Peaks are the vendors'
dense bf16 tensor-core numbers (no sparsity); utilisation (MFU) is either given, or measured on
the machine at hand by :func:`measure_utilisation`. Real diffusion training typically reaches
30–50 % MFU on A100/H100; the default 0.35 is an assumption and is printed as one.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Dense bf16/fp16 tensor-core peak, TFLOP/s, from the vendors' data sheets (no 2:4 sparsity).
DEVICE_PEAK_TFLOPS = {
    "a100": 312.0,  # A100 SXM/PCIe
    "a800": 312.0,  # the export variant of the A100: same compute
    "h100": 989.0,  # H100 SXM
    "h100-pcie": 756.0,
    "h800": 989.0,
    "h200": 989.0,  # same compute as H100 SXM, more memory bandwidth
    "b200": 2250.0,
    "l40s": 362.0,
    "a10g": 70.0,  # AWS A10G (fp16 dense, tensor cores)
    "v100": 125.0,  # fp16
}
DEFAULT_UTILISATION = 0.35  # an assumption; see the module docstring
UTILISATION_SOURCE = (
    "assumed, not measured (no GPU run of the real-size rows is recorded): model FLOPs utilisation is defined, and "
    "46 % reported for a 540B-parameter transformer on TPU v4, in the PaLM paper (Chowdhery et al. 2022, arXiv "
    "2204.02311, Table 3); convolutional UNets at 64x64-128x128 latents usually run lower, so 0.35 is our round "
    "figure below it. Set --mfu FLOAT, or measure it on a GPU: bash bench/gpu_all.sh")
# real-size benchmark sizes (bench/bench_realsize.py) of each preset
REAL_SIZES = {"sd15": ("sd15-real", "sd15-real-bf16", "sd15"), "sdxl": ("sdxl-real", "sdxl-real-bf16", "sdxl")}

# Training costs reported in the TDM paper (Table 3 and Fig. 1; spec §8). ``iterations`` only where the
# paper states it. Settings the paper does not state are ours, printed as "assumed".
PAPER_COSTS = [
    {"preset": "pixart", "method": "TDM (4-step)", "gpu": "a800", "gpu_hours": 2.0, "reported": "2 A800-hours",
     "iterations": 500, "steps": (4,)},
    {"preset": "pixart", "method": "LCM", "gpu": "a100", "gpu_hours": 14.5 * 24, "reported": "14.5 A100-days"},
    {"preset": "pixart", "method": "YOSO", "gpu": "a800", "gpu_hours": 10 * 24, "reported": "10 A800-days"},
    {"preset": "sdxl", "method": "TDM (4-step)", "gpu": "a800", "gpu_hours": 2 * 24, "reported": "2 A800-days", "steps": (4,)},
    {"preset": "sdxl", "method": "DMD2", "gpu": "a100", "gpu_hours": 160 * 24, "reported": "160 A100-days"},
    {"preset": "sdxl", "method": "LCM", "gpu": "a100", "gpu_hours": 32 * 24, "reported": "32 A100-days"},
    {"preset": "sd15", "method": "TDM-unify-SFT", "gpu": "a800", "gpu_hours": 3 * 24, "reported": "3 A800-days", "steps": (1, 2, 4)},
    {"preset": "sd15", "method": "TDM-unify-GAN", "gpu": "a800", "gpu_hours": 4 * 24, "reported": "4 A800-days", "steps": (1, 2, 4)},
    {"preset": "sd15", "method": "DMD2", "gpu": "a800", "gpu_hours": 30 * 24, "reported": "30+ A800-days"},
]


def device_peak(gpu: str) -> float:
    """Peak FLOP/s of a GPU name from :data:`DEVICE_PEAK_TFLOPS` ('a800', 'NVIDIA H100 80GB HBM3', …)."""
    key = gpu_key(gpu)
    if key is None:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(DEVICE_PEAK_TFLOPS)} (or pass --peak-tflops)")
    return DEVICE_PEAK_TFLOPS[key] * 1e12


def gpu_key(name: str) -> str | None:
    """Maps a table key or a CUDA device name onto a key of :data:`DEVICE_PEAK_TFLOPS`."""
    n = name.lower().replace("nvidia", "").strip()
    if n in DEVICE_PEAK_TFLOPS:
        return n
    if "h100" in n and "pcie" in n:
        return "h100-pcie"
    squashed = n.replace(" ", "").replace("-", "")
    for key in sorted((k for k in DEVICE_PEAK_TFLOPS if "-" not in k), key=len, reverse=True):
        if key in squashed:
            return key
    return None


# -- counting --------------------------------------------------------------------------------------
def _cpu_attention_formulas() -> dict:
    """torch's FLOP counter knows the GPUs' fused attention kernels, not the CPU's: on a CPU (the real-size
    benchmark) attention would count as zero. The CPU kernels take the same leading arguments."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                flop_registry[aten._scaled_dot_product_flash_attention_backward]}


class _FlopCount(TorchDispatchMode):
    """The sum of torch's FLOP formulas over the operators that run. ``FlopCounterMode`` sums the same
    formulas but also attributes each operator to its modules, through gradient hooks on every module's
    inputs and outputs; under gradient checkpointing those hooks keep gradients alive that would have been
    freed (SDXL's UNet, bf16, LoRA roles: tensor peak 2,070 MB against 754 MB at 32×32 latents), which at
    128×128 latents got the real-size row killed for memory on a 24 GB machine."""

    def __init__(self):
        super().__init__()
        self.formulas, self.total = {**flop_registry, **_cpu_attention_formulas()}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs while ``fn(*args, **kwargs)`` runs (forward and any backward), by torch's FLOP formulas,
    attention included on every device; no more memory than ``fn`` itself takes."""
    with _FlopCount() as counter:
        fn(*args, **kwargs)
    return int(counter.total)


@functools.lru_cache(maxsize=None)
def _meta_model(preset: str):
    from .plan import build_meta_model

    return build_meta_model(preset)


@functools.lru_cache(maxsize=None)
def network_forward_flops(preset: str, batch: int = 1, resolution=None, num_frames: int = 49) -> int:
    """FLOPs of one forward of the preset's denoiser at ``batch`` (meta device, published config)."""
    from .plan import _meta_inputs

    model = _meta_model(preset)
    run = _meta_inputs(preset, model, batch, resolution, num_frames)
    with torch.no_grad():
        return count_flops(run)


def measure_backward_ratio(preset: str, batch: int = 1, resolution=None, num_frames: int = 49, lora: bool = False) -> float:
    """(forward + backward) / forward FLOPs, measured on the meta model; ~3 full FT, ~2 frozen weights."""
    from .plan import _meta_inputs

    model = _meta_model(preset)
    fwd = network_forward_flops(preset, batch, resolution, num_frames)
    if not lora:
        run = _meta_inputs(preset, model, batch, resolution, num_frames)
        total = count_flops(lambda: run().sum().backward())
    else:  # frozen weights: the backward still needs input gradients; make the input require grad
        model.requires_grad_(False)
        try:
            conv_in = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)))
            handle = conv_in.register_forward_pre_hook(lambda m, a: (a[0].detach().requires_grad_(True),) + tuple(a[1:]))
            run = _meta_inputs(preset, model, batch, resolution, num_frames)
            try:
                total = count_flops(lambda: run().sum().backward())
            finally:
                handle.remove()
        finally:
            model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return total / fwd


def lora_adapter_flops(model, run, targets, rank: int) -> int:
    """FLOPs that rank-``rank`` LoRA adapters on ``targets`` add to one forward ``run()`` of ``model``.

    peft adds, beside each linear layer, two linears (in → r → out) and, beside each convolution, a
    convolution of the layer's kernel into r channels and a 1×1 one out of them: 2·r·(in·k² + out) FLOPs per
    output position. The positions are read from each targeted layer's output during the run (meta device
    works), so the count needs no adapters attached."""
    from .plan import is_lora_target

    positions = []

    def record(module, inputs, output):
        channels = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        fan_in = module.in_features if isinstance(module, torch.nn.Linear) else (
            module.in_channels * math.prod(module.kernel_size) // module.groups)
        positions.append((output.numel() // channels) * (fan_in + channels))

    handles = [m.register_forward_hook(record) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and is_lora_target(name, targets)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return 2 * rank * sum(positions)


@dataclass
class IterationSettings:
    steps: tuple[int, ...] = (4,)
    fake_updates: int = 1
    lora: bool = False
    checkpointing: bool = False
    backward_ratio: float | None = None  # None: 2 (full) or 1 (LoRA)
    adapter_fraction: float = 0.0  # LoRA adapters' forward FLOPs over the base network's (lora_adapter_flops)

    @property
    def bwd(self) -> float:
        ratio = self.backward_ratio if self.backward_ratio is not None else (1.0 if self.lora else 2.0)
        return ratio + (1.0 if self.checkpointing else 0.0)

    @property
    def adapted(self) -> float:
        """A forward of a pass whose adapters are on (student, fake score), in units of the base forward."""
        return 1.0 + (self.adapter_fraction if self.lora else 0.0)

    @property
    def adapted_bwd(self) -> float:
        """A backward of such a pass: the base's, plus the adapters' input and weight gradients (and their
        recomputed forward under checkpointing)."""
        if not self.lora:
            return self.bwd
        return self.bwd + self.adapter_fraction * (2.0 + (1.0 if self.checkpointing else 0.0))


def tdm_iteration_flops(forward_flops: float, settings: IterationSettings | None = None) -> dict:
    """Per-phase FLOPs of one TDM iteration given F(B), one network forward at the run's batch B."""
    s = settings or IterationSettings()
    f = float(forward_flops)
    a = s.adapted * f
    mean_rollout = sum(k - 1 for k in s.steps) / len(s.steps)
    last_stage = sum(1 / k for k in s.steps) / len(s.steps)
    phases = {
        "rollout: student fwd (no grad) x (K-1)": mean_rollout * a,
        "fake update: student fwd (no grad), last-stage draws (1/K)": s.fake_updates * last_stage * a,
        "fake update: fake fwd": s.fake_updates * a,
        "fake update: fake bwd": s.fake_updates * s.adapted_bwd * f,
        "generator: student fwd": a,
        "generator: student bwd": s.adapted_bwd * f,
        "generator: teacher fwd (cond+uncond, 2B)": 2 * f,
        "generator: fake fwd (no grad)": a,
    }
    phases["total"] = sum(phases.values())
    return phases


@functools.lru_cache(maxsize=None)
def preset_adapter_flops(preset: str, rank: int | None = None, batch: int = 1, resolution=None, num_frames: int = 49) -> int:
    """Forward FLOPs of the preset's default LoRA adapters (``tdm_fast.lora``'s targets and rank) at ``batch``."""
    from ..backbones.presets import get_preset
    from ..lora import DEFAULT_RANK, DEFAULT_TARGETS
    from .plan import _meta_inputs

    backbone = get_preset(preset).backbone
    model = _meta_model(preset)
    run = _meta_inputs(preset, model, batch, resolution, num_frames)
    return lora_adapter_flops(model, run, DEFAULT_TARGETS[backbone], rank or DEFAULT_RANK[backbone])


def plan_flops(preset: str, steps=(4,), batch: int = 1, resolution=None, num_frames: int = 49, lora: bool = False,
               fake_updates: int = 1, checkpointing: bool = False, exact_backward: bool = False,
               lora_rank: int | None = None) -> dict:
    """FLOPs per TDM iteration of a real preset; ``exact_backward`` measures the backward ratio on the meta model."""
    fwd = network_forward_flops(preset, batch, resolution, num_frames)
    ratio = measure_backward_ratio(preset, 1, resolution, num_frames, lora) - 1.0 if exact_backward else None
    adapters = preset_adapter_flops(preset, lora_rank, batch, resolution, num_frames) / fwd if lora else 0.0
    settings = IterationSettings(tuple(steps), fake_updates, lora, checkpointing, ratio, adapters)
    phases = tdm_iteration_flops(fwd, settings)
    return {"preset": preset, "batch": batch, "steps": tuple(steps), "lora": lora, "checkpointing": checkpointing,
            "fake_updates": fake_updates, "forward_flops": fwd, "backward_ratio": settings.bwd,
            "adapter_fraction": adapters, "phases": phases, "total": phases["total"],
            "forward_equivalents": phases["total"] / fwd}


def projected_gpu_hours(flops_per_iteration: float, iterations: int, peak_flops: float, utilisation: float) -> float:
    return flops_per_iteration * iterations / (peak_flops * utilisation) / 3600.0


# -- utilisation on the machine at hand -------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device=None, dtype=None, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul here (the practical peak, used on CPU where no table applies)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def measure_utilisation(trainer, steps: int = 5, warmup: int = 2, peak_flops: float | None = None) -> dict:
    """Achieved FLOP/s of ``trainer.train_step`` (counted by :func:`count_flops`) over the device's peak.

    The peak is the table's bf16 number on a known GPU, else a measured large-matmul FLOP/s (CPU).
    On a tiny network (the built-in teachers) this is far below what SDXL reaches on an A800; it
    is a measurement of *this* machine and network, not a forecast.
    """
    device = trainer.device
    for _ in range(warmup):
        trainer.train_step()
    flops = count_flops(trainer.train_step)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(device)
    seconds = (time.perf_counter() - t) / steps
    source = "measured matmul"
    if peak_flops is None and device.type == "cuda" and gpu_key(torch.cuda.get_device_name(device)):
        peak_flops, source = device_peak(torch.cuda.get_device_name(device)), "table (bf16 dense)"
    if peak_flops is None:
        peak_flops = matmul_peak(device)
    achieved = flops / seconds
    return {"flops_per_step": flops, "seconds_per_step": seconds, "achieved_flops": achieved,
            "peak_flops": peak_flops, "peak_source": source, "utilisation": achieved / peak_flops}


# -- the `tdm-fast bench plan` report ---------------------------------------------------------------
def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def _fmt_hours(h: float) -> str:
    return f"{h:,.1f} GPU-hours ({h / 24:,.2f} GPU-days)" if h >= 24 else f"{h:,.2f} GPU-hours"


def measured_real_size(plan: dict, real_size_rows: list[dict]) -> list[dict]:
    """The rows of the real-size benchmark (``extra_info`` of bench/bench_realsize.py's JSON) that measured
    this plan's preset in its role layout (LoRA roles, or full copies)."""
    sizes = REAL_SIZES.get(plan["preset"], ())
    configs = ("plain-lora", "all") if plan["lora"] else ("plain-full",)
    return [r for r in real_size_rows if r.get("size") in sizes and r.get("config") in configs]


def projection_inputs(plan: dict, real_size_rows: list[dict], utilisation_source: str) -> list[str]:
    """What the GPU-hour projection rests on, each input marked measured, modelled or assumed."""
    lines = ["inputs of the projection:",
             "  modelled  FLOPs of one forward: torch's FLOP formulas on the meta model of the published config "
             "(matmuls, convolutions, attention)",
             f"  modelled  forwards per iteration: {plan['forward_equivalents']:.2f} (the composition above)"]
    rows = measured_real_size(plan, real_size_rows)
    for r in rows:
        where = f"{r['size']} {r['config']}, batch {r['batch']}, {r['dtype']}, on {r['device']}"
        lines.append(f"  measured  one real-size iteration ({where}): counted {r['flops_measured'] / 1e12:,.2f} TFLOP = "
                     f"{r['flops_measured_vs_model']:.3f}x the model at that batch; {r['network_passes_x_batch']:g} network "
                     f"passes x batch; tensor peak {r['tensor_peak_vs_plan']:.2f}x tdm-fast plan")
    if not rows:
        sizes = " / ".join(REAL_SIZES.get(plan["preset"], ())) or "none"
        lines.append(f"  (no real-size measurement of {plan['preset']} in this layout is recorded; real-size sizes: {sizes}; "
                     "tdm-fast bench realsize)")
    lines.append(f"  {_utilisation_kind(utilisation_source):<9} utilisation: {utilisation_source}")
    return lines


def _utilisation_kind(source: str) -> str:
    return next((kind for kind in ("assumed", "measured") if source.startswith(kind)), "given")


def format_flops_plan(plan: dict, iterations: int, gpu: str, utilisation: float, utilisation_source: str,
                      peak_flops: float | None = None, real_size_rows: list[dict] = ()) -> str:
    from .plan import PLAN_CONFIGS, PUBLISHED

    peak = peak_flops or device_peak(gpu)
    preset = plan["preset"]
    mode = "LoRA (frozen base: backward = input gradients only)" if plan["lora"] else "full fine-tuning"
    lines = [
        f"TDM FLOP plan: {preset} — {PLAN_CONFIGS[preset][0]} as published: {PUBLISHED[preset]}",
        f"K = {','.join(map(str, plan['steps']))}, batch {plan['batch']}, {mode}"
        + (", gradient checkpointing" if plan["checkpointing"] else "")
        + f", fake updates per generator update {plan['fake_updates']}",
        f"one network forward at batch {plan['batch']} (torch's FLOP formulas, meta device): {_fmt_flops(plan['forward_flops'])}"
        f"  ({_fmt_flops(plan['forward_flops'] / plan['batch'])}/sample)",
        f"backward/forward ratio used: {plan['backward_ratio']:.2f}"
        + (f"; LoRA adapters (the default targets and rank) add {plan['adapter_fraction']:.1%} of a forward to each"
           " student/fake forward, twice that to each backward" if plan["lora"] else ""),
        "",
        "per-iteration FLOPs:",
    ]
    for name, value in plan["phases"].items():
        if name != "total":
            lines.append(f"  {name:<46}{_fmt_flops(value):>16}")
    lines.append(f"  {'FLOPs per iteration':<46}{_fmt_flops(plan['total']):>16}   (= {plan['forward_equivalents']:.1f} forwards)")
    hours = projected_gpu_hours(plan["total"], iterations, peak, utilisation)
    lines += ["", *projection_inputs(plan, list(real_size_rows), utilisation_source)]
    lines += [
        "",
        f"projected: {iterations} iterations on {gpu} (peak {peak / 1e12:,.0f} TFLOP/s bf16 dense) at utilisation "
        f"{utilisation:.0%} ({_utilisation_kind(utilisation_source)}): {_fmt_hours(hours)}",
        "",
        "paper's reported training costs for this backbone (Table 3 / Fig. 1 of arXiv 2503.06674):",
    ]
    rows = [r for r in PAPER_COSTS if r["preset"] == preset]
    for r in rows:
        note = ""
        if r["method"].startswith("TDM"):
            budget = r["gpu_hours"] * 3600 * device_peak(r["gpu"]) * utilisation
            implied = budget / plan["total"]
            note = f"  -> at this batch and {utilisation:.0%} utilisation that budget buys {implied:,.0f} iterations"
            if r.get("iterations"):
                ours = projected_gpu_hours(plan["total"], r["iterations"], device_peak(r["gpu"]), utilisation)
                note += f"; the paper's {r['iterations']} iterations project to {_fmt_hours(ours)} on {r['gpu']}"
        lines.append(f"  {r['method']:<16}{r['reported']:>16}{note}")
    if not rows:
        lines.append("  (none reported)")
    lines.append("  (batch size, resolution and LoRA-vs-full of the paper's runs are not stated there: compare with care)")
    return "\n".join(lines)

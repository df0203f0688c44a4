"""The training comparison of issue 15: one TDM iteration (K = 4) of an SD1.5-architecture UNet run by

* ``official``: the official-style loop (``bench/official_loop.py``: three full copies, separate
  teacher conditional/unconditional passes, the fake update's unused teacher pass, per-iteration
  ``.item()``, plain torch math);
* ``plain-full``: tdm-fast's ``TDMTrainer`` with full copies of the teacher and the reference kernels,
  stepped by ``train_step`` (which reads the losses every iteration), at the authors' settings
  (``PAPER_FAITHFUL``: no EMA, the per-sample normaliser, as the official-style loop); like every
  ``TDMTrainer`` its fake-score update reads the student's predictions from the rollout;
* ``plain-lora``: the same with LoRA roles (student and fake score as two adapters on one base);
* ``all``: LoRA roles, the fused kernels (custom operators), ``compile=True`` with the size's
  ``compile_scope`` (``scaled``: ``"full"``, each network compiled whole, one graph per role and grad
  mode, during the untimed warm-up: the regional ``compile_repeated_blocks`` leaves the resnets and
  their LoRA layers eager and gained 1.09x over plain against 1.28x; ``sd15``/``sdxl``: ``"regional"``,
  whose compilation fits a GPU session's minutes; ``TDM_BENCH_COMPILE_SCOPE`` overrides both),
  iterations that never read the device (``_iterate``; the losses are read once at the end of the
  measurement).

Sizes: ``scaled`` (CPU): SD1.5's published UNet config (block types, 2 layers per block, 8 attention
heads, cross-attention dim 768, 77×768 prompt embeddings) with the channel widths divided by 10
(32, 64, 128, 128: norm groups of 32 still divide them), 16×16 latents, random weights, fp32.
``sd15`` / ``sdxl`` (GPU): the published configs at 64×64 / 128×128 latents, bf16 autocast.
``sd15-real`` / ``sdxl-real`` (CPU, ``bench/bench_realsize.py``; ``-bf16``: at bf16 autocast, for CPUs with
bf16 arithmetic): the same configs at batch 1, fp32 (SDXL's
LoRA roles with gradient checkpointing). ``tiny``: SD1.5's block types at two levels of one layer, 32 channels, 8×8
latents, the dry run of ``bench/gpu_all.sh``.

Measured per configuration: milliseconds per iteration (timed by the caller), a per-category
breakdown (StepProfiler for the trainer, the same categories around the official loop's regions),
network passes per iteration (forward pre-hooks on every UNet: calls, and calls weighted by
batch / B), and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the build and the first
iterations, minus what was allocated before; on CPU the peak resident set size (``VmHWM``, reset after
a first iteration through ``/proc/self/clear_refs``) of a fresh process over two more iterations,
minus its resident size after the imports: weights, optimizer state, activations, what compilation
keeps and allocator slack, but not the Python/torch runtime, nor the transient peak of compiling
(reported beside it as ``peak_memory_first_iteration_mb``).

    python bench/sd15_comparison.py --peak-memory official --size scaled     # one memory measurement
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

CONFIGS = ("official", "plain-full", "plain-lora", "all")
LABELS = {
    "official": "official-style loop (3 full copies, plain torch)",
    "plain-full": "tdm-fast plain (full copies, reference kernels)",
    "plain-lora": "tdm-fast plain (LoRA roles, reference kernels)",
    "all": "tdm-fast all options (LoRA roles, fused custom ops, compiled networks, no per-iteration sync)",
}
K = 4
SD15_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
)
SDXL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)


@dataclass(frozen=True)
class ComparisonSize:
    unet: dict  # UNet2DConditionModel config
    latent: int  # latent side (4 x latent x latent)
    batch: int
    lora_rank: int
    autocast: torch.dtype | None  # None: fp32
    text_length: int
    text_width: int
    pooled_width: int | None  # SDXL's pooled text embedding (text-time conditioning); None: text only
    checkpointing: bool = False  # gradient checkpointing of the LoRA roles' shared base


def _batch(variable: str, default: int) -> int:
    return int(os.environ.get(variable, str(default)))


SIZES = {
    "scaled": ComparisonSize(dict(SD15_UNET, block_out_channels=(32, 64, 128, 128)), 16, 4, 8, None, 77, 768, None),
    # the published configs on a GPU, bf16 autocast
    "sd15": ComparisonSize(SD15_UNET, 64, _batch("TDM_BENCH_SD15_BATCH", 16), 64, torch.bfloat16, 77, 768, None),
    "sdxl": ComparisonSize(SDXL_UNET, 128, _batch("TDM_BENCH_SDXL_BATCH", 4), 64, torch.bfloat16, 77, 2048, 1280),
    # the published configs on a CPU (bench/bench_realsize.py): fp32, batch 1; SDXL's LoRA roles with checkpointing
    "sd15-real": ComparisonSize(SD15_UNET, 64, _batch("TDM_BENCH_REAL_BATCH", 1), 64, None, 77, 768, None),
    "sdxl-real": ComparisonSize(SDXL_UNET, 128, _batch("TDM_BENCH_REAL_BATCH", 1), 64, None, 77, 2048, 1280, checkpointing=True),
    # the same at bf16 autocast (the LoRA roles' base cast to bf16), for CPUs with bf16 arithmetic (AVX512-BF16, AMX)
    "sd15-real-bf16": ComparisonSize(SD15_UNET, 64, _batch("TDM_BENCH_REAL_BATCH", 1), 64, torch.bfloat16, 77, 768, None),
    "sdxl-real-bf16": ComparisonSize(SDXL_UNET, 128, _batch("TDM_BENCH_REAL_BATCH", 1), 64, torch.bfloat16, 77, 2048, 1280,
                                     checkpointing=True),
    # the dry run of bench/gpu_all.sh: SD1.5's block types at two levels of one layer, 32 channels
    "tiny": ComparisonSize(dict(SD15_UNET, block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 8, 2, 4, None, 8, 32, None),
}
PROMPTS = 16  # distinct random "prompt embeddings" the conditions are drawn from


def compile_scope(size: str) -> str:
    return os.environ.get("TDM_BENCH_COMPILE_SCOPE", "full" if size == "scaled" else "regional")


def size_info(size: str) -> dict:
    s = SIZES[size]
    return {"size": size, "latent": [4, s.latent, s.latent], "batch": s.batch, "K": K, "lora_rank": s.lora_rank,
            "dtype": "fp32" if s.autocast is None else str(s.autocast).replace("torch.", ""),
            "text_embeddings": [s.text_length, s.text_width], "block_out_channels": list(s.unet["block_out_channels"]),
            "gradient_checkpointing": s.checkpointing, "compile_scope": compile_scope(size)}


# -- the model and its conditions ----------------------------------------------------------------
def build_unet(size: str, device):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=SIZES[size].latent, **SIZES[size].unet).to(device).eval().requires_grad_(False)


def prompt_pool(size: str, device):
    """(conditions for the trainer, null condition, dict-of-kwargs builder for the official loop)."""
    s = SIZES[size]
    length, width, pooled = s.text_length, s.text_width, s.pooled_width
    g = torch.Generator().manual_seed(1)
    text = torch.randn(PROMPTS, length, width, generator=g).to(device)
    null_text = torch.zeros(length, width, device=device)
    if pooled is None:
        return text, null_text
    latent = s.latent
    time_ids = torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8], dtype=torch.float32, device=device)
    cond = {"encoder_hidden_states": text, "text_embeds": torch.randn(PROMPTS, pooled, generator=g).to(device),
            "time_ids": time_ids.expand(PROMPTS, 6).contiguous()}
    null = {"encoder_hidden_states": null_text, "text_embeds": torch.zeros(pooled, device=device), "time_ids": time_ids}
    return cond, null


def unet_kwargs(cond):
    """The UNet's keyword inputs for one batch of a (possibly dict) condition."""
    if isinstance(cond, dict):
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
    return {"encoder_hidden_states": cond}


def _batched(tensors, idx):
    return {k: v[idx] for k, v in tensors.items()} if isinstance(tensors, dict) else tensors[idx]


def _expand(null, batch):
    return {k: v.expand(batch, *v.shape) for k, v in null.items()} if isinstance(null, dict) else null.expand(batch, *null.shape)


# -- timing regions (StepProfiler's semantics: exclusive time per category) ------------------------
class RegionTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._last = 0.0

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, name):
        now = self._now()
        if self._stack:
            self.totals[self._stack[-1]] = self.totals.get(self._stack[-1], 0.0) + now - self._last
        self._stack.append(name)
        self._last = now
        try:
            yield
        finally:
            now = self._now()
            top = self._stack.pop()
            self.totals[top] = self.totals.get(top, 0.0) + now - self._last
            self._last = now


# -- the four configurations ---------------------------------------------------------------------
class PassCounter:
    """Forward pre-hooks on UNets: calls and batch-weighted calls (samples / B)."""

    def __init__(self, modules, batch):
        self.batch, self.calls, self.samples, self.iterations = batch, 0, 0, 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in {id(m): m for m in modules}.values()]

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.samples += x.shape[0]

    def per_iteration(self) -> dict:
        n = max(self.iterations, 1)
        return {"network_calls": self.calls / n, "network_passes_x_batch": self.samples / (n * self.batch)}


class Runner:
    """One configuration, built and ready: ``step()`` runs one iteration."""

    def __init__(self, name: str, size: str, device, profile: bool = True):
        self.name, self.size, self.device = name, size, torch.device(device)
        self.batch = SIZES[size].batch
        self.cuda = self.device.type == "cuda"
        teacher_unet = build_unet(size, self.device)
        cond, null = prompt_pool(size, self.device)
        if name == "official":
            self._build_official(teacher_unet, cond, null, profile)
        else:
            self._build_trainer(teacher_unet, cond, null, profile)
        self.passes = PassCounter(self.unets, self.batch)

    def _build_official(self, teacher_unet, cond, null, profile):
        from diffusers import DDPMScheduler

        from official_loop import OfficialStyleTDM

        self.timer = RegionTimer(self.cuda) if profile else None
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  steps_offset=1, prediction_type="epsilon")

        def conditions(batch, generator):
            return unet_kwargs(_batched(cond, torch.randint(0, PROMPTS, (batch,), generator=generator)))

        autocast = SIZES[self.size].autocast
        self.loop = OfficialStyleTDM(teacher_unet, scheduler, conditions, unet_kwargs(_expand(null, self.batch)),
                                     (4, SIZES[self.size].latent, SIZES[self.size].latent), self.batch, cfg=4.5, total_steps=900,
                                     steps=K, autocast_dtype=autocast,
                                     latent_dtype=torch.float32 if autocast is None else autocast, timer=self.timer)
        self.unets = [m for _, m in self.loop.networks()]

    def _build_trainer(self, teacher_unet, cond, null, profile):
        from tdm_fast.backbones.unet import UNetAdapter
        from tdm_fast.config import PAPER_FAITHFUL, TDMConfig
        from tdm_fast.denoiser import Denoiser
        from tdm_fast.lora import LoRASettings, lora_denoisers
        from tdm_fast.perf.step_profiler import StepProfiler
        from tdm_fast.schedule import ScheduleConfig
        from tdm_fast.trainer import EmbeddingConditions, TDMTrainer

        size = SIZES[self.size]
        autocast = size.autocast
        # the authors' settings, as the official-style loop runs them (no EMA, the per-sample normaliser),
        # whatever the defaults of the day
        config = TDMConfig(**{**PAPER_FAITHFUL, **dict(
            steps=(K,), batch_size=self.batch, cfg_scale=4.5, huber_c=1e-3, total_steps=900,
            kernels="fused" if self.name == "all" else "reference", compile=self.name == "all", compile_scope=compile_scope(self.size),
            log_every=10 ** 6,
            mixed_precision="no" if autocast is None else "bf16")})
        schedule = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        teacher = Denoiser(UNetAdapter(teacher_unet), schedule, "epsilon", null_cond=null)
        student = fake = None
        if self.name != "plain-full":
            lora = LoRASettings.for_backbone("unet", rank=size.lora_rank)
            teacher, student, fake = lora_denoisers(teacher, config, lora, gradient_checkpointing=size.checkpointing)
            if autocast is not None:
                student.model.shared.cast_base(autocast)
        self.trainer = TDMTrainer(teacher, config, EmbeddingConditions(cond), (4, size.latent, size.latent),
                                  student=student, fake=fake, progress=False)
        tr = self.trainer
        inner = [tr.teacher, tr.student_core, tr.fake_core]
        self.unets = [d.model.shared.adapter.inner if hasattr(d.model, "shared") else d.model.inner for d in inner]
        self.profiler = StepProfiler(tr).attach() if profile else None
        if self.profiler is not None and self.name == "all":
            self.profiler._patch(tr, "_iterate", "other (python glue, .item(), casts)")
        self.pending = []

    def step(self) -> None:
        if self.name == "official":
            if self.timer is not None:
                with self.timer("other (python glue, .item(), casts)"):
                    self.loop.iteration()
            else:
                self.loop.iteration()
        elif self.name == "all":
            self.pending.append(self.trainer._iterate())
        else:
            self.trainer.train_step()
        self.passes.iterations += 1
        if self.cuda:
            torch.cuda.synchronize()

    def finish(self) -> None:
        """Reads the losses the ``all`` configuration left on the device (and checks them)."""
        if self.name == "all" and self.pending:
            records = self.trainer._records(self.pending)
            self.pending = []
            bad = [r for r in records if r["generator_loss"] is None or r["skipped_updates"]]
            if bad:
                raise FloatingPointError(f"non-finite TDM iterations in the 'all' configuration: {bad[:2]}")

    def reset_stats(self) -> None:
        self.passes.calls = self.passes.samples = self.passes.iterations = 0
        if self.name == "official":
            if self.timer is not None:
                self.timer.totals.clear()
        elif self.profiler is not None:
            self.profiler.reset()

    def breakdown_ms(self) -> dict:
        n = max(self.passes.iterations, 1)
        totals = self.timer.totals if self.name == "official" else dict(self.profiler.totals)
        return {k: round(1e3 * v / n, 3) for k, v in totals.items() if v > 0}


# -- peak memory -----------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_peak_memory(name: str, size: str, device: str = "cpu", iterations: int = 2) -> dict:
    """Peak memory of one configuration (see the module docstring for what is counted)."""
    if torch.device(device).type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner = Runner(name, size, device, profile=False)
        for _ in range(iterations):
            runner.step()
        runner.finish()
        peak = torch.cuda.max_memory_allocated() - base
        del runner
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_memory_mb": peak / 2**20, "peak_memory_method":
                f"torch.cuda.max_memory_allocated over build + {iterations} iterations, minus the allocation before the build"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-memory", name, "--size", size, "--iterations", str(iterations)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(name: str, size: str, iterations: int) -> dict:
    # everything the configurations import, imported before the baseline is read
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    import tdm_fast.kernels  # noqa: F401
    import tdm_fast.trainer  # noqa: F401

    base = _rss_kb("VmRSS")
    runner = Runner(name, size, "cpu", profile=False)
    runner.step()  # lazily created optimizer state; torch.compile's compilation for the compiled configuration
    first = _rss_kb("VmHWM")
    steady = _reset_peak_rss()
    for _ in range(iterations):
        runner.step()
    runner.finish()
    peak = _rss_kb("VmHWM")
    what = (f"CPU: peak RSS (VmHWM) of a fresh process over {iterations} iterations after a first one (which compiles "
            "where torch.compile is on: that transient peak is peak_memory_first_iteration_mb), minus its RSS after imports"
            if steady else f"CPU: peak RSS (VmHWM) of a fresh process over build + {iterations + 1} iterations, minus "
                           "its RSS after imports")
    return {"peak_memory_mb": ((peak if steady else max(peak, first)) - base) / 1024,
            "peak_memory_first_iteration_mb": (first - base) / 1024, "peak_memory_method": what}


def planned_memory_mb(name: str, size: str) -> float:
    """``tdm-fast plan``'s accounting of one configuration (tdm_fast/perf/plan.py) on this size's UNet, built
    on the meta device: the teacher's frozen weights; the student's and the fake score's trainable weights,
    gradients and AdamW moments (full copies, or their LoRA adapters on the shared base); the activations
    one forward with grad saves. No GPU-process overhead: it is compared with tensor memory. The
    official-style loop's full copies are planned like tdm-fast's."""
    from tdm_fast.lora import DEFAULT_TARGETS
    from tdm_fast.perf.plan import count_parameters, forward_activation_bytes, lora_parameters, network_bytes

    s = SIZES[size]
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=s.latent, **s.unet)
    cond, _ = prompt_pool(size, "meta")
    x = torch.zeros(s.batch, 4, s.latent, s.latent, device="meta")
    t = torch.zeros(s.batch, dtype=torch.long, device="meta")
    kwargs = unet_kwargs(_batched(cond, slice(0, s.batch)))
    plan = {"parameters": count_parameters(unet), "lora_parameters": lora_parameters(unet, DEFAULT_TARGETS["unet"], s.lora_rank),
            "activations": forward_activation_bytes(unet, lambda: unet(x, t, **kwargs))}
    lora = name in ("plain-lora", "all")
    # the Runner checkpoints only the LoRA roles' shared base
    total = network_bytes(plan, lora=lora, checkpointing=lora and s.checkpointing, mixed_precision=s.autocast is not None,
                          adam8bit=False, overhead_gib=0)["total"]
    return total / 2**20


def _tensor_peak_child(name: str, size: str, iterations: int) -> dict:
    """CPU tensor memory, the counterpart of CUDA's ``max_memory_allocated``: the running sum of the
    allocator's allocations and frees (torch.profiler's memory events) over build + first iteration +
    ``iterations``, its maximum."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner = Runner(name, size, "cpu", profile=False)
        for _ in range(iterations + 1):
            runner.step()
        runner.finish()
    return {"tensor_peak_memory_mb": profiled_tensor_peak_mb(prof)}


def profiled_tensor_peak_mb(prof) -> float:
    """The maximum of the running sum of a finished ``torch.profiler.profile(profile_memory=True)``'s
    allocation and free events, in MB."""
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def measure_tensor_peak(name: str, size: str, iterations: int = 2) -> dict:
    """Peak tensor memory of one configuration in a fresh process (CPU); on CUDA the peak memory already is."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tensor-peak", name, "--size", size, "--iterations", str(iterations)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--peak-memory", choices=CONFIGS, help="peak RSS (CPU) or allocated memory (CUDA) of one configuration")
    what.add_argument("--tensor-peak", choices=CONFIGS, help="CPU: peak tensor memory of one configuration")
    parser.add_argument("--size", choices=list(SIZES), default="scaled")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args(argv)
    if args.tensor_peak:
        print(json.dumps(_tensor_peak_child(args.tensor_peak, args.size, args.iterations)))
    else:
        print(json.dumps(_memory_child(args.peak_memory, args.size, args.iterations)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

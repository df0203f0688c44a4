"""Memory plan of a TDM run on a real backbone, from meta-device models (no weights, no download).

The published configs of SD1.5's UNet, SDXL's UNet, PixArt-α 1024, SD3-medium and CogVideoX-2B
are embedded below. Parameters are counted on the meta model; activations are estimated by a
meta-device forward pass with grad that sums the bytes autograd saves for backward (each storage
once, the weights excluded; with gradient checkpointing: what is saved outside the checkpointed
blocks, plus one block's worth recomputed); optimizer state is AdamW's two moments (fp32, or 1 byte each with 8-bit Adam).

Accounting per network (LoRA: one base shared by all three; the adapters are the trainable part):
- teacher: the frozen weights (fp32, or bf16/fp16 with mixed precision).
- student, fake: trainable weights (fp32), their gradients (fp32), AdamW state, and during their own
  update the activations of one forward pass with grad.
The peak holds every weight and optimizer state but one update's gradients and activations: the fake-score
and generator updates run one after the other, and each frees its gradients (``zero_grad(set_to_none=True)``)
and activations before the next. The no-grad teacher/CFG passes are transient. Checked against measured
tensor memory by ``tdm-fast bench training`` (bench/sd15_comparison.py).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

GIB = 1024**3
OVERHEAD_GIB = 1.5  # CUDA context, allocator fragmentation, kernels' workspaces

PLAN_CONFIGS = {
    "sd15": ("UNet2DConditionModel", {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    }),
    "sdxl": ("UNet2DConditionModel", {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
        "use_linear_projection": True, "norm_num_groups": 32,
    }),
    "pixart": ("PixArtTransformer2DModel", {
        "sample_size": 128, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16, "in_channels": 4,
        "out_channels": 8, "patch_size": 2, "caption_channels": 4096, "cross_attention_dim": 1152,
        "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000, "upcast_attention": False, "dropout": 0.0, "attention_bias": True,
    }),
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
    }),
    "cogvideox": ("CogVideoXTransformer3DModel", {
        "num_attention_heads": 30, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16, "time_embed_dim": 512,
        "text_embed_dim": 4096, "num_layers": 30, "sample_width": 90, "sample_height": 60, "sample_frames": 49,
        "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 226, "flip_sin_to_cos": True,
        "freq_shift": 0, "use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": False,
    }),
}
PUBLISHED = {"sd15": "runwayml/stable-diffusion-v1-5 (UNet)", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0 (UNet)",
             "pixart": "PixArt-alpha/PixArt-XL-2-1024-MS (transformer)", "sd3": "stabilityai/stable-diffusion-3-medium-diffusers (transformer)",
             "cogvideox": "THUDM/CogVideoX-2b (transformer)"}
# text-condition shapes (tokens, width) and extras per preset
_TEXT = {"sd15": (77, 768), "sdxl": (77, 2048), "pixart": (120, 4096), "sd3": (333, 4096), "cogvideox": (226, 4096)}


def build_meta_model(preset: str):
    import diffusers

    class_name, config = PLAN_CONFIGS[preset]
    with torch.device("meta"):
        return getattr(diffusers, class_name).from_config(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def is_lora_target(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module's name, or its last dotted parts, is one of them."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_parameters(model, targets, rank: int) -> int:
    total = 0
    for name, module in model.named_modules():
        if not is_lora_target(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):  # peft: a down conv of the layer's kernel, a 1x1 up conv
            total += rank * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
    return total


class _SavedBytes:
    """Bytes autograd saves for backward, each storage once: a tensor saved by several ops (a norm's
    input that a convolution also saves, views of one buffer) is held once, and the model's own
    parameters and buffers are weights, counted as such."""

    def __init__(self, model):
        self.bytes = 0
        self._seen = {t.untyped_storage()._cdata for t in itertools.chain(model.parameters(), model.buffers())}

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


@contextmanager
def _counting(model):
    counter = _SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        yield counter


def _meta_inputs(preset: str, model, batch: int, resolution, num_frames: int):
    from ..backbones.presets import VIDEO_SIZE, get_preset

    p = get_preset(preset)
    if resolution is None:
        resolution = VIDEO_SIZE if p.video else p.resolution
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    c = model.config.in_channels
    tokens, width = _TEXT[preset]
    meta = dict(device="meta")
    t = torch.zeros(batch, dtype=torch.long, **meta)
    text = torch.zeros(batch, tokens, width, **meta)
    if preset == "cogvideox":
        x = torch.zeros(batch, (num_frames - 1) // 4 + 1, c, h // 8, w // 8, **meta)
        return lambda: model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
    x = torch.zeros(batch, c, h // 8, w // 8, **meta)
    if preset == "sd15":
        return lambda: model(x, t, encoder_hidden_states=text).sample
    if preset == "sdxl":
        added = {"text_embeds": torch.zeros(batch, 1280, **meta), "time_ids": torch.zeros(batch, 6, **meta)}
        return lambda: model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    if preset == "pixart":
        added = {"resolution": torch.zeros(batch, 2, **meta), "aspect_ratio": torch.zeros(batch, 1, **meta)}
        return lambda: model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
    if preset == "sd3":
        pooled = torch.zeros(batch, 2048, **meta)
        return lambda: model(hidden_states=x, timestep=t.float(), encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
    raise ValueError(preset)


@contextmanager
def _fused_attention():
    """On the meta device ``scaled_dot_product_attention`` takes its math path, which saves the
    (tokens x tokens) attention probabilities; training runs a fused kernel (flash attention on GPUs, its
    CPU twin on CPUs) that saves only the outputs and one log-sum-exp per query. The CPU kernel, which has
    a meta implementation, stands in for all of them while counting."""
    functional = torch.nn.functional
    math_path = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa or query.dim() != 4:
            return math_path(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = math_path


def saved_activation_bytes(model, forward) -> int:
    """Bytes that ``forward()``, one pass with grad through ``model`` (meta tensors suffice), saves for
    backward, attention counted as the fused kernel that training runs."""
    with _counting(model) as saved, _fused_attention():
        forward()
    return saved.bytes


def activation_bytes(preset: str, model, batch: int, resolution=None, num_frames: int = 49) -> dict:
    """fp32 bytes saved for backward by one forward with grad: without and with gradient checkpointing."""
    return forward_activation_bytes(model, _meta_inputs(preset, model, batch, resolution, num_frames))


def forward_activation_bytes(model, run) -> dict:
    """What :func:`activation_bytes` counts, for any forward closure ``run`` through a diffusers ``model``."""
    full_bytes = saved_activation_bytes(model, run)
    calls = []

    def checkpoint(module, *args):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, preserve_rng_state=False)

    model.enable_gradient_checkpointing(checkpoint)
    try:
        outside_bytes = saved_activation_bytes(model, run)
    finally:
        model.disable_gradient_checkpointing()
    per_block = (full_bytes - outside_bytes) / max(len(calls), 1)
    return {"none": full_bytes, "checkpointing": outside_bytes + 2 * per_block, "checkpointed_blocks": len(calls)}


def memory_plan(preset: str, batch: int = 1, resolution=None, num_frames: int = 49, lora_rank: int | None = None,
                activations: bool = True) -> dict:
    from ..backbones.presets import get_preset
    from ..lora import DEFAULT_RANK, DEFAULT_TARGETS

    model = build_meta_model(preset)
    params = count_parameters(model)
    backbone = get_preset(preset).backbone
    rank = lora_rank or DEFAULT_RANK[backbone]
    lora = lora_parameters(model, DEFAULT_TARGETS[backbone], rank)
    act = activation_bytes(preset, model, batch, resolution, num_frames) if activations else None
    return {"preset": preset, "published": PUBLISHED[preset], "model_class": PLAN_CONFIGS[preset][0], "parameters": params,
            "lora_parameters": lora, "lora_rank": rank, "batch": batch, "activations": act}


def network_bytes(plan: dict, lora: bool, checkpointing: bool, mixed_precision: bool, adam8bit: bool,
                  overhead_gib: float = OVERHEAD_GIB) -> dict:
    """Bytes per network and the peak total (see the module docstring; ``overhead_gib`` for what a GPU
    process holds beside the tensors) for one combination of memory savers."""
    p, lp = plan["parameters"], plan["lora_parameters"]
    frozen = 2 if mixed_precision else 4
    opt = 2 if adam8bit else 8
    act = plan["activations"]
    act_bytes = 0.0
    if act is not None:
        act_bytes = act["checkpointing" if checkpointing else "none"] * (0.5 if mixed_precision else 1.0)
    if lora:
        trainable = lp  # each role (student, fake) has its own rank-r adapter
        teacher = {"weights": p * frozen, "grads": 0, "optimizer": 0, "activations": 0}
        student = {"weights": trainable * 4, "grads": trainable * 4, "optimizer": trainable * opt, "activations": act_bytes}
        fake = {"weights": trainable * 4, "grads": trainable * 4, "optimizer": trainable * opt, "activations": act_bytes}
    else:
        teacher = {"weights": p * frozen, "grads": 0, "optimizer": 0, "activations": 0}
        student = {"weights": p * 4, "grads": p * 4, "optimizer": p * opt, "activations": act_bytes}
        fake = {"weights": p * 4, "grads": p * 4, "optimizer": p * opt, "activations": act_bytes}
    nets = {"teacher": teacher, "student": student, "fake": fake}
    resident = sum(d["weights"] + d["optimizer"] for d in nets.values())
    one_update = max(d["grads"] + d["activations"] for d in nets.values())
    total = resident + one_update + overhead_gib * GIB
    return {"networks": nets, "total": total}


def format_plan(plan: dict, gpu_memory_gib: float = 80.0) -> str:
    lines = [
        f"TDM memory plan: {plan['preset']} — {plan['model_class']} as published: {plan['published']}",
        f"parameters: {plan['parameters'] / 1e6:,.1f} M   LoRA (rank {plan['lora_rank']}, per adapter): {plan['lora_parameters'] / 1e6:,.2f} M",
        f"batch per GPU: {plan['batch']}",
    ]
    act = plan["activations"]
    if act is not None:
        lines.append(f"activations saved by one forward with grad (fp32, attention as a fused kernel): {act['none'] / GIB:,.2f} GiB; "
                     f"with gradient checkpointing: {act['checkpointing'] / GIB:,.2f} GiB ({act['checkpointed_blocks']} blocks)")
    else:
        lines.append("activations: not estimated (--no-activations)")
    base = network_bytes(plan, lora=True, checkpointing=True, mixed_precision=True, adam8bit=False)
    lines.append("")
    lines.append("per network, LoRA + checkpointing + bf16 (GiB):   weights   grads   optimizer   activations")
    for name, d in base["networks"].items():
        lines.append(f"  {name:<8}{'':40}{d['weights'] / GIB:8.2f}{d['grads'] / GIB:8.2f}{d['optimizer'] / GIB:12.2f}{d['activations'] / GIB:14.2f}")
    lines.append("")
    lines.append(f"fits in {gpu_memory_gib:g} GiB?  (total incl. {OVERHEAD_GIB} GiB overhead)")
    lines.append(f"  {'LoRA':<6}{'ckpt':<6}{'bf16':<6}{'8bit':<6}{'total GiB':>10}  fits")
    for lora, ckpt, mp, a8 in itertools.product((True, False), repeat=4):
        total = network_bytes(plan, lora, ckpt, mp, a8)["total"] / GIB
        mark = lambda b: "on" if b else "off"  # noqa: E731
        fits = "yes" if total <= gpu_memory_gib else "no"
        if act is None:
            fits += " (without activations)"
        lines.append(f"  {mark(lora):<6}{mark(ckpt):<6}{mark(mp):<6}{mark(a8):<6}{total:10.1f}  {fits}")
    return "\n".join(lines)


# (label, LoRA roles, gradient checkpointing, bf16, 8-bit Adam) of the README's plan table
TABLE_CONFIGURATIONS = (
    ("full copies, fp32", False, False, False, False),
    ("full copies, bf16", False, False, True, False),
    ("full copies, bf16 + checkpointing + 8-bit Adam", False, True, True, True),
    ("LoRA roles, fp32", True, False, False, False),
    ("LoRA roles, fp32 + checkpointing", True, True, False, False),
    ("LoRA roles, bf16", True, False, True, False),
    ("LoRA roles, bf16 + checkpointing", True, True, True, False),
)
TABLE_COLUMNS = (("sd15", 1), ("sd15", 8), ("sdxl", 1), ("sdxl", 4))


def plan_table(columns=TABLE_COLUMNS, configurations=TABLE_CONFIGURATIONS) -> str:
    """The README's markdown table: tensor memory (GiB, no GPU-process overhead) of every configuration
    per (preset, batch), from :func:`memory_plan` and :func:`network_bytes`."""
    plans = [memory_plan(preset, batch) for preset, batch in columns]
    lines = ["| configuration | " + " | ".join(f"{p} batch {b}" for p, b in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, lora, checkpointing, bf16, adam8bit in configurations:
        cells = [network_bytes(plan, lora, checkpointing, bf16, adam8bit, overhead_gib=0)["total"] / GIB for plan in plans]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tdm_fast.perf.plan: the README's plan table
    print(plan_table())

"""The embedded default teacher: a class-conditional UNet on scikit-learn's 8×8 handwritten digits.

Everything here runs offline on a CPU in minutes: the data set ships inside scikit-learn
(``sklearn.datasets.load_digits``, 1,797 images of 8×8 pixels with 17 grey levels), the network has
about 0.4 M parameters, and its trained weights ship inside the package (``tdm_fast/assets``), so
``tdm-fast demo`` distils without retraining the teacher.

- Images stay at their native 8×8 resolution (upsampling adds no information and costs 4× the
  compute), scaled to [-1, 1], one channel.
- A fixed, stratified split keeps ``HELDOUT_SIZE`` images out of all training (teacher and
  classifier); the classifier's accuracy is measured on them.
- The teacher is ε-predicting under the SD scaled-linear schedule (β 0.00085→0.012, T = 1000), with
  class dropout to the null class ``NUM_CLASSES`` so that classifier-free guidance works; it is
  distilled with ``DIGITS_CFG_SCALE``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_folder
from ..denoiser import Denoiser, denoising_loss
from ..schedule import ScheduleConfig
from ..usage import UsageError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 8
HELDOUT_SIZE = 297  # 1,797 = 1,500 train + 297 held out
SPLIT_SEED = 0
DIGITS_SCHEDULE = ScheduleConfig(kind="vp", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIGITS_CFG_SCALE = 2.0
ASSETS = Path(__file__).parent.parent / "assets"
TEACHER_ASSET = "digits_teacher"


# -- data ------------------------------------------------------------------------------------------
def load_digits_tensors(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] (float32) and labels (N,), for ``split`` 'train', 'heldout' or 'all'.

    The split is stratified and fixed (seed ``SPLIT_SEED``): the same on every machine.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # an extra since the toy and text-to-image paths do not need it
        raise UsageError("the digits data comes from scikit-learn, which is not installed: "
                         "pip install 'tdm-fast[digits]'") from exc

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if split == "all":
        return images, labels
    idx = np.arange(len(labels))
    train_idx, held_idx = train_test_split(
        idx, test_size=HELDOUT_SIZE, random_state=SPLIT_SEED, stratify=data.target
    )
    if split == "train":
        chosen = np.sort(train_idx)
    elif split == "heldout":
        chosen = np.sort(held_idx)
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    chosen = torch.from_numpy(chosen)
    return images[chosen], labels[chosen]


def to_display(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] for plotting."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def thicken(images: torch.Tensor, amount: float = 1.0) -> torch.Tensor:
    """Stroke-thickened digits (a 3×3 max-pool dilation, blended by ``amount``): a customised style."""
    dilated = F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    return images + amount * (dilated - images)


# -- the network -----------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DigitsUNet(ModelMixin, ConfigMixin):
    """A two-resolution UNet (8×8 → 4×4) predicting ε: ``model(x_t, t, labels)``.

    Label ``num_classes`` is the null class. The timestep embedding ``time_embed`` (named in
    ``time_embedding_module``) is where a steps-aware student adds its embedding of K.
    """

    time_embedding_module = "time_embed"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int] = (32, 64),
        emb_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        groups: int = 8,
        sample_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        c0, c1 = channels
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, emb_dim, groups)
        self.downsample = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim, groups)
        self.mid = ResBlock(c1, c1, emb_dim, groups)
        self.up1 = ResBlock(2 * c1, c1, emb_dim, groups)
        self.upsample = nn.Conv2d(c1, c0, 3, padding=1)
        self.up0 = ResBlock(2 * c0, c0, emb_dim, groups)
        self.norm_out = nn.GroupNorm(min(groups, c0), c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one sample (what ``tdm-fast sample``/``distill`` read)."""
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c0 = self.config.channels[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_embed(timestep_features(t, c0).to(x_t.dtype)) + self.class_embed(labels.long())
        emb = F.silu(emb)
        h0 = self.down0(self.conv_in(x_t), emb)
        h1 = self.down1(self.downsample(h0), emb)
        h = self.mid(h1, emb)
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def digits_denoiser(model: DigitsUNet | None = None) -> Denoiser:
    """Wraps a :class:`DigitsUNet` (a fresh one by default) as an ε-predicting denoiser with null class."""
    return Denoiser(model if model is not None else DigitsUNet(), DIGITS_SCHEDULE, "epsilon", null_cond=NULL_CLASS)


def save_teacher_asset(teacher: Denoiser, stem: str | Path, info: dict | None = None) -> None:
    """Flat shipping format (``stem``.safetensors + ``stem``.json), matched by the package-data globs."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(stem.with_suffix(".safetensors")))
    meta = {"model_config": {k: v for k, v in dict(teacher.model.config).items() if not k.startswith("_")},
            "schedule": teacher.schedule.config.to_dict(), "prediction_type": teacher.prediction_type,
            "null_cond": teacher.null_cond, "training": info or getattr(teacher, "training_info", None)}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_digits_teacher(path: str | Path | None = None) -> Denoiser:
    """The shipped teacher (``tdm_fast/assets/digits_teacher.*``), or a saved denoiser folder at ``path``."""
    if path is not None:
        path = Path(path)
        if not (path / "denoiser.json").is_file():
            raise FileNotFoundError(f"{path} is not a saved denoiser; train one with `tdm-fast teacher train --dataset digits`")
        teacher = Denoiser.from_pretrained(path)
        shape = getattr(teacher.model, "sample_shape", None)
        if shape is None or tuple(shape) != (1, IMAGE_SIZE, IMAGE_SIZE) or teacher.null_cond != NULL_CLASS:
            raise ValueError(f"{path} is not a digits teacher: it samples {tuple(shape) if shape is not None else 'an unknown shape'} "
                             f"with null class {teacher.null_cond!r}, a digits teacher (1, {IMAGE_SIZE}, {IMAGE_SIZE}) with {NULL_CLASS}")
        return teacher.eval().requires_grad_(False)
    from safetensors.torch import load_file

    stem = ASSETS / TEACHER_ASSET
    meta = json.loads(stem.with_suffix(".json").read_text())
    config = dict(meta["model_config"])
    config["channels"] = tuple(config["channels"])
    model = DigitsUNet(**config)
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
    teacher = Denoiser(model, ScheduleConfig(**meta["schedule"]), meta["prediction_type"], null_cond=meta["null_cond"])
    teacher.training_info = meta.get("training")
    return teacher.eval().requires_grad_(False)


# -- teacher training ------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 0) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels (zero padding at -1, the background)."""
    if max_shift <= 0:
        return images
    b = images.shape[0]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(IMAGE_SIZE))[:, :, None]
    cols = (dx[:, None] + torch.arange(IMAGE_SIZE))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_digits_teacher(
    output_dir: str | Path | None = None,
    iterations: int = 2500,
    batch_size: int = 128,
    lr: float = 2e-3,
    cond_dropout: float = 0.15,
    ema_decay: float = 0.999,
    seed: int = 0,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    init: Denoiser | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> Denoiser:
    """Trains the digits teacher on the training split (seeded, reproducible); returns the EMA model.

    With ``init`` it fine-tunes that denoiser instead of a fresh digits UNet (see :func:`finetune_variant`),
    or with ``fresh=True`` trains that untrained network (the other built-in teachers);
    ``images``/``labels`` replace the training split. Saves to ``output_dir`` when given
    (``Denoiser.save_pretrained`` plus ``training.json``, and the flat ``digits_teacher.safetensors/.json``
    that ships in ``tdm_fast/assets``: copy those two files there to replace the shipped teacher).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if images is None:
        images, labels = load_digits_tensors("train")
    teacher = copy.deepcopy(init) if init is not None else digits_denoiser(DigitsUNet())
    model = teacher.model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, iterations // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))
    )
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc="digits teacher", disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = denoising_loss(teacher, images[idx], labels[idx], generator, cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    teacher.model = ema
    teacher.eval().requires_grad_(False)
    info = {
        "iterations": iterations, "batch_size": batch_size, "lr": lr, "cond_dropout": cond_dropout,
        "ema_decay": ema_decay, "seed": seed, "final_loss_ema": running, "wall_s": time.perf_counter() - start,
        "train_images": int(images.shape[0]), "finetuned": init is not None and not fresh,
        "parameters": sum(p.numel() for p in ema.parameters()),
    }
    teacher.training_info = info
    if output_dir is not None:
        with atomic_folder(output_dir) as folder:  # a kill or a full disk leaves the previous teacher folder whole
            teacher.save_pretrained(folder)
            (folder / "training.json").write_text(json.dumps(info, indent=2))
            save_teacher_asset(teacher, folder / TEACHER_ASSET, info)  # the flat form shipped in tdm_fast/assets
    return teacher


def finetune_variant(
    teacher: Denoiser,
    output_dir: str | Path | None = None,
    iterations: int = 1500,
    lr: float = 5e-4,
    seed: int = 1,
    amount: float = 1.0,
    progress: bool = True,
) -> Denoiser:
    """A customised teacher: ``teacher`` fine-tuned on stroke-thickened training digits (paper Table 2)."""
    images, labels = load_digits_tensors("train")
    return train_digits_teacher(
        output_dir, iterations=iterations, lr=lr, seed=seed, images=thicken(images, amount), labels=labels,
        init=teacher, progress=progress,
    )

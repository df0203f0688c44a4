"""Tiny trained text-to-image pipelines of stock diffusers classes, on the digits data.

Two pipeline folders that load offline with the stock diffusers classes and draw recognisable
digits from prompts such as "a handwritten digit seven":

- ``sd15``: :class:`~diffusers.AutoencoderKL` (trained) + :class:`~transformers.CLIPTextModel` and
  :class:`~transformers.CLIPTokenizer` (tiny, fixed random weights) + :class:`~diffusers.UNet2DConditionModel`
  with cross-attention (trained, ε-prediction, empty-prompt dropout for classifier-free guidance) +
  :class:`~diffusers.DDIMScheduler` configured as SD1.5 ships it. ``StableDiffusionPipeline.from_pretrained(DIR)``.
- ``sd3``: :class:`~diffusers.SD3Transformer2DModel` (trained with the rectified-flow objective) +
  :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (shift 3) + the same VAE with SD3's
  ``shift_factor``/``scaling_factor`` + two tiny ``CLIPTextModelWithProjection`` + a tiny
  ``T5EncoderModel``. ``StableDiffusion3Pipeline.from_pretrained(DIR)``.

Data: the digits training split (:func:`tdm_fast.demos.digits.load_digits_tensors`) upsampled 8×8 → 16×16
(nearest, so the VAE's 2× downsampling puts one latent pixel on each original pixel), one channel,
in [-1, 1]. Each class has :data:`TEMPLATES` phrasings ("the number 7", "a drawing of the digit
seven", ...) over a small word vocabulary; the tokenizers know exactly those words (one token each).

Text lengths: the CLIP tokenizers pad to :data:`CLIP_LENGTH` = 16 tokens (their
``model_max_length``, which the stock pipelines use), and the SD3 folder is trained and meant to be
called with ``max_sequence_length=T5_LENGTH`` (16) for its T5 encoder.

The trained folders ship in ``tdm_fast/assets/t2i/<name>/`` (:func:`shipped_pipeline`); rebuild one
with ``tdm-fast teacher train --dataset digits-t2i --pipeline sd15|sd3 --out DIR``. Quality is
measured by :func:`pipeline_accuracy`: the shipped digits classifier's accuracy on the pipeline's
images (16×16 → 8×8 by 2×2 average pooling, in [-1, 1]).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_folder
from .digits import ASSETS, NUM_CLASSES, load_digits_tensors

PIPELINES = ("sd15", "sd3")
IMAGE_SIZE = 16
VAE_FACTOR = 2
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
LATENT_CHANNELS = 4
CLIP_LENGTH = 16  # the CLIP tokenizers' model_max_length (what the pipelines pad to)
T5_LENGTH = 16  # max_sequence_length for the SD3 folder's T5 encoder
SD15_CFG = 4.5
SD3_CFG = 5.0
SD3_SHIFT = 3.0
T2I_ASSETS = ASSETS / "t2i"
DEFAULT_VAE_ITERATIONS = 400

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit as a word, {n}: as a numeral
TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "a drawing of the digit {w}",
    "handwritten {n}",
    "the digit {w}",
    "a picture of the number {w}",
    "a handwritten {n}",
    "number {w}",
)


# -- prompts and data ----------------------------------------------------------------------------
def class_prompts(label: int) -> list[str]:
    """The phrasings of one class."""
    return [t.format(w=DIGIT_WORDS[label], n=str(label)) for t in TEMPLATES]


def prompt_table() -> tuple[list[str], torch.Tensor]:
    """All prompts (class-major: class c has prompts c*len(TEMPLATES) ...) and their labels."""
    prompts, labels = [], []
    for c in range(NUM_CLASSES):
        prompts += class_prompts(c)
        labels += [c] * len(TEMPLATES)
    return prompts, torch.tensor(labels)


def vocabulary() -> list[str]:
    """Every word of every prompt (the tokenizers' word list)."""
    words = {w for p in prompt_table()[0] for w in p.split()}
    return sorted(words)


def write_prompt_file(path: str | Path) -> Path:
    """All prompts, one per line (the ``--prompts`` file of ``tdm-fast distill --preset``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompt_table()[0]) + "\n")
    return path


def upsample(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) → (N, 1, 16, 16), nearest (each pixel becomes a 2×2 block)."""
    return F.interpolate(images, scale_factor=VAE_FACTOR, mode="nearest")


def to_digits8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images (N, 1, 16, 16) in [-1, 1] → the classifier's (N, 1, 8, 8) by 2×2 average pooling."""
    return F.avg_pool2d(images.float(), VAE_FACTOR).clamp(-1, 1)


def load_t2i_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits at 16×16 in [-1, 1] (N, 1, 16, 16) and their labels."""
    images, labels = load_digits_tensors(split)
    return upsample(images), labels


# -- tokenizers and text encoders (tiny, fixed random weights) ---------------------------------
def clip_tokenizer(words: list[str] | None = None, max_length: int = CLIP_LENGTH):
    """A CLIPTokenizer whose vocabulary holds the byte characters and every word of ``words`` as
    one token (BPE merges built left to right), BOS/EOS last; pads with EOS as CLIP does."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = list(words or vocabulary())
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    for w in words:
        if tok.tokenize(w) != [w + "</w>"]:
            raise RuntimeError(f"the digits CLIP tokenizer splits {w!r} into {tok.tokenize(w)}")
    return tok


def t5_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``words``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words or vocabulary():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def clip_text_encoder(vocab_size: int, projection: bool = False, seed: int = 1, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, projection_dim=hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval().requires_grad_(False)


def t5_text_encoder(vocab_size: int, seed: int = 3, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5EncoderModel(cfg).eval().requires_grad_(False)


# -- the VAE -----------------------------------------------------------------------------------
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    )


def train_vae(iterations: int = DEFAULT_VAE_ITERATIONS, batch_size: int = 64, lr: float = 2e-3, kl_weight: float = 1e-3, seed: int = 0,
              progress: bool = True):
    """Trains the AutoencoderKL on the 16×16 training digits (MSE + ``kl_weight`` · KL, per element).

    Sets ``scaling_factor`` = 1 / std of the posterior samples of the training set (SD1.5's rule) and
    returns ``(vae, info)``; ``info`` has the latents' mean and std (SD3's ``shift_factor`` is the mean).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_t2i_images("train")
    vae = make_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations, pct_start=0.1)
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc="digits-t2i VAE", disable=not progress)
    for step in bar:
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval().requires_grad_(False)
    mean, std = encode_latent_stats(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=g)
    info = {"iterations": iterations, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "wall_s": time.perf_counter() - start, "latent_mean": float(z.mean()), "latent_std": float(z.std())}
    with torch.no_grad():
        recon = vae.decode(mean).sample.clamp(-1, 1)
    info["recon_mse"] = float(F.mse_loss(recon, images))
    from ..eval.classifier import accuracy, load_classifier

    info["recon_accuracy"] = accuracy(load_classifier(), to_digits8(recon), labels)
    vae.register_to_config(scaling_factor=1.0 / info["latent_std"])
    return vae, info


@torch.no_grad()
def encode_latent_stats(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled latents) of ``images``."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        d = vae.encode(images[i:i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# -- the denoisers -----------------------------------------------------------------------------
def make_unet(cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )


def make_sd3_transformer(joint_attention_dim: int = 64, pooled_projection_dim: int = 64):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=64, pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=LATENT_SIZE,
    )


def sd15_scheduler():
    """DDIMScheduler as SD1.5 ships its config (scaled-linear β 0.00085→0.012, steps_offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)


def assemble_pipeline(name: str, vae, denoiser=None):
    """The stock pipeline object of ``name`` around ``vae`` and ``denoiser`` (fresh text encoders:
    fixed seeds, so every build has the same ones)."""
    import diffusers

    words = vocabulary()
    tok = clip_tokenizer(words)
    vocab = len(tok.get_vocab())
    if name == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=clip_text_encoder(vocab, seed=1), tokenizer=tok, unet=denoiser if denoiser is not None else make_unet(),
            scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if name == "sd3":
        t5_tok = t5_tokenizer(words)
        return diffusers.StableDiffusion3Pipeline(
            transformer=denoiser if denoiser is not None else make_sd3_transformer(), scheduler=sd3_scheduler(), vae=vae,
            text_encoder=clip_text_encoder(vocab, projection=True, seed=1), tokenizer=tok,
            text_encoder_2=clip_text_encoder(vocab, projection=True, seed=2), tokenizer_2=clip_tokenizer(words),
            text_encoder_3=t5_text_encoder(len(t5_tok.get_vocab()), seed=3), tokenizer_3=t5_tok,
        )
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {name!r}")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """What the stock pipeline feeds its denoiser for ``prompts`` (SD1.5: ``encoder_hidden_states``;
    SD3: also ``pooled_projections``), computed with its own ``encode_prompt``."""
    import diffusers

    if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
        c, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
                                             max_sequence_length=T5_LENGTH)
        return {"encoder_hidden_states": c, "pooled_projections": pooled}
    c, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    return {"encoder_hidden_states": c}


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_denoiser(name: str, pipe, latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor,
                   iterations: int, batch_size: int = 128, lr: float = 2e-3, cond_dropout: float = 0.1,
                   ema_decay: float = 0.999, seed: int = 0, progress: bool = True):
    """Trains the pipeline's UNet (ε-prediction, DDPM loss at uniform t) or SD3 transformer
    (rectified flow: x_σ = (1-σ) x0 + σ ε, target ε - x0, σ = shift(u) with u uniform, timestep σ·1000)
    on model-space latents ``(z - shift_factor) · scaling_factor``; prompts are drawn per sample among
    its class's phrasings, replaced by the empty prompt at rate ``cond_dropout``. Returns the EMA model."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompts, prompt_labels = prompt_table()
    emb = encode_prompts(pipe, prompts + [""])
    null_index = len(prompts)
    per_class = len(TEMPLATES)
    vae_cfg = pipe.vae.config
    scale, shift = float(vae_cfg.scaling_factor), float(getattr(vae_cfg, "shift_factor", None) or 0.0)
    model = (pipe.unet if name == "sd15" else pipe.transformer).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, iterations // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations)))
    if name == "sd15":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    start = time.perf_counter()
    running = None
    bar = tqdm(range(iterations), desc=f"digits-t2i {name}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, latent_mean.shape[0], (batch_size,), generator=g)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)
        x0 = (z - shift) * scale
        which = labels[idx] * per_class + torch.randint(0, per_class, (batch_size,), generator=g)
        which = torch.where(torch.rand(batch_size, generator=g) < cond_dropout, torch.full_like(which, null_index), which)
        cond = {k: v[which] for k, v in emb.items()}
        noise = torch.randn(x0.shape, generator=g)
        if name == "sd15":
            t = torch.randint(0, 1000, (batch_size,), generator=g)
            a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
            pred = model(a * x0 + s * noise, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
            target = noise
        else:
            u = torch.rand(batch_size, generator=g)
            sigma = SD3_SHIFT * u / (1 + (SD3_SHIFT - 1) * u)
            sv = sigma.view(-1, 1, 1, 1)
            pred = model(hidden_states=(1 - sv) * x0 + sv * noise, timestep=sigma * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                         pooled_projections=cond["pooled_projections"]).sample
            target = noise - x0
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    info = {"iterations": iterations, "batch_size": batch_size, "lr": lr, "cond_dropout": cond_dropout, "ema_decay": ema_decay,
            "seed": seed, "final_loss_ema": running, "wall_s": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in ema.parameters())}
    return ema, info


# -- building, shipping, loading -----------------------------------------------------------------
DEFAULT_ITERATIONS = {"sd15": 2000, "sd3": 2000}


def build_pipeline(name: str, out: str | Path, iterations: int | None = None, vae_iterations: int | None = None,
                   batch_size: int = 128, lr: float = 2e-3, cond_dropout: float = 0.1, seed: int = 0,
                   progress: bool = True, evaluate: int = 0, threads: int | None = 2) -> dict:
    """Trains the VAE and the denoiser of ``name`` ('sd15' or 'sd3') and writes a diffusers pipeline
    folder to ``out`` (safetensors) with ``build.json`` (settings, wall-clock times; with
    ``evaluate`` > 0 also the classifier accuracy of that many 50-step CFG images). Returns the build info.

    ``threads``: torch CPU threads (2 by default; on a machine shared with other jobs, 1 thread can be
    several times faster than 2, whose OpenMP barriers stall whenever one thread is descheduled).
    """
    if name not in PIPELINES:
        raise ValueError(f"--pipeline must be one of {PIPELINES}, got {name!r}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    t0, cpu0 = time.perf_counter(), time.process_time()
    vae, vae_info = train_vae(vae_iterations or DEFAULT_VAE_ITERATIONS, seed=seed, progress=progress)
    if name == "sd3":
        shift = vae_info["latent_mean"]
        images, _ = load_t2i_images("train")
        mean, std = encode_latent_stats(vae, images)
        z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / float((z - shift).std()))
    pipe = assemble_pipeline(name, vae)
    images, labels = load_t2i_images("train")
    mean, std = encode_latent_stats(vae, images)
    denoiser, den_info = train_denoiser(name, pipe, mean, std, labels, iterations or DEFAULT_ITERATIONS[name], batch_size=batch_size,
                                        lr=lr, cond_dropout=cond_dropout, seed=seed, progress=progress)
    if name == "sd15":
        pipe.unet = denoiser
    else:
        pipe.transformer = denoiser
    pipe.register_modules(**{"unet" if name == "sd15" else "transformer": denoiser})
    with atomic_folder(out) as folder:  # a kill or a full disk leaves the previous pipeline folder whole
        pipe.save_pretrained(folder, safe_serialization=True)
        info = {
            "pipeline": name, "seed": seed, "vae": vae_info, "denoiser": den_info,
            "build_wall_s": time.perf_counter() - t0, "build_cpu_s": time.process_time() - cpu0, "threads": torch.get_num_threads(),
            "scaling_factor": float(vae.config.scaling_factor), "shift_factor": getattr(vae.config, "shift_factor", None),
            "clip_length": CLIP_LENGTH, "t5_length": T5_LENGTH if name == "sd3" else None,
            "cfg_scale": SD15_CFG if name == "sd15" else SD3_CFG,
        }
        if evaluate:
            loaded = load_pipeline(folder)
            info["eval"] = pipeline_accuracy(loaded, samples=evaluate, steps=50, guidance_scale=info["cfg_scale"], progress=progress)
        (folder / "build.json").write_text(json.dumps(info, indent=2))
    return info


def shipped_pipeline(name: str) -> Path:
    """The folder of a shipped pipeline ('sd15' or 'sd3') inside the package."""
    if name not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {name!r}")
    path = T2I_ASSETS / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `tdm-fast teacher train --dataset digits-t2i --pipeline {name} --out {path}`")
    return path


def pipeline_kind(path: str | Path) -> str:
    """'sd15' or 'sd3' from a folder's model_index.json."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    if cls == "StableDiffusionPipeline":
        return "sd15"
    if cls == "StableDiffusion3Pipeline":
        return "sd3"
    raise ValueError(f"{path} holds a {cls}, not a StableDiffusionPipeline or StableDiffusion3Pipeline")


def load_pipeline(path: str | Path):
    """The stock pipeline of a folder (a name 'sd15'/'sd3' means the shipped one), offline, on the CPU."""
    import diffusers

    if str(path) in PIPELINES:
        path = shipped_pipeline(str(path))
    kind = pipeline_kind(path)
    if kind == "sd15":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                                requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- sampling and scoring through the stock pipeline --------------------------------------------
def eval_prompts(samples: int, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Balanced evaluation inputs: prompts (class i % 10, a random phrasing, shuffled), labels and
    the initial latents (N, 4, 8, 8), all from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(samples) % NUM_CLASSES)[torch.randperm(samples, generator=g)]
    phrasing = torch.randint(0, len(TEMPLATES), (samples,), generator=g)
    prompts = [class_prompts(int(c))[int(p)] for c, p in zip(labels, phrasing)]
    latents = torch.randn(samples, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=g)
    return prompts, labels, latents


@torch.no_grad()
def generate(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance_scale: float, batch: int = 500,
             output_type: str = "pt", **kwargs) -> torch.Tensor:
    """Images (N, 1, 16, 16) in [-1, 1] from the stock pipeline (``output_type="latent"``: its latents)."""
    import diffusers

    extra = {"max_sequence_length": T5_LENGTH} if isinstance(pipe, diffusers.StableDiffusion3Pipeline) else {}
    extra.update(kwargs)
    outs = []
    for i in range(0, len(prompts), batch):
        out = pipe(prompt=prompts[i:i + batch], latents=latents[i:i + batch].clone(), num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type=output_type, **extra).images
        outs.append(out if output_type == "latent" else out * 2 - 1)
    return torch.cat(outs).float()


def pipeline_accuracy(pipe, samples: int = 200, steps: int = 50, guidance_scale: float | None = None, seed: int = 0,
                      progress: bool = False) -> dict:
    """Class accuracy (shipped digits classifier) of the pipeline's images for balanced prompts."""
    from ..eval.classifier import accuracy, load_classifier

    if guidance_scale is None:
        guidance_scale = SD3_CFG if pipe.__class__.__name__ == "StableDiffusion3Pipeline" else SD15_CFG
    prompts, labels, latents = eval_prompts(samples, seed)
    start = time.perf_counter()
    images = generate(pipe, prompts, latents, steps, guidance_scale)
    acc = accuracy(load_classifier(), to_digits8(images), labels)
    result = {"samples": samples, "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "accuracy": acc,
              "wall_s": time.perf_counter() - start}
    if progress:
        print(f"{pipe.__class__.__name__}: {steps} steps, CFG {guidance_scale}: accuracy {acc:.3f} on {samples} images")
    return result


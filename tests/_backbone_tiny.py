"""Tiny random diffusers pipelines (no downloads): denoiser, text encoders, tokenizers, scheduler.

The VAE is left out (``vae=None``): the tests work in latent space and the pipelines fall back
to a VAE scale factor of 8, which the presets also assume when a folder has no ``vae/``.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a photo of cat dog red blue car tree house on the in with sky big small".split()


def clip_tokenizer(folder: Path | None = None):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    return tok, len(vocab)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)
    return tok, len(vocab)


def clip_text(vocab: int, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_text(vocab: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return T5EncoderModel(cfg).eval()


def _ddim(**kw):
    from diffusers import DDIMScheduler

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def build_sd15(folder: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok, vocab = clip_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(vae=None, text_encoder=clip_text(vocab), tokenizer=tok, unet=unet, scheduler=_ddim(prediction_type=prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok, vocab = clip_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip_text(vocab), text_encoder_2=clip_text(vocab, projection=True),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_ddim(timestep_spacing="leading"))
    pipe.save_pretrained(folder)
    return folder


def build_pixart(folder: Path) -> Path:
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    tok, vocab = t5_tokenizer()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5_text(vocab), vae=None, transformer=transformer,
                               scheduler=_ddim(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))
    pipe.save_pretrained(folder)
    return folder


def build_sd3(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, vocab = clip_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=clip_text(vocab, projection=True), tokenizer=tok,
                                    text_encoder_2=clip_text(vocab, projection=True), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def build_cogvideox(folder: Path, rotary: bool = False) -> Path:
    """CogVideoX-2B-like (sin-cos positional embeddings); ``rotary=True``: 5B-like 3D rotary embeddings."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tok, vocab = t5_tokenizer()
    torch.manual_seed(0)
    # the 3D RoPE splits the head dim into t/h/w parts of dim/4 and 3*dim/8, each of which must be even
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rotary else 8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=32,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=16, use_rotary_positional_embeddings=rotary,
    )
    sched = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=t5_text(vocab), vae=None, transformer=transformer, scheduler=sched)
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "pixart": build_pixart, "sd3": build_sd3, "cogvideox": build_cogvideox}
# resolution (pixels, vae factor 8) and extra args per preset so the latents stay tiny
RESOLUTION = {"sd15": 64, "sdxl": 64, "pixart": 64, "sd3": 64, "cogvideox": (64, 64)}


def preset_args(preset: str, model: Path, prompts: Path, **overrides):
    """The tiny run of ``preset`` as :func:`~tdm_fast.backbones.run.build_preset_run` takes it."""
    from tdm_fast.backbones.run import PresetRun

    values = dict(preset=preset, model=model, prompts=prompts, lora_rank=4, resolution=64)
    if preset == "cogvideox":
        values.update(num_frames=5, max_sequence_length=16, resolution=(64, 64))
    if preset in ("pixart", "sd3"):
        values["max_sequence_length"] = 16
    return PresetRun(**{**values, **overrides})


def write_prompts(path: Path) -> Path:
    path.write_text("a photo of a cat\na red car\n# comment\n\na dog in the sky\n")
    return path

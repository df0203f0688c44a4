"""ONNX parity of the demo's distilled student (``tdm-fast demo --pipeline sd15 --onnx``).

The student folder the demo saved is exported by ``tdm-fast export``'s own pipeline
(:func:`~tdm_fast.export.student.export_student`: the K-step sampler graphs and the VAE decoder graph), sampled by ONNX Runtime on the CPU from the prompts and initial latents that
scored the torch student, and scored with the same classifier features against the same teacher-50
reference. The torch side is the same student through :func:`~tdm_fast.sampling.sample_student` and the
torch VAE decoder: the exact computation each graph was traced from, so any FID gap is the export's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import t2i

BATCH = 500  # the ORT sessions' batch: bounded memory for any --samples


def export_argv(student_dir: Path, model_dir: Path, out: Path, steps, total_steps: int, exporter: str = "dynamo") -> list[str]:
    """The ``tdm-fast export`` command equivalent to :func:`export_parity_student` (what a user deploying the
    student types), for the demo's report."""
    return ["export", "--checkpoint", str(student_dir), "--out", str(out), "--steps", *map(str, steps), "--total-steps",
            str(total_steps), "--vae", str(model_dir), "--device", "cpu", "--exporter", exporter, "--quiet"]


def export_parity_student(student_dir: Path, model_dir: Path, out: Path, steps, total_steps: int,
                          exporter: str = "dynamo") -> dict:
    """Exports the student's K-step sampler graphs and ``model_dir``'s VAE decoder on the CPU into ``out``."""
    from ..export.student import export_student

    try:
        return export_student(student_dir, out, steps=tuple(steps), total_steps=total_steps, vae=model_dir, device="cpu",
                              exporter=exporter)
    except ValueError as exc:  # e.g. its own ORT-vs-torch parity check failed
        raise RuntimeError(f"`tdm-fast {' '.join(export_argv(student_dir, model_dir, out, steps, total_steps, exporter))}` "
                           f"failed: {exc}") from None


@torch.no_grad()
def onnx_parity(pipeline: str, model_dir: Path, student, onnx_dir: Path, steps, total_steps: int, samples: int, seed: int,
                reference8: torch.Tensor, metrics) -> dict:
    """``{"K=k": {"onnx_fid", "torch_fid", "fid_bootstrap_std", "onnx_max_abs_diff", ...}}``: FID to the teacher-50
    reference of the ONNX Runtime images and of the torch images of the same student, prompts and latents."""
    from ..export.student import onnx_name
    from ..export.runtime import OrtDecoder, OrtSampler
    from ..export.vae import LatentDecoder, load_vae
    from ..sampling import sample_student

    prompts, labels, latents = t2i.eval_prompts(samples, seed)
    cond = t2i.encode_prompts(t2i.load_pipeline(model_dir), prompts)
    cond = cond["encoder_hidden_states"] if pipeline == "sd15" else cond
    decoder = LatentDecoder(load_vae(model_dir)).eval()
    ort_decoder = OrtDecoder(onnx_dir / "vae_decoder_fp32.onnx")
    ref_feats = metrics.features(reference8)
    out = {}
    for k in steps:
        sampler = OrtSampler(onnx_dir / onnx_name(k, "fp32"))
        start = time.perf_counter()
        got = torch.cat([ort_decoder(sampler(latents[i:i + BATCH], cond[i:i + BATCH])) for i in range(0, samples, BATCH)])
        onnx_s = time.perf_counter() - start
        ref = torch.cat([decoder(sample_student(student, latents[i:i + BATCH].clone(), cond[i:i + BATCH], k, total_steps))
                         for i in range(0, samples, BATCH)])
        onnx_row, torch_row = (metrics(t2i.to_digits8(x * 2 - 1), labels, ref_feats) for x in (got, ref))
        out[f"K={k}"] = {
            "onnx_fid": onnx_row["fid_teacher"], "torch_fid": torch_row["fid_teacher"],
            "fid_bootstrap_std": torch_row.get("fid_teacher_boot_std"),
            "onnx_accuracy": onnx_row["accuracy"], "torch_accuracy": torch_row["accuracy"],
            "onnx_max_abs_diff": float((got - ref).abs().max()), "onnx_ms_per_image": 1000 * onnx_s / samples,
        }
    return out


def within_std(entry: dict) -> bool:
    """The acceptance check: the ONNX FID is the torch FID within the torch FID's bootstrap std."""
    std = entry["fid_bootstrap_std"]
    return bool(std is not None and abs(entry["onnx_fid"] - entry["torch_fid"]) <= std)


def markdown(parity: dict, argv: list[str], export_s: float) -> list[str]:
    lines = [
        f"ONNX Runtime (CPU) vs torch: the student exported by `tdm-fast {' '.join(argv[:-1])}` ({export_s:.0f} s), "
        "sampled from the same prompts and latents, decoded by the exported VAE decoder graph; torch = the same student "
        "and decoder in eager torch. ± is the bootstrap std of the torch FID.",
        "",
        "| K | torch FID to teacher-50 | ONNX FID to teacher-50 | FID gap within the std | max abs Δ of the images | ONNX ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in sorted(parity.items(), key=lambda kv: -int(kv[0][2:])):
        std = e["fid_bootstrap_std"]
        lines.append(f"| {key[2:]} | {e['torch_fid']:.3f}{f' ± {std:.3f}' if std is not None else ''} | {e['onnx_fid']:.3f} "
                     f"| {'yes' if within_std(e) else 'NO'} | {e['onnx_max_abs_diff']:.1e} | {e['onnx_ms_per_image']:.2f} |")
    return lines

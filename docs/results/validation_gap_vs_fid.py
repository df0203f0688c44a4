"""Does the trainer's validation gap (tdm_fast.validation: paired latent distance to the teacher's 50-step CFG
samples of the same prompts and noise, over the best NFE-matched teacher sampler's) move with the FID ratio
between saved students of one pipeline?

From the repository root: ``python docs/results/validation_gap_vs_fid.py sd3|sd15 N RUN [RUN ...]``, each RUN a
folder a ``run_t2i_demo`` run scored (``lora/``, ``metrics.json``): prints the gap of each K on N fresh prompts and
latents (seed 123, not the evaluation's) beside the run's FID ratio."""
import json
import sys
from pathlib import Path

from tdm_fast.demos import t2i
from tdm_fast.demos.t2i_demo import CFG, _scheduler, load_stock, load_student_pipeline, teacher_samplers

pipeline, count, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
model = t2i.shipped_pipeline(pipeline)
prompts, _, latents = t2i.eval_prompts(count, seed=123)
teacher = load_stock(model)
teacher.scheduler = _scheduler(teacher, "stock")
reference = t2i.generate(teacher, prompts, latents, 50, CFG[pipeline], output_type="latent")


def distance(samples):
    return float((samples - reference).pow(2).mean())


best = {}
for k in (1, 2, 4):
    scored = {}
    for sampler in teacher_samplers(pipeline, k, CFG[pipeline]):
        teacher.scheduler = _scheduler(teacher, sampler["scheduler"])
        scored[sampler["name"]] = distance(t2i.generate(teacher, prompts, latents, sampler["steps"], sampler["guidance"],
                                                        output_type="latent"))
    best[k] = min(scored.items(), key=lambda pair: pair[1])
print("best baselines (name, distance):", best)
for run in runs:
    fid = json.loads((Path(run) / "metrics.json").read_text())["comparisons"]
    cells = []
    for k in (1, 2, 4):
        if f"K={k}" not in fid or "fid_ratio" not in fid[f"K={k}"]:
            continue
        student = load_student_pipeline(model, Path(run) / "lora", k)
        gap = distance(t2i.generate(student, prompts, latents, k, 1.0, output_type="latent")) / best[k][1]
        cells.append(f"K={k}: gap {gap:.3f}, FID ratio {fid[f'K={k}']['fid_ratio']:.3f}")
    print(run, "|", "; ".join(cells), flush=True)

"""sd15 demo at 10,000 evaluation samples: does the K = 4 ratio move when the measure's floor shrinks?

From the repository root: ``OMP_NUM_THREADS=1 python docs/results/demo_sd15_10000_samples.py [N]`` (writes runs/).
The teacher-50 reference of N samples is computed once into a cache folder the demo then reads."""
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tdm_fast.demos import t2i, t2i_demo
from tdm_fast.demos.t2i_demo import CFG, load_stock, run_t2i_demo, write_reference_cache
from tdm_fast.eval.digits import DigitsMetrics

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
out = Path(f"runs/demo-sd15-{N}")
ref_dir = Path(f"runs/ref-sd15-{N}")
t0 = time.time()
if not (ref_dir / "sd15.json").is_file():
    write_reference_cache("sd15", samples=N, folder=ref_dir)
print("reference", time.time() - t0, flush=True)
t2i_demo.REFERENCE_DIR = ref_dir  # the demo reads its teacher-50 samples from this cache
results = run_t2i_demo("sd15", out, samples=N, progress=False)
print("demo", time.time() - t0, {k: v.get("fid_ratio") for k, v in results["comparisons"].items()}, flush=True)
teacher = load_stock(t2i.shipped_pipeline("sd15"))
prompts, labels, latents = t2i.eval_prompts(N, 1)
other = t2i.to_digits8(t2i.generate(teacher, prompts, latents, 50, CFG["sd15"]))
reference = load_file(str(ref_dir / "sd15.safetensors"))["images"]
m = DigitsMetrics()
floor = m(other, labels, m.features(reference))["fid_teacher"]
print("floor", floor, time.time() - t0, flush=True)
json.dump({"samples": N, "floor": floor, "comparisons": results["comparisons"],
           "samplers": {k: {m_: v[m_] for m_ in ("fid_teacher", "accuracy") if m_ in v} for k, v in results["samplers"].items()}},
          open(out / "floor.json", "w"), indent=2)

"""Where the tiny SD-shaped UNet's K-step sample spends its time: eager torch vs ONNX Runtime, per op class.

Why this exists: the latency suite measures compile and ONNX Runtime close to eager for this model
on CPU. The profile shows how much of the eager time is convolution and matmul (which torch.compile
hands back to the same oneDNN/BLAS kernels, so only the rest can get faster) and how ONNX Runtime's
time splits over the same classes.

    python bench/profile_unet.py [--steps 4] [--rounds 20] [--out bench/results/latency-<machine>-unet-profile.md]

With ``--out`` the table goes into a markdown file that ``tdm-fast bench --render-only`` inlines into
bench/RESULTS.md under the latency suite of the same machine (``tdm_fast.perf.bench_report.machine_id``).
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

CLASSES = {
    "conv": ("conv",),
    "matmul/attention": ("addmm", "mm", "bmm", "matmul", "linear", "gemm", "attention", "softmax", "baddbmm"),
    "norm": ("norm",),
}


def op_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES.items():
        if any(k in low for k in keys):
            return cls
    return "pointwise/other"


def torch_profile(sampler, noise, cond, rounds: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sampler(noise, cond)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            sampler(noise, cond)
    shares = collections.Counter()
    for event in prof.key_averages():
        # self time excludes children, so nested aten ops (conv2d -> mkldnn_convolution) count once
        if event.key.startswith("aten::"):
            shares[op_class(event.key)] += event.self_cpu_time_total
    return dict(shares)


def ort_profile(path: Path, noise, cond, rounds: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], [noise.numpy(), cond.numpy()]))
    session.run(None, feeds)
    for _ in range(rounds):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    shares = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            shares[op_class(event["args"].get("op_name", ""))] += event["dur"]
    return dict(shares)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="also write the table as markdown here")
    args = parser.parse_args(argv)

    import bench_latency  # noqa: E402  (same folder: the latency suite's tiny UNet)
    from tdm_fast.export.onnx import export_sampler_onnx
    from tdm_fast.export.sampler import StudentSampler

    den, noise, cond = bench_latency.build_model("unet")
    sampler = StudentSampler(den, args.steps)
    with torch.no_grad():
        eager = torch_profile(sampler, noise, cond, args.rounds)
        path = Path(tempfile.mkdtemp(prefix="tdm_profile_")) / f"unet_k{args.steps}.onnx"
        export_sampler_onnx(den, path, args.steps, noise, cond)
        onnx = ort_profile(path, noise, cond, args.rounds, torch.get_num_threads())
    total_e, total_o = sum(eager.values()), sum(onnx.values())
    lines = [
        f"Tiny SD-shaped UNet, K={args.steps} sampler, {args.rounds} samples, {torch.get_num_threads()} threads "
        f"(`python bench/profile_unet.py`): op time per sample by op class.",
        "",
        "| op class | eager torch ms / sample | share | ONNX Runtime ms / sample | share |",
        "|---|---|---|---|---|",
    ]
    for cls in [*CLASSES, "pointwise/other"]:
        e, o = eager.get(cls, 0.0), onnx.get(cls, 0.0)
        lines.append(f"| {cls} | {e / 1e3 / args.rounds:.2f} | {100 * e / max(total_e, 1):.1f} % "
                     f"| {o / 1e3 / args.rounds:.2f} | {100 * o / max(total_o, 1):.1f} % |")
    lines.append(f"| total | {total_e / 1e3 / args.rounds:.2f} | | {total_o / 1e3 / args.rounds:.2f} | |")
    # torch.compile calls the same oneDNN convolutions, BLAS matmuls and fused CPU attention kernel
    # as eager; what it can remove is the rest (fused into its own loops) and Python dispatch.
    library = eager.get("conv", 0.0) + eager.get("matmul/attention", 0.0)
    lines += ["", f"Convolutions and matmul/attention are {100 * library / max(total_e, 1):.0f} % of eager op time; "
              f"torch.compile runs them in the same oneDNN/BLAS/attention kernels, so removing all of the rest "
              f"would make the op time at most {total_e / max(library, 1):.2f}x faster (Python dispatch, which the "
              f"profile's op times leave out, comes on top).",
              "", f"ONNX Runtime spends {onnx.get('matmul/attention', 0.0) / 1e3 / args.rounds:.1f} ms per sample in "
              f"matmul/attention against eager's {eager.get('matmul/attention', 0.0) / 1e3 / args.rounds:.1f}: the "
              f"exported graph spells attention as MatMul, Softmax, MatMul over the full score matrix (1,024 tokens "
              f"at the first level), where eager torch calls its fused CPU attention kernel."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")

if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()

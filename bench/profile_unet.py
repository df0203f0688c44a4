"""Where the tiny SD-shaped UNet's K-step sample spends its time: eager torch vs ONNX Runtime, per op class.

Why this exists: the latency suite measures compile and ONNX Runtime close to eager for this model
on CPU. The profile shows how much of the eager time is convolution and matmul (which torch.compile
hands back to the same oneDNN/BLAS kernels, so only the rest can get faster) and how ONNX Runtime's
time splits over the same classes.

    python bench/profile_unet.py [--steps 4] [--rounds 20]
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
    print(f"tiny SD-shaped UNet, K={args.steps}, {args.rounds} samples, {torch.get_num_threads()} threads")
    print(f"{'op class':20s} {'eager torch ms/sample':>22s} {'share':>7s} {'ORT ms/sample':>14s} {'share':>7s}")
    total_e, total_o = sum(eager.values()), sum(onnx.values())
    for cls in [*CLASSES, "pointwise/other"]:
        e, o = eager.get(cls, 0.0) / 1e3 / args.rounds, onnx.get(cls, 0.0) / 1e3 / args.rounds
        print(f"{cls:20s} {e:22.2f} {100 * e * 1e3 * args.rounds / max(total_e, 1):6.1f}% {o:14.2f} "
              f"{100 * o * 1e3 * args.rounds / max(total_o, 1):6.1f}%")
    print(f"{'total (op time)':20s} {total_e / 1e3 / args.rounds:22.2f} {'':7s} {total_o / 1e3 / args.rounds:14.2f}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()

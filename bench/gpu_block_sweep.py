"""Device time of the fused Triton kernels per block size on a CUDA GPU, next to the block that
``tdm_fast.kernels._triton.block_size`` picks: the evidence for its rule.

    python bench/gpu_block_sweep.py        (run by bench/gpu_kernels.sh)
"""
from __future__ import annotations

import importlib
import sys

import torch

from bench_kernels import SHAPES, copy_device_bandwidth, device_times
from tdm_fast.kernels import _triton

generator_loss = importlib.import_module("tdm_fast.kernels.generator_loss")
renoise = importlib.import_module("tdm_fast.kernels.renoise")
BLOCKS = (512, 1024, 2048, 4096)


def kernel_us(launch, name):
    _, per_kernel = device_times(launch)
    return 1e6 * sum(t for k, t in per_kernel.items() if name in k)


def main():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs; float32; largest kernel only\n")
    print("| op | shape | " + " | ".join(f"block {b} µs" for b in BLOCKS) + " | picked | copy of the same bytes µs |")
    print("|---|---|" + "---|" * (len(BLOCKS) + 2))
    for shape_name, (batch, sample) in SHAPES.items():
        x = [torch.randn(batch, *sample, device=dev).view(batch, -1) for _ in range(4)]
        d = x[0].shape[1]
        a_s = torch.full((batch,), 0.8, device=dev)
        scalars = (a_s, (1 - a_s**2).sqrt(), a_s * 0.7, (1 - (a_s * 0.7) ** 2).sqrt())
        cases = {
            "generator_loss": (lambda b: generator_loss._launch_triton(*x, 4.5, 1e-3, True, block=b), "_generator_loss_kernel", 5),
            "renoise": (lambda b: renoise._launch_triton(*x[:3], scalars, block=b), "_renoise_kernel", 4),
        }
        for op, (launch, name, tensors) in cases.items():
            times = [kernel_us(lambda: launch(b), name) for b in BLOCKS]
            copy_us = 1e6 * tensors * x[0].nbytes / copy_device_bandwidth(tensors * x[0].nbytes, dev)
            picked = _triton.block_size(d, dev)
            print(f"| {op} | {shape_name} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {picked} | {copy_us:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

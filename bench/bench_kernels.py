"""Fused TDM ops vs the eager reference vs torch.compile(reference), forward + backward.

Two ways to run it:
    python -m pytest bench/bench_kernels.py --benchmark-json=out.json    # pytest-benchmark
    python bench/bench_kernels.py [--shapes sd15,sdxl,video] [--out table.md] [--threads N]
On a shared CPU box pin one thread (OMP_NUM_THREADS=1 for the pytest form, --threads 1 for the
script): with more threads than free cores, OpenMP barriers stall every implementation.

"fused" is what ``tdm_fast.kernels`` runs by default on the device (Triton on CUDA, the native C++
loops on CPU); on CPU the fused test also times "fused_inductor" (the same single-pass formulation
compiled by Inductor, the CPU fallback, forced through TDM_FAST_KERNELS=compile) in the same
interleaved rounds, which is the measurement behind the CPU default. Per case we record:
- median wall time of one call (forward + backward for the two losses; the trainer calls renoise and
  ddim_jump without gradients, so those are forward only);
- peak extra memory: bytes allocated above what existed before the call, at the high-water mark,
  including the gradient buffer the call leaves in ``.grad``. On CUDA from the caching allocator's
  peak statistics; on CPU from the allocation/free events of torch.profiler(profile_memory=True)
  replayed in time order (every tensor allocation goes through the profiled c10 CPU allocator,
  Inductor's buffers included). Also given in units of one input tensor;
- effective bandwidth: the bytes the op's contract moves at least (every input read once, every
  output written once; for the two losses also backward's rescale of the stored gradient, one read
  and one write) divided by the median time, next to the bandwidth of a same-size tensor copy
  measured in the same run;
- on CUDA also the device time per call from the profiler (the sum of the op's kernels, which
  leaves out the host's launch overhead) and the bandwidth it gives, next to the copy kernel's,
  and the device time of the op's largest kernel (for the fused ops: the Triton kernel itself).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import tdm_fast.kernels as K
from tdm_fast.kernels import reference as R

SHAPES = {
    "sd15": (8, (4, 64, 64)),
    "sdxl": (8, (4, 128, 128)),
    "video": (1, (13, 16, 60, 90)),
}
OPS = ("generator_loss", "renoise", "fake_score_loss", "ddim_jump")
IMPLS = ("fused", "eager", "compiled_ref")
# Tensors of input size each op must read or write at least once: the inputs, the outputs and, for
# the losses, backward's in-place rescale of the stored gradient (forward stores it, backward
# rescales it: the Liger pattern of the spec).
TRAFFIC = {"generator_loss": 4 + 1 + 2, "renoise": 3 + 1, "fake_score_loss": 2 + 1 + 2, "ddim_jump": 2 + 1}
_COMPILED_REF = {}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reference_fn(op, impl):
    fn = {"generator_loss": R.tdm_generator_loss, "renoise": R.renoise,
          "fake_score_loss": R.fake_score_loss, "ddim_jump": R.ddim_jump}[op]
    if impl == "eager":
        return fn
    if op not in _COMPILED_REF:
        _COMPILED_REF[op] = torch.compile(fn)
    return _COMPILED_REF[op]


def _forcing_backend(fn, backend):
    def call(*args):
        old = os.environ.get(K._backend.ENV)
        os.environ[K._backend.ENV] = backend
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[K._backend.ENV]
            else:
                os.environ[K._backend.ENV] = old

    return call


def make_case(op, shape_name, impl, dtype=torch.float32, device=None):
    """(step, input_bytes): ``step()`` runs one call of ``impl`` on fresh-per-case inputs."""
    device = device or _device()
    batch, sample = SHAPES[shape_name]
    shape = (batch, *sample)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    fused = {"generator_loss": K.tdm_generator_loss, "renoise": K.renoise,
             "fake_score_loss": K.fake_score_loss, "ddim_jump": K.ddim_jump}[op]
    if impl == "fused_inductor":
        fn = _forcing_backend(fused, "compile")
    else:
        fn = fused if impl == "fused" else _reference_fn(op, impl)
    input_bytes = torch.Size(shape).numel() * dtype.itemsize

    if op in ("generator_loss", "fake_score_loss"):
        x = rand(*shape).requires_grad_()
        if op == "generator_loss":
            others = (rand(*shape), rand(*shape), rand(*shape))
            args = (4.5,)
        else:
            others = (rand(*shape),)
            args = (torch.rand(batch, generator=gen).to(device) * 10, torch.randn(batch, generator=gen).to(device))

        def step():
            x.grad = None
            fn(x, *others, *args).backward()
    else:
        a_s = torch.rand(batch, generator=gen).to(device) * 0.4 + 0.5
        s_s = (1 - a_s**2).sqrt()
        a_t = a_s * 0.7
        s_t = (1 - a_t**2).sqrt()
        if op == "renoise":
            inputs = (rand(*shape), rand(*shape), rand(*shape), a_s, s_s, a_t, s_t)
        else:
            inputs = (rand(*shape), rand(*shape), a_t, s_t)

        def step():
            with torch.no_grad():
                fn(*inputs)

    return step, input_bytes


def _timed(step, device):
    """Seconds per call; on CUDA over a burst of calls so that launches overlap as in training."""
    inner = 20 if device.type == "cuda" else 1
    _sync(device)
    t = time.perf_counter()
    for _ in range(inner):
        step()
    _sync(device)
    return (time.perf_counter() - t) / inner


def median_time(step, rounds, device, warmup=2):
    for _ in range(warmup):
        step()
    return statistics.median(_timed(step, device) for _ in range(rounds))


def peak_extra_bytes(step, device):
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def device_times(step, calls=20):
    """CUDA: (device seconds per call summed over all kernels, {kernel name: seconds per call})."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            per_kernel[e.name()] = per_kernel.get(e.name(), 0.0) + e.duration_ns() * 1e-9 / calls
    return sum(per_kernel.values()), per_kernel


def _copy_step(nbytes, device):
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(nbytes, device, rounds):
    """Bytes/s of ``dst.copy_(src)`` moving ``nbytes`` in total (read + write)."""
    return nbytes / median_time(_copy_step(nbytes, device), rounds, device)


def copy_device_bandwidth(nbytes, device):
    """CUDA: bytes/s of the same copy by the copy kernel's device time."""
    return nbytes / device_times(_copy_step(nbytes, device))[0]


def measure(op, shape_name, impls=IMPLS, rounds=10, device=None):
    """Per impl: median time, first-call time, peak extra memory and effective bandwidth.

    The impls are timed interleaved, one call each per round, so that load from other processes on a
    shared machine falls on all of them alike and the ratios stay meaningful.
    """
    device = device or _device()
    cases = {impl: make_case(op, shape_name, impl, device=device) for impl in impls}
    info = {}
    for impl, (step, input_bytes) in cases.items():
        t0 = time.perf_counter()
        step()
        _sync(device)
        info[impl] = {"first_call_s": time.perf_counter() - t0, "bytes_moved": TRAFFIC[op] * input_bytes}
        step()
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl, (step, _) in cases.items():
            times[impl].append(_timed(step, device))
    for impl, (step, input_bytes) in cases.items():
        peak = peak_extra_bytes(step, device)
        median = statistics.median(times[impl])
        info[impl].update(
            median_s=median,
            peak_extra_bytes=peak,
            peak_extra_inputs=peak / input_bytes,
            eff_GBps=info[impl]["bytes_moved"] / median / 1e9,
        )
        if device.type == "cuda":
            total, per_kernel = device_times(step)
            name, main = max(per_kernel.items(), key=lambda kv: kv[1])
            info[impl].update(
                device_us=total * 1e6, n_kernels=len(per_kernel), device_GBps=info[impl]["bytes_moved"] / total / 1e9,
                main_kernel=name[:60], main_kernel_us=main * 1e6,
            )
    return info


def _rounds(shape_name, device):
    if device.type == "cuda":
        return 50
    return {"sd15": 100, "sdxl": 20, "video": 5}[shape_name]


# ---------------------------------------------------------------- pytest-benchmark entry points

try:
    import pytest
except ImportError:  # the script mode below does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("shape_name", list(SHAPES))
    @pytest.mark.parametrize("op", OPS)
    def test_bench(benchmark, op, shape_name, impl):
        device = _device()
        rounds = _rounds(shape_name, device)
        if impl == "fused":
            # The ratios come from the three implementations timed interleaved in this one test, so
            # that drift in the machine's speed between tests cannot bias them.
            impls = IMPLS if device.type == "cuda" else (*IMPLS, "fused_inductor")
            both = measure(op, shape_name, impls, rounds=rounds, device=device)
            info = both["fused"]
            info["interleaved_ms"] = {i: 1e3 * both[i]["median_s"] for i in impls}
        else:
            info = measure(op, shape_name, (impl,), rounds=3, device=device)[impl]
        info["copy_GBps"] = copy_bandwidth(info["bytes_moved"], device, rounds) / 1e9
        info["bw_fraction_of_copy"] = info["eff_GBps"] / info["copy_GBps"]
        if device.type == "cuda":
            info["copy_device_GBps"] = copy_device_bandwidth(info["bytes_moved"], device) / 1e9
            info["device_bw_fraction_of_copy"] = info["device_GBps"] / info["copy_device_GBps"]
            # The largest kernel against a copy of the bytes that kernel moves (a copy's bandwidth
            # depends on its size at these sizes: launch latency is a visible share).
            kernel_bytes = MAIN_KERNEL_TRAFFIC[op] * info["bytes_moved"] // TRAFFIC[op]
            info["kernel_GBps"] = kernel_bytes / (info["main_kernel_us"] * 1e-6) / 1e9
            info["kernel_bw_fraction_of_copy"] = info["kernel_GBps"] / (copy_device_bandwidth(kernel_bytes, device) / 1e9)
        # On CUDA one benchmark round is a burst of 20 calls followed by one synchronisation.
        info.update(device=str(device), torch_threads=torch.get_num_threads(),
                    calls_per_round=20 if device.type == "cuda" else 1)
        step, _ = make_case(op, shape_name, impl, device=device)
        benchmark.extra_info.update(info)
        benchmark.pedantic(lambda: _timed(step, device), rounds=rounds, warmup_rounds=2, iterations=1)


# ---------------------------------------------------------------- the ratios, from a pytest-benchmark JSON

# Tensors of input size the largest kernel of the fused op moves (forward: inputs read, outputs written).
MAIN_KERNEL_TRAFFIC = {"generator_loss": 5, "renoise": 4, "fake_score_loss": 3, "ddim_jump": 3}


def summarize(benchmarks) -> str:
    """Markdown: per op and shape, fused vs eager vs compile(ref) and the bandwidth against a copy.

    Times are the interleaved medians of the fused test where it recorded them (each
    implementation called in turn, round after round), else each test's own median.

    Called by ``tdm-fast bench`` on the JSON it renders (tdm_fast/perf/bench_report.py).
    """
    cases = {}
    for b in benchmarks:
        info, params = b.get("extra_info", {}), b.get("params") or {}
        if "op" in params:
            per_call = b["stats"]["median"] / info.get("calls_per_round", 1)
            cases.setdefault((params["op"], params["shape_name"]), {})[params["impl"]] = (per_call, info)
    if not cases:
        return ""
    cuda = any(i.get("device", "").startswith("cuda") for c in cases.values() for _, i in c.values())
    inductor = any("fused_inductor" in c["fused"][1].get("interleaved_ms", {}) for c in cases.values() if "fused" in c)
    head = ("| op | shape | fused ms | eager ms | compile(ref) ms | fused vs eager | fused vs compile(ref) "
            "| peak extra memory, fused / eager (input tensors) | fused % of copy bandwidth (wall) |")
    if inductor:
        head += " fused via Inductor ms (the CPU fallback) | fused vs it |"
    if cuda:
        head += " fused device µs (kernels) | fused % of copy (device time) | largest kernel µs | largest kernel % of copy |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (op, shape), impls in sorted(cases.items(), key=lambda kv: (OPS.index(kv[0][0]), list(SHAPES).index(kv[0][1]))):
        if not all(i in impls for i in IMPLS):
            continue
        (f, fi), (e, ei), (c, _) = (impls[i] for i in IMPLS)
        if "interleaved_ms" in fi:
            f, e, c = (fi["interleaved_ms"][i] * 1e-3 for i in IMPLS)
        row = (f"| {op} | {shape} | {f * 1e3:.3f} | {e * 1e3:.3f} | {c * 1e3:.3f} | **{e / f:.2f}x** | {c / f:.2f}x "
               f"| {fi['peak_extra_inputs']:.2f} / {ei['peak_extra_inputs']:.2f} | {100 * fi['bw_fraction_of_copy']:.0f} % |")
        if inductor:
            i_ms = fi.get("interleaved_ms", {}).get("fused_inductor")
            row += f" {i_ms:.3f} | {i_ms * 1e-3 / f:.2f}x |" if i_ms else " | |"
        if cuda and "device_us" in fi:
            row += (f" {fi['device_us']:.1f} ({fi['n_kernels']}) | {100 * fi['device_bw_fraction_of_copy']:.0f} % "
                    f"| {fi['main_kernel_us']:.1f} | **{100 * fi['kernel_bw_fraction_of_copy']:.0f} %** |")
        lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------- script mode: one table with ratios


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_table(shapes, ops=OPS, rounds_scale=1.0, log=sys.stderr):
    device = _device()
    lines = [
        f"Device: {device_name(device)}; torch {torch.__version__}; dtype float32; "
        f"fused backend = {K.select_backend(torch.empty(1, device=device))}",
        "",
        "| op | shape | fused ms | eager ms | compile(ref) ms | speedup vs eager | vs compile(ref) "
        "| peak extra (inputs) fused / eager | fused GB/s | copy GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for op in ops:
        for shape_name in shapes:
            rounds = max(3, int(_rounds(shape_name, device) * rounds_scale))
            res = measure(op, shape_name, IMPLS, rounds, device)
            copy = copy_bandwidth(res["fused"]["bytes_moved"], device, rounds) / 1e9
            f, e, c = (res[i] for i in IMPLS)
            results[(op, shape_name)] = dict(res, copy_GBps=copy)
            line = (
                f"| {op} | {shape_name} | {f['median_s']*1e3:.3f} | {e['median_s']*1e3:.3f} | "
                f"{c['median_s']*1e3:.3f} | {e['median_s']/f['median_s']:.2f}x | {c['median_s']/f['median_s']:.2f}x | "
                f"{f['peak_extra_inputs']:.2f} / {e['peak_extra_inputs']:.2f} | {f['eff_GBps']:.1f} | {copy:.1f} | "
                f"{100*f['eff_GBps']/copy:.0f}% |"
            )
            print(line, file=log, flush=True)
            lines.append(line)
    return "\n".join(lines) + "\n", results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table, _ = run_table(args.shapes.split(","), args.ops.split(","), args.rounds_scale)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(table)


if __name__ == "__main__":
    main()

"""The ``native`` CPU backend: each fused op's C++ loop, built on first use by the system compiler
and called through ctypes.

Why not only Inductor: at the sizes training meets (SD1.5 latents, 0.5 MB per tensor) a compiled
Inductor call spends more time in its Python runtime (Dynamo guards, the AOT wrapper) than in its
kernel. A ctypes call costs a few microseconds, and a hand-written loop can also finish the generator
loss's gradient while each sample's tile is still in cache (bench/bench_kernels.py measures all
three). The library is cached per source, compiler and CPU, so later processes load it directly, once
they have checked that only this user could have written it and that its sha256 is the one recorded
when it was built: loading a library runs its code.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

CACHE_ENV = "TDM_FAST_CACHE"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
PTR, I64, F64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int

# Shared by every op's source: element conversions (arithmetic in float, or double for double
# inputs), the (B, D) tiling the parallel loops run over, and the per-dtype export macro.
PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
using i64 = int64_t;
struct bf16 { uint16_t bits; };

template <class T> using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
template <class C, class T> static inline C ld(const T* p, i64 i) { return (C)p[i]; }
template <> inline float ld<float, bf16>(const bf16* p, i64 i) {
    uint32_t u = (uint32_t)p[i].bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
template <class T> static inline void st(T* p, i64 i, acc_t<T> v) { p[i] = (T)v; }
template <> inline void st<bf16>(bf16* p, i64 i, float v) {
    uint32_t u; std::memcpy(&u, &v, 4);
    p[i].bits = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The parallel loops run over tiles of about TILE elements: a chunk of one sample (a sample longer
// than TILE has several), or several whole samples when they are short. Big enough for the SIMD
// loops and to amortise the per-chunk bookkeeping of 2-element toy samples, small enough that a tile
// written in one pass is still in L2 for the next. Per-sample sums are added up per chunk, so they do
// not depend on the thread count.
static const i64 TILE = 16384;
struct Tiles {
    i64 D, per_row, chunks, per_tile, total;
    Tiles(i64 B, i64 D_)
        : D(D_), per_row((D_ + TILE - 1) / TILE), chunks(B * per_row),
          per_tile(per_row == 1 && D_ < TILE ? TILE / D_ : 1), total((chunks + per_tile - 1) / per_tile) {}
    i64 first(i64 t) const { return t * per_tile; }
    i64 end(i64 t) const { i64 e = (t + 1) * per_tile; return e < chunks ? e : chunks; }
    i64 row(i64 c) const { return c / per_row; }
    i64 lo(i64 c) const { return row(c) * D + (c % per_row) * TILE; }
    i64 hi(i64 c) const { i64 h = lo(c) + TILE, end = (row(c) + 1) * D; return h < end ? h : end; }
    int threads(int n) const { return total < n ? (int)total : n; }
    // Sample b's sum of per-chunk partials (part[ch] for each chunk ch), in chunk order.
    double row_sum(const double* part, i64 b) const {
        double s = 0.0;
        for (i64 ch = b * per_row; ch < (b + 1) * per_row; ch++) s += part[ch];
        return s;
    }
};

#define TDM_FOR_DTYPES(X) X(f32, float) X(f64, double) X(f16, _Float16) X(bf16, bf16)
"""


def _cpu_id() -> str:
    """The library is built with -march=native: key the cache on the CPU so a shared home
    directory never hands one machine another's instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not found:
        raise RuntimeError(
            "the native CPU kernels need a C++ compiler with OpenMP (g++ or clang++ on PATH, or $CXX); "
            "install one or set TDM_FAST_KERNELS=compile or torch"
        )
    return found


def cache_dir() -> Path:
    """Where built libraries are kept: the configured cache if only this user can write to it, else a
    private directory for this process."""
    configured = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tdm_fast") / "native"
    problem = _make_private(configured)
    return configured if problem is None else _scratch_dir(str(configured), problem)


def _why_untrusted(st: os.stat_result) -> str | None:
    """Why a cache entry may hold someone else's code: it is another user's, or others may write to it."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _make_private(path: Path) -> str | None:
    """Create the cache directory readable and writable by this user only; why an existing one cannot
    be trusted, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as err:
        return str(err)
    return _why_untrusted(st)


@functools.cache
def _scratch_dir(untrusted: str, problem: str) -> Path:
    """A private directory for this process's builds, removed at exit; said once per untrusted cache."""
    warnings.warn(
        f"tdm_fast: not using the native kernel cache {untrusted}: it is {problem}; building into a private "
        f"temporary directory instead (fix its owner and mode, or set {CACHE_ENV})",
    )
    path = Path(tempfile.mkdtemp(prefix="tdm_fast_native_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _digest_path(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


class _Untrusted(Exception):
    """A cache file that someone other than this user could have written."""


def _read_private(path: Path) -> bytes:
    """A cache file's content, read through one descriptor so that what is checked is what is read."""
    # O_NOFOLLOW: a symlink could point at any file; O_NONBLOCK: a planted FIFO must not hang the open.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        problem = _why_untrusted(st) if stat.S_ISREG(st.st_mode) else "not a regular file"
        if problem:
            raise _Untrusted(f"{path} is {problem}")
        return f.read()


def _load_cached(path: Path) -> ctypes.CDLL | None:
    """The cached library if this user built it and it is unchanged since; None when it has to be built."""
    try:
        content = _read_private(path)
        recorded = _read_private(_digest_path(path)).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None  # not built yet, or built by a version that recorded no digest
    except (OSError, _Untrusted) as err:
        warnings.warn(f"tdm_fast: rebuilding the native kernel library instead of loading it: {err}")
        return None
    if hashlib.sha256(content).hexdigest() != recorded:
        warnings.warn(
            f"tdm_fast: rebuilding the native kernel library {path} instead of loading it: its content differs "
            "from the sha256 recorded when it was built"
        )
        return None
    # The directory is private, so between the check and the load only this user could swap the file.
    return ctypes.CDLL(str(path))


def _compile(compiler: str, src: Path, out: Path) -> None:
    try:
        result = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        error = (result.stderr[-2000:] or f"exit status {result.returncode}") if result.returncode else None
    except OSError as err:
        error = str(err)
    if error is not None:
        raise RuntimeError(
            f"building the native CPU kernels with {compiler} failed (set TDM_FAST_KERNELS=compile or "
            f"torch to use another backend):\n{error}"
        )


def _build(compiler: str, text: str, path: Path) -> ctypes.CDLL:
    """Compile into a private temporary directory, load the result from there, then publish it to
    ``path`` together with its sha256."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, built, digest = Path(tmp) / "op.cpp", Path(tmp) / path.name, Path(tmp) / _digest_path(path).name
        src.write_text(text)
        _compile(compiler, src, built)
        # Explicit modes: under a permissive umask the next load would refuse group-writable files.
        os.chmod(built, 0o755)
        digest.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
        os.chmod(digest, 0o644)
        # Loaded before publishing: what this process runs is what it compiled, whatever a concurrent
        # build publishes. Each rename is atomic; a reader between the two sees a mismatch and rebuilds.
        lib = ctypes.CDLL(str(built))
        os.replace(built, path)
        os.replace(digest, _digest_path(path))
    return lib


@functools.cache
def library(source: str) -> ctypes.CDLL:
    """Build (once per source, compiler and CPU) and load the shared library of one op's source."""
    compiler = _compiler()
    text = PRELUDE + source
    key = hashlib.sha256("\0".join([text, compiler, *FLAGS, torch.__version__, _cpu_id()]).encode()).hexdigest()[:24]
    path = cache_dir() / f"tdm_fast_{key}.so"
    lib = _load_cached(path)
    return _build(compiler, text, path) if lib is None else lib


@functools.cache
def kernel(source: str, name: str, dtype: torch.dtype, argtypes: tuple):
    fn = getattr(library(source), f"{name}_{SUFFIX[dtype]}")
    fn.argtypes, fn.restype = list(argtypes), INT
    return fn


_PROBE = 'extern "C" int probe() { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n; }\n'


@functools.cache
def build_error() -> str | None:
    """Why the native kernels do not build here (no compiler with OpenMP or the prelude's types, a
    broken $CXX), or None when they do."""
    try:
        library(_PROBE)
    except (RuntimeError, OSError) as err:
        return str(err)
    return None


def available() -> bool:
    return build_error() is None


def table(*per_sample: torch.Tensor) -> torch.Tensor:
    """The (n, B) float64 table of per-sample scalars a native loop reads."""
    return torch.stack(per_sample).to(torch.float64).contiguous()


def threads() -> int:
    return torch.get_num_threads()


def check(rc: int) -> None:
    if rc == 1:
        raise MemoryError("native kernel: out of memory for its per-tile partial sums")
    if rc != 0:
        raise RuntimeError(f"native kernel failed with code {rc}")

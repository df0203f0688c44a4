"""The native kernels' build cache loads only what this user built and nobody changed since.

Loading a shared library runs its constructors, so a planted library is an attack even if none of
its functions is ever called. The planted library here writes a marker file from its constructor:
a marker that never appears proves it was never loaded. Ownership by another user is made with
os.chown, which needs root (the tests' usual user); those cases skip otherwise.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from tdm_fast.kernels import _backend, _native

MARKER_ENV = "TDM_FAST_TEST_PLANTED_MARKER"
OTHER_UID = 12345
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

PLANTED = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
    if (const char* path = std::getenv("TDM_FAST_TEST_PLANTED_MARKER")) std::fclose(std::fopen(path, "w"));
}
extern "C" int probe() { return -1; }
"""


def _forget():
    """Drop the per-process caches, as a new process would start."""
    for cached in (_native.library, _native.kernel, _native.build_error, _native._scratch_dir, _backend._cpu_fallback):
        cached.cache_clear()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The native cache directory of a fresh $TDM_FAST_CACHE, and where a loaded planted library would
    leave its marker."""
    monkeypatch.setenv(_native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "planted-was-loaded"))
    _forget()
    yield tmp_path / "cache" / "native"
    _forget()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A library with a constructor that writes the marker; checked to do so when it is loaded."""
    compiler = shutil.which("g++") or shutil.which("c++") or pytest.skip("needs a C++ compiler")
    folder = tmp_path_factory.mktemp("planted")
    source, library = folder / "planted.cpp", folder / "planted.so"
    source.write_text(PLANTED)
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    marker = folder / "control-marker"
    subprocess.run(
        [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"],
        env={**os.environ, MARKER_ENV: str(marker)}, check=True,
    )
    assert marker.exists(), "the planted library's constructor must write the marker when loaded"
    return library.read_bytes()


def _built(cache: Path) -> tuple[Path, Path]:
    """Build the probe library into ``cache``; its path and its digest file's."""
    _native.library(_native._PROBE)
    (library,) = cache.glob("*.so")
    return library, Path(f"{library}.sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_trusted_build(library: Path, digest: Path) -> None:
    for path in (library, digest):
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    assert digest.read_text().strip() == _sha256(library)


def _replace(library: Path, content: bytes) -> None:
    """A new file at the library's path: writing into the old one would change the code this process
    has mapped from it (the probe library is loaded) and crash it."""
    library.unlink()
    library.write_bytes(content)


def _plant(library: Path, digest: Path, planted: bytes, case: str, tmp_path: Path) -> None:
    """Put the planted library where the probe library was, each case failing one check only (the
    others pass: a digest that matches it, files of this user, no write access for others)."""
    library.unlink()
    if case == "symlink":
        elsewhere = tmp_path / "elsewhere.so"
        elsewhere.write_bytes(planted)
        library.symlink_to(elsewhere)
    else:
        library.write_bytes(planted)
    if case != "wrong hash":
        digest.write_text(hashlib.sha256(planted).hexdigest() + "\n")
    if case == "library writable by others":
        library.chmod(0o777)
    if case == "digest writable by others":
        digest.chmod(0o666)
    if case == "library owned by another user":
        os.chown(library, OTHER_UID, OTHER_UID)
    if case == "digest owned by another user":
        os.chown(digest, OTHER_UID, OTHER_UID)


def test_cache_is_private_and_reused(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first build and a verified load are silent
        library, digest = _built(cache)
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        _assert_trusted_build(library, digest)
        inode = library.stat().st_ino
        _forget()
        assert _native.library(_native._PROBE).probe() >= 1
    assert library.stat().st_ino == inode, "a verified library is loaded, not rebuilt"


@pytest.mark.parametrize(
    "case",
    [
        "wrong hash",
        "library writable by others",
        "digest writable by others",
        pytest.param("library owned by another user", marks=as_root),
        pytest.param("digest owned by another user", marks=as_root),
        "symlink",
    ],
)
def test_untrusted_cached_library_is_rebuilt_not_loaded(cache, planted, case, tmp_path):
    library, digest = _built(cache)
    _forget()
    _plant(library, digest, planted, case, tmp_path)
    with pytest.warns(UserWarning, match="rebuilding the native kernel library"):
        lib = _native.library(_native._PROBE)
    assert not Path(os.environ[MARKER_ENV]).exists(), "the planted library was loaded"
    assert lib.probe() >= 1
    _assert_trusted_build(library, digest)
    assert library.read_bytes() != planted


def test_library_without_digest_is_rebuilt_silently(cache, planted):
    """A cache written before digests were recorded (or a build killed between its two renames)."""
    library, digest = _built(cache)
    _forget()
    digest.unlink()
    _replace(library, planted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.library(_native._PROBE).probe() >= 1
    assert not Path(os.environ[MARKER_ENV]).exists()
    _assert_trusted_build(library, digest)


@pytest.mark.parametrize(
    "case", ["writable by others", pytest.param("owned by another user", marks=as_root)]
)
def test_untrusted_cache_directory_is_not_used(cache, planted, case):
    library, digest = _built(cache)
    _forget()
    _replace(library, planted)
    digest.write_text(hashlib.sha256(planted).hexdigest() + "\n")
    if case == "writable by others":
        cache.chmod(0o777)
    else:
        os.chown(cache, OTHER_UID, OTHER_UID)
    with pytest.warns(UserWarning, match="not using the native kernel cache"):
        lib = _native.library(_native._PROBE)
    assert not Path(os.environ[MARKER_ENV]).exists(), "the planted library was loaded"
    assert lib.probe() >= 1
    scratch = _native.cache_dir()
    assert scratch != cache and stat.S_IMODE(scratch.stat().st_mode) == 0o700
    assert library.read_bytes() == planted, "an untrusted directory is left alone"


BROKEN_COMPILER_RUN = textwrap.dedent(
    """
    import torch
    import tdm_fast.kernels as K
    from tdm_fast.kernels import reference as R

    torch.manual_seed(0)
    x0, dc, du, df = (torch.randn(2, 4, 8, 8) for _ in range(4))
    for _ in range(2):  # the fallback is said once, not per call
        x, x_ref = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        loss = K.tdm_generator_loss(x, dc, du, df, 4.5)
        ref = R.tdm_generator_loss(x_ref, dc, du, df, 4.5, 1e-3, True)
        (loss + ref).backward()
        assert torch.equal(loss, ref) and torch.equal(x.grad, x_ref.grad)
    print(K.select_backend(x0, "tdm_generator_loss"))
    """
)


def test_broken_compiler_falls_back_to_reference(tmp_path):
    """Inductor on CPU needs the C++ compiler too: with both broken, the reference runs, said once.
    (A missing compiler fails the same way in both; tests/test_kernels.py covers its native side.)"""
    env = {**os.environ, _native.CACHE_ENV: str(tmp_path), "CXX": "/bin/false"}
    env.pop(_backend.ENV, None)
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", BROKEN_COMPILER_RUN],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["torch"]
    assert "Traceback" not in run.stderr
    assert run.stderr.count("Warning: tdm_fast:") == 1, run.stderr  # (-W always: repeats would show)
    assert "using the (slower) reference torch kernels" in run.stderr and "/bin/false" in run.stderr

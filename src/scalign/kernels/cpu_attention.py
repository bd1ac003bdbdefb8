"""Decode-step attention products on XLA:CPU as FFI custom calls (`decode_attention.cc`).

`decode_scores(q, keys, lo, hi)` and `decode_values(probs, values, lo, hi)` are the two cache
products of one decode step (one new token per row), with the cache layouts of
`models.transformer` (keys [B, K, Dh, S], values [B, K, S, Dh]). They read only the visible
slots lo[b] <= s <= hi of each row; the softmax between them stays in XLA. float32 only.

The C++ source is compiled on first use, like `torch.utils.cpp_extension.load`: `g++ -O3
-march=native` against the FFI headers that jaxlib ships (`jax.ffi.include_dir()`), into
`$SCALIGN_KERNEL_CACHE` (default `~/.cache/scalign/kernels`) under a name that hashes the
source, the flags, jaxlib's version and this CPU's feature flags, so a changed source, jaxlib or
machine rebuilds; the build goes to a temporary file renamed into place (safe under
pytest-xdist). Where that cannot happen (no C++ compiler, no headers, a failed build),
`available()` is False, says why in `unavailable_reason()`, and the model keeps its XLA
attention: nothing else changes. `SCALIGN_CPU_ATTENTION=0` switches the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("decode_attention.cc")
_SCORES, _VALUES = "scalign_decode_scores", "scalign_decode_values"
_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("SCALIGN_KERNEL_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "scalign" / "kernels"


def library_path() -> Path:
    """Where the compiled kernels for this source, jaxlib, compiler flags and CPU live."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
    return _cache_dir() / f"decode_attention_{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) on PATH")
    include = jax.ffi.include_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    if os.environ.get("SCALIGN_CPU_ATTENTION", "1") == "0":
        raise RuntimeError("switched off by SCALIGN_CPU_ATTENTION=0")
    path = library_path()
    if not path.exists():
        _build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(_SCORES, jax.ffi.pycapsule(lib.ScalignDecodeScores),
                                platform="cpu")
    jax.ffi.register_ffi_target(_VALUES, jax.ffi.pycapsule(lib.ScalignDecodeValues),
                                platform="cpu")
    _state["lib"] = lib  # keep the library loaded for the process


@functools.cache
def available() -> bool:
    """Whether the kernels are built, loaded and registered (builds them on first call)."""
    try:
        _load()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "use XLA's attention"
        _state["reason"] = f"{type(e).__name__}: {e}"
        return False


def unavailable_reason() -> str | None:
    """Why `available()` is False (None if it is True or was not asked yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def _bounds(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    return lo.astype(jnp.int32), jnp.reshape(hi, (1,)).astype(jnp.int32)


def decode_scores(q: jax.Array, keys: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """float32 [B, K, G, S]: q [B, K, G, Dh] . keys [B, K, Dh, S] over slots lo[b] <= s <= hi;
    the lowest float32 at the other slots."""
    B, K, G, _ = q.shape
    lo, hi = _bounds(lo, hi)
    out = jax.ShapeDtypeStruct((B, K, G, keys.shape[3]), jnp.float32)
    return jax.ffi.ffi_call(_SCORES, out)(q.astype(jnp.float32), keys, lo, hi)


def decode_values(probs: jax.Array, values: jax.Array, lo: jax.Array, hi: jax.Array
                  ) -> jax.Array:
    """float32 [B, K, G, Dh]: sum over slots lo[b] <= s <= hi of probs[..., s] * values[.., s, :]."""
    B, K, G, _ = probs.shape
    lo, hi = _bounds(lo, hi)
    out = jax.ShapeDtypeStruct((B, K, G, values.shape[3]), jnp.float32)
    return jax.ffi.ffi_call(_VALUES, out)(probs, values, lo, hi)

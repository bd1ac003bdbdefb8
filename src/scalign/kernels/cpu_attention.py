"""Decode-step attention on XLA:CPU as one FFI custom call per layer (`decode_attention.cc`).

`decode_attention(q, keys, values, lo, hi, softcap)` is the whole attention of one decode step
(one new token per row) with the cache layouts of `models.transformer` (keys [B, K, Dh, S],
values [B, K, S, Dh]): scores, optional soft-cap, softmax and the weighted sum of values, over
the visible slots lo[b] <= s <= hi of each row only. float32 only.

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
import numpy as np

SOURCE = Path(__file__).with_name("decode_attention.cc")
_TARGET = "scalign_decode_attention"
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
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.ScalignDecodeAttention),
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


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, lo: jax.Array,
                     hi: jax.Array, softcap: float | None = None) -> jax.Array:
    """float32 [B, K, G, Dh]: softmax_s(cap(q . keys[..., s])) . values[..., s, :] over the
    slots lo[b] <= s <= hi (clipped to the buffer) of each row b; zeros for a row with none.

    q: [B, K, G, Dh], already scaled; keys [B, K, Dh, S]; values [B, K, S, Dh]; lo int [B];
    hi a scalar (one query slot for the whole batch); softcap: cap * tanh(x / cap) on the
    scores (Gemma 2), None for none."""
    B, K, G, Dh = q.shape
    out = jax.ShapeDtypeStruct((B, K, G, Dh), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(
        q.astype(jnp.float32), keys, values, lo.astype(jnp.int32),
        jnp.reshape(hi, (1,)).astype(jnp.int32), softcap=np.float32(softcap or 0.0))

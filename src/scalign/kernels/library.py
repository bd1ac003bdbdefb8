"""Build, load and register the C++ kernels of this package (XLA FFI custom calls on CPU).

The sources (`decode_attention.cc`, `decode_matmul.cc` and their shared `parallel_for.h`) are
compiled into one library on first use, like `torch.utils.cpp_extension.load`: `g++ -O3
-march=native` against the FFI headers that jaxlib ships (`jax.ffi.include_dir()`), into
`$SCALIGN_KERNEL_CACHE` (default `~/.cache/scalign/kernels`) under a name that hashes the
sources, the flags, jaxlib's version and this CPU's feature flags, so a changed source, jaxlib
or machine rebuilds; the build goes to a temporary file renamed into place (safe under
pytest-xdist). Where that cannot happen (no C++ compiler, no headers, a failed build),
`available()` is False, says why in `unavailable_reason()`, and the model keeps XLA's own ops:
nothing else changes. `SCALIGN_CPU_KERNELS=0` (or the older `SCALIGN_CPU_ATTENTION=0`) switches
the kernels off.
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

_DIR = Path(__file__).parent
SOURCES = (_DIR / "decode_attention.cc", _DIR / "decode_matmul.cc")
HEADERS = (_DIR / "parallel_for.h",)
# FFI target name -> the handler symbol the library exports
TARGETS = {"scalign_decode_attention": "ScalignDecodeAttention",
           "scalign_panel_matmul": "ScalignPanelMatmul"}
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
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(_FLAGS).encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
    return _cache_dir() / f"scalign_kernels_{key.hexdigest()[:16]}.so"


def compiler() -> str | None:
    """The C++ compiler the build uses ($CXX, else g++ or c++ on PATH), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def switched_off() -> str | None:
    """The environment variable that switches the kernels off (set to 0), or None."""
    for var in ("SCALIGN_CPU_KERNELS", "SCALIGN_CPU_ATTENTION"):
        if os.environ.get(var, "1") == "0":
            return var
    return None


def _build(target: Path) -> None:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) on PATH")
    include = jax.ffi.include_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{include}", f"-I{_DIR}", *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    var = switched_off()
    if var is not None:
        raise RuntimeError(f"switched off by {var}=0")
    path = library_path()
    if not path.exists():
        _build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    _state["lib"] = lib  # keep the library loaded for the process


@functools.cache
def available() -> bool:
    """Whether the kernels are built, loaded and registered (builds them on first call)."""
    try:
        _load()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "use XLA's own ops"
        _state["reason"] = f"{type(e).__name__}: {e}"
        return False


def unavailable_reason() -> str | None:
    """Why `available()` is False (None if it is True or was not asked yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def require(what: str) -> None:
    """Build and register the kernels if need be; raise RuntimeError saying why they cannot be."""
    if not available():
        raise RuntimeError(f"{what}: the CPU kernels are unavailable ({unavailable_reason()})")

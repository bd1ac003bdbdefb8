"""Test session setup: 8 virtual CPU devices for the sharding tests.

The flag must be set before jax initialises its backend, so it is set here, before any test
module imports jax. Single-device tests simply use the first device.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Persistent XLA compilation cache: many tests compile identical programs (same model, new
# closures); the cache turns those recompiles into lookups. Safe under pytest-xdist.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache",
                                   "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """Tests of the CPU FFI kernels: skipped where they cannot exist (no C++ compiler, or
    switched off by SCALIGN_CPU_KERNELS=0), but FAILED where a compiler exists and the build or
    load failed, so a broken kernel build never turns CI green with the kernels silently off."""
    from scalign.kernels import library

    if library.available():
        return
    reason = library.unavailable_reason()
    if library.switched_off() is not None or library.compiler() is None:
        pytest.skip(f"CPU kernels unavailable: {reason}")
    pytest.fail(f"a C++ compiler ({library.compiler()}) is present but the CPU kernels are "
                f"unavailable: {reason}")


def _flip_bytes(step_dir, n: int = 64) -> None:
    """Flip `n` bytes in the middle of the largest file of a checkpoint step's state: the array
    data (so values change and the file still parses; only the checksums can tell)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2 - n // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))


import pytest  # noqa: E402


@pytest.fixture
def flip_bytes():
    """The checkpoint-corruption helper of the integrity tests (`_flip_bytes`)."""
    return _flip_bytes

"""Small shared utilities: progress bars on process 0, seeds, timing."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax


def is_main_process() -> bool:
    return jax.process_index() == 0


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def set_description(self, *a: Any, **k: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int | None = None, *, desc: str = "", initial: int = 0,
                 enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on process 0 (a no-op object elsewhere or when disabled)."""
    if not enabled or not is_main_process():
        return _NullBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                leave=True)


def stage_key(seed: int, *names: str | int) -> jax.Array:
    """A key derived from the root seed and names (stage, purpose, index), stable across runs.

    Strings are folded in through a fixed hash (FNV-1a 32-bit), never Python's salted hash().
    """
    key = jax.random.PRNGKey(seed)
    for name in names:
        key = jax.random.fold_in(key, name if isinstance(name, int) else fnv1a32(name))
    return key


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


# XLA:CPU flags the entry points (experiments/launch.py, `python -m scalign.bench`) add on the
# jaxlib versions they were measured on. LIBRARY_FUSION_TYPE_DOT + ELTWISE lets XLA hand dots
# together with their element-wise neighbours to YNNPACK: on the 2-core AVX2 CI machine
# `sft_llama_small` 695 vs 645 tok/s and `dpo_llama_small` 1.87 vs 1.71 pairs/s (2026-12-04,
# same losses to 6 digits), the sampler unchanged.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type="
                 "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",)
CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


def tune_cpu_xla_flags(env: dict[str, str] | None = None,
                       jaxlib_version: str | None = None) -> list[str]:
    """Append `CPU_XLA_FLAGS` to XLA_FLAGS (in `env`, default os.environ) and return the flags
    added. Nothing is added when SCALIGN_XLA_TUNING=0, when XLA_FLAGS already sets the flag
    (the user's value wins), on a jaxlib other than `CPU_XLA_FLAGS_JAXLIB` (XLA aborts on
    flags it does not know), or once a JAX backend exists (XLA read its flags then)."""
    env = os.environ if env is None else env
    if env.get("SCALIGN_XLA_TUNING", "1") == "0":
        return []
    if jaxlib_version is None:
        import jaxlib

        jaxlib_version = jaxlib.__version__
        try:
            from jax._src import xla_bridge

            if xla_bridge._backends:  # flags are read when the first backend is made
                return []
        except (ImportError, AttributeError):
            pass
    if not jaxlib_version.startswith(CPU_XLA_FLAGS_JAXLIB):
        return []
    current = env.get("XLA_FLAGS", "")
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added

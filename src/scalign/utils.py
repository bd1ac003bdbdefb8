"""Small shared utilities: progress bars on process 0, seeds, timing."""

from __future__ import annotations

import contextlib
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

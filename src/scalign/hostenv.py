"""Process-level host settings the entry points apply before JAX starts (no jax import here).

glibc malloc and transparent huge pages. XLA:CPU allocates a training step's temporaries
(logits, their gradient, per-layer activations: ~1.4 GB for `sft_llama_small`) afresh every
step, and glibc serves large blocks with new mmaps that the kernel faults in 4 KiB at a time:
350k page faults and 0.7 s of system time per 2.7 s step on the 2-core CI machine. With the
glibc >= 2.35 tunable `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages
(madvise), faults drop to ~2k per step and the step to 2.3-2.4 s (2026-12-04). glibc reads
tunables only at process start, so `reexec_with_malloc_tuning` restarts the interpreter once
with GLIBC_TUNABLES set (the same command line; the variable being set ends the loop).
`SCALIGN_MALLOC_TUNING=0` turns it off; a GLIBC_TUNABLES that already names the tunable wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None (not glibc, not Linux)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # e.g. "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def malloc_tuning_env(env: Mapping[str, str], *, libc: tuple[int, int] | None = None,
                      thp: str | None = None) -> dict[str, str] | None:
    """The environment to restart with (env plus the hugetlb tunable), or None when nothing is
    to change: opted out, not glibc >= 2.35, huge pages disabled ("[never]"), or the tunable
    already set. `libc` / `thp` override the detected glibc version / THP setting (tests)."""
    if env.get("SCALIGN_MALLOC_TUNING", "1") == "0":
        return None
    libc = glibc_version() if libc is None else libc
    if libc is None or libc < (2, 35):
        return None
    if thp is None:
        try:
            with open(THP_SETTING) as f:
                thp = f.read()
        except OSError:
            return None
    if "[never]" in thp:
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    out = dict(env)
    out["GLIBC_TUNABLES"] = ":".join(t for t in (current, HUGETLB_TUNABLE) if t)
    return out


def reexec_with_malloc_tuning(exec_fn: Callable[..., object] = os.execve) -> bool:
    """Restart this interpreter with the same command line and `malloc_tuning_env`, if it
    changes anything (`exec_fn` does not return then). False when nothing changed."""
    env = malloc_tuning_env(os.environ)
    if env is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    exec_fn(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return True

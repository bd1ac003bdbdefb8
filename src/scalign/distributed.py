"""Multi-process JAX: one call that joins the cluster, with timeouts that turn a dead peer
into an error instead of a hang.

    from scalign import distributed
    distributed.initialize()                                    # TPU VM: all found by JAX
    distributed.initialize("10.0.0.2:8476", num_processes=4, process_id=i)   # CPU / GPU

JAX's multi-controller runtime runs one process per host; every process runs the same program
and collectives meet across processes. Two failure modes matter on preemptible pods:

- a peer that never starts: `init_timeout_s` bounds the wait in `initialize`;
- a peer that dies mid-run (a reclaimed spot VM, an OOM kill): the coordination service misses
  its heartbeats for `heartbeat_timeout_s` and stops every other process with an error naming
  the lost task, instead of leaving them blocked in a collective forever.

On CPU the cross-process collectives are gloo's (`jax_cpu_collectives_implementation`), set
here before the backend starts.
"""

from __future__ import annotations

import os

import jax

#: defaults, overridable by the environment (seconds)
HEARTBEAT_TIMEOUT_S = int(os.environ.get("SCALIGN_HEARTBEAT_TIMEOUT_S", "100"))
INIT_TIMEOUT_S = int(os.environ.get("SCALIGN_INIT_TIMEOUT_S", "300"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int | None = None,
               init_timeout_s: int | None = None) -> None:
    """`jax.distributed.initialize` with scalign's timeouts (and gloo collectives on CPU).

    With every argument None (a TPU VM slice, SLURM, ...) JAX detects the cluster itself.
    Call it before anything touches a device.
    """
    platforms = str(jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", ""))
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator, num_processes, process_id,
        initialization_timeout=int(init_timeout_s or INIT_TIMEOUT_S),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s or HEARTBEAT_TIMEOUT_S))


def describe() -> str:
    """`process i/n, local devices l, global devices g (platform)` for logs."""
    return (f"process {jax.process_index()}/{jax.process_count()}, local devices "
            f"{jax.local_device_count()}, global devices {jax.device_count()} "
            f"({jax.default_backend()})")

"""Preemption: SIGTERM (how spot / preemptible TPU VMs are reclaimed) stops a run cleanly.

    preemption.install()              # the launcher does this once, before training
    ...
    if preemption.reached(step):      # train_loop / OnlineLoop.run, at every step boundary
        save a checkpoint at `step`; raise Preempted(...)

The launcher catches `Preempted`, prints one line

    preempted: <stage> saved at step N; resume with: python experiments/launch.py ... --resume

and exits 0, so a job supervisor (or `tpu/run.sh` re-run by hand) simply starts the same
command with `--resume`; the resumed run reproduces the uninterrupted one bitwise on CPU
(all randomness is folded from the step / iteration, the data iterator is checkpointed).

One process: a Python SIGTERM handler sets a flag that the next boundary reads. Several
processes: they must all stop at the *same* boundary (a process that saved and left would
leave its peers blocked in a collective), so JAX's preemption sync service decides
(`multihost_utils.reached_preemption_sync_point`: the first notice is propagated to every
process, which agree on the next boundary after the furthest one). Its own SIGTERM notifier is
used there, so no Python handler is installed. Boundaries are counted process-wide (every
process runs the same sequence of steps and iterations), so stages with restarting step
numbers never confuse the protocol.
"""

from __future__ import annotations

import signal
import threading

import jax

_EVENT = threading.Event()
_STATE = {"installed": False, "boundary": 0, "signal": None}


class Preempted(Exception):  # noqa: N818 - a normal outcome, not an error
    """A preemption notice stopped a run after saving at `step` (of `stage`)."""

    def __init__(self, message: str, *, stage: str, step: int):
        super().__init__(message)
        self.stage = stage
        self.step = step


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _STATE["signal"] = signum
    _EVENT.set()


def install(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Watch for preemption notices (call from the main thread, once, before training)."""
    if jax.process_count() == 1:
        for s in signals:
            signal.signal(s, _handler)
    _STATE["installed"] = True


def uninstall() -> None:
    """Restore default signal handling and forget any notice (tests)."""
    if _STATE["installed"] and jax.process_count() == 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _STATE.update(installed=False, boundary=0, signal=None)
    _EVENT.clear()


def request() -> None:
    """Behave as if a notice arrived (tests, drills)."""
    _STATE["installed"] = True
    _EVENT.set()


def reached(step: int | None = None) -> bool:
    """At a step boundary: should the run save now and stop? Call at every boundary, on every
    process (it is cheap: no device work; one coordination-service check with several
    processes)."""
    del step  # boundaries are counted process-wide (see the module docstring)
    if not _STATE["installed"]:
        return False
    _STATE["boundary"] += 1
    if jax.process_count() > 1 and not _EVENT.is_set():
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(_STATE["boundary"]))
    return _EVENT.is_set()


def message(stage: str, step: int, where: str) -> str:
    return f"{stage}: preempted (signal received); saved at {where} {step} so a resume continues there"

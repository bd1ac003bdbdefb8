"""The training loop: feed batches to a compiled step, log, checkpoint, resume.

    state, history = train_loop(step_fn, state, data_iter, num_steps=..., mesh=...,
                                checkpointer=ckpt, metrics=writer, stage="sft")

It is orchestration only: what is learned is decided by the step's loss function. With a
`Checkpointer`, the loop first restores the newest checkpoint (train state *and* data-iterator
state), so a killed run continues bitwise identically to one that was never interrupted: the
step's randomness is `fold_in(state.rng, state.step)` and the iterator resumes mid-epoch.
The restore is verified (see `Checkpointer.restore`): a damaged newest checkpoint is skipped
for the newest good one, and the run says so (`LoopResult.checkpoint_fallbacks`).

Non-finite guard: every step reports `nonfinite` (loss or gradient norm NaN/inf). With
`on_nonfinite="stop"` (the default) the loop raises `NonFiniteError` naming the first such step
before it saves anything after it, so the newest checkpoint stays the last good one. With
`"skip"` (the step must be built with `make_train_step(skip_nonfinite=True)`) such updates are
not applied, counted (`skipped_steps` in the logged metrics) and the run stops after
`max_consecutive_skips` in a row. The check is device-side per step and read by the host only
at log and checkpoint steps, so it never stalls the accelerator.

Preemption: once `training.preemption.install()` ran (the launcher does), a SIGTERM makes the
loop save at the next step boundary and raise `preemption.Preempted` (the launcher prints how
to resume and exits 0).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from scalign import parallel
from scalign.training import preemption
from scalign.training.checkpoint import Checkpointer
from scalign.training.metrics import MetricsWriter, to_scalars
from scalign.training.state import TrainState
from scalign.utils import progress_bar


class Interrupted(RuntimeError):
    """Raised by `train_loop(stop_after=...)`: a simulated crash, for resume tests and drills."""


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient norm stopped the run; `step` is the first bad step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


NONFINITE_POLICIES = ("stop", "skip")


@functools.partial(jax.jit, static_argnames=("max_run",))
def _track_nonfinite(acc: dict[str, jax.Array], metrics: dict[str, jax.Array],
                     step: jax.Array, *, max_run: int) -> dict[str, jax.Array]:
    """Device-side counters: skipped total, current run, first bad step, step the run hit
    `max_run` (-1: not yet)."""
    if "nonfinite" in metrics:
        bad = metrics["nonfinite"] > 0
    else:
        bad = ~jnp.isfinite(metrics["loss"]) if "loss" in metrics else jnp.bool_(False)
        if "grad_norm" in metrics:
            bad = bad | ~jnp.isfinite(metrics["grad_norm"])
    run = jnp.where(bad, acc["run"] + 1, 0)
    return {"total": acc["total"] + bad.astype(jnp.int32), "run": run,
            "first": jnp.where((acc["first"] < 0) & bad, step, acc["first"]),
            "stop": jnp.where((acc["stop"] < 0) & (run >= max_run), step, acc["stop"])}


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    history: list[dict[str, float]]
    resumed_from: int | None
    seconds: float
    steps_run: int
    #: updates not applied because the loss or gradient norm was non-finite (on_nonfinite="skip")
    skipped_steps: int = 0
    #: checkpoint steps skipped on restore because they were bad: [{"step", "path", "error"}]
    checkpoint_fallbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def train_loop(step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]],
               state: TrainState, data_iter: Iterator[Any], *, num_steps: int, mesh: Mesh,
               stage: str, checkpointer: Checkpointer | None = None,
               metrics: MetricsWriter | None = None, log_every: int = 10,
               hooks: tuple[Callable[[int, TrainState], dict[str, float] | None], ...] = (),
               hook_every: int = 0, stop_after: int | None = None,
               meta: dict[str, Any] | None = None, progress: bool = True,
               on_nonfinite: str = "stop", max_consecutive_skips: int = 3,
               inject: Callable[[int, Any], Any] | None = None) -> LoopResult:
    """Run `step_fn` until `state.step == num_steps`.

    Args:
      step_fn: from `make_train_step` (donates its state argument).
      state: initial state (also the restore template: shapes + shardings).
      data_iter: host batches (a checkpointable grain iterator when resuming matters).
      checkpointer: restore the newest checkpoint first; save every `save_every` steps and at
        the end.
      log_every: fetch and log metrics every this many steps (and at the last step); metrics
        stay on device in between so the host never stalls the accelerator.
      hooks / hook_every: `hook(step, state) -> metrics | None` called every `hook_every` steps
        (evaluations); their metrics are logged under the same stage.
      stop_after: raise `Interrupted` after this many steps of *this call* (after the
        checkpoint at that step, if one is due) — a deterministic crash for tests.
      meta: JSON dict saved with each checkpoint.
      on_nonfinite: "stop" (raise `NonFiniteError` naming the first step whose loss or
        gradient norm is NaN/inf; nothing after it is saved) or "skip" (the step, built with
        `skip_nonfinite=True`, did not apply the update; counted; `NonFiniteError` after
        `max_consecutive_skips` in a row).
      inject: test-only hook, `batch = inject(step, batch)` before sharding (e.g. a NaN drill).
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    if max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
    resumed_from = None
    fallbacks: list[dict[str, Any]] = []
    if checkpointer is not None and checkpointer.latest_step() is not None:
        n_before = len(checkpointer.fallbacks)
        state, _ = checkpointer.restore(state, data_iter)
        fallbacks = checkpointer.fallbacks[n_before:]
        resumed_from = int(state.step)
        if fallbacks and metrics is not None:
            metrics.write(stage, resumed_from, {"checkpoint_fallbacks": float(len(fallbacks))})
    start = int(state.step)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    last_log_time, last_log_step = t0, start
    bar = progress_bar(total=num_steps, initial=start, desc=stage, enabled=progress)
    pending: dict[str, Any] | None = None
    steps_run = 0
    zero = jnp.zeros((), jnp.int32)
    acc = {"total": zero, "run": zero, "first": zero - 1, "stop": zero - 1}
    max_run = max_consecutive_skips if on_nonfinite == "skip" else 1

    def check(done: int) -> int:
        """Raise if the guard says stop; return the skipped count so far."""
        # replicated scalars: this process' copy (device_get would need every process' shard)
        got = {k: int(v.addressable_data(0)) for k, v in acc.items()}
        if (on_nonfinite == "stop" and got["first"] >= 0) or got["stop"] >= 0:
            bar.close()
        if on_nonfinite == "stop" and got["first"] >= 0:
            raise NonFiniteError(
                f"{stage}: non-finite loss or gradient norm at step {got['first']} (checked at "
                f"step {done}); stopped without saving a checkpoint after it"
                f"{last_good_message(checkpointer)} (on_nonfinite='skip' skips such updates instead)",
                got["first"])
        if on_nonfinite == "skip" and got["stop"] >= 0:
            raise NonFiniteError(
                f"{stage}: {max_consecutive_skips} consecutive non-finite updates skipped, the "
                f"last at step {got['stop']} ({got['total']} skipped in all); stopping"
                f"{last_good_message(checkpointer)}", got["stop"])
        return got["total"]
    for step in range(start, num_steps):
        try:
            batch = next(data_iter)
        except StopIteration:
            raise RuntimeError(f"{stage}: data ran out at step {step} of {num_steps}; "
                               f"increase num_epochs or lower the number of steps") from None
        if inject is not None:
            batch = inject(step, batch)
        state, pending = step_fn(state, parallel.shard_batch(batch, mesh))
        done = step + 1
        steps_run += 1
        acc = _track_nonfinite(acc, pending, jnp.asarray(done, jnp.int32), max_run=max_run)
        bar.update(1)
        if done % log_every == 0 or done == num_steps:
            skipped = check(done)
            scalars = to_scalars(pending)
            if on_nonfinite == "skip":
                scalars["skipped_steps"] = float(skipped)
            now = time.perf_counter()
            scalars["steps_per_s"] = (done - last_log_step) / max(now - last_log_time, 1e-9)
            last_log_time, last_log_step = now, done
            if metrics is not None:
                metrics.write(stage, done, scalars)
            history.append({"step": done, **scalars})
            bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss",) if k in scalars})
        if hook_every and (done % hook_every == 0 or done == num_steps):
            for hook in hooks:
                out = hook(done, state)
                if out:
                    if metrics is not None:
                        metrics.write(stage, done, out)
                    history.append({"step": done, **out})
        if checkpointer is not None and checkpointer.should_save(done, force=done == num_steps):
            check(done)  # never save a state after a non-finite step (policy "stop")
            checkpointer.maybe_save(done, state, data_iter, meta, force=done == num_steps)
        if preemption.reached(done) and done < num_steps:
            saved = ""
            if checkpointer is not None:
                check(done)
                checkpointer.maybe_save(done, state, data_iter, meta, force=True)
                checkpointer.wait()
                saved = f" in {checkpointer.directory}"
            bar.close()
            raise preemption.Preempted(
                f"{stage}: preempted; saved at step {done} of {num_steps}{saved}"
                if saved else f"{stage}: preempted at step {done} (no checkpointer: not saved)",
                stage=stage, step=done)
        if stop_after is not None and steps_run >= stop_after and done < num_steps:
            if checkpointer is not None:
                checkpointer.wait()
            bar.close()
            raise Interrupted(f"{stage}: stopped after step {done} (stop_after={stop_after})")
    if checkpointer is not None:
        checkpointer.wait()
    bar.close()
    skipped = check(num_steps) if steps_run else 0
    jax.block_until_ready(state)
    return LoopResult(state=state, history=history, resumed_from=resumed_from,
                      seconds=time.perf_counter() - t0, steps_run=steps_run,
                      skipped_steps=skipped, checkpoint_fallbacks=fallbacks)


def last_good_message(checkpointer: Checkpointer | None) -> str:
    if checkpointer is None:
        return ""
    checkpointer.wait()
    good = checkpointer.good_steps()
    return (f"; the last good checkpoint is step {good[-1]} in {checkpointer.directory}"
            if good else "; there is no good checkpoint yet")

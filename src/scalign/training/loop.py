"""The training loop: feed batches to a compiled step, log, checkpoint, resume.

    state, history = train_loop(step_fn, state, data_iter, num_steps=..., mesh=...,
                                checkpointer=ckpt, metrics=writer, stage="sft")

It is orchestration only: what is learned is decided by the step's loss function. With a
`Checkpointer`, the loop first restores the newest checkpoint (train state *and* data-iterator
state), so a killed run continues bitwise identically to one that was never interrupted: the
step's randomness is `fold_in(state.rng, state.step)` and the iterator resumes mid-epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from scalign import parallel
from scalign.training.checkpoint import Checkpointer
from scalign.training.metrics import MetricsWriter, to_scalars
from scalign.training.state import TrainState
from scalign.utils import progress_bar


class Interrupted(RuntimeError):
    """Raised by `train_loop(stop_after=...)`: a simulated crash, for resume tests and drills."""


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    history: list[dict[str, float]]
    resumed_from: int | None
    seconds: float
    steps_run: int


def train_loop(step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]],
               state: TrainState, data_iter: Iterator[Any], *, num_steps: int, mesh: Mesh,
               stage: str, checkpointer: Checkpointer | None = None,
               metrics: MetricsWriter | None = None, log_every: int = 10,
               hooks: tuple[Callable[[int, TrainState], dict[str, float] | None], ...] = (),
               hook_every: int = 0, stop_after: int | None = None,
               meta: dict[str, Any] | None = None, progress: bool = True) -> LoopResult:
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
    """
    resumed_from = None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state, data_iter)
        resumed_from = int(state.step)
    start = int(state.step)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    last_log_time, last_log_step = t0, start
    bar = progress_bar(total=num_steps, initial=start, desc=stage, enabled=progress)
    pending: dict[str, Any] | None = None
    steps_run = 0
    for step in range(start, num_steps):
        try:
            batch = next(data_iter)
        except StopIteration:
            raise RuntimeError(f"{stage}: data ran out at step {step} of {num_steps}; "
                               f"increase num_epochs or lower the number of steps") from None
        state, pending = step_fn(state, parallel.shard_batch(batch, mesh))
        done = step + 1
        steps_run += 1
        bar.update(1)
        if done % log_every == 0 or done == num_steps:
            scalars = to_scalars(pending)
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
        if checkpointer is not None:
            checkpointer.maybe_save(done, state, data_iter, meta, force=done == num_steps)
        if stop_after is not None and steps_run >= stop_after and done < num_steps:
            if checkpointer is not None:
                checkpointer.wait()
            bar.close()
            raise Interrupted(f"{stage}: stopped after step {done} (stop_after={stop_after})")
    if checkpointer is not None:
        checkpointer.wait()
    bar.close()
    jax.block_until_ready(state)
    return LoopResult(state=state, history=history, resumed_from=resumed_from,
                      seconds=time.perf_counter() - t0, steps_run=steps_run)

"""Checkpointing: orbax `CheckpointManager` for the train state, data iterator and metadata.

One checkpoint step directory holds four items:

- `state`: the state pytree (`ocp.args.StandardSave`; any pytree of arrays, e.g. a
  `TrainState` or an online loop's state), written asynchronously; the device-to-host copy
  happens before `maybe_save` returns, so the caller may donate or overwrite the state right
  after.
- `data_iter`: the grain iterator state of *this* process (`grain.checkpoint.CheckpointSave`
  writes `process_<i>-of-<n>.json`), captured synchronously at save time.
- `meta`: a small JSON dict (config hash, stage name, counters...), identical on all
  processes (`ocp.args.JsonSave`).
- `integrity`: per-leaf checksums of `state` and whether every floating leaf was finite,
  computed on device at save time (`state_integrity`).

Integrity: `restore` recomputes the checksums of what it read and checks finiteness. A step
that cannot be read (a damaged `_METADATA`, a truncated iterator JSON, a TensorStore error),
whose checksums differ (flipped bytes), or whose state is non-finite is *bad*: with the default
`step=None` the restore logs a warning naming the step and the problem, moves the step aside to
`<directory>.corrupt/<step>` (never deleted: it stays for inspection) and falls back to the
next older step; `fallbacks` lists what was skipped. Retention keeps the `keep` newest
steps *and* the newest step known good (saved from a finite state, not found bad), so a run that
goes wrong never deletes its last good checkpoint.

Multi-host rule (Levanter's hang on save is the cautionary tale): every process calls
`maybe_save` / `restore` with the same step; orbax coordinates which process writes what.
There is no `if process_index == 0` around any call here (except moving a bad step aside,
which process 0 does between two barriers).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_STATE, _DATA, _META, _INTEGRITY = "state", "data_iter", "meta", "integrity"

log = logging.getLogger(__name__)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step that cannot be restored as saved (unreadable, changed or non-finite)."""


class Checkpointer:
    """Save every `save_every` steps, keep the `keep` newest (and the newest good one), restore
    onto given shardings with verification and fall-back.

    Usage::

        ckpt = Checkpointer(workdir / "checkpoints", save_every=500, keep=3)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state, data_iter)   # state: template
        for step in ...:
            ...
            ckpt.maybe_save(step, state, data_iter, meta)
        ckpt.maybe_save(step, state, data_iter, meta, force=True)
        ckpt.close()
    """

    def __init__(self, directory: str | epath.PathLike, *, save_every: int, keep: int,
                 async_save: bool = True, check_finite: bool = True):
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be positive, got {save_every}")
        if keep <= 0:
            raise ValueError(f"checkpoint keep must be positive, got {keep}")
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        self.keep = int(keep)
        self.check_finite = bool(check_finite)
        #: steps skipped by `restore` because they were bad: [{"step", "path", "error"}]
        self.fallbacks: list[dict[str, Any]] = []
        # retention is ours (see `_prune`): orbax keeps every step it is given
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._finite: dict[int, bool] = {}  # step -> state was finite when saved (this process)

    # ------------------------------------------------------------------ save

    def should_save(self, step: int, force: bool = False) -> bool:
        """True when `step` is a multiple of `save_every` (or `force`) and not yet saved."""
        return (force or step % self.save_every == 0) and step not in self.all_steps()

    def maybe_save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None,
                   meta: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Save `state` (and the iterator state, and `meta`) at `step` if `should_save`.

        Call on every process. Returns whether a save was started. With async saving the
        write continues in the background; `wait()` blocks until it is durable. The state's
        checksums and finiteness are computed (on device) before this returns.
        """
        step = int(step)
        if not self.should_save(step, force):
            return False
        meta = {} if meta is None else dict(meta)
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be JSON-serializable: {e}") from e
        integrity = state_integrity(state)
        # the previous save is durable before old steps are pruned (never the newest good one)
        self._manager.wait_until_finished()
        self._prune(extra=1)
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(meta),
            _INTEGRITY: ocp.args.JsonSave(integrity),
        }
        if data_iter is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        if started:
            self._finite[step] = bool(integrity["finite"])
            if not integrity["finite"]:
                log.warning("checkpoint step %d in %s holds non-finite values (%s); it is not "
                            "counted as a good checkpoint", step, self.directory,
                            ", ".join(integrity["nonfinite_leaves"][:5]))
        return started

    # ------------------------------------------------------------------ restore

    def restore(self, state_template: Any, data_iter: grain.DatasetIterator | None = None,
                step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) from `step` (default: the newest good step).

        `state_template` gives the pytree structure, shapes, dtypes and shardings: its leaves
        are concrete `jax.Array`s or `jax.ShapeDtypeStruct`s with `.sharding`; restored arrays
        are placed on exactly those shardings. If `data_iter` is given its state is set in
        place to the saved one of this process.

        Every restored step is verified: readable, checksums equal to those written at save
        time, and (with `check_finite`) every floating leaf finite. With `step=None` a bad
        step is logged, moved aside to `<directory>.corrupt/` and recorded in `fallbacks`,
        and the next older step is tried.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or no checkpoint for `step`.
          ValueError: `data_iter` given but the checkpoint has no iterator state.
          CheckpointCorruptError: the requested `step` is bad, or (`step=None`) every step is.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
            candidates = steps[::-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        else:
            candidates = [step]
        problems = []
        for s in candidates:
            try:
                return self._restore_verified(s, state_template, data_iter)
            except CheckpointCorruptError as e:
                if step is not None:
                    raise
                problems.append(str(e))
                moved = self._quarantine(s)
                self.fallbacks.append({"step": s, "path": str(moved), "error": str(e)})
                log.warning("%s; moved it to %s and falling back to an older checkpoint",
                            e, moved)
        raise CheckpointCorruptError(
            f"no good checkpoint in {self.directory}; every step was bad (each moved to "
            f"{self.directory}.corrupt/; restoring again finds none and starts over):\n  "
            + "\n  ".join(problems))

    def _restore_verified(self, step: int, state_template: Any,
                          data_iter: grain.DatasetIterator | None) -> tuple[Any, dict[str, Any]]:
        path = self.directory / str(step)
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardRestore(abstract_like(state_template)),
            _META: ocp.args.JsonRestore(),
        }
        has_integrity = (path / _INTEGRITY).exists()
        if has_integrity:
            items[_INTEGRITY] = ocp.args.JsonRestore()
        if data_iter is not None:
            if not (path / _DATA).exists():
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data "
                                 f"iterator state (it was saved without data_iter)")
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax / TensorStore / JSON errors of a bad step
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointCorruptError(f"checkpoint step {step} at {path} cannot be read: "
                                         f"{type(e).__name__}: {first}") from e
        state = restored[_STATE]
        found = state_integrity(state)
        problems = []
        if has_integrity:
            saved = restored[_INTEGRITY] or {}
            want, have = saved.get("checksums", {}), found["checksums"]
            changed = [k for k in want if have.get(k) != want[k]]
            changed += [k for k in have if k not in want]
            if changed:
                problems.append(f"{len(changed)} array(s) differ from what was saved "
                                f"(checksum mismatch in {path / _STATE}): "
                                f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}")
        if self.check_finite and not found["finite"]:
            leaves = found["nonfinite_leaves"]
            problems.append(f"non-finite values in {', '.join(leaves[:5])}"
                            f"{' ...' if len(leaves) > 5 else ''}")
        if problems:
            raise CheckpointCorruptError(f"checkpoint step {step} at {path} is bad: "
                                         + "; ".join(problems))
        self._finite[step] = True
        return state, dict(restored[_META] or {})

    def _quarantine(self, step: int) -> epath.Path:
        """Move a bad step out of the manager's directory (kept, never deleted)."""
        src = self.directory / str(step)
        dest_root = self.directory.parent / (self.directory.name + ".corrupt")
        dest = dest_root / str(step)
        n = 1
        while dest.exists():
            dest, n = dest_root / f"{step}.{n}", n + 1
        _sync("scalign_ckpt_quarantine_before")
        if jax.process_index() == 0:
            dest_root.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        _sync("scalign_ckpt_quarantine_after")
        self._finite.pop(step, None)
        self._manager.reload()
        return dest

    # ------------------------------------------------------------------ retention

    def good_steps(self) -> list[int]:
        """Steps not known to be bad: committed, and saved from a finite state (as recorded
        at save time; steps written before integrity records existed count as good)."""
        return [s for s in self.all_steps() if self._saved_finite(s)]

    def _saved_finite(self, step: int) -> bool:
        if step in self._finite:
            return self._finite[step]
        path = self.directory / str(step) / _INTEGRITY / "metadata"
        try:
            finite = bool(json.loads(path.read_text()).get("finite", True)) if path.exists() \
                else True
        except (OSError, ValueError):
            finite = False  # an unreadable record: not known good
        self._finite[step] = finite
        return finite

    def _prune(self, extra: int = 0) -> None:
        """Delete committed steps beyond the `keep - extra` newest, except the newest good one
        (`extra=1` makes room for a save about to start)."""
        steps = self.all_steps()
        if len(steps) <= max(self.keep - extra, 0):
            return
        keep = set(steps[len(steps) - max(self.keep - extra, 0):]) if self.keep > extra else set()
        good = self.good_steps()
        if good:
            keep.add(good[-1])
        if not keep:
            keep.add(steps[-1])  # the newest step stays until a newer one is durable
        for s in steps:
            if s not in keep:
                self._manager.delete(s)
                self._finite.pop(s, None)

    # ------------------------------------------------------------------ bookkeeping

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def wait(self) -> None:
        """Block until every pending asynchronous save has finished (then apply retention)."""
        self._manager.wait_until_finished()
        self._prune()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------ integrity
def _as_uint32(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits > 32:  # only with jax_enable_x64: fold both halves
        u = jax.lax.bitcast_convert_type(x, jnp.uint64)
        return (u ^ (u >> 32)).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


@jax.jit
def _leaf_checks(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    sums, finite = [], []
    for x in leaves:
        u = _as_uint32(x)
        # sum_i (u_i + c) * (2i + 1) mod 2^32: integer addition is exact and order-free, so the
        # value does not depend on the sharding; any single changed element changes it.
        weight = jnp.arange(u.size, dtype=jnp.uint32).reshape(u.shape) * 2 + 1
        sums.append(jnp.sum((u + jnp.uint32(0x9E3779B9)) * weight, dtype=jnp.uint32))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True))
    return sums, finite


def state_integrity(state: Any) -> dict[str, Any]:
    """{"checksums": {leaf path: uint32 checksum}, "finite": bool, "nonfinite_leaves": [...]}.

    Computed on device (a sharded reduction; every process gets the same numbers). Leaves
    that are not arrays are left out.
    """
    flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
            if isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)]
    if not flat:
        return {"checksums": {}, "finite": True, "nonfinite_leaves": []}
    # one jitted reduction per device set (a state may mix, e.g. a step counter on one device
    # with params on the mesh; one jit call cannot take both)
    groups: dict[Any, list[int]] = {}
    arrays = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for _, x in flat]
    for i, x in enumerate(arrays):
        key = (tuple(sorted(d.id for d in x.sharding.device_set))
               if getattr(x, "committed", True) else None)
        groups.setdefault(key, []).append(i)
    sums: list[int] = [0] * len(flat)
    finite: list[bool] = [True] * len(flat)
    for idx in groups.values():
        g_sums, g_finite = _leaf_checks([arrays[i] for i in idx])
        for i, s_, f_ in zip(idx, g_sums, g_finite, strict=True):
            sums[i], finite[i] = int(_host(s_)), bool(_host(f_))
    bad = [name for (name, _), ok in zip(flat, finite, strict=True) if not ok]
    return {"checksums": {name: s for (name, _), s in zip(flat, sums, strict=True)},
            "finite": not bad, "nonfinite_leaves": bad}


def _host(x: jax.Array) -> np.ndarray:
    """A replicated scalar's value on every process (no cross-process gather needed)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def abstract_like(tree: Any) -> Any:
    """Per leaf: `jax.ShapeDtypeStruct(shape, dtype, sharding)` to restore onto.

    Concrete `jax.Array`s contribute their own sharding. A `ShapeDtypeStruct` without a
    sharding (e.g. from `jax.eval_shape`) gets the first device in a single-process run and
    is an error in a multi-process run (where a default placement would be a silent bug).
    """

    def leaf(path: Any, x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is not None:
                return x
            if jax.process_count() > 1:
                raise ValueError(f"restore template leaf {jax.tree_util.keystr(path)} has no "
                                 f"sharding; give every ShapeDtypeStruct a sharding")
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        return x

    return jax.tree_util.tree_map_with_path(leaf, tree)


# ---------------------------------------------------------------- model artifacts
def save_model(directory: str | epath.PathLike, config: Any, params: Any,
               extra: dict[str, Any] | None = None) -> None:
    """Write a model artifact: `model_config.json` (+ `extra`) and the params (orbax).

    This is the hand-off format between stages (SFT policy -> reward model init, RL, eval);
    train checkpoints (with optimizer state) stay in each stage's `checkpoints/`. Every
    process calls this; orbax decides who writes.
    """
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    target = directory / "params"
    if target.exists() and jax.process_index() == 0:
        target.rmtree()
    ckptr.save(target, params)
    ckptr.wait_until_finished()
    ckptr.close()
    if jax.process_index() == 0:
        meta = {"model_config": config.to_dict(), **(extra or {})}
        (directory / "model_config.json").write_text(json.dumps(meta, indent=1))


def load_model(directory: str | epath.PathLike, *, shardings: Any = None
               ) -> tuple[Any, Any, dict[str, Any]]:
    """(ModelConfig, params, extra) from `save_model`; params placed on `shardings` if given."""
    from scalign.models.config import ModelConfig

    directory = epath.Path(directory)
    meta_path = directory / "model_config.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: not a saved model directory")
    meta = json.loads(meta_path.read_text())
    config = ModelConfig.from_dict(meta.pop("model_config"))
    ckptr = ocp.StandardCheckpointer()
    if shardings is None:
        stored = ckptr.metadata(directory / "params")
        tree = getattr(stored, "item_metadata", stored)
        tree = getattr(tree, "tree", tree)
        # the stored tree may carry extra heads (scalar_head): restore what was saved
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
        params = ckptr.restore(directory / "params", abstract_like(abstract))
    else:
        params = ckptr.restore(directory / "params", abstract_like(shardings))
    ckptr.close()
    return config, params, meta

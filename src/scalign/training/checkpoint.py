"""Checkpointing: orbax `CheckpointManager` for the train state, data iterator and metadata.

One checkpoint step directory holds three items:

- `state`: the `TrainState` pytree (`ocp.args.StandardSave`), written asynchronously; the
  device-to-host copy happens before `maybe_save` returns, so the caller may donate or
  overwrite the state right after.
- `data_iter`: the grain iterator state of *this* process (`grain.checkpoint.CheckpointSave`
  writes `process_<i>-of-<n>.json`), captured synchronously at save time.
- `meta`: a small JSON dict (config hash, stage name, counters...), identical on all
  processes (`ocp.args.JsonSave`).

Multi-host rule (Levanter's hang on save is the cautionary tale): every process calls
`maybe_save` / `restore` with the same step; orbax coordinates which process writes what.
There is no `if process_index == 0` around any call here.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

_STATE, _DATA, _META = "state", "data_iter", "meta"


class Checkpointer:
    """Save every `save_every` steps, keep the `keep` newest, restore onto given shardings.

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
                 async_save: bool = True):
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be positive, got {save_every}")
        if keep <= 0:
            raise ValueError(f"checkpoint keep must be positive, got {keep}")
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        self.keep = int(keep)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(self.keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ save

    def should_save(self, step: int, force: bool = False) -> bool:
        """True when `step` is a multiple of `save_every` (or `force`) and not yet saved."""
        return (force or step % self.save_every == 0) and step not in self.all_steps()

    def maybe_save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None,
                   meta: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Save `state` (and the iterator state, and `meta`) at `step` if `should_save`.

        Call on every process. Returns whether a save was started. With async saving the
        write continues in the background; `wait()` blocks until it is durable.
        """
        step = int(step)
        if not self.should_save(step, force):
            return False
        meta = {} if meta is None else dict(meta)
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be JSON-serializable: {e}") from e
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(meta),
        }
        if data_iter is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    # ------------------------------------------------------------------ restore

    def restore(self, state_template: Any, data_iter: grain.DatasetIterator | None = None,
                step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) from `step` (default: the latest).

        `state_template` gives the pytree structure, shapes, dtypes and shardings: its leaves
        are concrete `jax.Array`s or `jax.ShapeDtypeStruct`s with `.sharding`; restored arrays
        are placed on exactly those shardings. If `data_iter` is given its state is set in
        place to the saved one of this process.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or no checkpoint for `step`.
          ValueError: `data_iter` given but the checkpoint has no iterator state.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardRestore(abstract_like(state_template)),
            _META: ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            if not (self.directory / str(step) / _DATA).exists():
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data "
                                 f"iterator state (it was saved without data_iter)")
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[_STATE], dict(restored[_META] or {})

    # ------------------------------------------------------------------ bookkeeping

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def wait(self) -> None:
        """Block until every pending asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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

"""Checkpoint restore onto sharded templates over 8 virtual CPU devices."""

from __future__ import annotations

import os

# Must happen before jax is imported anywhere in this process.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from scalign.training.checkpoint import Checkpointer  # noqa: E402
from scalign.training.state import TrainState  # noqa: E402

OPT = optax.adamw(1e-3)


def _mesh() -> jax.sharding.Mesh:
    assert jax.device_count() >= 8, (
        "this test needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 must "
        "be set before jax is first imported (set it in tests/conftest.py when running the "
        "whole suite in one process)")
    return jax.make_mesh((2, 4), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _sharded_state(mesh, specs) -> TrainState:
    """A TrainState whose params and Adam moments are sharded by `specs` (rng replicated)."""
    params = {"w": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7.0,
              "b": jnp.linspace(-1.0, 1.0, 16)}
    shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    params = jax.device_put(params, shard)
    state = TrainState.create(params, OPT, 3)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    updates, opt_state = OPT.update(grads, state.opt_state, params)
    opt_state = optax.tree_map_params(OPT, lambda p, s: jax.device_put(p, s), opt_state, shard)
    return state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                         opt_state=opt_state)


def _template(state: TrainState, mesh, specs) -> TrainState:
    """ShapeDtypeStructs carrying the shardings to restore onto."""
    shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    replicated = NamedSharding(mesh, P())

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    abstract = jax.tree.map(lambda x: sds(x, replicated), state)
    params = {k: sds(state.params[k], shard[k]) for k in state.params}
    opt_state = optax.tree_map_params(OPT, lambda p, s: sds(p, s), state.opt_state, shard,
                                      transform_non_params=lambda x: sds(x, replicated))
    return abstract.replace(params=params, opt_state=opt_state)


def test_restore_onto_template_shardings(tmp_path):
    mesh = _mesh()
    saved_specs = {"w": P("data", "fsdp"), "b": P("fsdp")}
    state = _sharded_state(mesh, saved_specs)
    assert state.params["w"].sharding.spec == P("data", "fsdp")
    # Restore onto a *different* layout: orbax reshards on read.
    target_specs = {"w": P("fsdp", None), "b": P(None)}
    template = _template(state, mesh, target_specs)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        assert ckpt.maybe_save(1, state, meta={"mesh": [2, 4]})
        restored, meta = ckpt.restore(template)
    assert meta == {"mesh": [2, 4]}
    for got, want, tmpl in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(template), strict=True):
        assert isinstance(got, jax.Array)
        assert got.sharding == tmpl.sharding, (got.sharding, tmpl.sharding)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    w = restored.params["w"]
    assert len(w.sharding.device_set) == 8
    assert w.addressable_shards[0].data.shape == (2, 16)  # 8 rows over fsdp=4
    mu_w = restored.opt_state[0].mu["w"]
    assert mu_w.sharding == NamedSharding(mesh, P("fsdp", None))


def test_restore_onto_concrete_sharded_template(tmp_path):
    mesh = _mesh()
    specs = {"w": P("data", "fsdp"), "b": P("fsdp")}
    state = _sharded_state(mesh, specs)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.maybe_save(1, state)
        # The template is a live state with the same layout (e.g. freshly initialised).
        fresh = _sharded_state(mesh, specs).replace(step=jnp.zeros((), jnp.int32))
        restored, _ = ckpt.restore(fresh)
    for got, want, tmpl in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(fresh), strict=True):
        assert got.sharding == tmpl.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(restored.step) == 1

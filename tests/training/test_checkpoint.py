"""Tests for scalign.training.checkpoint (orbax CheckpointManager wrapper), single device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalign.data.pipeline import make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.training.checkpoint import Checkpointer, abstract_like
from scalign.training.state import TrainState

OPT = optax.adamw(1e-2, weight_decay=0.1)


def _state(seed: int = 0) -> TrainState:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"dense": {"w": jax.random.normal(k1, (4, 8)), "b": jnp.zeros((8,))},
              "emb": jax.random.normal(k2, (16, 4), jnp.bfloat16)}
    return TrainState.create(params, OPT, seed)


@jax.jit
def _update(state: TrainState) -> TrainState:
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, state.params)
    updates, opt_state = OPT.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, rng=jax.random.fold_in(state.rng, 1))


def _advance(state: TrainState, n: int = 1) -> TrainState:
    """n AdamW updates with a nonzero gradient, new step and rng: every leaf changes."""
    for _ in range(n):
        state = _update(state)
    return state


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _changed_leaves(a, b) -> int:
    return sum(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_save_advance_restore_bitwise(tmp_path):
    state = _advance(_state(), 2)
    with Checkpointer(tmp_path, save_every=2, keep=3) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.maybe_save(2, state, meta={"stage": "sft", "tokens_seen": 128})
        later = _advance(state, 3)
        assert _changed_leaves(later, state) == len(jax.tree.leaves(state))
        restored, meta = ckpt.restore(later)  # `later` only serves as the template
    assert isinstance(restored, TrainState)
    _assert_bitwise_equal(restored, state)
    assert meta == {"stage": "sft", "tokens_seen": 128}
    assert restored.rng.dtype == jnp.uint32 and int(restored.step) == 2


def test_save_schedule_force_and_duplicates(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=5, keep=10, async_save=False) as ckpt:
        assert not ckpt.maybe_save(3, state)
        assert ckpt.maybe_save(5, state)
        assert not ckpt.maybe_save(5, state, force=True)  # already saved: no error, no save
        assert ckpt.maybe_save(7, state, force=True)
        assert ckpt.all_steps() == [5, 7] and ckpt.latest_step() == 7


def test_keep_prunes_older_steps(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        for step in range(1, 6):
            state = _advance(state)
            ckpt.maybe_save(step, state, meta={"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        old, meta = ckpt.restore(state, step=4)
        assert meta == {"step": 4} and int(old.step) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]


def test_reopen_directory_and_restore_latest(tmp_path):
    state = _advance(_state(), 1)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.maybe_save(1, state)
    with Checkpointer(tmp_path, save_every=1, keep=2) as again:
        assert again.latest_step() == 1
        restored, meta = again.restore(_state(seed=9))
    _assert_bitwise_equal(restored, state)
    assert meta == {}


def test_async_save_is_independent_of_later_buffer_reuse(tmp_path):
    state = _advance(_state(), 1)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.maybe_save(1, state)
        for leaf in jax.tree.leaves(state):  # what donation to the next step does
            leaf.delete()
        ckpt.wait()
        restored, _ = ckpt.restore(_state())
    _assert_bitwise_equal(restored, expected)


def test_restore_from_abstract_template(tmp_path):
    state = _advance(_state(), 1)
    abstract = jax.eval_shape(lambda: _state())  # ShapeDtypeStructs without sharding
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.maybe_save(1, state)
        restored, _ = ckpt.restore(abstract)
    _assert_bitwise_equal(restored, state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    sds = abstract_like(state)
    assert all(s.sharding == x.sharding
               for s, x in zip(jax.tree.leaves(sds), jax.tree.leaves(state), strict=True))


def test_iterator_state_round_trip_resumes_identical_batches(tmp_path):
    recs = [{"prompt": f"{i} + {i} = ?\n\n", "response": f"{2 * i}\n\n#### {2 * i}"}
            for i in range(40)]
    tok = Tokenizer.train([r["prompt"] + r["response"] for r in recs], None, vocab_size=64)

    def make():
        return make_sft_iterator(recs, tok, batch_size=4, seq_len=24, seed=5, num_epochs=None,
                                 shard_index=0, shard_count=1)

    it = make()
    for _ in range(7):
        next(it)
    state = _state()
    with Checkpointer(tmp_path, save_every=7, keep=2) as ckpt:
        assert ckpt.maybe_save(7, state, data_iter=it)
        expected = [next(it) for _ in range(15)]  # crosses an epoch boundary (10 batches)
        fresh = make()
        ckpt.restore(state, data_iter=fresh)
    got = [next(fresh) for _ in range(15)]
    for want, have in zip(expected, got, strict=True):
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(want[key], have[key])
    assert (tmp_path / "7" / "data_iter" / "process_0-of-1.json").exists()


def test_restore_errors(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint found"):
            ckpt.restore(state)
        ckpt.maybe_save(1, state)
        with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[1\]"):
            ckpt.restore(state, step=3)
        with pytest.raises(ValueError, match="no data iterator state"):
            ckpt.restore(state, data_iter=object())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.maybe_save(2, state, meta={"bad": object()})
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)

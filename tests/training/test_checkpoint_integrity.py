"""Checkpoint integrity (issue 16, finding 1-2): a damaged or changed checkpoint is detected on
restore, named (step and file), moved aside and skipped for the newest good one; retention
never deletes the last good checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalign.data.pipeline import make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.training.checkpoint import CheckpointCorruptError, Checkpointer, state_integrity
from scalign.training.state import TrainState

OPT = optax.adam(1e-2)


def _state(step: int, value: float = 0.0) -> TrainState:
    params = {"w": jnp.arange(16384, dtype=jnp.float32).reshape(128, 128) / 7 + value,
              "e": jnp.full((8, 4), value, jnp.bfloat16)}
    state = TrainState.create(params, OPT, 0)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _save(tmp_path, steps, *, keep=5, values=None, data_iter=None):
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=keep)
    for s in steps:
        ckpt.maybe_save(s, _state(s, (values or {}).get(s, float(s))), data_iter)
    ckpt.wait()
    return ckpt


def test_flipped_bytes_in_newest_fall_back_to_previous(tmp_path, flip_bytes):
    ckpt = _save(tmp_path, [1, 2])
    flip_bytes(tmp_path / "ckpt" / "2")
    restored, _ = ckpt.restore(_state(0, 9.0))
    assert _equal(restored, _state(1, 1.0))
    assert [f["step"] for f in ckpt.fallbacks] == [2]
    assert "step 2" in ckpt.fallbacks[0]["error"]
    assert "checksum mismatch" in ckpt.fallbacks[0]["error"]
    assert str(tmp_path / "ckpt" / "2") in ckpt.fallbacks[0]["error"]
    # moved aside, never deleted; a new save of step 2 is possible again
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "ckpt.corrupt" / "2" / "state").exists()
    assert ckpt.maybe_save(2, _state(2, 2.0))
    ckpt.close()


def test_changed_values_fail_the_checksum_naming_the_leaf(tmp_path):
    ckpt = _save(tmp_path, [1, 2])
    record = tmp_path / "ckpt" / "2" / "integrity" / "metadata"
    saved = json.loads(record.read_text())
    key = next(k for k in saved["checksums"] if "'w'" in k and "params" in k)
    saved["checksums"][key] = (saved["checksums"][key] + 1) % 2**32
    record.write_text(json.dumps(saved))
    with pytest.raises(CheckpointCorruptError, match=r"step 2 .*checksum mismatch.*params\['w'\]"):
        ckpt.restore(_state(0), step=2)  # an explicit step: no fall-back
    restored, _ = ckpt.restore(_state(0))
    assert int(restored.step) == 1 and [f["step"] for f in ckpt.fallbacks] == [2]
    ckpt.close()


def _records():
    return [{"prompt": f"{i} + {i} = ?\n\n", "response": f"{2 * i}\n\n#### {2 * i}"}
            for i in range(24)]


@pytest.mark.parametrize("damage", ["empty_state_metadata", "truncated_iterator_json",
                                    "empty_meta"])
def test_unreadable_newest_falls_back_with_a_message(tmp_path, damage, caplog):
    recs = _records()
    tok = Tokenizer.train([r["prompt"] + r["response"] for r in recs], None, vocab_size=48)
    it = make_sft_iterator(recs, tok, batch_size=4, seq_len=16, seed=0, num_epochs=None,
                           shard_index=0, shard_count=1)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=5)
    for s in (1, 2):
        next(it)
        ckpt.maybe_save(s, _state(s, float(s)), it)
    ckpt.wait()
    step2 = tmp_path / "ckpt" / "2"
    if damage == "empty_state_metadata":
        (step2 / "state" / "_METADATA").write_text("")
    elif damage == "truncated_iterator_json":
        f = step2 / "data_iter" / "process_0-of-1.json"
        f.write_text(f.read_text()[:10])
    else:
        (step2 / "meta" / "metadata").write_text("{")
    fresh = make_sft_iterator(recs, tok, batch_size=4, seq_len=16, seed=0, num_epochs=None,
                              shard_index=0, shard_count=1)
    with caplog.at_level("WARNING"):
        restored, _ = ckpt.restore(_state(0), fresh)
    assert int(restored.step) == 1
    assert "checkpoint step 2" in caplog.text and "falling back" in caplog.text
    # the iterator is at step 1's position: its next batch is the original second batch
    ref = make_sft_iterator(recs, tok, batch_size=4, seq_len=16, seed=0, num_epochs=None,
                            shard_index=0, shard_count=1)
    next(ref)
    np.testing.assert_array_equal(next(fresh)["tokens"], next(ref)["tokens"])
    ckpt.close()


def test_every_step_bad_raises_listing_each(tmp_path):
    ckpt = _save(tmp_path, [1, 2])
    for s in (1, 2):
        (tmp_path / "ckpt" / str(s) / "state" / "_METADATA").write_text("")
    with pytest.raises(CheckpointCorruptError, match=r"no good checkpoint(.|\n)*step 2(.|\n)*step 1"):
        ckpt.restore(_state(0))
    ckpt.close()


def test_nonfinite_state_is_never_good_and_the_last_good_one_is_kept(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=1)
    ckpt.maybe_save(1, _state(1, 1.0))
    for s in (2, 3, 4):
        ckpt.maybe_save(s, _state(s, float("nan")))
    ckpt.wait()
    assert ckpt.all_steps() == [1, 4]  # keep=1 newest + the newest good one
    assert ckpt.good_steps() == [1]
    ckpt.close()
    again = Checkpointer(tmp_path / "ckpt", save_every=1, keep=1)  # a new process: from disk
    assert again.good_steps() == [1]
    restored, _ = again.restore(_state(0))
    assert int(restored.step) == 1
    assert "non-finite" in again.fallbacks[0]["error"] and "params['w']" in again.fallbacks[0]["error"]
    again.close()


def test_integrity_of_any_pytree_and_every_dtype():
    tree = {"a": jnp.arange(10, dtype=jnp.int32), "b": (jnp.ones(3, jnp.bfloat16),
            jnp.array([True, False])), "k": jax.random.PRNGKey(1), "n": None}
    first = state_integrity(tree)
    assert first["finite"] and len(first["checksums"]) == 4
    moved = dict(tree, a=tree["a"].at[9].add(1))
    second = state_integrity(moved)
    changed = [k for k in first["checksums"] if first["checksums"][k] != second["checksums"][k]]
    assert changed == ["['a']"]
    # swapping two elements changes the checksum too (positions are weighted)
    swapped = dict(tree, a=tree["a"][::-1])
    assert state_integrity(swapped)["checksums"]["['a']"] != first["checksums"]["['a']"]


def test_checksums_do_not_depend_on_the_sharding():
    """Integer sums mod 2^32 are order-free: the same values on 1 device or on 8 give the same
    checksums, so a run restored onto another mesh verifies."""
    from jax.sharding import NamedSharding, PartitionSpec

    from scalign import parallel

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = parallel.make_mesh((2, 2, 2))
    tree = {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 3,
            "b": jnp.arange(32, dtype=jnp.bfloat16)}
    sharded = {"w": jax.device_put(tree["w"], NamedSharding(mesh, PartitionSpec(
                   ("data", "fsdp"), "tensor"))),
               "b": jax.device_put(tree["b"], NamedSharding(mesh, PartitionSpec("tensor")))}
    one = jax.device_put(tree, jax.devices()[0])
    assert state_integrity(sharded)["checksums"] == state_integrity(one)["checksums"]

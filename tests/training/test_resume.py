"""A run interrupted after step k and resumed ends bitwise equal to an uninterrupted run."""

import functools

import jax
import numpy as np
import pytest

from scalign import parallel
from scalign.data.pipeline import make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.models import init_params, param_logical_axes, presets
from scalign.objectives.sft import make_sft_loss
from scalign.training.checkpoint import Checkpointer
from scalign.training.loop import Interrupted, NonFiniteError, train_loop
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = []
    for _ in range(40):
        a, b = rng.integers(0, 10, 2)
        records.append({"prompt": f"{a} plus {b} is", "response": f" {a + b}. Next."})
    texts = [r["prompt"] + r["response"] for r in records]
    tok = Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=60)
    config = presets.tiny(tok.vocab_size).replace(n_layers=2, d_model=64, mlp_dim=128)
    return records, tok, config


def _train(setup, workdir, *, stop_after=None, accum=1, inject=None, on_nonfinite="stop",
           max_skips=3, on_checkpointer=None):
    records, tok, config = setup
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=STEPS))
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=3)
    step = make_train_step(make_sft_loss(config), opt, mesh, state_sharding=st_sh,
                           grad_accum_steps=accum, skip_nonfinite=on_nonfinite == "skip")
    it = make_sft_iterator(records, tok, batch_size=8, seq_len=24, seed=1, num_epochs=None)
    ckpt = Checkpointer(workdir, save_every=3, keep=2)
    if on_checkpointer is not None:
        on_checkpointer(ckpt)
    try:
        return train_loop(step, state, it, num_steps=STEPS, mesh=mesh, stage="sft",
                          checkpointer=ckpt, log_every=1, stop_after=stop_after, progress=False,
                          inject=inject, on_nonfinite=on_nonfinite,
                          max_consecutive_skips=max_skips)
    finally:
        ckpt.close()


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                    strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), "not bitwise equal"


@pytest.mark.parametrize("stop_after", [4, 7])
def test_interrupted_then_resumed_is_bitwise_equal(setup, tmp_path, stop_after):
    straight = _train(setup, tmp_path / "a")
    with pytest.raises(Interrupted):
        _train(setup, tmp_path / "b", stop_after=stop_after)
    resumed = _train(setup, tmp_path / "b")
    # resumes from the newest checkpoint at or before the interruption (saved every 3 steps)
    assert resumed.resumed_from == (stop_after // 3) * 3
    assert int(resumed.state.step) == STEPS
    _leaves_equal(resumed.state.params, straight.state.params)
    _leaves_equal(resumed.state.opt_state, straight.state.opt_state)
    # the re-run steps log the same losses as the uninterrupted run
    straight_loss = {h["step"]: h["loss"] for h in straight.history}
    for h in resumed.history:
        assert h["loss"] == straight_loss[h["step"]]


def test_loss_falls(setup, tmp_path):
    result = _train(setup, tmp_path / "c")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------- issue 16: runs that never lose work
def _nan_at(*steps):
    """Test-only hook: NaN loss mask in the batches of the given (1-based) update steps."""
    def inject(step, batch):
        if step + 1 in steps:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch
    return inject


def _guard_deletions(ckpt):
    """Fail if retention ever deletes a step while no newer good step exists."""
    delete = ckpt._manager.delete

    def checked(step):
        good = ckpt.good_steps()
        assert any(g > step for g in good), f"deleted step {step}, good steps {good}"
        return delete(step)
    ckpt._manager.delete = checked


def test_flipped_bytes_in_newest_checkpoint_fall_back_and_match_uninterrupted(setup, tmp_path,
                                                                            flip_bytes):
    straight = _train(setup, tmp_path / "a")
    with pytest.raises(Interrupted):
        _train(setup, tmp_path / "b", stop_after=7, on_checkpointer=_guard_deletions)
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == [3, 6]
    flip_bytes(tmp_path / "b" / "6")
    resumed = _train(setup, tmp_path / "b", on_checkpointer=_guard_deletions)
    assert resumed.resumed_from == 3
    assert [f["step"] for f in resumed.checkpoint_fallbacks] == [6]
    assert "checkpoint step 6" in resumed.checkpoint_fallbacks[0]["error"]
    _leaves_equal(resumed.state.params, straight.state.params)
    _leaves_equal(resumed.state.opt_state, straight.state.opt_state)
    assert (tmp_path / "b.corrupt" / "6").exists()  # kept for inspection, not deleted


def test_nan_batch_stops_the_run_naming_the_step(setup, tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient norm at step 5"
                                             r".*last good checkpoint is step 3") as err:
        _train(setup, tmp_path / "n", inject=_nan_at(5))
    assert err.value.step == 5
    steps = sorted(int(p.name) for p in (tmp_path / "n").iterdir() if p.name.isdigit())
    assert steps == [3]  # nothing after the bad step was saved


def test_nan_batch_is_skipped_and_counted(setup, tmp_path):
    result = _train(setup, tmp_path / "s", inject=_nan_at(5), on_nonfinite="skip")
    assert result.skipped_steps == 1 and int(result.state.step) == STEPS
    by_step = {h["step"]: h for h in result.history}
    assert by_step[5]["skipped"] == 1.0 and by_step[6]["skipped"] == 0.0
    assert by_step[12]["skipped_steps"] == 1.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state)))


def test_consecutive_nan_batches_stop_a_skipping_run(setup, tmp_path):
    with pytest.raises(NonFiniteError, match=r"2 consecutive non-finite updates skipped, the "
                                             r"last at step 6") as err:
        _train(setup, tmp_path / "k", inject=_nan_at(5, 6), on_nonfinite="skip", max_skips=2)
    assert err.value.step == 6

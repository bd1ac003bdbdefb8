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
from scalign.training.loop import Interrupted, train_loop
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


def _train(setup, workdir, *, stop_after=None, accum=1):
    records, tok, config = setup
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=STEPS))
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=3)
    step = make_train_step(make_sft_loss(config), opt, mesh, state_sharding=st_sh,
                           grad_accum_steps=accum)
    it = make_sft_iterator(records, tok, batch_size=8, seq_len=24, seed=1, num_epochs=None)
    ckpt = Checkpointer(workdir, save_every=3, keep=2)
    try:
        return train_loop(step, state, it, num_steps=STEPS, mesh=mesh, stage="sft",
                          checkpointer=ckpt, log_every=1, stop_after=stop_after, progress=False)
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

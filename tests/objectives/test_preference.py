"""Tests for scalign.objectives.preference: hand-computed values, properties, train-step use."""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalign import parallel
from scalign.models import init_params, param_logical_axes, presets
from scalign.models.transformer import logits as model_logits
from scalign.objectives.preference import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    make_preference_loss,
    orpo_loss,
    response_lengths,
    sequence_log_probs,
    simpo_loss,
    sppo_loss,
)
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step


def a(*xs):
    return jnp.asarray(xs, jnp.float32)


# ----------------------------------------------------------------------------- DPO


def test_dpo_at_zero_margin_is_log2():
    for beta in (0.1, 1.0, 5.0):
        loss, m = dpo_loss(a(-3.0, -7.0), a(-4.0, -2.0), a(-3.0, -7.0), a(-4.0, -2.0), beta=beta)
        assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
        assert float(m["margins"]) == 0.0
        assert float(m["accuracy"]) == 0.0       # strict: equal rewards are not "right"


def test_dpo_hand_computed():
    # h = (-10 - -11) - (-12 - -11) = 2; beta h = 0.2; -log sigma(0.2) = log(1 + e^-0.2)
    loss, m = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1)
    assert float(loss) == pytest.approx(0.5981388693815918, rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1)
    assert float(m["rewards/rejected"]) == pytest.approx(-0.1)
    assert float(m["margins"]) == pytest.approx(0.2)
    assert float(m["accuracy"]) == 1.0
    assert float(m["logits"]) == pytest.approx(0.2)


def test_dpo_label_smoothing():
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.59814 + 0.1 * 0.2
    loss, _ = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.6181388693815918, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a(0.0), a(0.0), a(0.0), a(0.0), label_smoothing=0.5)


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    def f(pc, pr):
        return dpo_loss(pc, pr, a(-5.0, -5.0), a(-5.0, -5.0), beta=0.5)[0]
    gc, gr = jax.grad(f, argnums=(0, 1))(a(-5.0, -4.0), a(-5.0, -6.0))
    assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0)
    # dL/dpi_c = -beta sigma(-beta h) / B: at h = 0 -> -0.5 * 0.5 / 2
    assert float(gc[0]) == pytest.approx(-0.125, rel=1e-6)


def test_weights_ignore_padding_rows():
    pc, pr, rc, rr = a(-10.0, 99.0), a(-12.0, -99.0), a(-11.0, 0.0), a(-11.0, 0.0)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1, weights=a(1.0, 0.0))
    assert float(loss) == pytest.approx(0.5981388693815918, rel=1e-6)
    assert float(m["margins"]) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- IPO, hinge


def test_ipo_hand_computed_with_and_without_lengths():
    # log-ratios: chosen -10 - -12 = 2 over 4 tokens; rejected -9 - -8 = -1 over 2 tokens
    args = (a(-10.0), a(-9.0), a(-12.0), a(-8.0))
    # token-averaged: h = 0.5 - -0.5 = 1; beta = 0.5 -> target 1 -> loss 0
    loss, m = ipo_loss(*args, beta=0.5, chosen_lengths=a(4.0), rejected_lengths=a(2.0))
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    assert float(m["rewards/chosen"]) == pytest.approx(0.25)
    # summed: h = 3 -> (3 - 1)^2 = 4
    loss, _ = ipo_loss(*args, beta=0.5)
    assert float(loss) == pytest.approx(4.0)
    # h below target is penalised too (squared loss): beta = 0.125 -> target 4 -> (3-4)^2
    loss, _ = ipo_loss(*args, beta=0.125)
    assert float(loss) == pytest.approx(1.0)


def test_hinge_hand_computed():
    # h = 3, beta = 0.5: max(0, 1 - 1.5) = 0 ; h = -1: max(0, 1 + 0.5) = 1.5 ; mean 0.75
    loss, m = hinge_loss(a(-10.0, -10.0), a(-9.0, -10.0), a(-12.0, -10.0), a(-8.0, -11.0),
                         beta=0.5)
    assert float(loss) == pytest.approx(0.75)
    assert float(m["accuracy"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- SimPO, ORPO, SPPO


def test_simpo_hand_computed():
    # beta/|y| pi: 2 * -6 / 3 = -4 ; 2 * -10 / 2 = -10 ; -4 + 10 - 1 = 5 -> log(1 + e^-5)
    loss, m = simpo_loss(a(-6.0), a(-10.0), a(3.0), a(2.0), beta=2.0, gamma=1.0)
    assert float(loss) == pytest.approx(0.006715348489118068, rel=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(-4.0)
    assert float(m["margins"]) == pytest.approx(6.0)


def test_orpo_hand_computed():
    # mean log-probs: chosen -2/2 = -1, rejected -6/3 = -2
    # log odds(-1) = -1 - log(1 - e^-1) = -0.54132485 ; log odds(-2) = -1.85458654
    # L_OR = log(1 + e^-1.31326169) = 0.23818303 ; NLL = 2 / 2 = 1 ; L = 1 + 0.1 * 0.23818303
    loss, m = orpo_loss(a(-2.0), a(-6.0), a(2.0), a(3.0), lam=0.1)
    assert float(loss) == pytest.approx(1.0238183026413827, rel=1e-6)
    assert float(m["nll"]) == pytest.approx(1.0)
    assert float(m["or_loss"]) == pytest.approx(0.23818302641382824, rel=1e-5)
    assert float(m["log_odds_ratio"]) == pytest.approx(1.3132616875182228, rel=1e-5)
    # the NLL is a mean over pairs of each response's token mean (Hong et al. eq. 6):
    # (2/2 + 9/3) / 2, not the batch token mean (2 + 9) / (2 + 3)
    _, m2 = orpo_loss(a(-2.0, -9.0), a(-6.0, -6.0), a(2.0, 3.0), a(3.0, 3.0))
    assert float(m2["nll"]) == pytest.approx(2.0)
    _, m3 = orpo_loss(a(-2.0, -9.0), a(-6.0, -6.0), a(2.0, 3.0), a(3.0, 3.0),
                      weights=a(1.0, 0.0))
    assert float(m3["nll"]) == pytest.approx(1.0)


def test_orpo_is_finite_at_probability_one():
    loss, _ = orpo_loss(a(0.0), a(-3.0), a(2.0), a(2.0))
    grads = jax.grad(lambda x: orpo_loss(x, a(-3.0), a(2.0), a(2.0))[0])(a(-1e-3))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grads)))


def test_sppo_hand_computed():
    # log-ratios 0.5 and -2; eta = 2, hard labels -> targets +1, -1: (0.5-1)^2 + (-2+1)^2
    args = (a(-9.5), a(-12.0), a(-10.0), a(-10.0))
    loss, m = sppo_loss(*args, eta=2.0)
    assert float(loss) == pytest.approx(1.25)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5)
    # win rates 0.75 / 0.25 -> targets 0.5 / -0.5: 0 + 1.5^2
    loss, _ = sppo_loss(*args, eta=2.0, chosen_win_rate=0.75, rejected_win_rate=0.25)
    assert float(loss) == pytest.approx(2.25)


def test_sppo_default_eta_is_the_practical_one():
    # eta = 1/beta = 1e3 (the SPPO authors' beta = 1e-3): hard-label targets are +-500, so at
    # policy == reference the loss is 2 * 500^2
    assert inspect.signature(sppo_loss).parameters["eta"].default == 1e3
    loss, _ = sppo_loss(a(-3.0), a(-4.0), a(-3.0), a(-4.0))
    assert float(loss) == pytest.approx(5e5)


# ----------------------------------------------------------------------------- model side
# Compilation dominates these tests on CPU: one jitted init, and each program compiled once.


def _tiny_config(vocab: int = 32):
    return presets.tiny(vocab).replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                                       head_dim=16, mlp_dim=64)


def _pair_batch(batch_size: int = 4, length: int = 10, vocab: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for b in range(batch_size):
            end = int(rng.integers(5, length + 1))
            mask[b, 3:end] = 1.0          # prompt = first 3 tokens, then padding after `end`
            tokens[b, end:] = 0
        batch[f"{side}_tokens"] = tokens
        batch[f"{side}_mask"] = mask
    return batch


KIND_HPARAMS = {"dpo": {"beta": 0.1, "label_smoothing": 0.1}, "ipo": {"beta": 0.5},
                "hinge": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 0.5},
                "orpo": {"lam": 0.1}, "sppo": {"eta": 1.0}}


@pytest.fixture(scope="module")
def tiny():
    """(config, mesh, optimizer, train state, its sharding, reference params, batch).

    The reference is the initial policy scaled by 0.9 (no second init to compile)."""
    config = _tiny_config()
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"))
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=0)
    ref = jax.tree.map(lambda x: x * 0.9, state.params)
    return config, mesh, opt, state, st_sh, ref, _pair_batch()


@pytest.fixture(scope="module")
def forward_results(tiny):
    """One compiled forward-only program shared by the two tests below."""
    config, _, _, state, _, ref, batch = tiny
    loss_fn = make_preference_loss(config, "dpo", beta=0.1)

    @jax.jit
    def run(p, b, r):
        out = {"logps": sequence_log_probs(config, p, b["chosen_tokens"], b["chosen_mask"]),
               "log_softmax": jax.nn.log_softmax(model_logits(config, p, b["chosen_tokens"]), -1)}
        out["same"], out["metrics"] = loss_fn(p, b, None, p)   # policy == reference
        out["frozen"], _ = loss_fn(p, b, None, r)
        pre = dict(b, ref_chosen_logps=sequence_log_probs(config, r, b["chosen_tokens"],
                                                          b["chosen_mask"]),
                   ref_rejected_logps=sequence_log_probs(config, r, b["rejected_tokens"],
                                                         b["rejected_mask"]))
        out["precomputed"], _ = loss_fn(p, pre, None, None)  # batch keys, no frozen params
        out["pairs"] = {k: sequence_log_probs(config, q, b[f"{side}_tokens"], b[f"{side}_mask"])
                        for k, q, side in (("pc", p, "chosen"), ("pr", p, "rejected"),
                                           ("rc", r, "chosen"), ("rr", r, "rejected"))}
        out["ipo_default"], _ = make_preference_loss(config, "ipo", beta=0.5)(p, b, None, r)
        out["ipo_length"], _ = make_preference_loss(config, "ipo", beta=0.5,
                                                    length_normalize=True)(p, b, None, r)
        out["sppo_default"], _ = make_preference_loss(config, "sppo")(p, b, None, p)
        return out

    return jax.device_get(run(state.params, batch, ref))


def test_sequence_log_probs_matches_direct_log_softmax(tiny, forward_results):
    tokens, mask = tiny[-1]["chosen_tokens"], tiny[-1]["chosen_mask"]
    logp = forward_results["log_softmax"]
    want = np.zeros(len(tokens))
    for b in range(len(tokens)):
        for t in range(1, tokens.shape[1]):
            want[b] += mask[b, t] * logp[b, t - 1, tokens[b, t]]
    np.testing.assert_allclose(forward_results["logps"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(response_lengths(jnp.asarray(mask))),
                                  mask[:, 1:].sum(-1))


def test_make_preference_loss_reference_sources_agree(tiny, forward_results):
    r = forward_results
    assert float(r["same"]) == pytest.approx(math.log(2.0), rel=1e-5)
    assert float(r["metrics"]["weight"]) == 4.0 and float(r["metrics"]["num_pairs"]) == 4.0
    assert float(r["precomputed"]) == pytest.approx(float(r["frozen"]), rel=1e-5)
    assert abs(float(r["frozen"]) - math.log(2.0)) > 1e-4  # a different reference matters
    config, _, _, state, _, _, batch = tiny
    loss_fn = make_preference_loss(config, "dpo")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        jax.eval_shape(lambda p, b: loss_fn(p, b, None, None), state.params, batch)


def test_make_preference_loss_defaults_mean_what_the_functions_mean(tiny, forward_results):
    """"ipo" through the factory is `ipo_loss`'s summed form unless length_normalize=True;
    "sppo" through the factory uses `sppo_loss`'s eta."""
    r, batch = forward_results, tiny[-1]
    pc, pr, rc, rr = (r["pairs"][k] for k in ("pc", "pr", "rc", "rr"))
    summed, _ = ipo_loss(pc, pr, rc, rr, beta=0.5)
    lengths = (response_lengths(jnp.asarray(batch["chosen_mask"])),
               response_lengths(jnp.asarray(batch["rejected_mask"])))
    averaged, _ = ipo_loss(pc, pr, rc, rr, beta=0.5, chosen_lengths=lengths[0],
                           rejected_lengths=lengths[1])
    assert float(r["ipo_default"]) == pytest.approx(float(summed), rel=1e-5)
    assert float(r["ipo_length"]) == pytest.approx(float(averaged), rel=1e-5)
    assert abs(float(summed) - float(averaged)) > 1e-3     # the two forms differ here
    assert float(r["sppo_default"]) == pytest.approx(5e5, rel=1e-6)


def test_make_preference_loss_validates_arguments():
    config = _tiny_config()
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        make_preference_loss(config, "kto")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['gamma'\]"):
        make_preference_loss(config, "dpo", gamma=1.0)


def test_every_kind_is_exact_under_gradient_accumulation(tiny):
    """make_train_step(grad_accum_steps=2) == grad_accum_steps=1 for all six losses, on a batch
    with a padding row (`weight` 0) and ragged response lengths, so the two micro-batches carry
    different weights and token counts. Plain SGD (lr 1) so that the parameter update IS the
    gradient (Adam's first step would hide a wrong gradient scale)."""
    config, mesh, _, state0, _, ref, batch = tiny
    batch = dict(batch, weight=np.asarray([1.0, 1.0, 1.0, 0.0], np.float32),
                 chosen_win_rate=np.asarray([0.9, 0.6, 0.8, 0.5], np.float32),
                 rejected_win_rate=np.asarray([0.1, 0.3, 0.4, 0.5], np.float32))
    opt = optax.sgd(1.0)
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=0,
                                    params=state0.params)
    hparams = dict(KIND_HPARAMS, ipo={"beta": 0.5, "length_normalize": True})
    fns = {k: make_preference_loss(config, k, **h) for k, h in hparams.items()}

    def loss_fn(params, b, rng, frozen):
        total, metrics = 0.0, {}
        for kind, fn in fns.items():
            value, m = fn(params, b, rng, frozen)
            total = total + value
            metrics[f"{kind}_loss"] = value
        metrics["weight"] = m["weight"]
        return total, metrics

    results = {}
    for accum in (1, 2):
        step = make_train_step(loss_fn, opt, mesh, state_sharding=st_sh, use_frozen=True,
                               clip_norm=None, grad_accum_steps=accum, donate=False)
        new_state, metrics = step(state, batch, ref)
        results[accum] = jax.device_get((new_state.params, metrics))
    (p1, m1), (p2, m2) = results[1], results[2]
    assert m1["weight"] == 3.0 and m2["weight"] == 3.0
    for kind in KIND_HPARAMS:
        assert m2[f"{kind}_loss"] == pytest.approx(m1[f"{kind}_loss"], rel=1e-5, abs=1e-6), kind
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        # float32 rounding scales with the leaf: the embedding's entries reach ~4 and its
        # summed gradient differs by ~5e-6 between the two batch shapes; a wrong micro-batch
        # weighting would be off by a factor, orders above this bound
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=2e-6 * max(1.0, np.abs(x).max()))


def test_every_kind_plugs_into_the_train_step(tiny):
    """All six losses in ONE compiled step (their sum is the objective; each is a metric)."""
    config, mesh, opt, state, st_sh, _, batch = tiny
    params = state.params
    fns = {k: make_preference_loss(config, k, **h) for k, h in KIND_HPARAMS.items()}

    def loss_fn(params, b, rng, frozen):
        total, metrics = 0.0, {}
        for kind, fn in fns.items():
            value, m = fn(params, b, rng, frozen)
            total = total + value
            metrics[f"{kind}_loss"] = value
        metrics["num_pairs"] = m["num_pairs"]
        return total, metrics

    step = make_train_step(loss_fn, opt, mesh, state_sharding=st_sh, use_frozen=True,
                           donate=False)
    state, first = step(state, batch, params)             # reference = initial policy
    first = jax.device_get(first)
    for kind in KIND_HPARAMS:
        assert np.isfinite(first[f"{kind}_loss"]), kind
    assert np.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
    assert first["num_pairs"] == 4.0 and int(state.step) == 1
    # policy == reference: DPO (any smoothing) = log 2; hinge = 1; SPPO = 2 (eta/2)^2 = 0.5;
    # IPO = (1 / (2 beta))^2 = 1
    assert first["dpo_loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert first["hinge_loss"] == pytest.approx(1.0, rel=1e-5)
    assert first["sppo_loss"] == pytest.approx(0.5, rel=1e-5)
    assert first["ipo_loss"] == pytest.approx(1.0, rel=1e-5)
    # a second step on the same batch: the objective went down, and the DPO/hinge losses too
    second = jax.device_get(step(state, batch, params)[1])
    assert second["loss"] < first["loss"]
    assert second["dpo_loss"] < first["dpo_loss"]
    assert second["hinge_loss"] < first["hinge_loss"]

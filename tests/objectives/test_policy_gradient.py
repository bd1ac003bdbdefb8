"""Policy-gradient pieces pinned on examples computed by hand (the arithmetic is in comments)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models import ModelConfig, init_params
from scalign.models.heads import add_scalar_head
from scalign.objectives import policy_gradient as pg
from scalign.objectives.logprobs import token_log_probs


def test_gae_by_hand():
    # completion = tokens 1..3; gamma 0.9, lam 0.5 (gamma * lam = 0.45)
    r = np.array([[0.0, 0.0, 1.0, 2.0, 0.0]])
    v = np.array([[0.0, 0.5, 0.2, 0.1, 9.0]])   # V_4 = 9 is after the end: never read
    m = np.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = pg.gae(r, v, m, gamma=0.9, lam=0.5)
    # d3 = 2 + 0 - 0.1 = 1.9                      A3 = 1.9
    # d2 = 1 + 0.9*0.1 - 0.2 = 0.89               A2 = 0.89 + 0.45*1.9 = 1.745
    # d1 = 0 + 0.9*0.2 - 0.5 = -0.32              A1 = -0.32 + 0.45*1.745 = 0.46525
    np.testing.assert_allclose(adv, [[0.0, 0.46525, 1.745, 1.9, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 0.96525, 1.945, 2.0, 0.0]], atol=1e-6)
    # gamma = lam = 1 (the e2h default): A_t = (sum of rewards from t) - V_t
    adv, _ = pg.gae(r, v, m)
    np.testing.assert_allclose(adv, [[0.0, 3 - 0.5, 3 - 0.2, 2 - 0.1, 0.0]], atol=1e-6)


def test_whiten_masked():
    x = np.array([[1.0, 2.0, 3.0, 100.0]])
    m = np.array([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3) = -1.2247449, 0, 1.2247449
    np.testing.assert_allclose(pg.whiten(x, m), [[-1.2247449, 0.0, 1.2247449, 0.0]], atol=1e-5)
    np.testing.assert_allclose(pg.whiten(x, m, shift_mean=False),
                               [[0.7752551, 2.0, 3.2247449, 0.0]], atol=1e-5)


def test_ppo_clipped_surrogate_by_hand():
    d = np.log([[1.5, 0.5, 1.0, 0.5, 7.0]])            # logp - old_logp: ratios 1.5 .5 1 .5 7
    adv = np.array([[1.0, 1.0, -2.0, -1.0, 50.0]])
    mask = np.array([[1.0, 1.0, 1.0, 1.0, 0.0]])       # last token masked out
    loss, met = pg.ppo_policy_loss(d, np.zeros_like(d), adv, mask, clip_eps=0.2)
    # tok0: max(-1.5, -1.2) = -1.2 (clipped)   tok1: max(-0.5, -0.8) = -0.5
    # tok2: max(2, 2) = 2                       tok3: max(0.5, 0.8) = 0.8 (clipped)
    np.testing.assert_allclose(loss, (-1.2 - 0.5 + 2.0 + 0.8) / 4, atol=1e-6)
    np.testing.assert_allclose(met["clipfrac"], 0.5, atol=1e-6)
    assert float(met["weight"]) == 4.0


def test_clipped_value_loss_by_hand():
    v = np.array([[0.5, 0.1, 3.0]])
    old = np.zeros((1, 3))
    ret = np.array([[1.0, -1.0, 0.0]])
    mask = np.array([[1.0, 1.0, 0.0]])
    loss, met = pg.ppo_value_loss(v, old, ret, mask, value_clip=0.2, vf_coef=0.1)
    # clipped values 0.2, 0.1; errors (0.25, 1.21) vs clipped (0.64, 1.21) -> max 0.64, 1.21
    # 0.1 * 0.5 * (0.64 + 1.21) / 2 = 0.04625
    np.testing.assert_allclose(loss, 0.04625, atol=1e-7)
    np.testing.assert_allclose(met["vf_clipfrac"], 0.5, atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])   # d = 0.5, -1
    np.testing.assert_allclose(pg.kl_penalty(logp, ref, "k1_clamped"), [0.5, 0.0])
    np.testing.assert_allclose(pg.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    np.testing.assert_allclose(pg.kl_penalty(logp, ref, "k2"), [0.125, 0.5])
    # k3 = exp(-d) - 1 + d: exp(-0.5) - 0.5 = 0.10653066, exp(1) - 2 = 0.71828183
    np.testing.assert_allclose(pg.kl_penalty(logp, ref, "k3"), [0.10653066, 0.71828183],
                               atol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        pg.kl_penalty(logp, ref, "k9")


def test_min_shaping_by_hand():
    s = np.array([[0.7, 0.4, 0.45, 0.2], [0.3, 0.9, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    r = pg.min_shaping(s, mask, upper=0.5, bonus=0.25)
    # row 0: m = .5 .4 .4 .2 -> 0, -.1, 0, -.2 ; + 0.25/4 each
    # row 1: m = .3 .3 -> -.2, 0 ; + 0.25/2 each; padding 0
    np.testing.assert_allclose(r, [[0.0625, -0.0375, 0.0625, -0.1375],
                                   [-0.075, 0.125, 0.0, 0.0]], atol=1e-6)
    # the sum is min(0.5, min s) - 0.5 + bonus
    np.testing.assert_allclose(np.asarray(r).sum(-1), [0.2 - 0.5 + 0.25, 0.3 - 0.5 + 0.25],
                               atol=1e-6)


def test_step_rewards_on_delimiters_and_terminal_placement():
    tok = pg.step_rewards_to_tokens(np.array([[1.0, -0.5, 9.0]]), np.array([[-1, 0, 0, -1, 1]]))
    np.testing.assert_allclose(tok, [[0.0, 0.5, 0.5, 0.0, -0.5]])   # step 2 has no delimiter
    last = pg.place_at_last_token(np.array([3.0, 4.0, 5.0]),
                                  np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(last, [[0, 0, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]])


def test_terminal_rewards():
    r = pg.terminal_rewards(np.array([1.0, 0.0, np.nan, 1.0, np.nan]),
                            np.array([True, True, True, False, False]),
                            np.array([True, True, False, True, False]))
    np.testing.assert_allclose(r, [1.0, 0.0, 0.25, 0.0, -0.75])


def test_group_advantages_by_hand():
    a = pg.group_advantages(np.array([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    # group 0: mean .25, std sqrt(.1875) = .4330127 -> .75/.433 = 1.7320508, -.25/.433
    np.testing.assert_allclose(a, [1.7320508, -0.5773503, -0.5773503, -0.5773503, 0, 0, 0, 0],
                               atol=1e-5)


def test_group_process_advantages_by_hand():
    rewards = np.array([[0.0, 0.2, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    at = np.array([[0, 1, 0, 1], [0, 0, 0, 1]])       # group rewards 0.2, 1, 0
    resp = np.array([[0, 1, 1, 1], [0, 0, 1, 1]])
    a = pg.group_process_advantages(rewards, at, resp, 2, eps=0.0)
    # mean 0.4, std sqrt((.04 + .36 + .16) / 3) = .4320494 -> -.4629100, 1.3887301, -.9258201
    np.testing.assert_allclose(a, [[0.0, 0.9258201, 1.3887301, 1.3887301],
                                   [0.0, 0.0, -0.9258201, -0.9258201]], atol=1e-5)


def test_grpo_loss_by_hand():
    logp = np.array([[-1.0, -1.0]])
    ref = np.array([[-1.5, -1.0]])                       # d = 0.5, 0
    loss, met = pg.grpo_loss(logp, logp, ref, np.array([[1.0, -1.0]]), np.ones((1, 2)),
                             kl_coef=0.04)
    # surrogate (-1 + 1) / 2 = 0; k3 mean (0.10653066 + 0) / 2 = 0.05326533
    np.testing.assert_allclose(met["kl"], 0.05326533, atol=1e-7)
    np.testing.assert_allclose(loss, 0.04 * 0.05326533, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=8, mlp_dim=32, tie_embeddings=False, family="llama")
    return config, init_params(config, jax.random.PRNGKey(0))


def test_loss_builders_on_a_model(tiny):
    config, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], jnp.float32)
    adv = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6)), jnp.float32)
    lp = token_log_probs(config, params, tokens)
    batch = {"tokens": tokens, "response_mask": mask, "old_logp": lp, "ref_logp": lp,
             "advantages": adv}
    # at old = current params the ratio is 1: loss = -mean(A) over the 8 response tokens
    loss, met = pg.make_ppo_loss(config)(params, batch, None, None)
    np.testing.assert_allclose(loss, -float((adv * mask).sum()) / 8, atol=1e-6)
    assert float(met["weight"]) == 8
    loss, met = pg.make_grpo_loss(config)(params, batch, None, None)
    np.testing.assert_allclose(loss, -float((adv * mask).sum()) / 8, atol=1e-6)
    vparams = add_scalar_head(config, params, jax.random.PRNGKey(1))
    v = pg.token_values(config, vparams, tokens)
    assert v.shape == (2, 6) and float(jnp.abs(v[:, 0]).max()) == 0.0
    loss, met = pg.make_value_loss(config)(vparams, {"tokens": tokens, "response_mask": mask,
                                                     "old_values": v, "returns": v + 1.0},
                                           None, None)
    np.testing.assert_allclose(loss, 0.1 * 0.5 * 1.0, atol=1e-6)

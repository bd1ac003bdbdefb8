"""The shared-prompt pair layout (one prompt forward, the 2B responses against its cache) gives
the same log-probs, losses and gradients as the concatenated [2B, P + R] layout, with
left-padded prompts of different lengths and right-padded responses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models import init_params
from scalign.models.config import ModelConfig
from scalign.objectives.preference import make_preference_loss


def _batches(rng, B=3, P=6, R=5, V=61):
    plen = rng.integers(2, P + 1, B)
    rlen_c, rlen_r = rng.integers(1, R + 1, B), rng.integers(1, R + 1, B)
    prompts = [rng.integers(3, V, n) for n in plen]
    chosen = [rng.integers(3, V, n) for n in rlen_c]
    rejected = [rng.integers(3, V, n) for n in rlen_r]
    T = P + R
    cat = {k: np.zeros((B, T), np.int32 if "tokens" in k else np.float32)
           for k in ("chosen_tokens", "rejected_tokens", "chosen_mask", "rejected_mask")}
    shared = {"prompt_tokens": np.zeros((B, P), np.int32), "prompt_start": np.zeros(B, np.int32)}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        shared[f"{side}_response"] = np.zeros((B, R), np.int32)
        shared[f"{side}_response_mask"] = np.zeros((B, R), np.float32)
        for b in range(B):
            p, r = prompts[b], resp[b]
            cat[f"{side}_tokens"][b, :len(p) + len(r)] = np.concatenate([p, r])
            cat[f"{side}_mask"][b, len(p):len(p) + len(r)] = 1
            shared[f"{side}_response"][b, :len(r)] = r
            shared[f"{side}_response_mask"][b, :len(r)] = 1
    for b, p in enumerate(prompts):
        shared["prompt_tokens"][b, P - len(p):] = p
        shared["prompt_start"][b] = P - len(p)
    return ({k: jnp.asarray(v) for k, v in cat.items()},
            {k: jnp.asarray(v) for k, v in shared.items()})


@pytest.mark.parametrize("kind,hp", [("dpo", {"beta": 0.1}), ("simpo", {"beta": 2.0}),
                                     ("ipo", {"beta": 0.1, "length_normalize": True})])
def test_shared_prompt_layout_matches_concatenated(kind, hp):
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=48, family="llama")
    policy = init_params(config, jax.random.PRNGKey(0))
    reference = init_params(config, jax.random.PRNGKey(1))
    cat, shared = _batches(np.random.default_rng(0))
    loss = jax.jit(make_preference_loss(config, kind, **hp))  # one compile per layout, not eager
    # the reference params are an argument, not a constant baked into the compiled program
    grad = jax.jit(jax.grad(lambda p, b, ref: loss(p, b, None, ref)[0]))
    (v0, m0), (v1, m1) = loss(policy, cat, None, reference), loss(policy, shared, None, reference)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5, atol=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad(policy, shared, reference)),
                    jax.tree.leaves(grad(policy, cat, reference)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_shared_prompt_layout_names_missing_keys():
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                         head_dim=16, mlp_dim=48, family="llama")
    _, shared = _batches(np.random.default_rng(1))
    del shared["rejected_response_mask"]
    loss = make_preference_loss(config, "simpo")
    with pytest.raises(ValueError, match="rejected_response_mask"):
        loss(init_params(config, jax.random.PRNGKey(0)), shared)


def test_pair_batches_shared_layout_gives_the_same_loss():
    """Rollout rows (`pack_rollout`) cut into shared-prompt pair batches (`pair_batches` with
    `response_start` / `prompt_width`) give the concatenated batches' loss; a prompt longer than
    the width falls back to the concatenated layout."""
    from scalign.algorithms.loop import pack_rollout, pair_batches

    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 61, n).tolist() for n in (3, 5, 4)]
    N, M = 2, 4
    lengths = rng.integers(1, M + 1, (3, N))
    completions = rng.integers(3, 61, (3, N, M))
    packed = pack_rollout(prompts, completions, lengths, pad_id=0, width=10)
    pairs = [(p * N, p * N + 1) for p in range(3)]
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=48, family="llama")
    policy = init_params(config, jax.random.PRNGKey(0))
    loss = jax.jit(make_preference_loss(config, "simpo", beta=2.0))
    common = dict(rows=2, order=[2, 0, 1])
    cat = pair_batches(packed["tokens"], packed["response_mask"], pairs, **common)
    shared = pair_batches(packed["tokens"], packed["response_mask"], pairs, **common,
                          response_start=packed["response_start"], prompt_width=6)
    assert "prompt_tokens" in shared[0] and "chosen_tokens" not in shared[0]
    for a, b in zip(cat, shared, strict=True):
        np.testing.assert_array_equal(a["pair_index"], b["pair_index"])
        la = loss(policy, {k: jnp.asarray(v) for k, v in a.items()})[0]
        lb = loss(policy, {k: jnp.asarray(v) for k, v in b.items()})[0]
        np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    narrow = pair_batches(packed["tokens"], packed["response_mask"], pairs, **common,
                          response_start=packed["response_start"], prompt_width=4)
    assert "chosen_tokens" in narrow[0]  # the 5-token prompt does not fit 4: concatenated


def test_grpo_loss_shared_prompt_rows_match_packed_rows():
    """GRPO's loss and gradient on a packed rollout equal those on its shared-prompt form
    (`loop.shared_prompt_rows`): same per-token log-probs, ratios, KL and advantages."""
    from scalign.algorithms.loop import pack_rollout, shared_prompt_rows
    from scalign.objectives import policy_gradient as pg

    rng = np.random.default_rng(3)
    N, M, width = 3, 4, 10
    prompts = [rng.integers(3, 61, n).tolist() for n in (3, 6, 4, 5)]
    lengths = rng.integers(1, M + 1, (4, N))
    packed = pack_rollout(prompts, rng.integers(3, 61, (4, N, M)), lengths, pad_id=0,
                          width=width)
    R, T = packed["tokens"].shape
    batch = {"tokens": packed["tokens"], "response_mask": packed["response_mask"],
             "ref_logp": (rng.standard_normal((R, T)) * packed["response_mask"]
                          ).astype(np.float32),
             "advantages": (np.repeat(rng.standard_normal(R), T).reshape(R, T)
                            * packed["response_mask"]).astype(np.float32),
             "response_start": packed["response_start"]}
    shared = shared_prompt_rows(batch, N, width - M)
    assert shared["prompt_tokens"].shape == (4, width - M)
    assert shared["response_tokens"].shape == (R, M)
    np.testing.assert_array_equal(shared["response_mask"].sum(1), lengths.reshape(-1))
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=48, family="llama")
    params = init_params(config, jax.random.PRNGKey(0))
    loss = jax.jit(pg.make_grpo_loss(config, pg.GRPOConfig(kl_coef=0.04)))
    as_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items() if k != "response_start"}  # noqa: E731
    (v0, m0), (v1, m1) = loss(params, as_jnp(batch)), loss(params, as_jnp(shared))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5, atol=1e-7)
    assert m0.keys() == m1.keys()
    for key in m0:  # KL, clip fraction, ... over the same response tokens
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-4, atol=1e-6)
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b)[0]))
    g0, g1 = grad(params, as_jnp(batch)), grad(params, as_jnp(shared))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # a prompt longer than the width, or prompts not dividing the mesh: no shared layout
    assert shared_prompt_rows(batch, N, 5) is None
    assert shared_prompt_rows(batch, N, width - M, divisor=8) is None

"""`objectives.common.target_log_probs(_and_hits)`: values and the custom VJP against autodiff
of a plain log-softmax, and hits against argmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scalign.objectives.common import target_log_probs, target_log_probs_and_hits


def _reference(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_log_probs_and_gradient_match_log_softmax():
    key = jax.random.PRNGKey(0)
    logits = 3.0 * jax.random.normal(key, (3, 5, 17))
    targets = jax.random.randint(jax.random.fold_in(key, 1), (3, 5), 0, 17)
    weights = jax.random.normal(jax.random.fold_in(key, 2), (3, 5))
    np.testing.assert_allclose(target_log_probs(logits, targets), _reference(logits, targets),
                               atol=1e-5)

    def loss(fn, x):
        return jnp.sum(fn(x, targets) * weights)

    got = jax.grad(lambda x: loss(target_log_probs, x))(logits)
    want = jax.grad(lambda x: loss(_reference, x))(logits)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # second use under jit and vmap-free batching: still the same gradient
    got_jit = jax.jit(jax.grad(lambda x: loss(target_log_probs, x)))(logits)
    np.testing.assert_allclose(got_jit, want, atol=1e-5)
    # bf16 logits are scored in float32
    lp16 = target_log_probs(logits.astype(jnp.bfloat16), targets)
    assert lp16.dtype == jnp.float32


def test_hits_are_the_argmax_test():
    key = jax.random.PRNGKey(4)
    logits = jax.random.normal(key, (4, 9, 11))
    argmax = jnp.argmax(logits, axis=-1)
    other = (argmax + 1) % 11
    _, hits = target_log_probs_and_hits(logits, argmax)
    assert bool(jnp.all(hits))
    _, misses = target_log_probs_and_hits(logits, other)
    assert not bool(jnp.any(misses))
    # no gradient through the hits
    g = jax.grad(lambda x: jnp.sum(target_log_probs_and_hits(x, argmax)[1].astype(jnp.float32)))(
        logits)
    assert float(jnp.abs(g).max()) == 0.0

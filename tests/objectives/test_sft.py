"""`objectives.sft.sft_loss`: the chunked LM head (positions in blocks inside a rematerialised
scan) gives the one-block loss, accuracy and gradients, and a large-vocabulary loss never holds
a [B, T, V] logits array in its forward or backward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from scalign.models import init_params
from scalign.models.config import ModelConfig
from scalign.models.transformer import logits as model_logits
from scalign.objectives.sft import make_sft_loss


def _batch(B, T, V, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):  # a prompt then a response of its own length, then padding
        start, stop = rng.integers(1, T // 2), rng.integers(T // 2, T + 1)
        mask[b, start:stop] = 1
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


def test_chunked_head_matches_one_block_and_the_plain_cross_entropy():
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=48, family="llama")
    params = init_params(config, jax.random.PRNGKey(0))
    batch = _batch(3, 23, 61)
    one_block = make_sft_loss(config, chunk=10_000)
    (loss1, m1), g1 = jax.jit(jax.value_and_grad(one_block, has_aux=True))(params, batch)
    for chunk in (5, 7, 22):  # 22 positions to score: uneven blocks, padding, one block
        (loss_c, m_c), g_c = jax.jit(jax.value_and_grad(make_sft_loss(config, chunk=chunk),
                                                        has_aux=True))(params, batch)
        np.testing.assert_allclose(loss_c, loss1, rtol=1e-6)
        np.testing.assert_allclose(m_c["accuracy"], m1["accuracy"], rtol=1e-6)
        assert float(m_c["num_tokens"]) == float(m1["num_tokens"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), g_c, g1)
    # and the one-block loss is the masked mean NLL of the full logits
    logits = model_logits(config, params, batch["tokens"][:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(loss1, jnp.sum(nll * mask) / jnp.sum(mask), rtol=1e-5)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.sum(mask)
    np.testing.assert_allclose(m1["accuracy"], acc, rtol=1e-6)


def _shapes(jaxpr, found):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            found.add(tuple(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    _shapes(getattr(inner, "jaxpr", inner), found)
    return found


def test_large_vocabulary_never_materialises_full_logits():
    V, B, T = 32_768, 2, 129  # B*(T-1)*V = 8.4M elements; a 1M budget forces 16-position chunks
    config = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=8, mlp_dim=32, family="llama")
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    batch = jax.eval_shape(lambda: _batch(B, T, 97))
    chunk = 16
    grad = jax.grad(lambda p, b: make_sft_loss(config, chunk=chunk)(p, b)[0])
    shapes = _shapes(jax.make_jaxpr(grad)(params, batch).jaxpr, set())
    full = [s for s in shapes if len(s) >= 2 and s[-1] == V and int(np.prod(s[:-1])) > B * chunk]
    assert not full, f"arrays with more than {B}x{chunk} rows of logits: {full}"
    assert (B, chunk, V) in shapes  # the chunk's logits block is there
    # the unchunked loss does hold the full block: the check above can fail
    grad_full = jax.grad(lambda p, b: make_sft_loss(config, chunk=T)(p, b)[0])
    assert (B, T - 1, V) in _shapes(jax.make_jaxpr(grad_full)(params, batch).jaxpr, set())

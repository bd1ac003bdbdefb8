"""bf16 compute (`ModelConfig.dtype="bfloat16"`: activations and matmul inputs in bf16, f32
accumulation, f32 params) agrees with f32 compute within stated tolerances: logits within 0.02
absolute (bf16 keeps 8 mantissa bits: ~0.4% per rounding; measured 0.004 on this model), the
SFT loss within 0.1% relative (measured 2e-5), every parameter gradient at cosine similarity
>= 0.999 with f32's (measured >= 0.99996) and within 1% in norm (measured 0.13%), and 20 AdamW
steps from the same init end within 1% of the f32 loss (measured 1.0540 vs 1.0504)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scalign.models import init_params
from scalign.models.config import ModelConfig
from scalign.models.transformer import logits as model_logits
from scalign.objectives.sft import sft_loss


def _config(dtype):
    return ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, mlp_dim=128, dtype=dtype, family="llama")


def _batch():
    tokens = np.random.default_rng(0).integers(0, 97, (4, 24)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones((4, 24), jnp.float32)}


def test_bf16_compute_agrees_with_f32():
    f32, bf16 = _config("float32"), _config("bfloat16")
    params = init_params(f32, jax.random.PRNGKey(0))
    batch = _batch()
    l32 = jax.jit(model_logits, static_argnums=0)(f32, params, batch["tokens"])
    l16 = jax.jit(model_logits, static_argnums=0)(bf16, params, batch["tokens"])
    assert l16.dtype == jnp.float32  # logits come back in f32
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.02
    grad = jax.jit(jax.value_and_grad(lambda p, c: sft_loss(c, p, batch)[0]), static_argnums=1)
    (v32, g32), (v16, g16) = grad(params, f32), grad(params, bf16)
    assert abs(float(v16) - float(v32)) < 1e-3 * abs(float(v32))
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
        assert cos >= 0.999, cos
        assert abs(np.linalg.norm(a) - np.linalg.norm(b)) <= 0.01 * np.linalg.norm(b)


def test_bf16_training_tracks_f32():
    batch = _batch()
    opt = optax.adamw(3e-3)
    finals = []
    for dtype in ("float32", "bfloat16"):
        config = _config(dtype)
        params = init_params(config, jax.random.PRNGKey(0))
        state = opt.init(params)

        @jax.jit
        def step(p, s, config=config):
            v, g = jax.value_and_grad(lambda q: sft_loss(config, q, batch)[0])(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, v

        for _ in range(20):
            params, state, loss = step(params, state)
        finals.append(float(loss))
    assert finals[0] < 2.0, finals  # it learns (ln 97 = 4.57 at init; measured 1.05)
    assert abs(finals[1] - finals[0]) < 0.01 * finals[0], finals

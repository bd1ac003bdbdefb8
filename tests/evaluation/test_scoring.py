"""SequenceScorer: global arrays in, process_allgather out; the same scores on 1 device and
on the 8 virtual CPU devices (batch and params sharded), and equal to a direct forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign import parallel
from scalign.evaluation.scoring import SequenceScorer
from scalign.models import init_params, presets
from scalign.models.heads import add_scalar_head, scalar_values


@pytest.fixture(scope="module")
def model():
    config = presets.tiny(32).replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                                      head_dim=16, mlp_dim=64)
    key = jax.random.PRNGKey(0)
    params = add_scalar_head(config, init_params(config, key), jax.random.fold_in(key, 1))
    rng = np.random.default_rng(0)
    # ragged lengths over two buckets (32 and 64), more sequences than one batch
    seqs = [rng.integers(1, 32, int(n)).astype(np.int32)
            for n in rng.integers(2, 60, 13)]
    return config, params, seqs


def test_sharded_scores_equal_single_device_and_direct_forward(model):
    config, params, seqs = model
    one = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    eight = parallel.make_mesh((2, 2, 2), jax.devices()[:8])
    single = SequenceScorer(config, params, one, batch_size=8).score(seqs, progress=False)
    sharded_scorer = SequenceScorer(config, params, eight, batch_size=8)
    assert sharded_scorer.batch_size == 8          # a multiple of data x fsdp = 4
    sharded = sharded_scorer.score(seqs, progress=False)
    assert len(single) == len(sharded) == len(seqs)
    for s, a, b in zip(seqs, single, sharded, strict=True):
        assert isinstance(b, np.ndarray) and a.shape == b.shape == (len(s),)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # and both are sigma(score) of one unpadded-equivalent forward (causal: right padding
    # does not change the scores of real tokens)
    padded = np.zeros((len(seqs), 64), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    direct = np.asarray(jax.jit(lambda p, t: jax.nn.sigmoid(scalar_values(config, p, t)))(
        params, jnp.asarray(padded)))
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(single[i], direct[i, :len(s)], rtol=1e-5, atol=1e-6)

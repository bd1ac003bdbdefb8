"""The CPU decode-attention FFI kernels against a float64 numpy reference, and their fallback."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.kernels import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason=f"kernels unavailable: {cpu_attention.unavailable_reason()}")
LOWEST = np.finfo(np.float32).min


def _reference(q, keys, values, lo, hi):
    """float64 scores (masked to the lowest float32) and p.V with p = softmax of the scores."""
    B, K, G, Dh = q.shape
    S = keys.shape[3]
    s = np.arange(S)
    visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi)  # [B, S]
    scores = np.einsum("bkgd,bkds->bkgs", q.astype(np.float64), keys.astype(np.float64))
    scores = np.where(visible[:, None, None], scores, LOWEST)
    p = np.where(visible[:, None, None], np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return scores, p, np.einsum("bkgs,bksd->bkgd", p, values.astype(np.float64))


# shapes: G from 1 to 5 (the kernels take query rows 2 at a time), Dh and S on and off the
# 32-wide register blocks, ragged lo (left padding / sliding windows), a row with nothing visible
@pytest.mark.parametrize("B,K,G,Dh,S,hi", [(3, 2, 2, 64, 96, 70), (2, 1, 1, 40, 37, 36),
                                          (4, 3, 5, 16, 200, 150), (2, 2, 3, 8, 8, 100)])
def test_kernels_match_a_float64_reference(B, K, G, Dh, S, hi):
    rng = np.random.default_rng(B * 1000 + S)
    q = rng.standard_normal((B, K, G, Dh)).astype(np.float32) * 0.3
    keys = rng.standard_normal((B, K, Dh, S)).astype(np.float32)
    values = rng.standard_normal((B, K, S, Dh)).astype(np.float32)
    lo = rng.integers(0, min(S, hi) // 2 + 1, size=B).astype(np.int32)
    lo[-1] = min(hi, S - 1) + 1 if B > 2 else lo[-1]  # nothing visible in the last row
    ref_scores, ref_p, ref_out = _reference(q, keys, values, lo, min(hi, S - 1))

    scores = np.asarray(jax.jit(cpu_attention.decode_scores)(q, keys, lo, jnp.int32(hi)))
    visible = ref_scores > LOWEST
    np.testing.assert_allclose(scores[visible], ref_scores[visible], rtol=1e-5, atol=1e-5)
    assert (scores[~visible] == LOWEST).all()  # masked slots hold exactly the lowest float

    out = np.asarray(jax.jit(cpu_attention.decode_values)(ref_p.astype(np.float32), values, lo,
                                                          jnp.int32(hi)))
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    if B > 2:
        assert (out[-1] == 0).all()  # an empty range sums nothing


def test_values_ignore_probabilities_outside_the_range():
    """Slots outside [lo, hi] are never read, whatever the probabilities say there."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1, 1, 10, 4)).astype(np.float32)
    p = np.full((1, 1, 1, 10), 7.0, np.float32)
    out = cpu_attention.decode_values(p, values, jnp.array([3]), jnp.int32(5))
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], 7.0 * values[0, 0, 3:6].sum(0),
                               rtol=1e-6)


def test_switched_off_by_the_environment():
    code = ("from scalign.kernels import cpu_attention as c; "
            "print(c.available(), c.unavailable_reason())")
    env = dict(os.environ, SCALIGN_CPU_ATTENTION="0", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == ("False RuntimeError: switched off by "
                                   "SCALIGN_CPU_ATTENTION=0"), done.stderr


def test_a_missing_compiler_is_reported_not_raised(tmp_path):
    code = ("from scalign.kernels import cpu_attention as c; "
            "print(c.available()); print(c.unavailable_reason())")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JAX_PLATFORMS="cpu",
               SCALIGN_KERNEL_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0] == "False" and "no-such-compiler" in lines[1], done.stdout + done.stderr

"""The few-row panel matmul FFI kernel against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.kernels import cpu_matmul

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skip only without a compiler


# rows on and off the 4-row register tile (1, 3, 5, 33), one and several panels, reduction
# lengths from 1 to past a page of the panel, and the decode shapes of sample_llama_small
@pytest.mark.parametrize("R,K,N", [(1, 1, 16), (3, 7, 48), (4, 64, 16), (5, 130, 80),
                                   (32, 512, 256), (33, 1536, 512), (128, 96, 32)])
def test_kernel_matches_a_float64_reference(R, K, N):
    rng = np.random.default_rng(R * 7919 + K * 31 + N)
    x = rng.standard_normal((R, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    out = np.asarray(jax.jit(cpu_matmul.panel_matmul)(x, cpu_matmul.pack_panels(jnp.asarray(w))))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_each_output_column_reads_its_own_weights():
    """One-hot weights: output column j must equal x[:, k_j], for every row and panel."""
    R, K, N = 7, 20, 48
    x = np.arange(R * K, dtype=np.float32).reshape(R, K)
    cols = np.random.default_rng(0).integers(0, K, N)
    w = np.zeros((K, N), np.float32)
    w[cols, np.arange(N)] = 1.0
    out = np.asarray(cpu_matmul.panel_matmul(x, cpu_matmul.pack_panels(jnp.asarray(w))))
    np.testing.assert_array_equal(out, x[:, cols])


def test_packing_round_trips_and_rejects_ragged_widths():
    w = jnp.arange(8 * 32, dtype=jnp.float32).reshape(8, 32)
    wp = cpu_matmul.pack_panels(w)
    assert wp.shape == (2, 8, 16) and float(wp[1, 3, 5]) == float(w[3, 16 + 5])
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack_panels(wp)), np.asarray(w))
    assert cpu_matmul.packable((8, 32)) and not cpu_matmul.packable((8, 24))
    with pytest.raises(ValueError, match="out % 16"):
        cpu_matmul.pack_panels(jnp.zeros((8, 24)))
    with pytest.raises(ValueError, match="panel_matmul wants"):
        cpu_matmul.panel_matmul(jnp.zeros((2, 9)), wp)


def test_no_rows():
    wp = cpu_matmul.pack_panels(jnp.ones((4, 16)))
    assert cpu_matmul.panel_matmul(jnp.zeros((0, 4)), wp).shape == (0, 16)

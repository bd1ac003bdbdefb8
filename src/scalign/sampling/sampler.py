"""The `Sampler`: batched generation from prompts, N samples per prompt, over a KV cache.

    sampler = Sampler(config, params, tokenizer, mesh=mesh)
    out = sampler.generate(["Q: 1+1?\\n", ...], n=16, max_new_tokens=256, key=jax.random.key(0),
                           temperature=0.8, top_p=0.95, stop_strings=("\\n\\n",))
    out.tokens [P, N, M], out.logprobs / out.model_logprobs [P, N, M], out.lengths [P, N],
    out.stop_reason [P, N], out.texts [P][N]

How one call runs (P prompts, N samples each, M = max_new_tokens, R = P * N rows): on the host,
prompts are **left-padded** to a bucketed length Tp (the next power of two >= the longest
prompt, at least `min_prompt_bucket`, or the smallest of `prompt_buckets` that fits), so varied
prompt lengths reuse a few compiled programs. Row p's first real token sits at slot
key_start[p] = Tp - len_p; the model masks the slots before it and gives RoPE positions
`slot - key_start` (see `models.transformer`). Then one jitted prefill and one jitted decode
loop run on device (`sampling.decode`), and the outputs come back to the host. Temperature and
top-p are traced (changing them does not recompile); top-k, M, N and Tp are static;
`temperature == 0` is greedy (a separately compiled program). Token draws: `sampling.tokens`.

Randomness (explicit keys, same key => same samples): row r = p * N + j draws its step-t uniform
from `fold_in(fold_in(key, r), t)`. So sample j of prompt p with `n=N` equals row p * N + j of a
call with every prompt repeated N times and `n=1`, and adding prompts at the end of a batch does
not change the samples of the earlier rows.

Log-probs (both [P, N, M] float32, 0 after a row stops):
  `logprobs`        log pi_sample(token): under the distribution the token was drawn from
                    (temperature, top-k and top-p applied, renormalised); 0 for greedy.
  `model_logprobs`  log softmax(logits)[token] of the unmodified model (temperature 1, no
                    truncation): what PPO's ratios, KL penalties and DPO's reference terms need.

Stops. A row stops after the token that (a) is an EOS id (if `stop_on_eos`), or (b) completes
one of the stop strings in the generated text (`sampling.stops`), or (c) is the M-th token. The
stopping token is the row's last token and is counted in `lengths`; later positions hold
`pad_id`. `texts` are cut at the first stop string.

Params. The prefill reads the params as stored; the decode loop reads them in the sampler's
`weight_layout` (on CPU a packed copy of the matmul weights, `kernels.decode_ops`). The sampler
holds a *reference* to the params it is given (no copy; under a mesh, the arrays placed on it)
plus, for a packed layout, its own packing of them: one extra copy of the matmul weights, which
the layout needs. For an online loop (sample -> score -> update): either call
`update_params(new_params)` after each update (packs once per update), or pass
`generate_ids(..., params=new_params)` (packs per call, stores nothing; with
`Sampler(config, None, ...)` the sampler never holds any params). Same shapes, dtypes and
shardings never recompile. A train step that donates its state deletes the arrays the sampler
was given; using them afterwards raises a RuntimeError that says so (never a silent read).

Sharding: with a `mesh`, params are placed by the logical-axis rule table
(`parallel.tree_shardings(param_logical_axes(config), ...)`), rows are sharded over
data x fsdp (the prompt batch is padded to a multiple of data * fsdp with rows that start
stopped), heads over tensor; the model's `constrain` calls shard activations and the cache.
On several hosts every process passes the same prompts and receives every row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalign import parallel
from scalign.kernels import decode_ops
from scalign.models.config import ModelConfig
from scalign.models.heads import SCALAR_HEAD
from scalign.models.transformer import param_logical_axes
from scalign.sampling.decode import (
    _DECODE,
    _DECODE_PHASED,
    _PREFILL,
    STOP_REASONS,
    cache_phases,
)
from scalign.sampling.stops import first_stop_end, stop_string_table

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """The result of one `Sampler` call (numpy arrays on the host).

    tokens: int32 [P, N, M], `pad_id` after each row's last token.
    logprobs: float32 [P, N, M], log-prob of each token under the *sampling* distribution
      (temperature / top-k / top-p applied; 0 for greedy); 0 after the last token.
    model_logprobs: float32 [P, N, M], log-prob under the unmodified model (temperature 1, full
      vocabulary); 0 after the last token.
    lengths: int32 [P, N], number of generated tokens, the stopping token (EOS or the token that
      completes a stop string) included.
    stop_reason: str [P, N], one of "eos", "stop_string", "max_length".
    texts: [P][N] decoded completions cut at the first stop string, or None without a tokenizer.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    model_logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    texts: list[list[str]] | None


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


class Sampler:
    """Batched sampler for one model (see the module docstring).

    Args:
      config, params: the model (params may carry a scalar head; it is ignored). The sampler
        keeps a reference to these arrays, not a copy (see "Params" in the module docstring);
        replace them with `update_params`, or pass `params=` per call. None: the sampler holds
        no params, and every call passes them.
      tokenizer: a `Tokenizer`, needed for text prompts, stop strings and decoded texts; None
        for the id-only API (`generate_ids` without stop strings).
      mesh: a (data, fsdp, tensor) mesh to shard over, or None for the default device.
      rules: the logical-axis rule table.
      max_new_tokens: default number of new tokens M (static: each value compiles once).
      prompt_buckets: allowed padded prompt lengths (ascending); None means powers of two
        >= `min_prompt_bucket`.
      eos_ids: token ids that stop a row; default the tokenizer's eos id (none without one).
      pad_id: the id written after a row stops and used for left padding; default the
        tokenizer's pad id, else 0.
      cache_dtype: K/V cache dtype; default the config's compute dtype.
      weight_layout: how the decode loop reads the matmul weights
        (`kernels.decode_ops.pick_weight_layout`): "output_major" packs them into [out, in]
        matrices and computes each decode product as W x^T, which XLA:CPU runs faster;
        "panels" packs them into `PanelWeight`s of 16-column panels that the FFI kernel of
        `scalign.kernels.cpu_matmul` streams through FMA register tiles (CPU, unsharded,
        float32 params; built with the attention kernel); "native" reads the params as stored;
        "auto" (default) is "panels" for an unsharded float32 CPU sampler whose kernels build,
        else "output_major" on CPU and "native" elsewhere (TPU and GPU compilers pick their
        own layouts, and the copy would cost HBM). A packed layout holds one packed copy of
        the matmul weights (made by a jitted pack when the params are set).
      cache_phases: how many phases the decode loop runs in, the cache growing between them
        (`cache_phases`); None (default) picks min(4, M // 32), so short generations use one,
        and one phase with the CPU attention kernel (it reads only the attended slots, so
        phases would only add copies: 5.64 vs 5.86 s per `sample_llama_small` call).
      attention: how a decode step computes its attention: "cpu_kernel" with the FFI kernel of
        `scalign.kernels.cpu_attention` (CPU, float32 cache; built with g++ on first use; under
        a mesh each device runs it on its own rows and heads), "xla" with XLA's own products;
        "auto" (default) is "cpu_kernel" for an unsharded CPU sampler whose kernel builds, else
        "xla".
    """

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any = None, *,
                 mesh: jax.sharding.Mesh | None = None,
                 rules: parallel.Rules = parallel.DEFAULT_RULES, max_new_tokens: int = 256,
                 prompt_buckets: Sequence[int] | None = None, min_prompt_bucket: int = 16,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                 cache_dtype: Any = None, weight_layout: str = "auto",
                 cache_phases: int | None = None, attention: str = "auto"):
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.rules = rules
        self.max_new_tokens = int(max_new_tokens)
        if prompt_buckets is not None:
            buckets = sorted(int(b) for b in prompt_buckets)
            if not buckets or buckets[0] <= 0:
                raise ValueError(f"prompt_buckets must be positive lengths, got {prompt_buckets}")
            self.prompt_buckets: tuple[int, ...] | None = tuple(buckets)
        else:
            self.prompt_buckets = None
        self.min_prompt_bucket = int(min_prompt_bucket)
        if eos_ids is None:
            eos_ids = (tokenizer.eos_id,) if tokenizer is not None else ()
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None
                          else tokenizer.pad_id if tokenizer is not None else 0)
        self.cache_dtype = jnp.dtype(cache_dtype or config.compute_dtype)
        if cache_phases is not None and cache_phases < 1:
            raise ValueError(f"cache_phases must be >= 1 (or None), got {cache_phases}")
        platform = (self.mesh.devices.flat[0] if self.mesh is not None
                    else jax.devices()[0]).platform
        sharded = self.mesh is not None
        self.weight_layout = decode_ops.pick_weight_layout(weight_layout, config, platform,
                                                           sharded)
        self.attention = decode_ops.pick_attention(attention, platform, self.cache_dtype,
                                                   sharded)
        self.cache_phases = (1 if cache_phases is None and self.attention == "cpu_kernel"
                             else cache_phases)
        # how the decode step computes its products and attention (`models.ops`)
        self.decode_ops = decode_ops.decode_ops(self.weight_layout, self.attention)
        self._params, self._decode_weights = (self._prepare(params) if params is not None
                                              else (None, None))
        self._stop_tables: dict[tuple[str, ...], Array] = {}
        self._prefill = _PREFILL
        self._decode, self._decode_phased = _DECODE, _DECODE_PHASED

    # ------------------------------------------------------------------ params
    @property
    def params(self) -> Any:
        """The backbone params the sampler holds (a reference to the caller's arrays, placed on
        the mesh if it has one); what the prefill reads."""
        return self._params

    def update_params(self, params: Any) -> None:
        """Sample from `params` from now on (same shapes and dtypes: nothing recompiles).

        Replaces the held reference and, with a packed layout, the packed copy (the old one is
        freed). Call it after every update of the policy whose params were passed in: a train
        step that donates its state deletes the old arrays, and a later call would fail."""
        self._params = self._decode_weights = None  # free the old packing before the new one
        self._params, self._decode_weights = self._prepare(params)

    def _prepare(self, params: Any) -> tuple[Any, Any]:
        """(backbone params on the mesh, what the decode loop reads: their packing)."""
        backbone = {k: v for k, v in params.items() if k != SCALAR_HEAD}
        _check_live(backbone, "params")
        if self.mesh is not None:
            shardings = parallel.tree_shardings(param_logical_axes(self.config), backbone,
                                                self.mesh, self.rules)
            backbone = parallel.put_tree(backbone, shardings)
        return backbone, decode_ops.pack_params(self.weight_layout, backbone)

    def cache_sizes(self) -> dict[str, int]:
        """Compiled-program counts of the jits this sampler calls (prefill, the decode loops
        and, with a packed layout, the pack). They are shared by every sampler of the process:
        an online loop asserts they stop growing after its first iteration."""
        sizes = {"prefill": self._prefill._cache_size(), "decode": self._decode._cache_size(),
                 "decode_phased": self._decode_phased._cache_size()}
        packer = decode_ops.packer(self.weight_layout)
        if packer is not None:
            sizes["pack"] = packer._cache_size()
        return sizes

    # ------------------------------------------------------------------ helpers
    def prompt_bucket(self, length: int) -> int:
        """The padded prompt length used for a longest prompt of `length` tokens."""
        if self.prompt_buckets is None:
            return max(self.min_prompt_bucket, _next_pow2(length))
        for b in self.prompt_buckets:
            if b >= length:
                return b
        raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket "
                         f"{self.prompt_buckets[-1]}; add a larger bucket to prompt_buckets")

    def stop_table(self, stop_strings: Sequence[str]) -> Array:
        """The [Q, V] token-level stop automaton for these stop strings, on device.

        Cached per stop-string tuple. Q is padded to a power of two (at least 8) with unreachable
        states, so similar stop sets share a compiled program; ids past the tokenizer's
        vocabulary (a model vocabulary padded for sharding) add no text.
        """
        key = tuple(stop_strings)
        if key not in self._stop_tables:
            if self.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer: pass one to Sampler(...)")
            table = stop_string_table(self.tokenizer.token_bytes(), key)
            Q, V = table.shape
            if V > self.config.vocab_size:
                raise ValueError(f"tokenizer has {V} ids but the model's vocab_size is "
                                 f"{self.config.vocab_size}")
            full = np.zeros((max(8, _next_pow2(Q)), self.config.vocab_size), np.int32)
            full[:Q, :V] = table
            full[:Q, V:] = np.arange(Q, dtype=np.int32)[:, None]  # no text: state unchanged
            self._stop_tables[key] = self._put_replicated(jnp.asarray(full))
        return self._stop_tables[key]

    def _put_rows(self, x: np.ndarray) -> Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, parallel.batch_sharding(self.mesh))

    def _put_replicated(self, x: Any) -> Any:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, parallel.replicated(self.mesh))

    # ------------------------------------------------------------------ API
    def generate_ids(self, prompts: Sequence[Sequence[int]] | np.ndarray, n: int = 1, *,
                     max_new_tokens: int | None = None, key: Array | int | None = None,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     stop_strings: Sequence[str] = (), stop_on_eos: bool = True,
                     include_stop_string: bool = True, decode_texts: bool = True,
                     params: Any = None) -> SampleOutput:
        """Sample `n` completions for each tokenized prompt.

        Args:
          prompts: P token-id sequences (ragged) or an int array [P, T] of full-length rows.
          n: samples per prompt N (one prefill per prompt).
          max_new_tokens: M (default: the sampler's).
          key: a PRNG key (or an int seed); required unless greedy.
          temperature: 0 for greedy, else > 0.
          top_k: keep the k most likely tokens (0: off). top_p: nucleus mass (1: off).
          stop_strings: stop after the first occurrence of any of these in the generated text.
          stop_on_eos: stop after an EOS id (`eos_ids`).
          include_stop_string: keep the stop string at the end of `texts`.
          decode_texts: fill `texts` (needs a tokenizer).
          params: sample from these params in this call only (same shapes and dtypes as the
            sampler's: nothing recompiles); with a packed layout they are packed for the call
            by a jitted pack and nothing is stored. None: the sampler's own (`update_params`).
        """
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        if not rows:
            raise ValueError("generate_ids: no prompts")
        for i, r in enumerate(rows):
            if r.size == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. bos)")
            if r.min() < 0 or r.max() >= self.config.vocab_size:
                raise ValueError(f"prompt {i} has ids outside [0, {self.config.vocab_size})")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        M = int(max_new_tokens if max_new_tokens is not None else self.max_new_tokens)
        if M < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {M}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        greedy = temperature == 0.0
        if not greedy and key is None:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(seed)")
        top_k = 0 if (greedy or top_k >= self.config.vocab_size) else int(top_k)
        use_top_p = (not greedy) and top_p < 1.0
        if isinstance(key, int):
            key = jax.random.key(key)
        if key is None:
            key = jax.random.key(0)  # unused by greedy decoding

        P = len(rows)
        div = parallel.batch_divisor(self.mesh) if self.mesh is not None else 1
        P_pad = -(-P // div) * div
        Tp = self.prompt_bucket(max(r.size for r in rows))
        tokens = np.full((P_pad, Tp), self.pad_id, np.int32)
        key_start = np.full((P_pad,), Tp - 1, np.int32)
        for i, r in enumerate(rows):
            tokens[i, Tp - r.size:] = r
            key_start[i] = Tp - r.size
        R = P_pad * n
        done = np.zeros((R,), bool)
        done[P * n:] = True  # batch-padding rows start stopped

        stop_table = self.stop_table(stop_strings) if stop_strings else None
        eos = (self._put_replicated(jnp.asarray(self.eos_ids, jnp.int32))
               if stop_on_eos and self.eos_ids else None)
        if params is None:
            if self._params is None:
                raise RuntimeError("the sampler has no params: pass params=... to this call "
                                   "or call update_params(params) first")
            params, weights = self._params, self._decode_weights
            _check_live(weights, "the sampler's params")
            if weights is not params:
                _check_live(params, "the sampler's params")
        else:
            params, weights = self._prepare(params)
        static = dict(config=self.config, mesh=self.mesh, rules=self.rules)
        phases = cache_phases(M, self.cache_phases)
        logits, cache = self._prefill(params, self._put_rows(tokens),
                                      self._put_rows(key_start), n=n, extra_slots=phases[0],
                                      cache_dtype=self.cache_dtype, **static)
        decode = self._decode if len(phases) == 1 else self._decode_phased
        out, _ = decode(
            weights, cache, logits, self._put_rows(np.repeat(key_start, n)),
            self._put_rows(done), self._put_rows(np.arange(R, dtype=np.int32)),
            self._put_replicated(key), self._put_replicated(jnp.float32(temperature)),
            self._put_replicated(jnp.float32(top_p)), stop_table, eos, prompt_len=Tp,
            phases=phases, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
            pad_id=self.pad_id, ops=self.decode_ops, weight_layout=self.weight_layout,
            **static)
        if jax.process_count() > 1:  # rows live on every host: gather them everywhere
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        out = jax.device_get(out)

        def shape(x):
            return np.asarray(x)[:P * n].reshape(P, n, *np.shape(x)[1:])

        reasons = np.asarray(STOP_REASONS)[shape(out["reason"]).astype(np.int64)]
        result = SampleOutput(tokens=shape(out["tokens"]), logprobs=shape(out["logprobs"]),
                              model_logprobs=shape(out["model_logprobs"]),
                              lengths=shape(out["lengths"]), stop_reason=reasons, texts=None)
        if decode_texts and self.tokenizer is not None:
            result = dataclasses.replace(result, texts=self._texts(result, stop_strings,
                                                                   include_stop_string))
        return result

    def generate(self, texts: Sequence[str], n: int = 1, *, add_bos: bool = True,
                 params: Any = None, **kwargs: Any) -> SampleOutput:
        """Encode `texts` (with bos unless add_bos=False) and call `generate_ids` (`params`:
        this call's params, as there)."""
        if self.tokenizer is None:
            raise ValueError("Sampler.generate needs a tokenizer; use generate_ids for ids")
        if isinstance(texts, str):
            raise TypeError("generate takes a sequence of prompts, got one str; wrap it in a "
                            "list")
        prompts = [self.tokenizer.encode(t, add_bos=add_bos) for t in texts]
        return self.generate_ids(prompts, n, params=params, **kwargs)

    def _texts(self, out: SampleOutput, stop_strings: Sequence[str],
               include_stop_string: bool) -> list[list[str]]:
        texts = []
        for p in range(out.tokens.shape[0]):
            row = []
            for j in range(out.tokens.shape[1]):
                text = self.tokenizer.decode(out.tokens[p, j, :out.lengths[p, j]])
                if out.stop_reason[p, j] == "stop_string":
                    span = first_stop_end(text, stop_strings)
                    if span is not None:
                        text = text[:span[1] if include_stop_string else span[0]]
                row.append(text)
            texts.append(row)
        return texts


def _check_live(tree: Any, what: str) -> None:
    """Raise if an array of `tree` was deleted (donated into a jitted step, or freed)."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(x, jax.Array) and x.is_deleted():
            raise RuntimeError(
                f"Sampler: {what} include a deleted array ({jax.tree_util.keystr(path)}); it was "
                f"probably donated into a jitted train step. The sampler holds references to "
                f"the params it was given: after each update pass the new params with "
                f"sampler.update_params(params) or generate_ids(..., params=params)")

"""`python -m scalign.bench sample --workload NAME`: the sampler on a shared sampling workload.

`sample_llama_small`: the spec's llama_small model (random init, seed `init_seed`), `batch`
prompts of `prompt_len` random ids (`common.random_ids`), exactly `max_new_tokens` greedy tokens
(no EOS stop), float32; `warmup_calls` untimed calls, then the median of `timed_calls`. One
timed call is one `Sampler.generate_ids` (prefill, decode loop, transfer of every output array
to the host). value = batch * max_new_tokens / median seconds.

Extra keys (each after its own warm-up call, `bon_timed` timed calls, median):
  bon_tok_s:    best-of-N layout: `bon_prompts` prompts x `bon_n` samples (default 8 x 16), one
                prefill per prompt, temperature 1 sampling;
  indep_tok_s:  the same number of rows as independent prompts (128 x 1), same sampling;
  both count generated tokens (rows x max_new_tokens) per second.
Also: prefill_s (one prefill call) and the per-call seconds.

Decode memory traffic (the roofline of batched decoding is bytes, not FLOPs):
  decode_step_ms:        (median call - prefill_s) / (M - 1) decode steps;
  decode_bytes_per_step: the fewest bytes a decode step must read: every weight except the
                         input-embedding table (a gather of B rows; with tied embeddings the
                         table is read as the LM head) plus the K/V cache slots it attends to
                         (step t of a prompt of T slots: T + t + 1), averaged over the M - 1
                         steps. What an implementation reads beyond that (masked slots,
                         re-reads) counts against it;
  decode_GBps:           decode_bytes_per_step / decode_step_ms;
  copy_GBps:             a measured ceiling: a 512 MiB float32 `x + 1` on the same device,
                         bytes read plus written per second (median of 5);
  decode_bw_util:        decode_GBps / copy_GBps.
`--extra copy_bw=0` skips the copy probe.

`--extra` options: `bon=0` skips the best-of-N comparison; `bon_timed=N`; `bon_prompts=P`,
`bon_n=N`; `weight_layout=native|output_major|panels` overrides the sampler's choice (A/B of
the decode weights' packing); `cache_phases=K` overrides the decode loop's phase count;
`attention=xla|cpu_kernel` overrides the decode attention (`Sampler(attention=...)`);
`param_dtype=bfloat16` / `dtype=bfloat16` run a bf16 variant (not the
spec's f32 workload; the line's `notes` say so); `scan_layers=0|1` overrides
`ModelConfig.scan_layers` (the same weights, stacked or per layer); `model=PRESET` (a
`models.presets` name, random init, e.g. `llama3_2_1b` with `dtype=bfloat16
param_dtype=bfloat16`: a decode that reads GBs per step, for bandwidth on a GPU) and
`batch=` replace the spec's model and batch (the line's `notes` say so).

`sample_gemma3_270m` needs the real Gemma-3-270M weights through `scalign.models.load_gguf`
and the assembled GGUF (`gguf=PATH`, `$PEERS_GGUF`, or /tmp/peers/gguf/gemma-3-270m-q4_k_m.gguf);
without them the run stops with an error that says what is missing. `--extra init=random` runs
the spec's fallback instead (a random init of exactly the Gemma-3-270M config, seed 0; the line's
`notes` say so): same shapes, same speed, meaningless tokens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scalign.bench import common
from scalign.models import init_params
from scalign.models.transformer import stack_layers, unstack_layers
from scalign.sampling import Sampler, cache_phases

_DEFAULT_GGUF = "/tmp/peers/gguf/gemma-3-270m-q4_k_m.gguf"


def _timed(fn, warmup: int, timed: int) -> list[float]:
    return common.time_calls(fn, warmup=warmup, timed=timed)


def _gemma(extra: dict[str, Any]):
    if str(extra.get("init", "")) == "random":
        from scalign.models.presets import gemma3_270m

        config = gemma3_270m()
        params = init_params(config, jax.random.PRNGKey(0))
        return config, params, None, ("random init of the Gemma-3-270M config (the spec's "
                                      "fallback; real weights not loaded)")
    try:
        from scalign.models import load_gguf
    except ImportError as e:
        raise SystemExit(
            f"sample_gemma3_270m needs real Gemma-3-270M weights, loaded by "
            f"scalign.models.load_gguf, which this checkout does not have yet ({e}); the "
            f"workload is not run on a random init") from e
    path = Path(extra.get("gguf") or os.environ.get("PEERS_GGUF") or _DEFAULT_GGUF)
    if not path.exists():
        raise SystemExit(f"sample_gemma3_270m: GGUF checkpoint not found at {path}; run "
                         f"`bash ../shared/peers/setup.sh` (assembles it) or pass --extra "
                         f"gguf=PATH")
    config, params, tokenizer = load_gguf(path, dtype="float32")
    return config, params, tokenizer, f"real Gemma-3-270M weights from {path.name}"


def run(workload: str, spec_path: str | None = None, **extra: Any) -> dict:
    """Run one sampling workload and print its JSON line (see the module docstring)."""
    wl, model = common.load_workload(workload, spec_path)
    if wl["kind"] != "sample":
        raise SystemExit(f"workload {workload!r} is of kind {wl['kind']!r}, not 'sample'")
    notes = []
    overrides = {k: extra[k] for k in ("dtype", "param_dtype") if k in extra}
    if "model" in extra:  # a scale check on a named preset (random init), not the spec's model
        config = common.bench_model_config(model, extra)
        params = init_params(config, jax.random.PRNGKey(0))
        tokenizer = None
        notes.append(f"NOT the spec's model: {extra['model']} random init (seed 0)")
    elif model["architecture"] == "llama":
        config = common.model_config_from_spec(model, **overrides)
        params = init_params(config, jax.random.PRNGKey(model.get("init_seed", 0)))
        tokenizer = None
        notes.append(f"llama_small random init (seed {model.get('init_seed', 0)})")
    elif model["architecture"] == "gemma3":
        config, params, tokenizer, note = _gemma(extra)
        if overrides:
            config = config.replace(**overrides)
        notes.append(note)
    else:
        raise SystemExit(f"unsupported architecture {model['architecture']!r}")
    if overrides:
        notes.append(f"NOT the spec's float32 workload: {overrides}")
    if "scan_layers" in extra:  # the same weights, stacked (scanned) or per layer
        scanned = config.replace(scan_layers=str(extra["scan_layers"]) not in ("0", "false"))
        if scanned.scanned and not config.scanned:
            params = stack_layers(params, config.n_layers)
        elif config.scanned and not scanned.scanned:
            params = unstack_layers(params, config.n_layers)
        config = scanned
        notes.append(f"scan_layers={config.scan_layers}")

    wl = common.workload_overrides(wl, extra)
    B, T, M = wl["batch"], wl["prompt_len"], wl["max_new_tokens"]
    high = wl.get("prompt_token_high", config.vocab_size)
    prompts = common.random_ids(wl["prompt_seed"], wl["prompt_token_low"], high, (B, T))
    if wl["decoding"] != "greedy":
        raise SystemExit(f"workload {workload!r}: decoding {wl['decoding']!r} is not supported")
    layout = str(extra.get("weight_layout", "auto"))
    attention = str(extra.get("attention", "auto"))
    phases = int(extra["cache_phases"]) if "cache_phases" in extra else None
    sampler = Sampler(config, params, tokenizer, max_new_tokens=M, min_prompt_bucket=T,
                      weight_layout=layout, cache_phases=phases, attention=attention)
    if layout != "auto":
        notes.append(f"weight_layout={layout}")
    if phases is not None:
        notes.append(f"cache_phases={phases}")

    def call():
        out = sampler.generate_ids(prompts, max_new_tokens=M, stop_on_eos=wl["stop_on_eos"],
                                   decode_texts=False)
        assert out.tokens.shape == (B, 1, M) and (out.lengths == M).all()
        return out

    t0 = time.perf_counter()
    call()
    first_call_s = time.perf_counter() - t0  # includes compilation
    secs = _timed(call, max(0, wl["warmup_calls"] - 1), wl["timed_calls"])
    value = B * M / common.median(secs)

    # prefill alone (a lower bound on time to first token)
    tp = sampler.prompt_bucket(T)
    toks = np.asarray(prompts, np.int32)
    ks = np.zeros((B,), np.int32)
    static = dict(config=sampler.config, mesh=sampler.mesh, rules=sampler.rules, n=1,
                  extra_slots=cache_phases(M, sampler.cache_phases)[0],  # as generate_ids
                  cache_dtype=sampler.cache_dtype)

    def prefill():
        jax.block_until_ready(sampler._prefill(sampler.params, toks, ks, **static))

    prefill_s = common.median(_timed(prefill, 1, 3)) if tp == T else None
    traffic: dict[str, Any] = {}
    if prefill_s is not None and M > 1:
        step_s = (common.median(secs) - prefill_s) / (M - 1)
        nbytes = decode_bytes_per_step(config, params, B, tp, M, sampler.cache_dtype)
        traffic = {"decode_step_ms": round(step_s * 1e3, 3), "decode_bytes_per_step": nbytes,
                   "decode_GBps": round(nbytes / step_s / 1e9, 2)}
        if str(extra.get("copy_bw", "1")) != "0":
            copy = common.copy_bandwidth()
            traffic.update(copy_GBps=round(copy / 1e9, 2),
                           decode_bw_util=round(nbytes / step_s / copy, 4))

    result_extra: dict[str, Any] = {
        "seconds": [round(s, 4) for s in secs], "first_call_s": round(first_call_s, 2),
        "prefill_s": round(prefill_s, 4) if prefill_s is not None else None,
        "batch": B, "prompt_len": T, "max_new_tokens": M, "threads": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "weight_layout": sampler.weight_layout,
        "attention": sampler.attention, "cache_phases": len(cache_phases(M, sampler.cache_phases)),
        **traffic,
    }
    if str(extra.get("bon", "1")) != "0":
        result_extra.update(_best_of_n(sampler, config, wl, extra))
    return common.emit(workload, wl["metric"], round(value, 1), wl["unit"],
                       notes="; ".join(notes), **result_extra)


def decode_bytes_per_step(config, params: Any, batch: int, prompt_slots: int,
                          max_new_tokens: int, cache_dtype: Any) -> int:
    """The fewest bytes one decode step reads, averaged over the M - 1 steps of a call: all
    weights but the input-embedding table (with tied embeddings it is the LM head, read once),
    plus the K and V of the slots step t attends to (prompt_slots + t + 1)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    weights = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for path, x in leaves
                  if config.tie_embeddings or "embedding" not in jax.tree_util.keystr(path))
    per_slot = (2 * config.n_layers * batch * config.n_kv_heads * config.head_dim
                * np.dtype(cache_dtype).itemsize)
    steps = max(max_new_tokens - 1, 1)
    mean_slots = prompt_slots + sum(t + 1 for t in range(steps)) / steps
    return int(weights + per_slot * mean_slots)


def _best_of_n(sampler: Sampler, config, wl: dict, extra: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of P prompts x N samples (shared prefill) vs P*N independent prompts."""
    P, N = int(extra.get("bon_prompts", 8)), int(extra.get("bon_n", 16))
    timed = int(extra.get("bon_timed", 2))
    T, M = wl["prompt_len"], wl["max_new_tokens"]
    high = wl.get("prompt_token_high", config.vocab_size)
    few = common.random_ids(1, wl["prompt_token_low"], high, (P, T))
    many = common.random_ids(2, wl["prompt_token_low"], high, (P * N, T))
    key = jax.random.key(0)
    kw = dict(max_new_tokens=M, key=key, temperature=1.0, stop_on_eos=False, decode_texts=False)
    bon = common.median(_timed(lambda: sampler.generate_ids(few, N, **kw), 1, timed))
    ind = common.median(_timed(lambda: sampler.generate_ids(many, 1, **kw), 1, timed))
    rows = P * N
    return {"bon_layout": f"{P}x{N}", "bon_tok_s": round(rows * M / bon, 1),
            "indep_layout": f"{rows}x1", "indep_tok_s": round(rows * M / ind, 1),
            "bon_s": round(bon, 3), "indep_s": round(ind, 3)}

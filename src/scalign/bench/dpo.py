"""`python -m scalign.bench dpo --workload dpo_llama_small`: DPO step throughput.

One step = the sigmoid DPO loss (Rafailov et al. 2023) on `batch_pairs` pairs of a shared
prompt (`prompt_len` random ids) and two responses (`response_len` random ids each), its
gradient and one AdamW update, through `make_preference_loss("dpo")` + `make_train_step`.
value = batch_pairs / median step seconds.

By default the step uses the two savings the issue allows (the line's `notes` say which ran):
  shared_prompt=1  the shared-prompt pair layout: one forward over the prompts and one over the
                   2B responses against their K/V cache (B(P + 2R) positions instead of
                   2B(P + R); `logprobs.shared_prompt_log_probs`), the LM head on responses only;
  ref_cache=1      reference log-probs computed once per pair before training
                   (`preference.pair_log_probs` on the frozen initial policy, as TRL's
                   `precompute_ref_log_probs`; its one-off time is `ref_seconds`), so the step
                   runs no reference forward.
`--extra shared_prompt=0 ref_cache=0` runs the plain form: one [2B, P + R] policy forward and
one reference forward per step. Also `dtype=`, `attention_impl=`, `model=`, `batch_pairs=`.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from scalign import parallel
from scalign.bench.common import emit, median, nondefault_notes, time_steps, train_setup
from scalign.objectives.preference import make_preference_loss, pair_log_probs
from scalign.training.step import make_train_step


def _flag(extra: dict, name: str, default: bool = True) -> bool:
    return str(extra.get(name, "1" if default else "0")).lower() not in ("0", "false", "no")


def run(workload: str, spec_path: str | None = None, **extra: str) -> dict:
    wl, config, mesh, opt, state, st_sh = train_setup(workload, spec_path, "dpo", extra)
    if wl.get("loss", "sigmoid") != "sigmoid":
        raise ValueError(f"workload {workload!r}: only the sigmoid DPO loss is benchmarked, "
                         f"got {wl['loss']!r}")
    shared, cached = _flag(extra, "shared_prompt"), _flag(extra, "ref_cache")
    B, P, R = wl["batch_pairs"], wl["prompt_len"], wl["response_len"]
    rng = np.random.default_rng(wl.get("data_seed", 0))
    prompt, chosen, rejected = (rng.integers(3, config.vocab_size, size=(B, n)).astype(np.int32)
                                for n in (P, R, R))
    if shared:
        ones = np.ones((B, R), np.float32)
        host = {"prompt_tokens": prompt, "chosen_response": chosen, "rejected_response": rejected,
                "chosen_response_mask": ones, "rejected_response_mask": ones}
    else:
        mask = np.concatenate([np.zeros((B, P), np.float32), np.ones((B, R), np.float32)], 1)
        host = {"chosen_tokens": np.concatenate([prompt, chosen], 1), "chosen_mask": mask,
                "rejected_tokens": np.concatenate([prompt, rejected], 1), "rejected_mask": mask}
    loss = make_preference_loss(config, "dpo", beta=float(wl["beta"]),
                                label_smoothing=float(wl.get("label_smoothing", 0.0)))
    reference = jax.tree.map(lambda x: x.copy(), state.params)  # the initial policy, frozen
    side: dict = {}
    if cached:
        ref_fn = jax.jit(lambda p, b: pair_log_probs(config, p, b))
        jax.block_until_ready(ref_fn(reference, host))  # compile
        t0 = time.perf_counter()
        rc, rr = jax.block_until_ready(ref_fn(reference, host))
        side["ref_seconds"] = time.perf_counter() - t0
        host = {**host, "ref_chosen_logps": np.asarray(rc), "ref_rejected_logps": np.asarray(rr)}
    batch = parallel.shard_batch(host, mesh)
    step = make_train_step(loss, opt, mesh, state_sharding=st_sh, use_frozen=not cached,
                           frozen_sharding=None if cached else st_sh.params, clip_norm=None)
    args = () if cached else (reference,)
    times, metrics = time_steps(step, state, batch, wl, *args)
    notes = [f"make_preference_loss('dpo') + make_train_step; shared_prompt={int(shared)}, "
             f"ref_cache={int(cached)}"] + nondefault_notes(extra)
    return emit(workload, "pairs_per_s", B / median(times), "pairs/s", step_seconds=times,
                loss=metrics["loss"], dtype=config.dtype, notes="; ".join(notes), **side)

"""`python -m scalign.bench dpo --workload dpo_llama_small`: one DPO step, pairs per second.

The spec's workload: `batch_pairs` pairs of [prompt; chosen] and [prompt; rejected] random ids
(seed `data_seed`, ids in [3, vocab)), log-probs summed over the response tokens only, sigmoid
DPO loss (Rafailov et al. 2023) with the spec's beta / label smoothing, the reference model a
frozen copy of the initial policy (forward only), AdamW at the spec's learning rate. One step =
policy forward + backward on the concatenated [2B, T] pair batch, reference forward, AdamW update,
through the project's own `make_preference_loss` and `make_train_step` (`use_frozen=True`).
value = batch_pairs / median step seconds.
"""

from __future__ import annotations

import jax
import numpy as np

from scalign import parallel
from scalign.bench.common import emit, median, time_steps, train_setup
from scalign.objectives.preference import make_preference_loss
from scalign.training.step import make_train_step


def run(workload: str, spec_path: str | None = None, **extra: str) -> dict:
    wl, config, mesh, opt, state, st_sh = train_setup(workload, spec_path, "dpo", extra)
    if wl.get("loss", "sigmoid") != "sigmoid":
        raise ValueError(f"workload {workload!r}: only the sigmoid DPO loss is benchmarked, "
                         f"got {wl['loss']!r}")
    B, P, R = wl["batch_pairs"], wl["prompt_len"], wl["response_len"]
    rng = np.random.default_rng(wl.get("data_seed", 0))
    prompt, chosen, rejected = (rng.integers(3, config.vocab_size, size=(B, n)).astype(np.int32)
                                for n in (P, R, R))
    mask = np.concatenate([np.zeros((B, P), np.float32), np.ones((B, R), np.float32)], axis=1)
    batch = parallel.shard_batch({
        "chosen_tokens": np.concatenate([prompt, chosen], 1), "chosen_mask": mask,
        "rejected_tokens": np.concatenate([prompt, rejected], 1), "rejected_mask": mask}, mesh)
    loss = make_preference_loss(config, "dpo", beta=float(wl["beta"]),
                                label_smoothing=float(wl.get("label_smoothing", 0.0)))
    step = make_train_step(loss, opt, mesh, state_sharding=st_sh, use_frozen=True,
                           frozen_sharding=st_sh.params, clip_norm=None)
    reference = jax.tree.map(lambda x: x.copy(), state.params)  # the initial policy, frozen
    times, metrics = time_steps(step, state, batch, wl, reference)
    return emit(workload, "pairs_per_s", B / median(times), "pairs/s", step_seconds=times,
                loss=metrics["loss"], dtype=config.dtype,
                notes="make_preference_loss('dpo') + make_train_step(use_frozen=True)")

"""`python -m scalign.bench train --workload sft_llama_small`: SFT step throughput and MFU.

One step = forward + backward + AdamW on `batch x seq_len` random tokens (spec seed), loss on
all tokens, through the project's own `make_train_step`. Reported: tokens/s (median of the
timed steps) and MFU = model FLOPs per step / step time / peak, where the peak is the best of 5
jitted float32 2048^3 matmuls measured in the same process and model FLOPs per token follow the
spec (6 * matmul params + 12 * L * T * H * Dh).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from scalign import parallel
from scalign.bench.common import (
    emit,
    load_workload,
    median,
    model_config_from_spec,
    peak_matmul_flops,
    random_ids,
    time_calls,
)
from scalign.models import init_params, param_logical_axes
from scalign.objectives.sft import make_sft_loss
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step


def run(workload: str, spec_path: str | None = None, **extra: str) -> dict:
    wl, m = load_workload(workload, spec_path)
    if wl["kind"] != "train":
        raise ValueError(f"workload {workload!r} is a {wl['kind']!r} workload, not 'train'")
    overrides = {}
    if "dtype" in extra:
        overrides["dtype"] = extra["dtype"]
    if "remat" in extra:
        overrides["remat"] = extra["remat"]
    config = model_config_from_spec(m, **overrides)
    B, T = wl["batch"], wl["seq_len"]
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=wl["learning_rate"],
                                         weight_decay=wl["weight_decay"], schedule="constant"))
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=m["init_seed"])
    step = make_train_step(make_sft_loss(config), opt, mesh, state_sharding=st_sh,
                           clip_norm=None)
    tokens = random_ids(wl["data_seed"], 0, config.vocab_size, (B, T))
    batch = parallel.shard_batch({"tokens": tokens, "loss_mask": np.ones((B, T), np.float32)},
                                 mesh)
    box = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready(metrics["loss"])
        box["loss"] = float(metrics["loss"])

    times = time_calls(one, warmup=wl["warmup_steps"], timed=wl["timed_steps"])
    step_s = median(times)
    flops_step = config.train_flops_per_token(T) * B * T
    peak = peak_matmul_flops()
    return emit(workload, "tokens_per_s", B * T / step_s, "tok/s",
                mfu=flops_step / step_s / peak, peak_flops=peak,
                model_flops_per_token=config.train_flops_per_token(T),
                step_seconds=times, loss=box["loss"], dtype=config.dtype)

"""`python -m scalign.bench train --workload sft_llama_small`: SFT step throughput and MFU.

One step = forward + backward + AdamW on `batch x seq_len` random tokens (spec seed), loss on
all tokens, through the project's own `make_train_step`. Reported: tokens/s (median of the
timed steps) and MFU = model FLOPs per step / step time / peak, where the peak is the best of 5
jitted float32 2048^3 matmuls measured in the same process and model FLOPs per token follow the
spec (6 * matmul params + 12 * L * T * H * Dh).
"""

from __future__ import annotations

import numpy as np

from scalign import parallel
from scalign.bench.common import (
    emit,
    median,
    peak_matmul_flops,
    random_ids,
    time_steps,
    train_setup,
)
from scalign.objectives.sft import make_sft_loss
from scalign.training.step import make_train_step


def run(workload: str, spec_path: str | None = None, **extra: str) -> dict:
    wl, config, mesh, opt, state, st_sh = train_setup(workload, spec_path, "train", extra)
    B, T = wl["batch"], wl["seq_len"]
    step = make_train_step(make_sft_loss(config), opt, mesh, state_sharding=st_sh,
                           clip_norm=None)
    tokens = random_ids(wl["data_seed"], 0, config.vocab_size, (B, T))
    batch = parallel.shard_batch({"tokens": tokens, "loss_mask": np.ones((B, T), np.float32)},
                                 mesh)
    times, metrics = time_steps(step, state, batch, wl)
    step_s = median(times)
    flops_step = config.train_flops_per_token(T) * B * T
    peak = peak_matmul_flops()
    return emit(workload, "tokens_per_s", B * T / step_s, "tok/s",
                mfu=flops_step / step_s / peak, peak_flops=peak,
                model_flops_per_token=config.train_flops_per_token(T),
                step_seconds=times, loss=metrics["loss"], dtype=config.dtype)

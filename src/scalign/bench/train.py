"""`python -m scalign.bench train --workload sft_llama_small`: SFT step throughput and MFU.

One step = forward + backward + AdamW on `batch x seq_len` random tokens (spec seed), loss on
all tokens, through the project's own `make_train_step`. Reported: tokens/s (median of the
timed steps) and MFU = model FLOPs per step / step time / peak, where the peak is the best of 5
jitted float32 2048^3 matmuls measured in the same process and model FLOPs per token follow the
spec (6 * matmul params + 12 * L * T * H * Dh).

`--extra` options beyond the spec (the line's `notes` say the run is not the spec's workload):
`model=PRESET` (a `models.presets` name, e.g. `llama3_2_1b`), `dtype=bfloat16`,
`param_dtype=`, `remat=none|full|dots`, `attention_impl=einsum|dot_product|cudnn`,
`attention_block=N` (query block of the einsum attention; 0 = one block),
`batch=`, `seq_len=`, `warmup_steps=`, `timed_steps=`; `peak_n=N` (side of the peak probe's
matmul, default 2048; 8192 on a GPU) — the probe runs in the compute dtype with float32
accumulation, so a bf16 run's MFU is against the measured bf16 peak; `peak_tflops=X` adds
`mfu_nominal` against a datasheet peak (e.g. 989 for an H100/H200's dense bf16).
"""

from __future__ import annotations

import numpy as np

from scalign import parallel
from scalign.bench.common import (
    emit,
    median,
    nondefault_notes,
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
    peak = peak_matmul_flops(n=int(extra.get("peak_n", 2048)), dtype=config.dtype)
    side: dict = {}
    if "peak_tflops" in extra:
        side["mfu_nominal"] = flops_step / step_s / (float(extra["peak_tflops"]) * 1e12)
        side["peak_flops_nominal"] = float(extra["peak_tflops"]) * 1e12
    notes = nondefault_notes(extra)
    if notes:
        side["notes"] = "; ".join(notes)
    return emit(workload, "tokens_per_s", B * T / step_s, "tok/s",
                mfu=flops_step / step_s / peak, peak_flops=peak, **side,
                model_flops_per_token=config.train_flops_per_token(T),
                step_seconds=times, loss=metrics["loss"], dtype=config.dtype,
                attention_impl=config.attention_impl, remat=config.remat, batch=B, seq_len=T)

"""Lower and compile the Llemma-7B reward-model train step of `e2h_llemma7b_prm800k.py` from
abstract shapes on a fake 8-device CPU mesh, scanned or unrolled over the 32 layers.

    python experiments/studies/rm_step_compile.py --scan_layers=true   # or false

Prints one JSON line: wall and process-CPU seconds to lower and to compile, the compiled
program's per-device temp memory, the HLO text size, and the process' peak RSS. Nothing of the
7B model is allocated (`jax.eval_shape` params, abstract AdamW state and batch), as in
`tests/stages/test_e2h_llemma_config.py`, whose helpers this mirrors.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from scalign import parallel  # noqa: E402
from scalign.models import presets  # noqa: E402
from scalign.models.heads import add_scalar_head  # noqa: E402
from scalign.models.transformer import init_params  # noqa: E402
from scalign.objectives.reward import make_reward_loss  # noqa: E402
from scalign.stages.common import optimizer_for, training_model  # noqa: E402
from scalign.stages.reward_models import _reward_axes, train_block  # noqa: E402
from scalign.training.state import TrainState  # noqa: E402
from scalign.training.step import make_train_step  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "e2h_llemma7b_prm800k.py"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scan_layers", choices=("true", "false", "default"), default="default")
    ap.add_argument("--n_layers", type=int, default=32)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    train = train_block(config.reward_models.train, 50_000)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    scan = {"true": True, "false": False, "default": None}[args.scan_layers]
    model = presets.get(config.model.preset).replace(
        dtype=config.checkpoint.compute_dtype, n_layers=args.n_layers, scan_layers=scan)
    model = training_model(model, config.reward_models.train)
    optimizer, schedule = optimizer_for(train)
    params = jax.eval_shape(lambda k: add_scalar_head(model, init_params(model, k), k),
                            jax.random.PRNGKey(0))
    p_sh = parallel.tree_shardings(_reward_axes(model), params, mesh)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                           params)
    st_sh = parallel.state_shardings(optimizer, state, p_sh, mesh)
    step = make_train_step(make_reward_loss(model), optimizer, mesh, state_sharding=st_sh,
                           clip_norm=train.clip_norm,
                           grad_accum_steps=int(train.grad_accum_steps), lr_schedule=schedule)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, st_sh)
    B, T = int(train.batch_size), int(train.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "labels": jax.ShapeDtypeStruct((B, T), jnp.float32),
             "label_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    w0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch)
    w1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()
    print(json.dumps({
        "model": config.model.preset, "n_layers": model.n_layers, "scanned": model.scanned,
        "remat": model.remat, "lower_wall_s": round(w1 - w0, 1), "lower_cpu_s": round(c1 - c0, 1),
        "compile_wall_s": round(w2 - w1, 1), "compile_cpu_s": round(c2 - c1, 1),
        "stablehlo_chars": len(lowered.as_text()),
        "temp_gib_per_device": round(mem.temp_size_in_bytes / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "jax": jax.__version__, "devices": jax.device_count(),
        "platform": jax.default_backend()}))


if __name__ == "__main__":
    main()

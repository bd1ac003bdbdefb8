"""Memory and compile planning: will a config fit a TPU slice, and with which remat policy?

    python -m scalign.plan --config=experiments/configs/e2h_llemma7b_prm800k.py \
        --tpu=v5e-16,v5p-8 --remat=config,none,full

For each named TPU type the config's mesh is resolved for that slice's chip count and built on
as many *virtual CPU devices*; every jitted train step of the config (SFT, reward-model
fitting, ...) is lowered and compiled from abstract shapes only (`jax.eval_shape` params, the
rule-table shardings, an abstract batch): no weights are allocated, nothing runs. For each
step and remat policy it prints bytes *per device*:

  params     the device's shard of the params              (exact, from the shardings)
  opt        its shard of the optimizer state (AdamW mu, nu) (exact)
  act        activations kept for the backward pass under the remat policy, and the logits
             (an analytic estimate: `activation_bytes`)
  batch      its shard of the input batch                 (exact)
  XLA temp   XLA's temporaries (`compiled.memory_analysis().temp_size_in_bytes`)
  XLA total  arguments + outputs - donated aliases + temp (XLA's own peak)
  estimate   params + gradients (params-sized) + opt + act

and whether the estimate fits the chip's HBM with 10% kept free. The XLA columns come from
XLA's *CPU* compiler with the same partitioning: it does not schedule FSDP's per-layer
all-gathers under a memory limit as the TPU compiler does, so its temp can hold many gathered
layers at once and is an upper bound, far above what a TPU needs (for Llemma-7B on 16 chips
~117 GiB against an estimate of a few GiB; not verified on a TPU here).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any

GiB = 2**30

#: chips and HBM per chip of a TPU type (v5p-N / v4-N count TensorCores: 2 per chip)
TPU_SPECS: dict[str, tuple[int, float]] = {
    "v4": (2, 32.0), "v5p": (2, 95.0), "v5e": (1, 16.0), "v5litepod": (1, 16.0),
    "v6e": (1, 32.0),
}


def tpu_type(name: str) -> tuple[int, float]:
    """(chips, HBM GiB per chip) of e.g. 'v5e-16', 'v5p-8', 'v4-32'."""
    family, _, size = name.partition("-")
    if family not in TPU_SPECS or not size.isdigit():
        raise ValueError(f"unknown TPU type {name!r}; use one of "
                         f"{sorted(TPU_SPECS)} with a size, e.g. v5e-16 or v5p-8")
    per_chip, hbm = TPU_SPECS[family]
    return max(int(size) // per_chip, 1), hbm


@dataclasses.dataclass
class Row:
    tpu: str
    step: str
    remat: str
    mesh: dict[str, int]
    params: int
    opt: int
    act: int
    estimate: int
    batch: int
    temp: int
    total: int
    hbm: int
    compile_s: float

    @property
    def fits(self) -> bool:
        """By the analytic estimate (XLA:CPU's `total` is an upper bound, see the docstring)."""
        return self.estimate <= 0.9 * self.hbm


def activation_bytes(model, rows: int, length: int, tensor: int, remat: str) -> int:
    """An analytic estimate of the activations one device keeps for the backward pass.

    Per layer, with b rows, T tokens, width D, MLP width F, H query / K kv heads of size d,
    tensor-parallel size t and activation bytes a (2 for bf16):
      matmul outputs  b T (H d + 2 K d + D + 2 F / ... ) a / t   (q, k, v, attention out, MLP in/out)
      everything      matmul outputs + b T (4 D + F) a + b (H / t) T^2 (4 + a)   (norms, softmax)
    remat "none" keeps everything of every layer; "dots" keeps every layer's matmul outputs
    plus one layer's everything; "full" keeps every layer's input (b T D a) plus one layer's
    everything. Plus the f32 logits and their gradient, b T V 4 * 2 / t.
    """
    a = 2 if "bfloat16" in str(model.dtype) else 4
    b, T, D, F = rows, length, model.d_model, model.mlp_dim
    H, K, d = model.n_heads, model.n_kv_heads, model.head_dim
    dots = b * T * (H * d + 2 * K * d + H * d + 3 * F) * a // tensor + b * T * D * a
    every = dots + b * T * (4 * D + F) * a + b * max(H // tensor, 1) * T * T * (4 + a)
    L = model.n_layers
    saved = {"none": L * every, "dots": L * dots + every, "full": L * b * T * D * a + every}
    logits = 2 * b * T * model.vocab_size * 4 // tensor
    return int(saved[remat] + logits)


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("scalign_plan_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def _model(config):
    from scalign.models import presets

    if "model" not in config or not config.model.get("preset"):
        raise ValueError("config.model.preset is missing: the planner needs the model's shapes")
    model = presets.get(config.model.preset)
    dtype = (config.get("checkpoint", {}) or {}).get("compute_dtype") or \
        config.model.get("dtype")
    return model.replace(dtype=str(dtype)) if dtype else model


def train_steps(config) -> list[tuple[str, Any]]:
    """(name, training block) of every train step the config runs."""
    steps = []
    if "sft" in config.stages and "sft" in config:
        steps.append(("sft", config.sft))
    if "reward_models" in config.stages and "reward_models" in config:
        steps.append(("reward_model", config.reward_models.train))
    return steps


def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def plan_step(name: str, block, model, mesh, compile: bool = True  # noqa: A002
              ) -> tuple[dict[str, int], float]:
    """Lower and compile one train step abstractly; bytes per device and compile seconds."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from scalign import parallel
    from scalign.models import init_params, param_logical_axes
    from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
    from scalign.objectives.reward import make_reward_loss
    from scalign.objectives.sft import make_sft_loss
    from scalign.training.state import OptimizerConfig, TrainState, make_optimizer

    opt_cfg = OptimizerConfig.from_config({**block.optimizer.to_dict(),
                                           "total_steps": int(block.get("steps") or 1000)})
    optimizer = make_optimizer(opt_cfg)
    axes = param_logical_axes(model)
    B, T = int(block.batch_size), int(block.seq_len)
    if name == "reward_model":
        def init(key):
            return add_scalar_head(model, init_params(model, key), key)
        axes = {**axes, SCALAR_HEAD: scalar_head_logical_axes()}
        loss = make_reward_loss(model)
        batch = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
                 "labels": jax.ShapeDtypeStruct((B, T), jnp.float32),
                 "label_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    else:
        init = functools.partial(init_params, model)
        loss = make_sft_loss(model)
        batch = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
                 "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    from scalign.training.step import make_train_step

    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    p_sh = parallel.tree_shardings(axes, params, mesh)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                           params)
    st_sh = parallel.state_shardings(optimizer, state, p_sh, mesh)
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh,
                           clip_norm=block.get("clip_norm", 1.0),
                           grad_accum_steps=int(block.get("grad_accum_steps", 1)))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, st_sh)
    bsh = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in batch.items()}
    t0 = time.perf_counter()
    if compile:
        mem = step.lower(state, batch).compile().memory_analysis()
        temp, total = int(mem.temp_size_in_bytes), int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    else:
        temp = total = -1
    seconds = time.perf_counter() - t0
    opt_bytes = _shard_bytes(optax.tree_map_params(optimizer, lambda x: x, state.opt_state))
    rows = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    act = activation_bytes(model, rows, T, mesh.shape["tensor"], model.remat)
    p_bytes = _shard_bytes(state.params)
    out = {"params": p_bytes, "opt": opt_bytes, "act": act,
           "estimate": 2 * p_bytes + opt_bytes + act,  # params + grads + opt + activations
           "batch": _shard_bytes(batch), "temp": temp, "total": total}
    return out, seconds


def run(config, tpus: list[str], remats: list[str], steps: list[str] | None = None,
        log=print, compile: bool = True) -> list[Row]:  # noqa: A002
    import jax

    from scalign import experiment, parallel
    from scalign.stages.common import training_model

    model = _model(config)
    rows = []
    for tpu in tpus:
        chips, hbm = tpu_type(tpu)
        if chips > jax.device_count():
            raise ValueError(f"{tpu} has {chips} chips but only {jax.device_count()} virtual "
                             f"devices exist; start with --devices={chips} or more")
        shape = experiment.mesh_shape_of(config, chips)
        mesh = parallel.make_mesh(shape, jax.devices()[:chips])
        for name, block in train_steps(config):
            if steps and name not in steps:
                continue
            policies = [str(block.get("remat") or "none") if r == "config" else r
                        for r in remats]
            for r in dict.fromkeys(policies):  # in order, each once
                m = training_model(model, {"remat": r})
                got, secs = plan_step(name, block, m, mesh, compile)
                row = Row(tpu=tpu, step=name, remat=r, mesh=shape, hbm=int(hbm * GiB),
                          compile_s=secs, **got)
                rows.append(row)
                log(format_row(row))
    return rows


HEADER = ("| TPU | step | remat | mesh (data, fsdp, tensor) | params | opt | act (est.) | batch "
          "| XLA temp | XLA total | estimate / HBM per chip | fits |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _g(n: int) -> str:
    if n < 0:
        return "-"
    return f"{n / GiB:.3g}"


def format_row(r: Row) -> str:
    mesh = ", ".join(str(r.mesh[a]) for a in ("data", "fsdp", "tensor"))
    return (f"| {r.tpu} | {r.step} | {r.remat} | {mesh} | {_g(r.params)} | {_g(r.opt)} | "
            f"{_g(r.act)} | {_g(r.batch)} | {_g(r.temp)} | {_g(r.total)} | "
            f"{_g(r.estimate)} / {_g(r.hbm)} | "
            f"{'yes' if r.fits else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scalign.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file (optionally file.py:arg)")
    p.add_argument("--tpu", default="v5e-16,v5p-8", help="comma-separated TPU types")
    p.add_argument("--remat", default="config",
                   help="comma-separated remat policies: config (the config's), none, full, dots")
    p.add_argument("--steps", default="", help="only these steps (sft, reward_model)")
    p.add_argument("--devices", type=int, default=0,
                   help="virtual CPU devices (default: the largest slice's chip count)")
    p.add_argument("--no_compile", action="store_true",
                   help="only the exact shard sizes and the analytic estimate (seconds)")
    args = p.parse_args(argv)
    tpus = [t for t in args.tpu.split(",") if t]
    try:
        chips = max(tpu_type(t)[0] for t in tpus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(args.devices, chips))
    config = load_config(args.config)
    print(f"plan for {args.config} ({config.get('name', '')}); bytes per device in GiB; "
          f"model {config.model.preset}, compute dtype "
          f"{_model(config).dtype}\n")
    print(HEADER, flush=True)
    rows = run(config, tpus, [r for r in args.remat.split(",") if r],
               [s for s in args.steps.split(",") if s] or None,
               log=lambda line: print(line, flush=True), compile=not args.no_compile)
    slow = max((r.compile_s for r in rows), default=0.0)
    done = "compiled" if not args.no_compile else "planned (not compiled)"
    print(f"\n{len(rows)} steps {done} (slowest {slow:.0f} s); 'fits': the estimate "
          f"(params + grads + opt + act) leaves 10% of HBM free")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

"""Memory and compile planning: will a config fit a TPU slice, and with which remat policy?

    python -m scalign.plan --config=experiments/configs/e2h_llemma7b_prm800k.py \
        --tpu=v5e-16,v5p-8 --remat=config,none,full [--set rl.remat=full ...]

For each named TPU type the config's mesh is resolved for that slice's chip count and built on
as many *virtual CPU devices*; every jitted train step of the config is lowered and compiled
from abstract shapes only (`jax.eval_shape` params, the rule-table shardings, an abstract
batch) with the one step factory (`training.step.make_train_step`) and the objectives the
stages use: no weights are allocated, nothing runs. The steps (`planned_steps`):

  sft                  SFT (`objectives.sft`), config.sft
  reward_model         reward-model fitting (`objectives.reward`), config.reward_models.train
  rl/<method>/policy   the policy update of each method in config.rl.methods (or
                       config.rl.method): "ppo*" PPO's clipped surrogate and "grpo*" GRPO's loss
                       (`objectives.policy_gradient`) on prompts_per_iteration x
                       samples_per_prompt / minibatches rows of config.rl.seq_len tokens
                       (minibatches from config.rl.per_method.<method>, default the method's
                       dataclass); "rest_em*" an SFT step of batch_size rows; "iterative_dpo*"
                       a DPO step of batch_size pairs (2 rows each)
  rl/<method>/value    PPO's value step: the reward model's preset with a scalar head
                       (config.reward_models.preset, default config.model.preset), its own AdamW
  eva/<loss>           eva's preference step (`objectives.preference`): config.eva.batch_size
                       pairs (chosen + rejected = 2 rows each) of config.eva.seq_len tokens

Methods with the same shapes and resident models share a row (`rl/ppo_answers,ppo_prm/...`).
Each step trains with its block's optional `remat` and `grad_accum_steps` (config.sft,
config.reward_models.train, config.rl, config.eva). For each step and remat policy it prints
bytes *per device*:

  params     the device's shard of the trained params           (exact, from the shardings)
  opt        its shard of the optimizer state (AdamW mu, nu)     (exact)
  other      other models resident on the device while the step runs (exact shard sizes):
             the frozen reference policy (RL, eva; not for reference-free losses SimPO/ORPO),
             every reward model of config.reward_models.evaluators when stage reward_models
             ran before (the rl stage keeps them on device), PPO's value state (params + AdamW)
             during the policy step and the policy state during the value step
  act        activations kept for the backward pass under the remat policy, and the logits
             (an analytic estimate: `activation_bytes`)
  gathered   FSDP's transient full-size weights of two blocks and the embedding / LM head,
             and their full-size gradients before the reduce-scatter (`gathered_bytes`)
  batch      its shard of the input batch                 (exact)
  XLA temp   XLA's temporaries (`compiled.memory_analysis().temp_size_in_bytes`)
  XLA total  arguments + outputs - donated aliases + temp (XLA's own peak; without `other`)
  estimate   params + gradients (params-sized) [+ a gradient accumulator with
             grad_accum_steps > 1] + opt + act + gathered + other

and two verdicts, each "fits" when it leaves 10% of the chip's HBM free: by the estimate, and
by XLA's peak plus the other resident models (`XLA total + other`). The XLA columns come from
XLA's *CPU* compiler with the same partitioning, not the TPU compiler: their schedule and
buffer assignment differ (the TPU compiler schedules FSDP's all-gathers and the rematerialised
blocks under its HBM limit), so neither number is a TPU measurement (none was made here).
The estimate leaves out what a compiler adds (transposes, f32 copies, buffers it cannot
reuse), so XLA:CPU's peak is usually the higher one, and a step that fits by both is the safe
plan. Not planned: the sampler (KV cache) and the log-prob / value forwards between updates
(no gradients, no optimizer: smaller than the update steps), and anything else a stage holds
(e.g. the starting policy's artifact while the online loop trains its copy).

`--set key=value` overrides a config key before planning (`--set rl.remat=full --set
rl.per_method.ppo_prm.minibatches=16`); values are Python literals, else strings. A key must
exist in the config, or be one of the optional keys the planner reads (`OPTIONAL_KEYS`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import sys
import time
from typing import Any

GiB = 2**30

#: chips and HBM per chip of a TPU type (v5p-N / v4-N count TensorCores: 2 per chip)
TPU_SPECS: dict[str, tuple[int, float]] = {
    "v4": (2, 32.0), "v5p": (2, 95.0), "v5e": (1, 16.0), "v5litepod": (1, 16.0),
    "v6e": (1, 32.0),
}

#: optional keys `--set` may create (the planner reads them when present)
OPTIONAL_KEYS = (
    r"(sft|reward_models\.train|rl|eva)\.(remat|grad_accum_steps|clip_norm)",
    r"(rl|eva)\.seq_len",
    r"reward_models\.(preset|evaluators)",
    r"rl\.per_method\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+",
    r"rl\.value_optimizer\.[A-Za-z0-9_]+",
)
OPTIONAL_KEYS_HELP = ("<block>.remat | grad_accum_steps | clip_norm (block: sft, "
                      "reward_models.train, rl, eva), rl.seq_len, eva.seq_len, "
                      "reward_models.preset | evaluators, rl.per_method.<method>.<key>, "
                      "rl.value_optimizer.<key>")


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
    other: int = 0
    gathered: int = 0  # FSDP's transient full-size weights and gradients (estimate)
    rows: int = 0      # rows per device per micro-batch
    length: int = 0

    @property
    def fits(self) -> bool:
        """By the analytic estimate: it leaves 10% of HBM free."""
        return self.estimate <= 0.9 * self.hbm

    @property
    def xla_peak(self) -> int:
        """XLA:CPU's peak of the compiled step plus the other resident models (-1: not
        compiled)."""
        return self.total + self.other if self.total >= 0 else -1

    @property
    def fits_xla(self) -> bool | None:
        """By `xla_peak` (None when not compiled): it leaves 10% of HBM free."""
        return None if self.total < 0 else self.xla_peak <= 0.9 * self.hbm


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One jitted train step of a config, as the planner builds it.

    kind: "sft" | "reward" | "ppo" | "value" | "grpo" | "preference"; rows: rows per update
    (global, before gradient accumulation; a preference pair counts 2); model: "policy" or
    "reward" (the reward model's preset with a scalar head); options: kind-specific
    (logprob_chunk, old_logp, loss); resident: other models on the device during the step
    ("reference", "reward_model:<kind>", "value_state", "policy_state").
    """

    name: str
    kind: str
    rows: int
    length: int
    remat: str
    optimizer: tuple  # (key, value) pairs of `training.state.OptimizerConfig`
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    model: str = "policy"
    options: tuple = ()
    resident: tuple[str, ...] = ()
    total_steps: int = 1000
    rows_from: str = dataclasses.field(default="", compare=False)  # config keys, for errors

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def activation_bytes(model, rows: int, length: int, tensor: int, remat: str,
                     logits: str = "chunked", chunk: int | None = None) -> int:
    """An analytic estimate of the activations one device keeps for the backward pass.

    Per layer, with b rows, T tokens, width D, MLP width F, H query / K kv heads of size d,
    tensor-parallel size t and activation bytes a (2 for bf16):
      matmul outputs  b T (H d + 2 K d + D + 2 F / ... ) a / t   (q, k, v, attention out, MLP in/out)
      everything      matmul outputs + b T (4 D + F) a + b (H / t) T^2 (4 + a)   (norms, softmax)
    remat "none" keeps everything of every layer; "dots" keeps every layer's matmul outputs
    plus one layer's everything; "full" keeps every layer's input (b T D a) plus one layer's
    everything. Plus the f32 logits and their gradient:
      logits="chunked"  b C V 4 * 2 / t              (`objectives.logprobs`, SFT included: the
                                                      LM head on C positions at a time,
                                                      rematerialised; chunk None: C = T)
      logits="none"     0                            (a scalar head: reward and value models)
    """
    a = 2 if "bfloat16" in str(model.dtype) else 4
    b, T, D, F = rows, length, model.d_model, model.mlp_dim
    H, K, d = model.n_heads, model.n_kv_heads, model.head_dim
    dots = b * T * (H * d + 2 * K * d + H * d + 3 * F) * a // tensor + b * T * D * a
    every = dots + b * T * (4 * D + F) * a + b * max(H // tensor, 1) * T * T * (4 + a)
    L = model.n_layers
    saved = {"none": L * every, "dots": L * dots + every, "full": L * b * T * D * a + every}
    positions = {"chunked": min(chunk or T, T), "none": 0}[logits]
    return int(saved[remat] + 2 * b * positions * model.vocab_size * 4 // tensor)


def gathered_bytes(model, params, mesh_shape: dict[str, int], lm_head: bool = True) -> int:
    """An analytic estimate of FSDP's transient working set on one device (ZeRO-3,
    Rajbhandari et al. 2020): a sharded weight is all-gathered to full size (over the fsdp
    axis; the tensor axis keeps its share) before it is used, and its gradient is computed at
    full size before the reduce-scatter. With fsdp > 1, in compute-dtype bytes a and param
    bytes g, for a block of P_l params and the embedding + LM head of P_e params:

        gathered = P_l (2 a + g) / t  +  P_e (a + g) / t

    (two blocks' weights: the running one and the next one being gathered, or a block
    re-gathered for its rematerialised backward; one block's full gradient; the embedding /
    LM head, which the chunked log-prob loop reads at every chunk, and its full gradient).
    0 without fsdp sharding: then the params and gradients columns hold the full weights.
    `lm_head=False`: a scalar-head model (reward, value) whose untied LM head is never read.
    """
    import jax
    import numpy as np

    if mesh_shape["fsdp"] <= 1:
        return 0
    a = np.dtype(model.compute_dtype).itemsize
    g = np.dtype(model.params_dtype).itemsize
    def size(k):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params.get(k, {})))

    outside = sum(size(k) for k in ("embedding", "lm_head", "final_norm", "scalar_head"))
    block = (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) - outside) \
        // model.n_layers
    head = size("embedding") + (size("lm_head") if lm_head else 0)
    return int((block * (2 * a + g) + head * (a + g)) // mesh_shape["tensor"])


# ============================================================================ config
def load_config(spec: str, sets: list[str] | tuple[str, ...] = ()):
    """`get_config()` of a config file (`file.py` or `file.py:arg`), with `--set` overrides."""
    from scalign.experiment import load_config_file

    path, _, arg = spec.partition(":")
    config = load_config_file(path, arg or None)
    apply_overrides(config, sets)
    return config


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string (e.g. full, dpo)


def apply_overrides(config, sets: list[str] | tuple[str, ...]) -> None:
    """Apply `key=value` overrides in place. The dotted key must exist in `config` or match
    `OPTIONAL_KEYS` (its missing blocks are created); anything else raises ValueError naming
    the key."""
    import ml_collections

    for item in sets:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. rl.remat=full")
        parts = key.split(".")
        optional = any(re.fullmatch(p, key) for p in OPTIONAL_KEYS)
        node = config
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if part not in node:
                if not optional or i == 0:  # a config's top-level blocks are never created
                    raise ValueError(_no_key(item, where, node, ".".join(parts[:i])))
                with node.unlocked():
                    node[part] = ml_collections.ConfigDict()
            node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ValueError(f"--set {item!r}: config.{where} is a "
                                 f"{type(node).__name__}, not a block of keys")
        leaf = parts[-1]
        if leaf not in node and not optional:
            raise ValueError(_no_key(item, key, node, ".".join(parts[:-1])))
        value = _literal(raw)
        try:
            with node.unlocked():
                node[leaf] = value
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"--set {item!r}: config.{key} cannot take {value!r}: {e}") from e


def _no_key(item: str, key: str, node, parent: str) -> str:
    have = sorted(node.keys()) if hasattr(node, "keys") else []
    where = f"config.{parent}" if parent else "config"
    return (f"--set {item!r}: the config has no key config.{key} ({where} has "
            f"{have}); optional keys the planner reads: {OPTIONAL_KEYS_HELP}")


def _model(config):
    """The policy's ModelConfig: config.model.preset with the checkpoint's (or config.model's)
    compute dtype and param storage dtype."""
    return _preset(config, "preset" in config.get("model", {}) and config.model.preset,
                   "config.model.preset")


def _reward_model(config):
    """The reward / value model's ModelConfig: config.reward_models.preset, else the policy's
    (the e2h evaluators are the policy's backbone with a scalar head)."""
    preset = (config.get("reward_models", {}) or {}).get("preset")
    return _preset(config, preset, "config.reward_models.preset") if preset else _model(config)


def _preset(config, name, key: str):
    from scalign.models import presets

    if not name:
        raise ValueError(f"{key} is missing: the planner needs the model's shapes")
    try:
        model = presets.get(str(name))
    except KeyError as e:
        raise ValueError(f"{key}={name!r}: {e.args[0]}") from e
    ckpt = config.get("checkpoint", {}) or {}
    mcfg = config.get("model", {}) or {}
    dtype = ckpt.get("compute_dtype") or mcfg.get("dtype")
    param_dtype = ckpt.get("dtype") or mcfg.get("param_dtype")
    changes = {}
    if dtype:
        changes["dtype"] = str(dtype)
    if param_dtype:
        changes["param_dtype"] = str(param_dtype)
    return model.replace(**changes) if changes else model


def _block(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            raise ValueError(f"config.{key} is missing")
        node = node[part]
    return node


def _need(block, where: str, key: str, hint: str = "") -> Any:
    value = block.get(key)
    if value is None:
        raise ValueError(f"config.{where}.{key} is missing: the planner needs it{hint}")
    return value


def _optimizer(block, where: str) -> tuple:
    """The AdamW settings (only the keys `OptimizerConfig` knows: others, e.g. a warmup ratio a
    stage converts, do not change the state's shapes)."""
    from scalign.training.state import OptimizerConfig

    opt = _need(block, where, "optimizer")
    data = opt.to_dict() if hasattr(opt, "to_dict") else dict(opt)
    known = {f.name for f in dataclasses.fields(OptimizerConfig)} - {"total_steps"}
    return tuple(sorted((k, v) for k, v in data.items() if k in known))


def _method_options(cls, overrides: dict, where: str):
    """`cls(**overrides)` with only its fields (other per-method keys are the stage's)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in overrides.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e


def _rows(total: int, parts: int, what: str) -> int:
    if parts < 1 or total % parts:
        raise ValueError(f"{what}: {total} rows do not split into {parts} equal minibatches")
    return total // parts


def _reward_models_before(config, stage: str) -> tuple[str, ...]:
    """'reward_model:<kind>' for every evaluator stage reward_models leaves on device before
    `stage` runs."""
    stages = list(config.get("stages", ()))
    if "reward_models" not in stages or stage not in stages or \
            stages.index("reward_models") > stages.index(stage):
        return ()
    rm = config.get("reward_models", {}) or {}
    return tuple(f"reward_model:{k}" for k in (rm.get("evaluators") or ("prm",)))


def _train_block_step(name: str, kind: str, config, key: str, model: str = "policy"
                      ) -> StepSpec:
    block = _block(config, key)
    return StepSpec(name=name, kind=kind, rows=int(_need(block, key, "batch_size")),
                    length=int(_need(block, key, "seq_len")),
                    remat=str(block.get("remat") or "none"),
                    optimizer=_optimizer(block, key), clip_norm=block.get("clip_norm", 1.0),
                    grad_accum_steps=int(block.get("grad_accum_steps") or 1), model=model,
                    total_steps=int(block.get("steps") or 1000),
                    rows_from=f"config.{key}.batch_size")


def _rl_steps(config) -> list[StepSpec]:
    from scalign.algorithms.iterative_dpo import IterativeDPOConfig
    from scalign.algorithms.rest_em import RestEMConfig
    from scalign.objectives import policy_gradient as pg

    cfg = _block(config, "rl")
    methods = cfg.get("methods") or ((cfg.method,) if cfg.get("method") else ())
    if isinstance(methods, str):
        methods = tuple(m for m in methods.split(",") if m)
    if not methods:
        raise ValueError("config.rl.methods (or config.rl.method) is missing")
    methods = [m for m in methods if m != "sft"]  # the starting policy's row: no step
    if not methods:
        return []
    length = int(_need(cfg, "rl", "seq_len", " (the prompt + response width of a rollout "
                                            "row); plan a width with --set rl.seq_len=N"))
    rollout = int(_need(cfg, "rl", "prompts_per_iteration")) * \
        int(_need(cfg, "rl", "samples_per_prompt"))
    common = dict(length=length, remat=str(cfg.get("remat") or "none"),
                  optimizer=_optimizer(cfg, "rl"), clip_norm=cfg.get("clip_norm", 1.0),
                  grad_accum_steps=int(cfg.get("grad_accum_steps") or 1),
                  total_steps=int(cfg.get("iterations") or 1) * 8)
    rms = _reward_models_before(config, "rl")
    per_method = cfg.get("per_method", {}) or {}
    specs: list[tuple[str, StepSpec]] = []  # (method, spec with a name to fill in)
    for name in methods:
        where = f"rl.per_method.{name}"
        over = dict(per_method.get(name, {}) or cfg.get(name, {}) or {})
        mb = (f"config.rl.prompts_per_iteration x samples_per_prompt / "
              f"config.{where}.minibatches")
        if name.startswith("ppo"):
            ppo = _method_options(pg.PPOConfig, over, where)
            rows = _rows(rollout, ppo.minibatches, f"config.{where}.minibatches (PPO)")
            opts = (("logprob_chunk", ppo.logprob_chunk),)
            specs.append((name, StepSpec("policy", "ppo", rows, options=opts, rows_from=mb,
                                         resident=("reference", *rms, "value_state"), **common)))
            vcommon = dict(common)
            if cfg.get("value_optimizer") is not None:  # the critic's own settings, if any
                vcommon["optimizer"] = tuple(sorted({
                    **dict(common["optimizer"]),
                    **dict(_optimizer({"optimizer": cfg.value_optimizer}, "rl"))}.items()))
            specs.append((name, StepSpec("value", "value", rows, model="reward", rows_from=mb,
                                         resident=("policy_state", "reference", *rms),
                                         **vcommon)))
        elif name.startswith("grpo"):
            grpo = _method_options(pg.GRPOConfig, over, where)
            rows = _rows(rollout, grpo.minibatches, f"config.{where}.minibatches (GRPO)")
            opts = (("logprob_chunk", grpo.logprob_chunk), ("old_logp", grpo.minibatches > 1))
            specs.append((name, StepSpec("policy", "grpo", rows, options=opts, rows_from=mb,
                                         resident=("reference", *rms), **common)))
        elif name.startswith("rest_em"):
            rest = _method_options(RestEMConfig, over, where)
            specs.append((name, StepSpec("policy", "sft", rest.batch_size,
                                         rows_from=f"config.{where}.batch_size",
                                         resident=("reference", *rms), **common)))
        elif name.startswith("iterative_dpo"):
            dpo = _method_options(IterativeDPOConfig, over, where)
            specs.append((name, StepSpec("policy", "preference", 2 * dpo.batch_size,
                                         rows_from=f"config.{where}.batch_size",
                                         options=(("loss", "dpo"),),
                                         resident=("reference", *rms), **common)))
        else:
            raise ValueError(f"config.rl.methods: unknown method {name!r}; the planner knows "
                             f"ppo*, grpo*, rest_em*, iterative_dpo* (and sft: no step)")
    # methods whose steps are identical share one row
    merged: dict[StepSpec, list[str]] = {}
    for method, spec in specs:
        merged.setdefault(spec, []).append(method)
    return [dataclasses.replace(spec, name=f"rl/{','.join(names)}/{spec.name}")
            for spec, names in merged.items()]


def _eva_steps(config) -> list[StepSpec]:
    from scalign.objectives.preference import LOSSES, REFERENCE_FREE

    cfg = _block(config, "eva")
    losses = _need(cfg, "eva", "loss")
    losses = (losses,) if isinstance(losses, str) else tuple(losses)
    pairs = int(_need(cfg, "eva", "batch_size"))
    length = int(_need(cfg, "eva", "seq_len", " (prompt + response tokens of a pair's row)"))
    rms = _reward_models_before(config, "eva")
    out = []
    for loss in losses:
        if loss not in LOSSES:
            raise ValueError(f"config.eva.loss={loss!r}: unknown preference loss; known: "
                             f"{sorted(LOSSES)}")
        ref = () if loss in REFERENCE_FREE else ("reference",)
        out.append(StepSpec(f"eva/{loss}", "preference", 2 * pairs, length,
                            remat=str(cfg.get("remat") or "none"), optimizer=_optimizer(cfg, "eva"),
                            clip_norm=cfg.get("clip_norm", 1.0),
                            grad_accum_steps=int(cfg.get("grad_accum_steps") or 1),
                            options=(("loss", loss),), resident=(*ref, *rms),
                            total_steps=int(cfg.get("iterations") or 1) * 8,
                            rows_from="config.eva.batch_size"))
    return out


def planned_steps(config) -> list[StepSpec]:
    """Every train step the config's stages run (see the module docstring)."""
    stages = tuple(config.get("stages", ()))
    steps = []
    if "sft" in stages and "sft" in config:
        steps.append(_train_block_step("sft", "sft", config, "sft"))
    if "reward_models" in stages and "reward_models" in config:
        steps.append(_train_block_step("reward_model", "reward", config, "reward_models.train",
                                       model="reward"))
    if "rl" in stages:
        steps.extend(_rl_steps(config))
    if "eva" in stages:
        steps.extend(_eva_steps(config))
    return steps


# ============================================================================ planning
def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _make_optimizer(spec: StepSpec):
    from scalign.training.state import OptimizerConfig, make_optimizer

    return make_optimizer(OptimizerConfig.from_config({**dict(spec.optimizer),
                                                       "total_steps": spec.total_steps}))


def resident_bytes(spec: StepSpec, policy, reward, mesh) -> dict[str, int]:
    """Bytes per device of each model in `spec.resident` (exact shard sizes): the reference
    (the policy's params on the policy's shardings), a reward model (its params with the
    scalar head), the value state or the policy state (params + AdamW + step + rng)."""
    from scalign.training.step import abstract_train_state

    optimizer = _make_optimizer(spec)

    def state(model, head):
        return abstract_train_state(model, optimizer, mesh, head=head)[0]

    out = {}
    for item in spec.resident:
        if item == "reference":
            out[item] = _shard_bytes(state(policy, False).params)
        elif item.startswith("reward_model:"):
            out[item] = _shard_bytes(state(reward, True).params)
        elif item == "value_state":
            out[item] = _shard_bytes(state(reward, True))
        elif item == "policy_state":
            out[item] = _shard_bytes(state(policy, False))
        else:
            raise ValueError(f"unknown resident model {item!r}")
    return out


def _loss_and_batch(spec: StepSpec, model):
    """(loss_fn, {key: (shape, dtype)}) of a step, as its stage builds them."""
    import jax.numpy as jnp

    from scalign.objectives import policy_gradient as pg
    from scalign.objectives.preference import REFERENCE_FREE, make_preference_loss
    from scalign.objectives.reward import make_reward_loss
    from scalign.objectives.sft import make_sft_loss

    B, T = spec.rows, spec.length
    i32, f32 = jnp.int32, jnp.float32
    if spec.kind == "sft":
        return make_sft_loss(model), {"tokens": ((B, T), i32), "loss_mask": ((B, T), f32)}
    if spec.kind == "reward":
        return make_reward_loss(model), {"tokens": ((B, T), i32), "labels": ((B, T), f32),
                                         "label_mask": ((B, T), f32)}
    if spec.kind == "ppo":
        loss = pg.make_ppo_loss(model, pg.PPOConfig(logprob_chunk=spec.option("logprob_chunk")))
        keys = ("response_mask", "old_logp", "advantages")
    elif spec.kind == "value":
        loss = pg.make_value_loss(model)
        keys = ("response_mask", "old_values", "returns")
    elif spec.kind == "grpo":
        loss = pg.make_grpo_loss(model, pg.GRPOConfig(
            logprob_chunk=spec.option("logprob_chunk")))
        keys = ("response_mask", "ref_logp", "advantages") + \
            (("old_logp",) if spec.option("old_logp") else ())
    elif spec.kind == "preference":
        kind = spec.option("loss", "dpo")
        pairs = B // 2
        batch = {"chosen_tokens": ((pairs, T), i32), "rejected_tokens": ((pairs, T), i32),
                 "chosen_mask": ((pairs, T), f32), "rejected_mask": ((pairs, T), f32),
                 "weight": ((pairs,), f32)}
        if kind not in REFERENCE_FREE:  # reference log-probs precomputed once per pair
            batch.update(ref_chosen_logps=((pairs,), f32), ref_rejected_logps=((pairs,), f32))
        return make_preference_loss(model, kind), batch
    else:
        raise ValueError(f"unknown step kind {spec.kind!r}")
    return loss, {"tokens": ((B, T), i32), **{k: ((B, T), f32) for k in keys}}


def plan_step(spec: StepSpec, model, mesh, *, reward_model=None,
              compile: bool = True) -> tuple[dict[str, int], float]:  # noqa: A002
    """Lower and compile one train step abstractly; bytes per device and compile seconds.

    `model` is the policy's ModelConfig with the remat policy to plan (`reward_model` the
    reward / value model's, default `model`)."""
    import jax
    import optax

    from scalign import parallel
    from scalign.objectives.logprobs import auto_chunk
    from scalign.training.step import abstract_train_state, make_train_step

    reward_model = reward_model or model
    m = reward_model if spec.model == "reward" else model
    optimizer = _make_optimizer(spec)
    state, st_sh = abstract_train_state(m, optimizer, mesh, head=spec.kind in ("reward", "value"))
    loss, shapes = _loss_and_batch(spec, m)
    div = parallel.batch_divisor(mesh)
    A = spec.grad_accum_steps
    pairs = spec.kind == "preference"
    lead = spec.rows // 2 if pairs else spec.rows
    if lead % (A * div):
        raise ValueError(f"{spec.name}: {lead} {'pairs' if pairs else 'rows'} per update "
                         f"({spec.rows_from}) do not split into grad_accum_steps={A} "
                         f"micro-batches over data*fsdp={div} devices of this mesh")
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh,
                           clip_norm=spec.clip_norm, grad_accum_steps=A)
    bsh = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=bsh) for k, (s, d) in shapes.items()}
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
    rows = spec.rows // A // div  # rows per device in one forward (a pair is 2 rows)
    T = spec.length
    if spec.kind in ("reward", "value"):
        logits, chunk = "none", None
    else:  # SFT and the log-prob losses (`objectives.logprobs`): the LM head on `chunk`
        # positions at a time
        logits = "chunked"
        chunk = spec.option("logprob_chunk") or auto_chunk(spec.rows // A, T - 1, m.vocab_size)
    act = activation_bytes(m, rows, T, mesh.shape["tensor"], m.remat, logits, chunk)
    p_bytes = _shard_bytes(state.params)
    gathered = gathered_bytes(m, state.params, dict(mesh.shape),
                              lm_head=spec.kind not in ("reward", "value"))
    other = sum(resident_bytes(spec, model, reward_model, mesh).values())
    accumulator = p_bytes if A > 1 else 0
    out = {"params": p_bytes, "opt": opt_bytes, "act": act, "gathered": gathered,
           "other": other,
           # params + grads (+ accumulator) + opt + activations + FSDP's gathered weights
           # + other resident models
           "estimate": 2 * p_bytes + accumulator + opt_bytes + act + gathered + other,
           "batch": _shard_bytes(batch), "temp": temp, "total": total,
           "rows": rows, "length": T}
    return out, seconds


def _matches(name: str, wanted: list[str] | None) -> bool:
    return not wanted or any(name == w or name.startswith(w + "/") for w in wanted)


def run(config, tpus: list[str], remats: list[str], steps: list[str] | None = None,
        log=print, compile: bool = True) -> list[Row]:  # noqa: A002
    import jax

    from scalign import experiment, parallel

    model = _model(config)
    specs = planned_steps(config)
    reward_model = _reward_model(config)  # reward models, PPO's critic
    rows = []
    for tpu in tpus:
        chips, hbm = tpu_type(tpu)
        if chips > jax.device_count():
            raise ValueError(f"{tpu} has {chips} chips but only {jax.device_count()} virtual "
                             f"devices exist; start with --devices={chips} or more")
        shape = experiment.mesh_shape_of(config, chips)
        mesh = parallel.make_mesh(shape, jax.devices()[:chips])
        for spec in specs:
            if not _matches(spec.name, steps):
                continue
            policies = [spec.remat if r == "config" else r for r in remats]
            for r in dict.fromkeys(policies):  # in order, each once
                got, secs = plan_step(spec, model.replace(remat=r), mesh,
                                      reward_model=reward_model.replace(remat=r),
                                      compile=compile)
                row = Row(tpu=tpu, step=spec.name, remat=r, mesh=shape, hbm=int(hbm * GiB),
                          compile_s=secs, **got)
                rows.append(row)
                log(format_row(row))
    return rows


HEADER = ("| TPU | step | remat | mesh (data, fsdp, tensor) | rows x len / device | params | opt "
          "| other resident | act (est.) | gathered (est.) | batch | XLA temp | XLA total "
          "| estimate / HBM per chip | XLA total + other | fits (estimate, XLA) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _g(n: int) -> str:
    if n < 0:
        return "-"
    return f"{n / GiB:.3g}"


def format_row(r: Row) -> str:
    mesh = ", ".join(str(r.mesh[a]) for a in ("data", "fsdp", "tensor"))
    return (f"| {r.tpu} | {r.step} | {r.remat} | {mesh} | {r.rows} x {r.length} | "
            f"{_g(r.params)} | {_g(r.opt)} | {_g(r.other)} | "
            f"{_g(r.act)} | {_g(r.gathered)} | {_g(r.batch)} | {_g(r.temp)} | {_g(r.total)} | "
            f"{_g(r.estimate)} / {_g(r.hbm)} | {_g(r.xla_peak)} | "
            f"{_yes(r.fits)}, {_yes(r.fits_xla)} |")


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "NO"


RESIDENT_WORDS = {"reference": "the frozen reference policy's params",
                  "value_state": "the value model's state (params + AdamW)",
                  "policy_state": "the policy's state (params + AdamW)"}


def describe_resident(spec: StepSpec) -> str:
    words = [RESIDENT_WORDS.get(r) or f"reward model {r.partition(':')[2]}'s params"
             for r in spec.resident]
    return f"{spec.name}: " + ("; ".join(words) if words else "nothing")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scalign.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file (optionally file.py:arg)")
    p.add_argument("--tpu", default="v5e-16,v5p-8", help="comma-separated TPU types")
    p.add_argument("--remat", default="config",
                   help="comma-separated remat policies: config (the config's), none, full, dots")
    p.add_argument("--steps", default="",
                   help="only these steps or step prefixes (sft, reward_model, rl, "
                        "rl/ppo_prm, eva, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key before planning (repeatable), e.g. "
                        "--set rl.remat=full --set eva.batch_size=32")
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

    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(args.devices, chips))
    except RuntimeError:  # a backend is already up (called in-process): `run` checks the count
        pass
    try:
        config = load_config(args.config, args.set)
        specs = planned_steps(config)
        model = _model(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sets = "".join(f" --set {s}" for s in args.set)
    print(f"plan for {args.config}{sets} ({config.get('name', '')}); bytes per device in GiB; "
          f"model {config.model.preset}, compute dtype {model.dtype}, params "
          f"{model.param_dtype}\n")
    print(HEADER, flush=True)
    try:
        rows = run(config, tpus, [r for r in args.remat.split(",") if r],
                   [s for s in args.steps.split(",") if s] or None,
                   log=lambda line: print(line, flush=True), compile=not args.no_compile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slow = max((r.compile_s for r in rows), default=0.0)
    done = "compiled" if not args.no_compile else "planned (not compiled)"
    print(f"\n{len(rows)} steps {done} (slowest {slow:.0f} s); 'fits': the estimate "
          f"(params + grads + opt + act + gathered + other resident), and XLA:CPU's peak + other "
          f"resident, leave 10% of HBM free")
    planned = {r.step for r in rows}
    resident = [describe_resident(s) for s in specs if s.name in planned and s.resident]
    if resident:
        print("other resident: " + " | ".join(resident))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

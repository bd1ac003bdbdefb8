"""Pieces every training stage shares: model configs, optimizers, the checkpointed loop."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from scalign import parallel
from scalign.models import presets
from scalign.models.config import REMAT_POLICIES, ModelConfig
from scalign.models.transformer import init_params, param_logical_axes
from scalign.stages.base import Context, check_batch
from scalign.training.checkpoint import Checkpointer
from scalign.training.loop import NONFINITE_POLICIES, LoopResult, train_loop
from scalign.training.state import OptimizerConfig, learning_rate_schedule, make_optimizer
from scalign.training.step import init_train_state, make_train_step

TRAIN_KEYS = ("steps", "batch_size", "seq_len", "optimizer")
#: the longest seq_len accepted for a preset model that declares no `max_position_embeddings`
UNDECLARED_MAX_LEN = 32768


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """`config.model` -> ModelConfig: a preset plus `overrides`, vocab from the tokenizer."""
    overrides = dict(cfg.get("overrides", {}) or {})
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    try:
        return presets.get(cfg.preset, **overrides)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from e


def preset_length_limit(config: ml_collections.ConfigDict) -> tuple[int, str] | None:
    """(longest supported length, why) of a policy built from `config.model` (not a loaded
    checkpoint); None when the model comes from a checkpoint or its preset is invalid (that
    error is reported by the stage that builds it)."""
    if "checkpoint" in tuple(config.get("stages", ())) or "model" not in config \
            or config.model.get("preset") is None:
        return None
    try:
        model = model_config(config.model)
    except ValueError:
        return None
    if model.max_position_embeddings:
        return model.max_position_embeddings, (f"max_position_embeddings="
                                               f"{model.max_position_embeddings}")
    return UNDECLARED_MAX_LEN, (f"preset {config.model.preset!r} declares no "
                                f"max_position_embeddings; up to {UNDECLARED_MAX_LEN} is accepted")


def training_model(model: ModelConfig, cfg: ml_collections.ConfigDict) -> ModelConfig:
    """`model` with the training block's optional `remat` policy ("none" | "full" | "dots").

    Rematerialisation only changes what the backward pass stores, so the trained params are
    the same; a 7B model needs "full" to fit its activations (Chen et al. 2016).
    """
    remat = cfg.get("remat")
    return model if remat is None or remat == model.remat else model.replace(remat=str(remat))


def validate_training(config: ml_collections.ConfigDict, key: str, mesh_shape: dict[str, int],
                      errors: list[str]) -> None:
    """Common checks of a training block `config.<key>` (`key` may be dotted, e.g.
    "reward_models.train"): steps, batch, lengths, optimizer, optional `remat`. A block with
    `epochs` set derives its steps from the data size at run time, so `steps` may then be
    absent or None (see `stages.reward_models.train_block`)."""
    cfg = config
    for part in key.split("."):
        if part not in cfg:
            errors.append(f"config.{key} is missing")
            return
        cfg = cfg[part]
    epochs = cfg.get("epochs")
    derived_steps = epochs is not None
    missing = [k for k in TRAIN_KEYS if k not in cfg and not (k == "steps" and derived_steps)]
    errors.extend(f"config.{key}.{k} is missing" for k in missing)
    if missing:  # (not `errors`: it also holds other stages' findings)
        return
    if derived_steps:
        if not epochs > 0:
            errors.append(f"config.{key}.epochs={epochs} must be > 0 (or None to train for "
                          f"`steps`)")
        steps = 1  # stands in for the data-derived count in the optimizer check below
    else:
        steps = cfg.steps
        if steps is None or steps <= 0:
            errors.append(f"config.{key}.steps={steps} must be positive")
            return
    if cfg.seq_len < 2:
        errors.append(f"config.{key}.seq_len={cfg.seq_len} must be >= 2")
    limit = preset_length_limit(config)
    if limit is not None and cfg.seq_len > limit[0]:
        errors.append(f"config.{key}.seq_len={cfg.seq_len} is longer than the model supports "
                      f"({limit[1]}); lower it, or declare a longer context with "
                      f"config.model.overrides.max_position_embeddings")
    step = cfg.get("bucket_step")
    if step is not None and not (isinstance(step, int) and 0 < step <= cfg.seq_len):
        errors.append(f"config.{key}.bucket_step={step!r} must be None or an int in "
                      f"[1, seq_len={cfg.seq_len}]")
    check_batch(errors, f"{key}.batch_size", cfg.batch_size, mesh_shape,
                accum=int(cfg.get("grad_accum_steps", 1)))
    policy = cfg.get("on_nonfinite", "stop")
    if policy not in NONFINITE_POLICIES:
        errors.append(f"config.{key}.on_nonfinite must be one of {NONFINITE_POLICIES}, got "
                      f"{policy!r}")
    max_skips = cfg.get("max_consecutive_skips", 3)
    if not isinstance(max_skips, int) or max_skips < 1:
        errors.append(f"config.{key}.max_consecutive_skips={max_skips!r} must be an int >= 1")
    if cfg.get("remat") is not None and cfg.remat not in REMAT_POLICIES:
        errors.append(f"config.{key}.remat must be one of {REMAT_POLICIES}, got {cfg.remat!r}")
    try:
        OptimizerConfig.from_config({**cfg.optimizer.to_dict(), "total_steps": steps})
    except (ValueError, TypeError) as e:
        errors.append(f"config.{key}.optimizer: {e}")


def length_buckets(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """`make_batch_iterator` length keywords of a training block: `{"seq_len": seq_len}`, or,
    with the optional `bucket_step`, `{"buckets": (step, 2 step, ..., seq_len)}` so that each
    batch is padded only to the smallest multiple of `bucket_step` that holds its longest row
    (causal attention: right padding never changes a real position's output, so the loss is the
    same up to float rounding; one compile of the step per bucket)."""
    seq_len = int(cfg.seq_len)
    step = cfg.get("bucket_step")
    if not step:
        return {"seq_len": seq_len}
    return {"buckets": tuple(sorted({*range(int(step), seq_len, int(step)), seq_len}))}


def optimizer_for(cfg: ml_collections.ConfigDict):
    opt_cfg = OptimizerConfig.from_config({**cfg.optimizer.to_dict(), "total_steps": cfg.steps})
    return make_optimizer(opt_cfg), learning_rate_schedule(opt_cfg)


def run_training(ctx: Context, *, stage: str, cfg: ml_collections.ConfigDict,
                 model: ModelConfig, loss_fn: Callable, data_iter: Iterator[Any],
                 params: Any = None, logical_axes: Any = None,
                 init_fn: Callable[[jax.Array], Any] | None = None,
                 hooks: tuple = (), hook_every: int = 0) -> LoopResult:
    """Build state + step for `loss_fn`, then run the checkpointed loop of `stage`.

    `params` (e.g. an SFT policy) are adopted and resharded; otherwise `init_fn` (default: a
    fresh init of `model`) creates them from the stage's key. `logical_axes` defaults to the
    backbone's; pass a tree with extra heads when params carry them.
    """
    optimizer, schedule = optimizer_for(cfg)
    logical_axes = logical_axes if logical_axes is not None else param_logical_axes(model)
    init_fn = init_fn or functools.partial(init_params, model)
    seed = int(jax.random.randint(ctx.key(stage, "init"), (), 0, 2**31 - 1))
    state, st_sh = init_train_state(init_fn, logical_axes, optimizer, ctx.mesh, seed=seed,
                                    params=params)
    on_nonfinite = str(cfg.get("on_nonfinite", "stop"))
    step_fn = make_train_step(loss_fn, optimizer, ctx.mesh, state_sharding=st_sh,
                              clip_norm=cfg.get("clip_norm", 1.0),
                              grad_accum_steps=int(cfg.get("grad_accum_steps", 1)),
                              lr_schedule=schedule, skip_nonfinite=on_nonfinite == "skip")
    ckpt = Checkpointer(ctx.stage_dir(stage) / "checkpoints",
                        save_every=int(cfg.get("checkpoint_every", max(cfg.steps // 4, 1))),
                        keep=int(cfg.get("keep_checkpoints", 2)))
    debug = ctx.config.get("debug", {}) or {}
    try:
        result = train_loop(step_fn, state, data_iter, num_steps=int(cfg.steps), mesh=ctx.mesh,
                            stage=stage, checkpointer=ckpt, metrics=ctx.metrics,
                            log_every=int(cfg.get("log_every", 10)), hooks=hooks,
                            hook_every=hook_every,
                            stop_after=debug.get("stop_after_steps"),
                            meta={"stage": stage, "config_hash": ctx.config_hash},
                            on_nonfinite=on_nonfinite,
                            max_consecutive_skips=int(cfg.get("max_consecutive_skips", 3)),
                            inject=nan_injector(debug.get("nan_at_step")))
    finally:
        ckpt.close()
    return result


def nan_injector(at_step: int | None) -> Callable[[int, Any], Any] | None:
    """Test-only drill (`config.debug.nan_at_step`): NaN in every float leaf of the batch that
    produces update `at_step` (1-based, as logged)."""
    if at_step is None:
        return None
    import numpy as np

    def inject(step: int, batch: Any) -> Any:
        if step + 1 != int(at_step):
            return batch
        return jax.tree.map(lambda x: np.full_like(x, np.nan)
                            if np.issubdtype(np.asarray(x).dtype, np.floating) else x, batch)
    return inject


def shardings_for(ctx: Context, model: ModelConfig, logical_axes: Any = None) -> Any:
    logical_axes = logical_axes if logical_axes is not None else param_logical_axes(model)
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
    return parallel.tree_shardings(logical_axes, abstract, ctx.mesh)

"""Train state and optimizers.

`TrainState` is a plain pytree (a `flax.struct.dataclass`): the step counter, the params, the
optax state and a raw PRNG key. Everything in it is an array, so orbax saves it as is and
`jax.jit` shards it with the same rules as the params (see `scalign.parallel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training stage needs to continue exactly where it stopped.

    Attributes:
      step: int32 scalar, number of optimizer updates applied so far.
      params: the trainable pytree.
      opt_state: the optax state for `params` (sharded like `params`).
      rng: raw uint32[2] PRNG key; the step's key is `fold_in(rng, step)`, so a resumed run
        draws the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, seed: int | jax.Array) -> TrainState:
        rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), rng=rng)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay (Loshchilov & Hutter 2019; 2017).

    lr(t) = peak * t / warmup                                   for t < warmup
          = min_ratio*peak + (1-min_ratio)*peak*(1+cos(pi*s))/2  s = (t-warmup)/(total-warmup)
    Gradient clipping by global norm happens in the train step (so the pre-clip norm is a
    metric), not here.
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"  # "cosine" | "constant"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        import math

        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} must be {want}")

        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise bad("learning_rate", "a positive finite number")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", ">= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "in [0, 1]")
        if self.schedule not in ("cosine", "constant"):
            raise bad("schedule", "'cosine' or 'constant'")
        if self.weight_decay < 0:
            raise bad("weight_decay", ">= 0")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1={self.b1}, b2={self.b2} must be in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "> 0")

    @classmethod
    def from_config(cls, cfg: Any) -> OptimizerConfig:
        """Build from a ConfigDict/dict; unknown keys raise, naming the key."""
        data = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown optimizer config key(s) {unknown}; known: {sorted(fields)}")
        return cls(**data)


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The schedule described in `OptimizerConfig`."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps <= 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
             optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    if cfg.schedule != "cosine":
        raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    decay_steps = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps > 0 else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax AdamW driven by `learning_rate_schedule(cfg)`.

    Weight decay is not applied to 1-D params (norm scales, biases), following common
    practice for transformers.
    """
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    return optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask)

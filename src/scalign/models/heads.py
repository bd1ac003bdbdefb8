"""Heads on the shared backbone.

The policy uses the LM head (`transformer.lm_logits`). Reward models (ORM / PRM / OPRM, Sun et
al. 2024), Bradley-Terry preference RMs and PPO value functions use a *scalar head*: one linear
map D -> 1 applied to every position's final hidden state, giving a per-token score [B, T].
A scalar model's params are the backbone params plus a `"scalar_head"` entry, so a reward model
is initialised from a policy checkpoint by `add_scalar_head(config, policy_params, key)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scalign.models.config import ModelConfig
from scalign.models.transformer import forward, lm_logits

SCALAR_HEAD = "scalar_head"


def init_scalar_head(config: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    """w ~ N(0, 1/(D+1)) (as in Ouyang et al. 2022's RM head init), b = 0."""
    w = jax.random.normal(key, (config.d_model,), jnp.float32) / jnp.sqrt(config.d_model + 1.0)
    return {"kernel": w.astype(config.params_dtype), "bias": jnp.zeros((), config.params_dtype)}


def scalar_head_logical_axes() -> dict[str, PartitionSpec]:
    return {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}


def add_scalar_head(config: ModelConfig, params: dict[str, Any], key: jax.Array
                    ) -> dict[str, Any]:
    """Backbone params plus a fresh scalar head (the input is not modified)."""
    return {**params, SCALAR_HEAD: init_scalar_head(config, key)}


def scalar_from_hidden(params: dict[str, Any], hidden: jax.Array) -> jax.Array:
    """Per-token scalar scores, float32 [..., T] from hidden [..., T, D]."""
    head = params[SCALAR_HEAD]
    out = jnp.einsum("...d,d->...", hidden.astype(jnp.float32),
                     head["kernel"].astype(jnp.float32))
    return out + head["bias"].astype(jnp.float32)


def scalar_values(config: ModelConfig, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """Full causal forward -> per-token scalar scores float32 [B, T]."""
    if SCALAR_HEAD not in params:
        raise KeyError("params have no 'scalar_head'; create one with add_scalar_head()")
    hidden, _ = forward(config, params, tokens)
    return scalar_from_hidden(params, hidden)


def logits_and_values(config: ModelConfig, params: dict[str, Any], tokens: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """One backbone pass, both heads: LM logits [B, T, V] and scalar scores [B, T]."""
    hidden, _ = forward(config, params, tokens)
    return lm_logits(config, params, hidden), scalar_from_hidden(params, hidden)

"""The one train-step factory.

SFT, reward-model fitting (ORM / PRM / OPRM / Bradley-Terry), the DPO family and policy-gradient
updates differ only in their loss function and batch; all of them are compiled here:

    step = make_train_step(loss_fn, optimizer, mesh, state_sharding=..., ...)
    state, metrics = step(state, batch)              # or step(state, batch, frozen)

`loss_fn(params, batch, rng, frozen) -> (loss, metrics)` is a pure function. `frozen` is an
optional pytree that is read but never updated (a DPO reference model, a PPO reward model).
The step is a plain `jax.jit` with explicit in/out shardings and a donated state:

  1. rng_t = fold_in(state.rng, state.step)           (same randomness after a resume)
  2. grads = d loss / d params, optionally over A micro-batches:
       g = sum_a w_a g_a / sum_a w_a,  w_a = metrics["weight"] (e.g. target-token count)
     so accumulation reproduces the full-batch gradient of a token-mean loss exactly.
  3. global-norm clipping: g <- g * min(1, c / ||g||)      (Pascanu et al. 2013)
  4. optax update (AdamW + schedule, see `training.state`).

Metric conventions: a metric named `weight` or starting with `num_` is summed over
micro-batches; every other metric is a `weight`-weighted mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from scalign import parallel
from scalign.training.state import TrainState

LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _is_summed(name: str) -> bool:
    return name == "weight" or name.startswith("num_")


def _loss_grads(loss_fn: LossFn, params: Any, batch: Any, rng: jax.Array, frozen: Any):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, frozen)
    metrics = {"loss": loss, **metrics}
    weight = jnp.asarray(metrics.get("weight", 1.0), jnp.float32)
    return grads, metrics, weight


def _split_micro(batch: Any, steps: int) -> Any:
    """[B, ...] -> [A, B/A, ...] with micro-batch a = rows a, a+A, a+2A, ... (balanced shards)."""
    def split(x):
        if x.shape[0] % steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={steps}")
        return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _accumulate(loss_fn: LossFn, params: Any, batch: Any, rng: jax.Array, frozen: Any,
                steps: int, mesh: Mesh):
    micro = _split_micro(batch, steps)
    bsh = parallel.batch_sharding(mesh)
    first = jax.tree.map(lambda x: x[0], micro)
    _, metric_shapes, _ = jax.eval_shape(functools.partial(_loss_grads, loss_fn),
                                         params, first, rng, frozen)
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)

    def body(carry, xs):
        g_acc, m_acc, w_acc = carry
        mb, i = xs
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, bsh)
                          if mesh.size > 1 else x, mb)
        g, m, w = _loss_grads(loss_fn, params, mb, jax.random.fold_in(rng, i), frozen)
        g_acc = jax.tree.map(lambda a, b: a + w * b.astype(a.dtype), g_acc, g)
        m_acc = {k: m_acc[k] + (m[k] if _is_summed(k) else w * m[k]) for k in m_acc}
        return (g_acc, m_acc, w_acc + w), None

    (g, m, w), _ = jax.lax.scan(body, (zeros_g, zeros_m, jnp.zeros((), jnp.float32)),
                                (micro, jnp.arange(steps)))
    w_safe = jnp.maximum(w, 1e-12)
    grads = jax.tree.map(lambda x: x / w_safe, g)
    metrics = {k: (v if _is_summed(k) else v / w_safe) for k, v in m.items()}
    return grads, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    state_sharding: Any, batch_sharding: NamedSharding | None = None,
                    frozen_sharding: Any = None, use_frozen: bool = False,
                    clip_norm: float | None = 1.0, grad_accum_steps: int = 1,
                    lr_schedule: optax.Schedule | None = None,
                    rules: parallel.Rules = parallel.DEFAULT_RULES,
                    donate: bool = True, skip_nonfinite: bool = False,
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted, sharded `step(state, batch[, frozen]) -> (state, metrics)`.

    Args:
      loss_fn: `(params, batch, rng, frozen) -> (loss, metrics)`.
      optimizer: the optax transformation whose state is in `state.opt_state`.
      mesh: the device mesh; the step traces under `parallel.sharding_context(mesh, rules)` so
        the model's activation constraints apply.
      state_sharding: `TrainState` of NamedShardings (see `init_train_state`).
      batch_sharding: sharding of every batch leaf (default: leading dim over data x fsdp).
      frozen_sharding / use_frozen: pass `use_frozen=True` to get the 3-argument step. Its
        `frozen` pytree (a reference or reward model) is read where it lies by default
        (`frozen_sharding=None`): place it like the params (`parallel.put_tree` with
        `tree_shardings(param_logical_axes(...))`, as `algorithms.loop.OnlineLoop` does) and a
        7B reference is sharded over the mesh like the policy, never copied to every chip.
        Pass a tree of shardings to force a placement (arrays elsewhere are moved).
      clip_norm: global-norm clip threshold (None disables clipping).
      grad_accum_steps: micro-batches per step (the batch's leading dim must divide).
      lr_schedule: reported as metric `lr` when given.
      donate: donate the input state's buffers to the output state.
      skip_nonfinite: when the loss or the gradient norm is NaN/inf, keep the old params and
        optimizer state (the step counter still advances) and report `skipped=1`. Every step
        reports `nonfinite` (1.0 when the loss or gradient norm is not finite); what to do
        about it across steps (stop, or stop after K skips) is `train_loop`'s job.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    batch_sharding = batch_sharding or parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)

    def step(state: TrainState, batch: Any, frozen: Any = None):
        with parallel.sharding_context(mesh, rules):
            rng = jax.random.fold_in(state.rng, state.step)
            if grad_accum_steps == 1:
                grads, metrics, _ = _loss_grads(loss_fn, state.params, batch, rng, frozen)
            else:
                grads, metrics = _accumulate(loss_fn, state.params, batch, rng, frozen,
                                             grad_accum_steps, mesh)
            grad_norm = optax.tree.norm(grads)
            if clip_norm is not None:
                scale = jnp.where(grad_norm > clip_norm, clip_norm / grad_norm, 1.0)
                grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            bad = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
            if skip_nonfinite:
                params, opt_state = jax.tree.map(lambda old, new: jnp.where(bad, old, new),
                                                 (state.params, state.opt_state),
                                                 (params, opt_state))
            metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                           nonfinite=bad.astype(jnp.float32))
            if skip_nonfinite:
                metrics["skipped"] = bad.astype(jnp.float32)
            if lr_schedule is not None:
                metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if use_frozen:
        fn = step
        in_sh = (state_sharding, batch_sharding, frozen_sharding)  # None: as placed
    else:
        def fn(state, batch):
            return step(state, batch, None)
        in_sh = (state_sharding, batch_sharding)
    return jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sharding, rep),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(fn: Callable[..., Any], mesh: Mesh, *, in_shardings: Any,
                   out_shardings: Any = None,
                   rules: parallel.Rules = parallel.DEFAULT_RULES) -> Callable[..., Any]:
    """Jit a pure evaluation function (reference log-probs, reward scores, ...) on the mesh."""
    def traced(*args):
        with parallel.sharding_context(mesh, rules):
            return fn(*args)
    return jax.jit(traced, in_shardings=in_shardings,
                   out_shardings=out_shardings if out_shardings is not None
                   else parallel.replicated(mesh))


def abstract_train_state(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                         head: bool = False) -> tuple[TrainState, TrainState]:
    """(TrainState of ShapeDtypeStructs carrying their shardings, its sharding tree) of `model`
    (`head`: with a scalar head, a reward / value model), placed as `init_train_state` places a
    real one -- for lowering and memory planning without allocating any weight."""
    from scalign.models import init_params, param_logical_axes
    from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes

    axes = param_logical_axes(model)
    if head:
        axes = {**axes, SCALAR_HEAD: scalar_head_logical_axes()}

    def init(key):
        p = init_params(model, key)
        return add_scalar_head(model, p, key) if head else p

    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    p_sh = parallel.tree_shardings(axes, params, mesh)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                           params)
    st_sh = parallel.state_shardings(optimizer, state, p_sh, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, st_sh)
    return state, st_sh


def init_train_state(init_params_fn: Callable[[jax.Array], Any], param_logical_axes: Any,
                     optimizer: optax.GradientTransformation, mesh: Mesh, *, seed: int,
                     rules: parallel.Rules = parallel.DEFAULT_RULES,
                     params: Any = None) -> tuple[TrainState, TrainState]:
    """Create (or adopt) params and optimizer state directly on their shardings.

    Args:
      init_params_fn: key -> params (e.g. `functools.partial(init_params, config)`).
      param_logical_axes: matching tree of logical-axis PartitionSpecs.
      params: existing params (e.g. an SFT checkpoint) to start from instead of a fresh init;
        they are resharded onto the rule-table shardings.
    Returns:
      (state, state_sharding). Params are initialised from fold_in(PRNGKey(seed), 0); the
      state's rng is PRNGKey(seed) (steps fold in their index).
    """
    key = jax.random.PRNGKey(seed)

    def make(p):
        return TrainState.create(p, optimizer, key)

    abstract_params = (jax.eval_shape(init_params_fn, key) if params is None
                       else jax.eval_shape(lambda: params))
    p_sh = parallel.tree_shardings(param_logical_axes, abstract_params, mesh, rules)
    abstract_state = jax.eval_shape(make, abstract_params)
    st_sh = parallel.state_shardings(optimizer, abstract_state, p_sh, mesh)
    if params is None:
        state = jax.jit(lambda k: make(init_params_fn(jax.random.fold_in(k, 0))),
                        out_shardings=st_sh)(key)
    else:
        params = jax.device_put(params, p_sh)
        state = jax.jit(make, in_shardings=(p_sh,), out_shardings=st_sh)(params)
    return state, st_sh

"""The online loop that RL (PPO, GRPO, ReST-EM, iterative DPO) and eva's self-play share:

    for k in iterations:                       key_k = fold_in(state.rng, k)
        prompts  = pool / problem set          (host; PromptPool keeps statistics + lineage)
        samples  = sampler(policy params, prompts, key_k)
        scores   = reward(samples)             (verifier, reward model, PRM, judge ...)
        batch    = algorithm's batch            (advantages, pairs, filtered SFT data ...)
        state    = step(state, batch[, frozen]) (the ONE jitted train step factory)

    loop = OnlineLoop.create(config, sft_params, mesh=mesh, sampler=sampler,
                             optimizer=opt, loss_fn=loss, seed=0, reference=True,
                             checkpointer=Checkpointer(workdir / "loop", save_every=1, keep=3))
    history = loop.run(num_iterations, iterate)      # iterate(loop, k, key_k) -> metrics

`iterate` is the algorithm: it calls the loop's verbs — `sample`, `log_probs`, `update`,
`update_value`, `pool` — and returns scalar metrics. The loop owns everything an iteration
changes, as one checkpointable object:

- `LoopState` (device pytree): iteration counter, root RNG, the policy's `TrainState`, an
  optional value `TrainState` (its own optimizer and learning rate, e.g. PPO's critic
  initialised from the reward model), and the frozen reference params (frozen *within* an
  iteration; iterative DPO may refresh it between iterations, so it is saved too).
- `PromptPool` (host, JSON): prompts with per-prompt statistics and lineage (eva's evolved
  prompts point at their parents), saved in the checkpoint's metadata.
- a read-only `reward` object (a scorer, a reward model's params): not checkpointed; the
  caller builds it from its own artifact on resume.

Invariants (tested in `tests/algorithms/test_loop.py`):

- Built once: the policy step, the value step and the log-prob program are jitted in the
  constructor; the sampler is the caller's, built once, and is handed the *current* params
  whenever they changed (`Sampler.update_params`: the same shapes, so nothing recompiles;
  a packed layout keeps one packed copy): after the first iteration no jit cache grows
  (`cache_sizes()`).
- No aliasing of donated buffers: the train step donates the policy state, which deletes the
  pre-update params; the sampler is re-pointed at the new params before it samples again
  (a sampler call on deleted buffers raises instead of reading garbage).
- Resumable mid-run: all randomness derives from `fold_in(state.rng, k)` and the train steps'
  `fold_in(state.rng, step)`, the pool is restored from the checkpoint, so a run killed in
  iteration k and resumed reproduces the uninterrupted run bitwise (CPU).
- Ratios and KL terms use `log_probs`, the *training* forward (`objectives.logprobs`), not the
  sampler's decode-time log-probs, so a bf16 or kernel-formulated decode cannot bias PPO.
- Multi-process: sampling returns every row on every process; `log_probs` and batch
  placement work on global arrays and bring results to the host with `process_allgather`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from scalign import parallel
from scalign.models.config import ModelConfig
from scalign.models.transformer import param_logical_axes
from scalign.objectives.logprobs import batch_token_log_probs, token_log_probs
from scalign.objectives.policy_gradient import token_values
from scalign.training import preemption
from scalign.training.checkpoint import Checkpointer
from scalign.training.loop import NONFINITE_POLICIES, Interrupted, NonFiniteError, last_good_message
from scalign.training.metrics import MetricsWriter, to_scalars
from scalign.training.state import TrainState
from scalign.training.step import init_train_state, make_eval_step, make_train_step
from scalign.utils import progress_bar

Iterate = Callable[["OnlineLoop", int, jax.Array], "dict[str, Any] | None"]


# ============================================================================ prompt pool
@dataclasses.dataclass
class PromptEntry:
    """One prompt of the pool.

    Attributes:
      id: stable index in the pool (never reused).
      data: JSON-serialisable payload (e.g. {"prompt": ..., "answer": ..., "level": ...}).
      parent: id of the prompt this one was evolved from (None for a seed prompt).
      iteration: the loop iteration that created it.
      stats: latest per-prompt statistics by name (e.g. eva's informativeness, mean reward).
    """

    id: int
    data: dict[str, Any]
    parent: int | None = None
    iteration: int = 0
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


class PromptPool:
    """Prompts with per-prompt statistics and lineage; the host half of the loop's state.

    `active` is the prompt set the next iteration draws from (eva replaces it by a mix of
    evolved and current prompts); every entry ever added stays, so lineage is complete.
    The whole pool round-trips through JSON (`state_dict` / `from_state_dict`), which is how
    the loop checkpoints it.
    """

    def __init__(self, entries: Sequence[PromptEntry] = (), active: Sequence[int] | None = None):
        self.entries: list[PromptEntry] = list(entries)
        for i, e in enumerate(self.entries):
            if e.id != i:
                raise ValueError(f"prompt pool entry {i} has id {e.id}; ids must be 0..n-1")
        self.active: list[int] = (list(range(len(self.entries))) if active is None
                                  else [int(i) for i in active])

    @classmethod
    def from_prompts(cls, prompts: Sequence[dict[str, Any]]) -> PromptPool:
        return cls([PromptEntry(i, dict(p)) for i, p in enumerate(prompts)])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> PromptEntry:
        return self.entries[i]

    def add(self, data: dict[str, Any], *, parent: int | None = None, iteration: int = 0
            ) -> int:
        """Append a prompt (not activated); returns its id."""
        if parent is not None and not 0 <= parent < len(self.entries):
            raise ValueError(f"parent {parent} is not in the pool (size {len(self.entries)})")
        self.entries.append(PromptEntry(len(self.entries), dict(data), parent, int(iteration)))
        return len(self.entries) - 1

    def set_active(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= int(i) < len(self.entries)]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are not in the pool (size {len(self)})")
        self.active = [int(i) for i in ids]

    def record(self, ids: Sequence[int], name: str, values: Sequence[float] | np.ndarray
               ) -> None:
        """Set statistic `name` of each prompt in `ids` (latest value wins)."""
        values = np.asarray(values, np.float64).reshape(-1)
        if len(ids) != values.size:
            raise ValueError(f"record({name!r}): {len(ids)} ids but {values.size} values")
        for i, v in zip(ids, values, strict=True):
            self.entries[int(i)].stats[name] = float(v)

    def stat(self, ids: Sequence[int], name: str, default: float = float("nan")) -> np.ndarray:
        return np.asarray([self.entries[int(i)].stats.get(name, default) for i in ids],
                          np.float64)

    def lineage(self, i: int) -> list[int]:
        """Ids from the seed prompt down to `i`."""
        chain = [int(i)]
        while self.entries[chain[-1]].parent is not None:
            chain.append(self.entries[chain[-1]].parent)
        return chain[::-1]

    def sample(self, n: int, rng: np.random.Generator, *, weights: np.ndarray | None = None,
               replace: bool = False) -> list[int]:
        """`n` ids from the active set, uniformly or with probabilities ∝ `weights`
        (one weight per active prompt)."""
        pool = np.asarray(self.active, np.int64)
        if not replace and n > pool.size:
            raise ValueError(f"cannot draw {n} prompts without replacement from {pool.size}")
        p = None
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != pool.shape or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise ValueError("weights must be finite, >= 0, not all 0, one per active prompt")
            p = w / w.sum()
        return [int(i) for i in rng.choice(pool, size=n, replace=replace, p=p)]

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [dataclasses.asdict(e) for e in self.entries],
                "active": list(self.active)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> PromptPool:
        return cls([PromptEntry(**e) for e in d["entries"]], d["active"])


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy Generator determined by a JAX key (host-side choices of an iteration)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(jax.device_get(data), np.uint32).tolist())


# ============================================================================ rollouts
def pack_rollout(prompts: Sequence[Sequence[int]], completions: np.ndarray,
                 lengths: np.ndarray, *, pad_id: int, width: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Prompt + completion rows for the training forward.

    Args:
      prompts: P token-id sequences.
      completions: int [P, N, M] sampled tokens (`SampleOutput.tokens`).
      lengths: int [P, N] completion lengths (`SampleOutput.lengths`).
      pad_id: id written after each row's end (right padding: causal attention makes it
        invisible to the real positions).
      width: row length T (default: longest prompt + M); rows are never cut.

    Returns numpy arrays with R = P * N rows (row r = p * N + j):
      tokens int32 [R, T]; response_mask float32 [R, T] (1 on completion tokens, aligned with
      `tokens`, as `token_log_probs` and SFT's loss mask are); prompt_index int32 [R];
      response_start int32 [R] (position of the first completion token).
    """
    completions = np.asarray(completions)
    lengths = np.asarray(lengths)
    P, N, M = completions.shape
    if len(prompts) != P:
        raise ValueError(f"{len(prompts)} prompts but completions for {P}")
    longest = max(len(p) for p in prompts)
    T = int(width if width is not None else longest + M)
    if T < longest + int(lengths.max(initial=0)):
        raise ValueError(f"width {T} cannot hold the longest prompt + completion "
                         f"({longest} + {int(lengths.max())})")
    R = P * N
    tokens = np.full((R, T), pad_id, np.int32)
    mask = np.zeros((R, T), np.float32)
    start = np.zeros((R,), np.int32)
    for p, prompt in enumerate(prompts):
        Lp = len(prompt)
        for j in range(N):
            r, L = p * N + j, int(lengths[p, j])
            tokens[r, :Lp] = prompt
            tokens[r, Lp:Lp + L] = completions[p, j, :L]
            mask[r, Lp:Lp + L] = 1.0
            start[r] = Lp
    return {"tokens": tokens, "response_mask": mask,
            "prompt_index": np.repeat(np.arange(P, dtype=np.int32), N), "response_start": start}


def to_host(x: Any) -> Any:
    """Global arrays -> numpy on every process (`process_allgather` with several processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


# ============================================================================ loop state
@flax.struct.dataclass
class LoopState:
    """Everything on device that an iteration changes (see the module docstring)."""

    iteration: jax.Array  # int32 scalar: iterations completed
    rng: jax.Array        # raw uint32[2] root key; iteration k uses fold_in(rng, k)
    policy: TrainState
    value: TrainState | None = None
    reference: Any = None


class OnlineLoop:
    """sample -> score -> update, with steps built once and state checkpointed per iteration.

    Build it with `OnlineLoop.create` (which initialises the train states on their shardings
    and jits the steps once), then `run(num_iterations, iterate)`.
    """

    def __init__(self, config: ModelConfig, *, mesh: Mesh, sampler: Any, state: LoopState,
                 state_sharding: LoopState, policy_step: Callable, value_step: Callable | None,
                 reference_in_loss: bool = False, reward: Any = None,
                 pool: PromptPool | None = None, checkpointer: Checkpointer | None = None,
                 metrics: MetricsWriter | None = None, stage: str = "online",
                 logprob_chunk: int | None = None, rules: parallel.Rules = parallel.DEFAULT_RULES,
                 progress: bool = True, on_nonfinite: str = "stop",
                 max_consecutive_skips: int = 3,
                 optimizer: optax.GradientTransformation | None = None,
                 value_config: ModelConfig | None = None):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got "
                             f"{on_nonfinite!r}")
        if reference_in_loss and state.reference is None:
            raise ValueError("reference_in_loss=True needs a reference model (reference=True)")
        self.config = config
        self.mesh = mesh
        self.sampler = sampler
        self.state = state
        self.state_sharding = state_sharding
        self.reward = reward
        self.pool = pool if pool is not None else PromptPool()
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.stage = stage
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self._policy_step = policy_step
        self._value_step = value_step
        self._sampler_source: Any = None  # first params leaf last handed to the sampler
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_updates = 0
        self._skip_run = 0
        self._nonfinite: list[jax.Array] = []  # this iteration's per-update flags (device)
        self._reference_in_loss = reference_in_loss
        bsh = parallel.batch_sharding(mesh)
        self._log_probs = make_eval_step(
            functools.partial(token_log_probs, config, chunk=logprob_chunk), mesh,
            in_shardings=(state_sharding.policy.params, bsh), out_shardings=bsh, rules=rules)
        self._batch_log_probs = make_eval_step(
            functools.partial(batch_token_log_probs, config, chunk=logprob_chunk), mesh,
            in_shardings=(state_sharding.policy.params, bsh), out_shardings=bsh, rules=rules)
        self._optimizer = optimizer
        # a copy of params onto the policy's shardings (reference refresh, policy reset): one
        # program for the loop's life (a fresh jit per call would compile every iteration)
        self._copy_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                    out_shardings=state_sharding.policy.params)
        self._reset = None
        self._values = None
        if state.value is not None:
            vconfig = value_config if value_config is not None else config
            self._values = make_eval_step(
                functools.partial(token_values, vconfig), mesh,
                in_shardings=(state_sharding.value.params, bsh), out_shardings=bsh, rules=rules)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, config: ModelConfig, params: Any, *, mesh: Mesh, sampler: Any,
               optimizer: optax.GradientTransformation, loss_fn: Callable, seed: int,
               reference: bool | Any = False, reference_in_loss: bool = False,
               value_params: Any = None, value_logical_axes: Any = None,
               value_optimizer: optax.GradientTransformation | None = None,
               value_loss_fn: Callable | None = None, value_config: ModelConfig | None = None,
               clip_norm: float | None = 1.0,
               value_clip_norm: float | None = 1.0, grad_accum_steps: int = 1,
               lr_schedule: optax.Schedule | None = None, on_nonfinite: str = "stop",
               rules: parallel.Rules = parallel.DEFAULT_RULES, **kwargs: Any) -> OnlineLoop:
        """Initialise states on their shardings and jit every step once.

        Args:
          config, params: the policy (e.g. an SFT checkpoint); resharded by the rule table.
          sampler: a `Sampler` for `config` (built once by the caller, any layout).
          optimizer / loss_fn: the policy's optax transformation and its
            `(params, batch, rng, frozen) -> (loss, metrics)` (see `training.step`).
          seed: root seed; the loop's rng is PRNGKey(seed) folded with "loop".
          reference: True to freeze a copy of `params` as the reference, or a params tree;
            placed with the policy's param shardings (never replicated).
          reference_in_loss: hand the reference to `loss_fn` as `frozen` (DPO computing
            reference log-probs inside the step); otherwise the step takes no frozen tree and
            algorithms precompute reference terms with `log_probs(..., "reference")`.
          value_params / value_logical_axes / value_optimizer / value_loss_fn: an optional
            value model with its own optimizer (e.g. PPO's critic from the reward model).
          value_config: the value model's ModelConfig when it differs from the policy's
            (`values` runs its forward).
          clip_norm / value_clip_norm / grad_accum_steps / lr_schedule: as `make_train_step`.
          on_nonfinite: "stop" (an iteration with a NaN/inf loss or gradient norm raises
            `training.loop.NonFiniteError` naming it, before anything after it is saved) or
            "skip" (such updates are not applied, counted, and the run stops after
            `max_consecutive_skips` of them in a row), as `training.loop.train_loop`.
          **kwargs: passed to the constructor (reward, pool, checkpointer, metrics, stage,
            logprob_chunk, progress, max_consecutive_skips).
        """
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x6C6F6F70)  # "loop"
        axes = param_logical_axes(config)
        policy, policy_sh = init_train_state(lambda k: params, axes, optimizer, mesh,
                                             seed=seed, rules=rules, params=params)
        policy_step = make_train_step(loss_fn, optimizer, mesh, state_sharding=policy_sh,
                                      use_frozen=reference_in_loss,
                                      frozen_sharding=policy_sh.params if reference_in_loss
                                      else None,
                                      clip_norm=clip_norm, grad_accum_steps=grad_accum_steps,
                                      lr_schedule=lr_schedule, rules=rules,
                                      skip_nonfinite=on_nonfinite == "skip")
        ref = None
        if reference is not False and reference is not None:
            src = params if reference is True else reference
            # a copy on the policy's shardings (device_put of the caller's arrays could alias
            # them; the policy state is donated every step)
            ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                          out_shardings=policy_sh.params)(src)
        value = value_sh = value_step = None
        if value_params is not None:
            if value_optimizer is None or value_loss_fn is None:
                raise ValueError("a value model needs value_optimizer and value_loss_fn")
            if value_logical_axes is None:
                raise ValueError("value_params need value_logical_axes (e.g. the backbone's "
                                 "axes plus scalar_head_logical_axes())")
            value, value_sh = init_train_state(lambda k: value_params, value_logical_axes,
                                               value_optimizer, mesh, seed=seed + 1, rules=rules,
                                               params=value_params)
            value_step = make_train_step(value_loss_fn, value_optimizer, mesh,
                                         state_sharding=value_sh, clip_norm=value_clip_norm,
                                         grad_accum_steps=grad_accum_steps, rules=rules,
                                         skip_nonfinite=on_nonfinite == "skip")
        rep = parallel.replicated(mesh)
        state = LoopState(iteration=jax.device_put(jnp.zeros((), jnp.int32), rep),
                          rng=jax.device_put(key, rep), policy=policy, value=value,
                          reference=ref)
        sharding = LoopState(iteration=rep, rng=rep, policy=policy_sh, value=value_sh,
                             reference=policy_sh.params if ref is not None else None)
        return cls(config, mesh=mesh, sampler=sampler, state=state, state_sharding=sharding,
                   policy_step=policy_step, value_step=value_step,
                   reference_in_loss=reference_in_loss, rules=rules,
                   on_nonfinite=on_nonfinite, optimizer=optimizer, value_config=value_config,
                   **kwargs)

    # ------------------------------------------------------------------ verbs
    @property
    def params(self) -> Any:
        """The current policy params (do not hold on to them across an `update`: donated)."""
        return self.state.policy.params

    def sample(self, prompts: Sequence[Sequence[int]], n: int, *, key: jax.Array,
               **kwargs: Any) -> Any:
        """`Sampler.generate_ids` with the *current* policy params.

        The sampler is handed new params (`Sampler.update_params`: one packing into its
        layout) only when they changed since the last call — after an `update`, or after a
        change of `state` by hand — so several sampling calls between two updates pack once.
        """
        first = jax.tree.leaves(self.params)[0]
        if first is not self._sampler_source:  # identity: held, so never reused by another
            self.sampler.update_params(self.params)
            self._sampler_source = first
        return self.sampler.generate_ids(prompts, n, key=key, **kwargs)

    def _params_of(self, which: str | Any) -> Any:
        if not isinstance(which, str):
            return which
        if which == "reference" and self.state.reference is None:
            raise ValueError("the loop has no reference model (create(..., reference=True))")
        params = {"policy": self.params, "reference": self.state.reference}.get(which)
        if params is None:
            raise ValueError(f"which must be 'policy', 'reference' or params, got {which!r}")
        return params

    def log_probs(self, tokens: np.ndarray, which: str | Any = "policy") -> np.ndarray:
        """Per-token log-probs float32 [R, T] of `tokens` [R, T] under the training forward
        (`objectives.logprobs.token_log_probs`; column 0 is 0), as numpy on every process.

        `which`: "policy", "reference", or a params tree shaped like the policy's. R must be
        a multiple of data x fsdp (pad rows if needed).
        """
        params = self._params_of(which)
        tokens = parallel.shard_batch({"t": np.asarray(tokens, np.int32)}, self.mesh,
                                      global_batch=True)["t"]
        return np.asarray(to_host(self._log_probs(params, tokens)))

    def log_probs_batch(self, batch: dict[str, np.ndarray], which: str | Any = "policy"
                        ) -> np.ndarray:
        """Per-token log-probs of a policy-gradient batch in either layout
        (`objectives.logprobs.batch_token_log_probs`): packed `tokens` [R, T] -> [R, T], or the
        shared-prompt layout of `shared_prompt_rows` -> [R, M] aligned with its
        `response_tokens`. `which` as in `log_probs`."""
        params = self._params_of(which)
        keys = ("prompt_tokens", "prompt_start", "response_tokens", "tokens")
        device = parallel.shard_batch({k: np.asarray(batch[k], np.int32) for k in keys
                                       if k in batch}, self.mesh, global_batch=True)
        return np.asarray(to_host(self._batch_log_probs(params, device)))

    def values(self, tokens: np.ndarray) -> np.ndarray:
        """Value-model scores float32 [R, T] of `tokens` [R, T], aligned with the tokens as
        log-probs are: v[r, t] = V(tokens[r, < t]) (the scalar head on the hidden state at
        t - 1; column 0 is 0), as numpy on every process. R a multiple of data x fsdp."""
        if self._values is None:
            raise ValueError("the loop has no value model (create(..., value_params=...))")
        tokens = parallel.shard_batch({"t": np.asarray(tokens, np.int32)}, self.mesh,
                                      global_batch=True)["t"]
        return np.asarray(to_host(self._values(self.state.value.params, tokens)))

    def update(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """One policy step on a host batch (identical on every process); device metrics."""
        device_batch = parallel.shard_batch(batch, self.mesh, global_batch=True)
        if self._reference_in_loss:
            policy, metrics = self._policy_step(self.state.policy, device_batch,
                                                self.state.reference)
        else:
            policy, metrics = self._policy_step(self.state.policy, device_batch)
        self.state = self.state.replace(policy=policy)
        self._nonfinite.append(metrics["nonfinite"])
        return metrics

    def update_value(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """One value-model step (its own optimizer); device metrics."""
        if self._value_step is None:
            raise ValueError("the loop has no value model (create(..., value_params=...))")
        value, metrics = self._value_step(self.state.value,
                                          parallel.shard_batch(batch, self.mesh,
                                                               global_batch=True))
        self.state = self.state.replace(value=value)
        self._nonfinite.append(metrics["nonfinite"])
        return metrics

    def refresh_reference(self) -> None:
        """Reference <- a copy of the current policy (iterative DPO's per-iteration reset)."""
        if self.state.reference is None:
            raise ValueError("the loop has no reference model")
        self.state = self.state.replace(reference=self._copy_params(self.params))

    def reset_policy(self, params: Any = None) -> None:
        """Policy <- a copy of `params` (default: the reference, e.g. ReST-EM's base policy)
        with a fresh optimizer state and step 0 (its rng kept): "fine-tune from the base model"
        each iteration. Same shapes and shardings, so no step recompiles."""
        if params is None:
            if self.state.reference is None:
                raise ValueError("reset_policy() without params needs a reference model")
            params = self.state.reference
        if self._optimizer is None:
            raise ValueError("reset_policy needs the policy optimizer (OnlineLoop.create)")
        if self._reset is None:
            optimizer = self._optimizer
            self._reset = jax.jit(
                lambda p, rng: TrainState.create(jax.tree.map(jnp.copy, p), optimizer, rng),
                out_shardings=self.state_sharding.policy)
        self.state = self.state.replace(policy=self._reset(params, self.state.policy.rng))

    def cache_sizes(self) -> dict[str, int]:
        """Compiled-program counts of the loop's jitted pieces (and the sampler's, if it tells):
        constant after the first iteration of a loop whose shapes do not change."""
        sizes = {"policy_step": self._policy_step._cache_size(),
                 "log_probs": self._log_probs._cache_size()}
        if self._batch_log_probs._cache_size():  # once used (GRPO's shared-prompt layout)
            sizes["batch_log_probs"] = self._batch_log_probs._cache_size()
        if self._value_step is not None:
            sizes["value_step"] = self._value_step._cache_size()
        if self._values is not None:
            sizes["values"] = self._values._cache_size()
        if self._copy_params._cache_size():  # once used (refresh_reference)
            sizes["copy_params"] = self._copy_params._cache_size()
        if self._reset is not None:
            sizes["reset_policy"] = self._reset._cache_size()
        sampler_sizes = getattr(self.sampler, "cache_sizes", None)
        if callable(sampler_sizes):
            sizes.update({f"sampler.{k}": v for k, v in sampler_sizes().items()})
        return sizes

    # ------------------------------------------------------------------ checkpoints
    def save(self, force: bool = True, iterate: Any = None) -> bool:
        """Checkpoint the loop state, the pool (and `iterate.state_dict()`, the algorithm's
        host state, if it has one) at the current iteration."""
        if self.checkpointer is None:
            raise ValueError("the loop has no checkpointer")
        k = int(self.state.iteration)
        get = getattr(iterate, "state_dict", None)
        meta = {"stage": self.stage, "iteration": k, "pool": self.pool.state_dict(),
                "history": self.history, "iterate": get() if callable(get) else None,
                "skipped_updates": self.skipped_updates, "skip_run": self._skip_run}
        return self.checkpointer.maybe_save(k, self.state, None, meta, force=force)

    def restore(self, iterate: Any = None) -> int | None:
        """Restore the newest checkpoint if there is one (and `iterate.load_state_dict`);
        returns its iteration or None."""
        if self.checkpointer is None or self.checkpointer.latest_step() is None:
            return None
        state, meta = self.checkpointer.restore(self.state)
        self.state = state
        self.pool = PromptPool.from_state_dict(meta["pool"])
        self.history = list(meta.get("history", []))
        self.skipped_updates = int(meta.get("skipped_updates", 0))
        self._skip_run = int(meta.get("skip_run", 0))
        load = getattr(iterate, "load_state_dict", None)
        if callable(load) and meta.get("iterate") is not None:
            load(meta["iterate"])
        return int(state.iteration)

    # ------------------------------------------------------------------ the loop
    def _check_nonfinite(self, k: int) -> int:
        """Read this iteration's non-finite flags (one host read per iteration); raise or
        count them by `on_nonfinite`. Returns how many updates were non-finite."""
        flags = [float(x) > 0 for x in jax.device_get(self._nonfinite)]
        self._nonfinite = []
        if not any(flags):
            self._skip_run = 0
            return 0
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{self.stage}: non-finite loss or gradient norm in iteration {k + 1} (update "
                f"{flags.index(True) + 1} of {len(flags)}); nothing after it is saved"
                f"{last_good_message(self.checkpointer)} (on_nonfinite='skip' skips such updates)",
                k + 1)
        for f in flags:
            self._skip_run = self._skip_run + 1 if f else 0
            self.skipped_updates += int(f)
            if self._skip_run >= self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{self.stage}: {self.max_consecutive_skips} consecutive non-finite updates "
                    f"skipped, the last in iteration {k + 1} ({self.skipped_updates} skipped in "
                    f"all); stopping", k + 1)
        return sum(flags)

    def run(self, num_iterations: int, iterate: Iterate, *, stop_after: int | None = None
            ) -> list[dict[str, float]]:
        """Run iterations until `num_iterations` are complete (resuming from the newest
        checkpoint first). `iterate(loop, k, key_k) -> metrics | None` is one iteration of the
        algorithm. Saves every `checkpointer.save_every` iterations and at the end.
        `stop_after`: raise `training.loop.Interrupted` after that many iterations of this
        call (after their checkpoint): a deterministic crash for resume tests.
        Returns the per-iteration history (scalars, also written to `metrics`).
        """
        resumed = self.restore(iterate)
        start = int(self.state.iteration)
        bar = progress_bar(total=num_iterations, initial=start, desc=self.stage,
                           enabled=self.progress)
        done_here = 0
        try:
            for k in range(start, num_iterations):
                t0 = time.perf_counter()
                key = jax.random.fold_in(self.state.rng, k)
                self._nonfinite = []
                out = iterate(self, k, key) or {}
                scalars = to_scalars(out)
                bad = self._check_nonfinite(k)
                if self.on_nonfinite == "skip":
                    scalars.update(skipped=float(bad), skipped_updates=float(self.skipped_updates))
                scalars["iteration_s"] = time.perf_counter() - t0
                self.state = self.state.replace(iteration=jax.device_put(
                    jnp.asarray(k + 1, jnp.int32), self.state_sharding.iteration))
                self.history.append({"iteration": k + 1, **scalars})
                if self.metrics is not None:
                    self.metrics.write(self.stage, k + 1, scalars)
                bar.update(1)
                if self.checkpointer is not None:
                    self.save(force=k + 1 == num_iterations, iterate=iterate)
                done_here += 1
                if preemption.reached(k + 1) and k + 1 < num_iterations:
                    if self.checkpointer is not None:
                        self.save(force=True, iterate=iterate)
                        self.checkpointer.wait()
                    raise preemption.Preempted(
                        f"{self.stage}: preempted; saved at iteration {k + 1} of "
                        f"{num_iterations}" + (f" in {self.checkpointer.directory}"
                                               if self.checkpointer is not None else
                                               " (no checkpointer: not saved)"),
                        stage=self.stage, step=k + 1)
                if stop_after is not None and done_here >= stop_after and k + 1 < num_iterations:
                    if self.checkpointer is not None:
                        self.checkpointer.wait()
                    raise Interrupted(f"{self.stage}: stopped after iteration {k + 1} "
                                      f"(stop_after={stop_after}; resumed from {resumed})")
        finally:
            bar.close()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return self.history


def sequence_log_probs(loop: OnlineLoop, tokens: np.ndarray, mask: np.ndarray,
                       which: str | Any = "reference") -> np.ndarray:
    """Per-row sums of masked token log-probs, float32 [R], of packed rows `tokens` / `mask`
    [R, T] (`pack_rollout`) under `which` ("reference", "policy" or params): ONE forward
    over all rows (padded with copies of row 0 to a multiple of data x fsdp, so the shape,
    and the compiled program, depends only on R)."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.asarray(mask, np.float32)
    R = tokens.shape[0]
    div = parallel.batch_divisor(loop.mesh)
    pad = (-R) % div
    if pad:
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    lp = loop.log_probs(tokens, which)[:R]
    return (lp * mask).sum(-1).astype(np.float32)


def shared_prompt_rows(batch: dict[str, np.ndarray], group_size: int, prompt_width: int, *,
                       divisor: int = 1) -> dict[str, np.ndarray] | None:
    """A packed policy-gradient batch in the shared-prompt layout, or None when it does not fit.

    `batch`: `tokens` [R, T] (rows r = p * group_size + j, as `pack_rollout` writes them),
    `response_start` [R] and per-token arrays [R, T] aligned with the tokens (response_mask,
    advantages, ref_logp, old_logp, ...). Returns `prompt_tokens` int32 [P, W] (left-padded to
    W = `prompt_width`), `prompt_start` int32 [P], `response_tokens` int32 [R, T - W] and every
    other [R, T] array cut to the same response columns (row r's column j is its token
    response_start[r] + j); [R]-shaped arrays are kept. The policy-gradient losses then compute
    each prompt once (`objectives.logprobs.batch_token_log_probs`): B(W + N(T - W)) positions
    instead of BN T. None when a prompt is longer than W, a response longer than T - W, a
    group's rows differ in their prompt, or P is not a multiple of `divisor` (the mesh's batch
    divisor: the prompts are sharded like the rows).
    """
    tokens = np.asarray(batch["tokens"])
    start = np.asarray(batch["response_start"])
    R, T = tokens.shape
    W, M = int(prompt_width), T - int(prompt_width)
    if R % group_size or W <= 0 or M <= 0:
        return None
    P = R // group_size
    mask = np.asarray(batch["response_mask"])
    ends = np.where(mask.any(1), T - np.argmax(mask[:, ::-1] > 0, axis=1), start)
    if P % divisor or (start > W).any() or (ends - start > M).any():
        return None
    first = np.arange(P) * group_size
    for r in range(R):
        f = first[r // group_size]
        if start[r] != start[f] or not np.array_equal(tokens[r, :start[r]], tokens[f, :start[f]]):
            return None
    cols = start[:, None] + np.arange(M)[None, :]          # [R, M], may run past T
    valid = cols < T
    cols = np.minimum(cols, T - 1)
    out: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if key == "tokens":
            out["response_tokens"] = np.where(valid, np.take_along_axis(value, cols, 1), 0
                                              ).astype(np.int32)
        elif value.ndim == 2 and value.shape == (R, T):
            out[key] = np.where(valid, np.take_along_axis(value, cols, 1), 0).astype(value.dtype)
        else:
            out[key] = value
    prompt = np.zeros((P, W), np.int32)
    for p in range(P):
        s = int(start[first[p]])
        prompt[p, W - s:] = tokens[first[p], :s]
    out["prompt_tokens"] = prompt
    out["prompt_start"] = (W - start[first]).astype(np.int32)
    return out


def pair_batches(tokens: np.ndarray, mask: np.ndarray, pairs: Sequence[tuple[int, int]], *,
                 rows: int, order: Sequence[int] | None = None,
                 ref_logps: np.ndarray | None = None,
                 extras: dict[str, np.ndarray] | None = None,
                 response_start: np.ndarray | None = None,
                 prompt_width: int | None = None) -> list[dict[str, np.ndarray]]:
    """Preference batches (the layout of `objectives.preference.make_preference_loss`) from
    packed rollout rows: pair (c, r) is row c (chosen) against row r (rejected) of `tokens` /
    `mask` [R, T]. The one pairing helper of iterative DPO and eva.

    Pairs are taken in `order` (indices into `pairs`, repeats allowed; default 0..n-1) and cut
    into batches of exactly `rows` rows, the last one padded with weight-0 copies of its first
    row, so every batch has one shape (no recompiles).

    `ref_logps` [R]: reference log-prob sums per packed row (`sequence_log_probs`, computed
    once for the whole rollout and shared by every epoch and batch); when given, batches carry
    `ref_chosen_logps` / `ref_rejected_logps` and the loss runs no reference forward.
    `extras`: per-pair arrays [len(pairs)] copied into each batch under their names (e.g.
    SPPO's `chosen_win_rate`).

    Each batch: chosen_tokens / rejected_tokens int32 [rows, T], chosen_mask / rejected_mask
    float32 [rows, T], weight float32 [rows], pair_index int32 [rows] (index into `pairs`,
    -1 on padding) and the optional keys above.

    `response_start` [R] (`pack_rollout`'s) and `prompt_width` W: batches in the shared-prompt
    layout of `make_preference_loss` instead (prompt_tokens [rows, W] left-padded with
    prompt_start, chosen_response / rejected_response and their masks [rows, T - W]): the
    prompt is computed once per pair (1.44x the pairs/s on `dpo_llama_small`). Every pair's
    rows must hold the same prompt; when a prompt is longer than W or a response longer than
    T - W, the concatenated layout is used for the whole call (the same losses either way).
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    pairs_arr = np.asarray(pairs, np.int64).reshape(-1, 2)
    order = np.arange(len(pairs_arr)) if order is None else np.asarray(order, np.int64)
    if order.size and (order.min() < 0 or order.max() >= len(pairs_arr)):
        raise ValueError(f"order indexes pairs outside 0..{len(pairs_arr) - 1}")
    shared = None
    if response_start is not None and prompt_width is not None:
        rows_of = shared_prompt_rows({"tokens": tokens, "response_mask": mask,
                                      "response_start": response_start}, 1, int(prompt_width))
        if rows_of is not None and all(
                np.array_equal(rows_of["prompt_tokens"][c], rows_of["prompt_tokens"][r])
                and rows_of["prompt_start"][c] == rows_of["prompt_start"][r]
                for c, r in pairs_arr):
            shared = (rows_of["prompt_tokens"], rows_of["prompt_start"],
                      rows_of["response_tokens"], rows_of["response_mask"].astype(np.float32))
    out = []
    for s in range(0, order.size, rows):
        part = order[s:s + rows]
        real = part.size
        idx = np.concatenate([part, np.full(rows - real, part[0], np.int64)])
        c, r = pairs_arr[idx, 0], pairs_arr[idx, 1]
        real_mask = np.arange(rows) < real
        if shared is not None:
            prompt, prompt_start, response, response_mask = shared
            batch = {"prompt_tokens": prompt[c], "prompt_start": prompt_start[c],
                     "chosen_response": response[c], "chosen_response_mask": response_mask[c],
                     "rejected_response": response[r],
                     "rejected_response_mask": response_mask[r]}
        else:
            batch = {"chosen_tokens": np.asarray(tokens[c], np.int32),
                     "chosen_mask": np.asarray(mask[c], np.float32),
                     "rejected_tokens": np.asarray(tokens[r], np.int32),
                     "rejected_mask": np.asarray(mask[r], np.float32)}
        batch.update(weight=real_mask.astype(np.float32),
                     pair_index=np.where(real_mask, idx, -1).astype(np.int32))
        if ref_logps is not None:
            batch["ref_chosen_logps"] = np.asarray(ref_logps, np.float32)[c]
            batch["ref_rejected_logps"] = np.asarray(ref_logps, np.float32)[r]
        for name, values in (extras or {}).items():
            batch[name] = np.asarray(values, np.float32)[idx]
        out.append(batch)
    return out

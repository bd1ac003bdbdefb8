"""One process of the multi-process test (`test_multiprocess.py` starts it as a script).

    python worker.py --out DIR --workdir DIR [--process_id I --num_processes N --port P]
                     [--devices D] [--die_at STAGE]

With `--num_processes` > 1 it joins a loopback JAX cluster (gloo CPU collectives, D virtual
CPU devices per process); without, it runs alone on D devices. Either way it builds the same
(data=2, fsdp=4) mesh over all global devices and runs: an SFT step (each process feeds only
its own rows), a checkpoint save + verified restore of that state, a PRM step, a DPO step
(frozen reference) and two iterations of the online loop (sample -> score -> update) with a
checkpoint per iteration, restored into a fresh loop. Process 0 writes every final param tree
to `OUT/params.npz` (gathered with `process_allgather`) and `OUT/done.json`.

`--die_at STAGE` makes process 1 exit abruptly (SIGKILL to itself) when it reaches STAGE, to
check that its peer fails with a clear error instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--die_at", default="")
    p.add_argument("--heartbeat_s", type=int, default=10)
    return p.parse_args()


def main() -> None:
    args = _args()
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        from scalign import distributed

        distributed.initialize(coordinator=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               heartbeat_timeout_s=args.heartbeat_s, init_timeout_s=60)
    run(args)


def _log(msg: str) -> None:
    import jax
    print(f"[process {jax.process_index()}] {msg}", flush=True)


def run(args: argparse.Namespace) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from scalign import parallel
    from scalign.algorithms.loop import OnlineLoop, PromptPool, host_rng, pack_rollout, to_host
    from scalign.models import ModelConfig, init_params, param_logical_axes
    from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
    from scalign.objectives.logprobs import token_log_probs
    from scalign.objectives.preference import make_preference_loss
    from scalign.objectives.reward import make_reward_loss
    from scalign.objectives.sft import make_sft_loss
    from scalign.sampling import Sampler
    from scalign.training.checkpoint import Checkpointer
    from scalign.training.step import init_train_state, make_train_step

    def maybe_die(stage: str) -> None:
        if args.die_at == stage and jax.process_index() == 1:
            _log(f"dying at {stage}")
            os.kill(os.getpid(), signal.SIGKILL)

    config = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=64, tie_embeddings=False, family="llama")
    mesh = parallel.make_mesh((2, 4, 1))
    assert mesh.size == 8 and jax.device_count() == 8, jax.devices()
    B, T = 16, 12
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}

    def record(name: str, tree) -> None:
        for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]:
            out[name + "/" + jax.tree_util.keystr(path)] = np.asarray(leaf)

    def local(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process' rows of a global batch (what a per-process pipeline would read)."""
        rows = parallel.process_rows(mesh, B)
        return {k: v[rows] for k, v in batch.items()}

    opt = optax.sgd(0.5, momentum=0.9)
    axes = param_logical_axes(config)

    # ---------------------------------------------------------------- SFT + checkpoint
    maybe_die("sft")
    state, st_sh = init_train_state(functools.partial(init_params, config), axes, opt, mesh,
                                    seed=0)
    sft_step = make_train_step(make_sft_loss(config), opt, mesh, state_sharding=st_sh)
    tokens = rng.integers(3, config.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        mask[b, 2 + b % 5:] = 1.0
    sft_batch = {"tokens": tokens, "loss_mask": mask}
    for _ in range(2):
        state, metrics = sft_step(state, parallel.shard_batch(local(sft_batch), mesh))
    _log(f"sft loss {float(metrics['loss']):.6f}")
    record("sft", state.params)
    ckpt = Checkpointer(os.path.join(args.workdir, "sft"), save_every=1, keep=2)
    ckpt.maybe_save(2, state, None, {"stage": "sft"}, force=True)
    ckpt.close()
    maybe_die("restore")
    template, _ = init_train_state(functools.partial(init_params, config), axes, opt, mesh,
                                   seed=7)
    restored, meta = Checkpointer(os.path.join(args.workdir, "sft"), save_every=1,
                                  keep=2).restore(template)
    assert meta["stage"] == "sft" and int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(to_host(restored)), jax.tree.leaves(to_host(state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    _log("checkpoint restored")

    # ---------------------------------------------------------------- PRM
    maybe_die("prm")
    rm_params = add_scalar_head(config, init_params(config, jax.random.PRNGKey(1)),
                                jax.random.PRNGKey(2))
    rm_axes = {**axes, SCALAR_HEAD: scalar_head_logical_axes()}
    rm_state, rm_sh = init_train_state(lambda k: rm_params, rm_axes, opt, mesh, seed=1,
                                       params=rm_params)
    prm_step = make_train_step(make_reward_loss(config), opt, mesh, state_sharding=rm_sh)
    label_mask = np.zeros((B, T), np.float32)
    label_mask[:, 3::3] = 1.0
    labels = (rng.random((B, T)) < 0.5).astype(np.float32)
    rm_state, metrics = prm_step(rm_state, parallel.shard_batch(
        local({"tokens": tokens, "labels": labels, "label_mask": label_mask}), mesh))
    _log(f"prm loss {float(metrics['loss']):.6f}")
    record("prm", rm_state.params)

    # ---------------------------------------------------------------- DPO
    maybe_die("dpo")
    pol, pol_sh = init_train_state(lambda k: init_params(config, jax.random.PRNGKey(3)), axes,
                                   opt, mesh, seed=3)
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=pol_sh.params)(pol.params)
    dpo_step = make_train_step(make_preference_loss(config, "dpo", beta=0.1), opt, mesh,
                               state_sharding=pol_sh, use_frozen=True,
                               frozen_sharding=pol_sh.params)
    other = rng.integers(3, config.vocab_size, size=(B, T)).astype(np.int32)
    pref = {"chosen_tokens": tokens, "chosen_mask": mask, "rejected_tokens": other,
            "rejected_mask": mask}
    pol, metrics = dpo_step(pol, parallel.shard_batch(local(pref), mesh), ref)
    _log(f"dpo loss {float(metrics['loss']):.6f}")
    record("dpo", pol.params)

    # ---------------------------------------------------------------- online loop
    maybe_die("loop")
    P, N, M, TARGET = 8, 2, 4, 7
    prompts = [rng.integers(1, config.vocab_size, size=int(rng.integers(2, 5))).tolist()
               for _ in range(P)]
    policy_params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x,
                                 init_params(config, jax.random.PRNGKey(4)))

    def pg_loss(params, batch, rng_, frozen):
        lp = token_log_probs(config, params, batch["tokens"])
        m = batch["response_mask"]
        return -jnp.sum(batch["advantages"][:, None] * lp * m) / jnp.maximum(m.sum(), 1.0), {
            "weight": m.sum()}

    def iterate(loop: OnlineLoop, k: int, key):
        ids = loop.pool.sample(P, host_rng(key))
        batch_prompts = [prompts[i] for i in ids]
        s = loop.sample(batch_prompts, N, key=key, temperature=1.0, max_new_tokens=M,
                        stop_on_eos=False)
        valid = np.arange(M)[None, None, :] < s.lengths[..., None]
        reward = ((s.tokens == TARGET) & valid).sum(-1) / np.maximum(s.lengths, 1)
        adv = (reward - reward.mean(axis=1, keepdims=True)).reshape(-1).astype(np.float32)
        packed = pack_rollout(batch_prompts, s.tokens, s.lengths, pad_id=0, width=T)
        old = loop.log_probs(packed["tokens"])
        metrics = loop.update({"tokens": packed["tokens"],
                               "response_mask": packed["response_mask"], "advantages": adv})
        loop.pool.record(ids, "mean_reward", reward.mean(axis=1))
        return {**metrics, "reward": float(reward.mean()),
                "old_logp": float((old * packed["response_mask"]).sum())}

    def make_loop():
        sampler = Sampler(config, policy_params, None, mesh=mesh, max_new_tokens=M,
                          min_prompt_bucket=8)
        return OnlineLoop.create(
            config, policy_params, mesh=mesh, sampler=sampler, optimizer=opt,
            loss_fn=pg_loss, seed=5, reference=True,
            pool=PromptPool.from_prompts([{"index": i} for i in range(P)]),
            checkpointer=Checkpointer(os.path.join(args.workdir, "loop"), save_every=1,
                                      keep=2),
            progress=False)

    loop = make_loop()
    history = loop.run(2, iterate)
    _log(f"loop rewards {[round(h['reward'], 4) for h in history]}")
    record("loop", loop.state.policy.params)
    loop.checkpointer.close()
    again = make_loop()
    assert again.restore() == 2
    for a, b in zip(jax.tree.leaves(to_host(again.state)), jax.tree.leaves(to_host(loop.state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.pool.state_dict() == loop.pool.state_dict()
    again.checkpointer.close()
    _log("loop checkpoint restored")

    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "params.npz"), **out)
        with open(os.path.join(args.out, "done.json"), "w") as f:
            json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                       "history": history}, f)
    _log("done")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"worker finished in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

"""Stage `smoke`: a real-model smoke test of the toolchain, every step timed.

On the `policy` and `tokenizer` of an earlier stage (a released checkpoint, stage `checkpoint`,
or an SFT policy), in order:

1. **sample**: `num_samples` continuations per prompt at `temperature` (nucleus `top_p`,
   PRNG key from the root seed), plus one greedy continuation, with `scalign.sampling.Sampler`.
   Plain-text prompts are [bos] + text; chat prompts (user messages) are rendered with the
   model family's template (`models.chat.render_chat`, e.g. Gemma's turn markers) and every row
   stops at the template's stop strings and stop ids (e.g. `<end_of_turn>`, `<eos>`).
2. **score**: a fresh scalar reward head on the same backbone (`heads.add_scalar_head`) scores
   each prompt + continuation by p = sigma(s_T) at its last token (`SequenceScorer`). The head
   is untrained, so the scores exercise the plumbing, not a preference.
3. **SFT step**: one `make_train_step` step of `objectives.sft` (token NLL on the response) on a
   batch of `batch_size` (prompt, continuation) records -- the best-scored sample of each
   prompt, as in best-of-N distillation -- built by `data.pipeline.make_sft_iterator`.
4. **reward-model step**: one step of `objectives.reward.make_reward_loss` (ORM: BCE at the last
   token, Cobbe et al. 2021) on `batch_size` sampled sequences. Labels need no task knowledge:
   y = 1 iff the sample's mean per-token log-probability under the policy,
   (1/n) sum_t log pi(x_t | x_<t), is at least the median over its prompt's samples
   (`likelihood_labels`), so (barring ties) both classes occur for every prompt when N >= 2.
5. **save / reload**: the SFT'd policy with `training.checkpoint.save_model`, reloaded with
   `load_model`; config equal and every param bitwise equal, or the stage fails. (The reward
   model's round trip, backbone plus scalar head, is the `reward_models` stage's hand-off; it is
   not repeated here to keep the run within minutes on a CPU.)
6. **export**: the SFT'd policy with `save_hf`; `config.json` and safetensors must exist. When
   `transformers` and `torch` are importable (dev dependencies), `AutoModelForCausalLM` loads the
   folder and its float32 logits on the first prompt + its greedy continuation are compared with
   ours (float32 compute): max-abs difference (must be <= `hf_atol`) and top-1 agreement.

The stage runs in a single process (any number of local devices).

`config.smoke`: prompts, chat_prompts, chat_template (default: the family's), num_samples,
temperature, top_p, max_new_tokens, batch_size (rows of each training batch; a multiple of
data*fsdp), learning_rate, train_dtype (params dtype of the two training steps; default the
policy's), hf_check (default True), hf_atol, show_chars (continuation characters in the report).

Results rows (`results["smoke"]["rows"]`), one measured number each:
  {"kind": "sample", "prompt_index", "prompt_kind", "decoding", "sample", "prompt",
   "continuation", "new_tokens", "stop_reason", "metric": "reward", "value"}
  {"kind": "timing", "step", "metric": "seconds", "value"}
  {"kind": "check", "step", "metric", "value"}
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from scalign import parallel
from scalign.data.pipeline import make_batch_iterator, make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.scoring import SequenceScorer
from scalign.models.chat import render_chat, template_for
from scalign.models.config import ModelConfig
from scalign.models.convert import save_hf
from scalign.models.heads import SCALAR_HEAD, init_scalar_head, scalar_head_logical_axes
from scalign.models.transformer import init_params, logits, param_logical_axes
from scalign.objectives.reward import RewardFeaturizer, make_reward_loss
from scalign.objectives.sft import make_sft_loss
from scalign.reporting import markdown_table
from scalign.sampling import SampleOutput, Sampler
from scalign.stages.base import Context, Stage, check_batch, register_stage, require_block
from scalign.training.checkpoint import load_model, save_model
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SmokePrompt:
    """One prompt: what the sampler sees (`ids`) and the SFT record's prompt text.

    `sft_text` is the prompt without BOS (the SFT featurizer adds it); for a chat prompt it is
    the rendered turn markup, whose marker pieces the tokenizer matches in text.
    """

    kind: str  # "text" | "chat"
    text: str
    ids: tuple[int, ...]
    sft_text: str


def build_prompts(cfg: ml_collections.ConfigDict, model: ModelConfig, tokenizer: Tokenizer
                  ) -> tuple[list[SmokePrompt], tuple[str, ...], tuple[int, ...]]:
    """(prompts, stop strings, stop ids): plain prompts first, then the rendered chat prompts.

    Stop strings / ids are those of the chat template (empty without chat prompts) plus the
    tokenizer's EOS id; they apply to every row.
    """
    prompts = [SmokePrompt("text", t, (tokenizer.bos_id, *tokenizer.encode(t)), t)
               for t in cfg.get("prompts", ()) or ()]
    stops: list[str] = []
    stop_ids: list[int] = [tokenizer.eos_id]
    chats = list(cfg.get("chat_prompts", ()) or ())
    if chats:
        template = cfg.get("chat_template") or template_for(model.family)
        for i, message in enumerate(chats):
            messages = [{"role": "user", "content": message}]
            chat = render_chat(messages, template)
            try:
                ids = chat.encode(tokenizer)
                ids_stop = chat.stop_ids(tokenizer)
            except KeyError as e:
                raise ValueError(f"config.smoke.chat_prompts[{i}]: the tokenizer cannot encode "
                                 f"the {template!r} chat template ({e}); drop chat_prompts or "
                                 f"set config.smoke.chat_template") from e
            sft_text = render_chat(messages, template, add_bos=False).text
            prompts.append(SmokePrompt("chat", chat.text, tuple(ids), sft_text))
            stops += [s for s in chat.stop_strings if s not in stops]
            stop_ids += [s for s in ids_stop if s not in stop_ids]
    return prompts, tuple(stops), tuple(stop_ids)


def likelihood_labels(model_logprobs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Task-free binary labels for N samples of each of P prompts: float32 [P, N].

        m[p, j] = (1 / n_pj) sum_{t < n_pj} log pi(x_t | x_<t)      (n_pj = lengths[p, j])
        y[p, j] = 1  iff  m[p, j] >= median_j m[p, :]

    i.e. a sample is "preferred" when the policy finds it at least as likely per token as its
    median sibling. `model_logprobs` [P, N, M] are 0 past each row's length.
    """
    mean = model_logprobs.sum(-1) / np.maximum(lengths, 1)
    return (mean >= np.median(mean, axis=1, keepdims=True)).astype(np.float32)


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def tree_bitwise_equal(a: Any, b: Any) -> bool:
    """Same tree structure, and every leaf has the same shape, dtype and bytes."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)):
            return False
    return True


@jax.jit
def _update_norm(new: Any, old: Any) -> jax.Array:
    """||new - old||_2 over the whole tree (float32)."""
    return optax.tree.norm(jax.tree.map(
        lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new, old))


def hf_logits_check(folder: epath.Path, model: ModelConfig, params: Any,
                    ids: Sequence[int]) -> dict[str, float] | None:
    """Our float32 logits vs `transformers.AutoModelForCausalLM` on the exported folder.

    Returns {max_abs_diff, top1_agreement, max_abs_logit} on `ids`, or None when transformers
    or torch is not importable (they are dev dependencies).
    """
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "torch")):
        return None
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()
    del hf
    fwd = jax.jit(functools.partial(logits, model.replace(dtype="float32")))
    ours = np.asarray(fwd(params, jnp.asarray([list(ids)], jnp.int32)))[0]
    return {"max_abs_diff": float(np.abs(ours - ref).max()),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs_logit": float(np.abs(ref).max())}


class _Clock:
    """Wall-clock seconds per named step, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        self.seconds[name] = time.perf_counter() - t0
        return out


@register_stage
class SmokeStage(Stage):
    name = "smoke"
    requires = {"policy": ("checkpoint", "sft"), "tokenizer": ("checkpoint", "data")}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        before = len(errors)
        cfg = require_block(config, "smoke", ("num_samples", "temperature", "max_new_tokens",
                                              "batch_size", "learning_rate"), errors)
        if cfg is None or len(errors) > before:
            return
        if not (cfg.get("prompts") or cfg.get("chat_prompts")):
            errors.append("config.smoke.prompts and config.smoke.chat_prompts are both empty; "
                          "give at least one prompt")
        if cfg.num_samples < 1:
            errors.append(f"config.smoke.num_samples={cfg.num_samples} must be >= 1")
        if cfg.temperature <= 0:
            errors.append(f"config.smoke.temperature={cfg.temperature} must be > 0 (a greedy "
                          f"continuation is always added)")
        if not 0 < cfg.get("top_p", 1.0) <= 1:
            errors.append(f"config.smoke.top_p={cfg.get('top_p')} must be in (0, 1]")
        if cfg.max_new_tokens < 1:
            errors.append(f"config.smoke.max_new_tokens={cfg.max_new_tokens} must be >= 1")
        if cfg.learning_rate <= 0:
            errors.append(f"config.smoke.learning_rate={cfg.learning_rate} must be > 0")
        check_batch(errors, "smoke.batch_size", int(cfg.batch_size), mesh_shape)
        if jax.process_count() > 1:
            errors.append(f"stage smoke runs in one process (it compares host copies of the "
                          f"params); this run has {jax.process_count()}")
        dtype = cfg.get("train_dtype")
        if dtype is not None and dtype not in DTYPES:
            errors.append(f"config.smoke.train_dtype must be one of {DTYPES} or None, "
                          f"got {dtype!r}")

    # ------------------------------------------------------------------ run
    def run(self, ctx: Context) -> None:
        cfg = ctx.config.smoke
        model, params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        out_dir = ctx.stage_dir(self.name)
        clock = _Clock()
        checks: list[dict[str, Any]] = []
        prompts, stops, stop_ids = build_prompts(cfg, model, tokenizer)
        P, N, M = len(prompts), int(cfg.num_samples), int(cfg.max_new_tokens)
        temperature, top_p = float(cfg.temperature), float(cfg.get("top_p", 1.0))

        # 1. sample ---------------------------------------------------------------
        sampler = clock.run("sampler_init", lambda: Sampler(
            model, params, tokenizer, mesh=ctx.mesh, max_new_tokens=M, eos_ids=stop_ids))
        ids = [list(p.ids) for p in prompts]
        sampled: SampleOutput = clock.run("sample", lambda: sampler.generate_ids(
            ids, N, key=ctx.key(self.name, "sample"), temperature=temperature, top_p=top_p,
            stop_strings=stops))
        greedy: SampleOutput = clock.run("sample_greedy", lambda: sampler.generate_ids(
            ids, 1, temperature=0.0, stop_strings=stops))
        checks += [{"step": "sample", "metric": "new_tokens", "value": int(sampled.lengths.sum())},
                   {"step": "sample_greedy", "metric": "new_tokens",
                    "value": int(greedy.lengths.sum())}]

        # 2. score with a fresh scalar head -----------------------------------------
        head = init_scalar_head(model, ctx.key(self.name, "head"))
        seqs = {(kind, p, j): np.asarray(prompts[p].ids + tuple(out.tokens[p, j,
                                                                          :out.lengths[p, j]]))
                for kind, out in (("sampled", sampled), ("greedy", greedy))
                for p in range(P) for j in range(out.tokens.shape[1])}
        scorer = clock.run("scorer_init", lambda: SequenceScorer(
            model, {**params, SCALAR_HEAD: head}, ctx.mesh, batch_size=len(seqs),
            pad_id=tokenizer.pad_id))
        keys = list(seqs)
        probs = clock.run("score", lambda: scorer.score([seqs[k] for k in keys], progress=False))
        reward = {k: float(pr[-1]) for k, pr in zip(keys, probs, strict=True)}

        # 3. one SFT step on the best-scored sample per prompt ----------------------
        train_dtype = jnp.dtype(cfg.get("train_dtype") or model.param_dtype)
        train_model = model.replace(param_dtype=train_dtype.name)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=float(cfg.learning_rate),
                                                   total_steps=1, schedule="constant"))
        batch_size = int(cfg.batch_size)
        best = [max(range(N), key=lambda j, p=p: reward[("sampled", p, j)]) for p in range(P)]
        sft_records = [{"prompt": prompts[p].sft_text, "response": sampled.texts[p][best[p]]}
                       for p in range(P)]
        sft_len = round_up(max(len(tokenizer.encode(r["prompt"])) + len(tokenizer.encode(
            r["response"])) + 2 for r in sft_records), 8)
        sft_batch = next(make_sft_iterator(sft_records, tokenizer, batch_size=batch_size,
                                           seq_len=sft_len, seed=int(ctx.config.seed)))
        sft_params, sft_metrics = self._one_step(
            ctx, clock, "sft_step", train_model, make_sft_loss(train_model),
            _cast_copy(params, train_dtype), param_logical_axes(model), sft_batch, optimizer,
            reference=params)
        checks += [{"step": "sft_step", "metric": k, "value": v} for k, v in sft_metrics.items()]

        # 4. one reward-model step: ORM BCE at the last token ------------------------
        labels = likelihood_labels(sampled.model_logprobs, sampled.lengths)
        rm_records = [{"tokens": seqs[("sampled", p, j)],
                       "final_position": len(seqs[("sampled", p, j)]) - 1,
                       "outcome": float(labels[p, j])}
                      for p in range(P) for j in range(N)]
        rm_len = round_up(max(len(r["tokens"]) for r in rm_records), 8)
        rm_batch = next(make_batch_iterator(
            rm_records, RewardFeaturizer(pad_id=tokenizer.pad_id, kind="orm"),
            batch_size=batch_size, seq_len=rm_len, seed=int(ctx.config.seed)))
        rm_init = {**_cast_copy(params, train_dtype),
                   SCALAR_HEAD: jax.tree.map(lambda x: x.astype(train_dtype), head)}
        rm_axes = {**param_logical_axes(model), SCALAR_HEAD: scalar_head_logical_axes()}
        rm_params, rm_metrics = self._one_step(
            ctx, clock, "rm_step", train_model, make_reward_loss(train_model), rm_init,
            rm_axes, rm_batch, optimizer, reference={**params, SCALAR_HEAD: head})
        checks += [{"step": "rm_step", "metric": k, "value": v} for k, v in rm_metrics.items()]
        checks.append({"step": "rm_step", "metric": "positive_labels",
                       "value": float(rm_batch["labels"].sum())})

        # 5. save and reload, bitwise ----------------------------------------------
        policy_dir = out_dir / "policy"
        clock.run("save_model", lambda: save_model(
            policy_dir, train_model, sft_params, {"stage": self.name, "after": "one SFT step"}))
        cfg_back, params_back, _ = clock.run("load_model", lambda: load_model(policy_dir))
        same = cfg_back == train_model and tree_bitwise_equal(sft_params, params_back)
        checks.append({"step": "reload", "metric": "policy_bitwise_equal", "value": float(same)})
        if not same:
            raise RuntimeError(f"smoke: the policy reloaded from {policy_dir} differs from what "
                               f"was saved (config or params not bitwise equal)")
        del params_back, rm_params

        # 6. export to HF and compare with transformers -------------------------------
        hf_dir = out_dir / "hf"
        clock.run("save_hf", lambda: save_hf(train_model, sft_params, hf_dir))
        files = sorted(p.name for p in hf_dir.iterdir())
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            raise RuntimeError(f"smoke: save_hf wrote {files} to {hf_dir}; expected config.json "
                               f"and *.safetensors")
        checks.append({"step": "save_hf", "metric": "files", "value": len(files)})
        hf_ids = list(prompts[0].ids) + list(greedy.tokens[0, 0, :greedy.lengths[0, 0]])
        hf_result, hf_note = None, "HF load + logits check disabled (config.smoke.hf_check)"
        if cfg.get("hf_check", True):
            hf_result = clock.run("hf_load_and_logits", lambda: hf_logits_check(
                hf_dir, train_model, sft_params, hf_ids))
            hf_note = (f"HF check: `AutoModelForCausalLM` on the export vs our float32 logits "
                       f"over {len(hf_ids)} tokens (first prompt + its greedy continuation)"
                       if hf_result is not None else
                       "transformers/torch not importable: HF load + logits check skipped")
        if hf_result is None:
            clock.seconds.pop("hf_load_and_logits", None)
            checks.append({"step": "hf_check", "metric": "skipped", "value": 1.0})
        else:
            checks += [{"step": "hf_check", "metric": k, "value": v}
                       for k, v in hf_result.items()]
            atol = float(cfg.get("hf_atol", 2e-3))
            if not hf_result["max_abs_diff"] <= atol:
                raise RuntimeError(
                    f"smoke: transformers' logits on the exported model differ from ours by "
                    f"{hf_result['max_abs_diff']:.3g} > config.smoke.hf_atol={atol:g}")

        self._finish(ctx, model, prompts, sampled, greedy, reward, checks, clock, hf_note,
                     temperature, top_p)

    def load(self, ctx: Context) -> None:
        pass  # no artifacts: results, report section and saved models are on disk

    # ------------------------------------------------------------------ helpers
    def _one_step(self, ctx: Context, clock: _Clock, name: str, model: ModelConfig,
                  loss_fn: Callable, params: Any, logical_axes: Any, batch: dict[str, Any],
                  optimizer: optax.GradientTransformation, reference: Any
                  ) -> tuple[Any, dict[str, float]]:
        """Build the sharded train state, compile and run one step: (new params, metrics).

        `params` are donated to the step; metrics add `update_norm` = ||new - reference||_2.
        """
        seed = int(jax.random.randint(ctx.key(self.name, name), (), 0, 2**31 - 1))
        state, st_sh = clock.run(f"{name}_init_state", lambda: init_train_state(
            functools.partial(init_params, model), logical_axes, optimizer, ctx.mesh, seed=seed,
            params=params))
        step = make_train_step(loss_fn, optimizer, ctx.mesh, state_sharding=st_sh)
        device_batch = parallel.shard_batch(batch, ctx.mesh)
        compiled = clock.run(f"{name}_compile", lambda: step.lower(state, device_batch).compile())
        state, metrics = clock.run(f"{name}_run", lambda: compiled(state, device_batch))
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "weight"}
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"smoke: {name} produced non-finite metrics {bad}")
        scalars["update_norm"] = float(clock.run(f"{name}_update_norm", lambda: _update_norm(
            state.params, reference)))
        return state.params, scalars

    def _finish(self, ctx: Context, model: ModelConfig, prompts: list[SmokePrompt],
                sampled: SampleOutput, greedy: SampleOutput, reward: dict, checks: list[dict],
                clock: _Clock, hf_note: str, temperature: float, top_p: float) -> None:
        cfg = ctx.config.smoke
        decoding = f"temperature={temperature:g}" + (f",top_p={top_p:g}" if top_p < 1 else "")
        sample_rows = []
        for kind, out, dec in (("greedy", greedy, "greedy"), ("sampled", sampled, decoding)):
            for p, prompt in enumerate(prompts):
                for j in range(out.tokens.shape[1]):
                    sample_rows.append({
                        "kind": "sample", "prompt_index": p, "prompt_kind": prompt.kind,
                        "decoding": dec, "sample": j, "prompt": prompt.text,
                        "continuation": out.texts[p][j], "new_tokens": int(out.lengths[p, j]),
                        "stop_reason": str(out.stop_reason[p, j]), "metric": "reward",
                        "value": reward[(kind, p, j)]})
        timing_rows = [{"kind": "timing", "step": k, "metric": "seconds", "value": v}
                       for k, v in clock.seconds.items()]
        check_rows = [{"kind": "check", **c} for c in checks]
        ctx.results.set_rows(self.name, sample_rows + check_rows + timing_rows)

        show = int(cfg.get("show_chars", 160))
        table = [{"#": r["prompt_index"], "prompt": _cell(r["prompt"], 60),
                  "decoding": r["decoding"].split(",")[0], "continuation":
                  _cell(r["continuation"], show), "tokens": r["new_tokens"],
                  "stop": r["stop_reason"], "reward p": r["value"]} for r in sample_rows]
        load = ctx.timings.get("checkpoint")
        timings = ([{"step": "checkpoint (load, earlier stage)", "seconds": load}]
                   if load is not None else [])
        timings += [{"step": k, "seconds": v} for k, v in clock.seconds.items()]
        timings.append({"step": "total (this stage)", "seconds": sum(clock.seconds.values())})
        check_table = [{**c, "value": f"{c['value']:.4g}"} for c in checks]
        md = [f"## Real-model smoke test: {model.describe()}", "",
              f"{len(prompts)} prompts x {int(cfg.num_samples)} samples ({decoding}) + greedy, "
              f"at most {int(cfg.max_new_tokens)} new tokens; rewards p = sigma(s) at the last "
              f"token from a fresh (untrained) scalar head on the same backbone. One SFT step "
              f"on the best-scored sample per prompt and one ORM step (label: the sample's mean "
              f"token log-prob >= its prompt's median), batch {int(cfg.batch_size)}; the "
              f"SFT'd policy saved, reloaded and compared bitwise, and exported with "
              f"`save_hf`. {hf_note}.", "",
              markdown_table(table, ["#", "prompt", "decoding", "continuation", "tokens", "stop",
                                     "reward p"]), "",
              "Checks:", "", markdown_table(check_table, ["step", "metric", "value"]), "",
              "Timings (wall clock, compile included where a step compiles):", "",
              markdown_table(timings, ["step", "seconds"], digits=1), ""]
        ctx.report.set_section(self.name, "\n".join(md))


def _cast_copy(params: Any, dtype: jnp.dtype) -> Any:
    """Fresh buffers in `dtype` (the train step donates its state; the policy must survive)."""
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else jnp.copy(x), params)


def _cell(text: str, limit: int) -> str:
    """Text for a markdown table cell: newlines shown as ⏎, pipes escaped, cut to `limit`."""
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"

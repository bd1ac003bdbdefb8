"""Can the tiny PRM learn the last-step check at all? (2026-12-04)

    PYTHONPATH=src .venv/bin/python experiments/studies/prm_last_step_probe.py \
        [PRM_STEPS] [LR] [BACKBONE policy|blind] [N_LAYERS]

 Synthetic policy-like failures:
gold easy solutions (positive) vs the same with the last step's operation changed while the
written result stays the target (negative, like the policy's failures). Backbone SFT'd on easy
gold (1200 steps), PRM trained on these records, AUC of the last step on hard test problems.

Measured (1500 PRM steps of 64, lr 2e-3, 12,000 easy records, half of them failures; shared
2-core CPU): last-step ROC-AUC, easy test / hard test: 0.62 / 0.64 at 250 steps, 0.70 / 0.65 at
500, 0.82 / 0.69 at 750, 0.83 / 0.65 at 1000, 0.83 / 0.68 at 1250, 0.83 / 0.68 at 1500.
So the check is learnable from balanced, policy-like failures on easy problems, slowly, and it
transfers only partly to hard ones (more "?" before the last step). The pipeline's PRM sees
fewer, unbalanced examples of this failure and reaches 0.62 on easy.
"""

import functools
import sys
import time

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.reward_labels import prm_record, score_positions
from scalign.data import stepmath
from scalign.data.pipeline import make_batch_iterator, make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.rerank import roc_auc
from scalign.evaluation.scoring import SequenceScorer
from scalign.models import init_params, param_logical_axes, presets
from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
from scalign.objectives.reward import RewardFeaturizer, make_reward_loss
from scalign.objectives.sft import make_sft_loss
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step

PRM_STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 2e-3
# "policy": the backbone SFT'd on the gold demonstrations as the policy sees them; "blind": on
# the same demonstrations with the goal hidden (`Problem.blind_prompt`), so it computes every
# step's result instead of copying the target into the last one
BACKBONE = sys.argv[3] if len(sys.argv) > 3 else "policy"
N_LAYERS = int(sys.argv[4]) if len(sys.argv) > 4 else 3


def solution(p, rng, bad):
    ops = list(p.ops)
    if bad:  # another op at the last step, result written as the target anyway
        ops[-1] = str(
            rng.choice(
                [
                    o
                    for o in stepmath.OPS
                    if o != p.ops[-1]
                    and stepmath.apply_op(p.values[-2], o, p.operands[-1], p.modulus) != p.target
                ]
                or ["+"]
            )
        )
    v, steps = p.start, []
    for k, (op, b) in enumerate(zip(ops, p.operands, strict=True)):
        c = stepmath.apply_op(v, op, b, p.modulus)
        if k == len(ops) - 1:
            c = p.target
        steps.append(stepmath.format_step(v, op, b, c))
        v = c
    return stepmath.STEP_DELIMITER.join(
        [
            *steps,
            stepmath.ANSWER_HEADER,
            stepmath.format_expression(p.start, ops, p.operands, spaced=False),
        ]
    )


def records(problems, tok, rng):
    tb = tok.token_bytes()
    out = []
    for p in problems:
        text = solution(p, rng, rng.random() < 0.5)
        pos = score_positions(
            tb,
            tok.encode(p.prompt, add_bos=True),
            tok.encode(text),
            text,
            stepmath.split_solution(text),
        )
        r = prm_record(
            pos, stepmath.verify(p, text), after_first_error="drop", level=p.level, uid=p.uid
        )
        if r:
            out.append(r)
    return out


rng = np.random.default_rng(0)
spl = stepmath.splits(
    [1, 2, 3, 4, 5], {1: 4000, 2: 4000, 3: 4000, 4: 0, 5: 0}, 200, seed=0, design="reach4"
)
easy = [p for lv in (1, 2, 3) for p in spl[lv].train]
hard = [p for lv in (4, 5) for p in spl[lv].test]
tok = Tokenizer.train(
    [p.prompt + p.solution for p in easy], None, vocab_size=96, user_defined_symbols=("\n\n",)
)
train, test = records(easy, tok, rng), records(hard, tok, rng)
easy_test = records([p for lv in (1, 2, 3) for p in spl[lv].test], tok, rng)
model = presets.tiny(tok.vocab_size).replace(n_layers=N_LAYERS)
mesh = parallel.single_device_mesh()
t = time.time()
opt = make_optimizer(
    OptimizerConfig.from_config(
        {"learning_rate": 1e-3, "warmup_steps": 50, "total_steps": 1200, "min_lr_ratio": 0.05}
    )
)
state, sh = init_train_state(
    functools.partial(init_params, model), param_logical_axes(model), opt, mesh, seed=0
)
step = make_train_step(make_sft_loss(model), opt, mesh, state_sharding=sh)
sft_records = [stepmath.to_record(p) for p in easy]
if BACKBONE == "blind":
    sft_records = [{**r, "prompt": p.blind_prompt} for r, p in zip(sft_records, easy, strict=True)]
it = make_sft_iterator(sft_records, tok, batch_size=16, seq_len=64, seed=0)
for _ in range(1200):
    state, m = step(state, parallel.shard_batch(next(it), mesh))
print("sft", time.time() - t, float(m["loss"]), flush=True)
params = add_scalar_head(model, jax.device_get(state.params), jax.random.PRNGKey(1))
opt = make_optimizer(
    OptimizerConfig.from_config({"learning_rate": LR, "warmup_steps": 20, "total_steps": PRM_STEPS})
)
axes = {**param_logical_axes(model), SCALAR_HEAD: scalar_head_logical_axes()}
state, sh = init_train_state(lambda k: params, axes, opt, mesh, seed=0, params=params)
step = make_train_step(make_reward_loss(model), opt, mesh, state_sharding=sh)
it = make_batch_iterator(
    train, RewardFeaturizer(pad_id=tok.pad_id, kind="prm"), batch_size=64, seq_len=72, seed=0
)


def evaluate(tag):
    sc = SequenceScorer(model, state.params, mesh, pad_id=tok.pad_id, batch_size=256)
    for name, recs in (("easy", easy_test), ("hard", test)):
        probs = sc.score([np.asarray(r["tokens"]) for r in recs], progress=False)
        y = [r["step_labels"][3] for r in recs if len(r["step_labels"]) == 4]
        s = [
            float(pr[r["step_end_positions"][3]])
            for r, pr in zip(recs, probs, strict=True)
            if len(r["step_labels"]) == 4
        ]
        print(
            tag,
            name,
            "last-step AUC",
            round(roc_auc(y, s), 3),
            "n",
            len(y),
            "pos",
            round(float(np.mean(y)), 3),
            flush=True,
        )


for i in range(PRM_STEPS):
    state, m = step(state, parallel.shard_batch(next(it), mesh))
    if (i + 1) % 250 == 0:
        print("prm step", i + 1, float(m["loss"]), round(time.time() - t), flush=True)
        evaluate(f"@{i + 1}")

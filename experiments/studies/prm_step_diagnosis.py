"""Where does an easy-trained PRM fail? ROC-AUC and mean score per step index, on fresh samples.

    PYTHONPATH=src .venv/bin/python experiments/studies/prm_step_diagnosis.py WORKDIR [1,4,5]

WORKDIR is a run with stages data, sft and reward_models (PRM). For each level, 60 test
problems x 16 policy samples (T=1) are verified and scored by the PRM at the step ends
(`score_positions`); per step index k: the label rate, ROC-AUC and the mean score of positive /
negative steps (steps up to the first wrong one, the PRM800K labelling), and the answer-token
score against outcome correctness; then three failing samples per level. The pooled step AUC of
the rerank stage hides a step index whose scores are flat: this prints it.
Results of 2026-12-04: `experiments/results/e2h_reach4_evaluators_2026-12-04/`.
"""
import collections
import sys

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.reward_labels import score_positions
from scalign.data.domain import load_domain
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.generation import sample_solutions
from scalign.evaluation.rerank import roc_auc
from scalign.evaluation.scoring import SequenceScorer
from scalign.sampling import Sampler
from scalign.training.checkpoint import load_model


def per_step(pos, verdicts, scores):
    """{step index: (labels, scores)} up to the first wrong step, and (outcomes, answer scores)."""
    by = collections.defaultdict(lambda: ([], []))
    answers = ([], [])
    for p, v, s in zip(pos, verdicts, scores, strict=True):
        labels = list(v.step_labels)
        for k, q in enumerate(p.step_positions[:len(labels)]):
            by[k][0].append(labels[k])
            by[k][1].append(float(s[q]))
            if labels[k] == 0:
                break
        if p.answer_position is not None:
            answers[0].append(int(v.outcome_correct))
            answers[1].append(float(s[p.answer_position]))
    return by, answers


def _auc(y, s):
    y = np.asarray(y)
    return roc_auc(list(y), list(s)) if 0 < y.mean() < 1 else float("nan")


def main(wd: str, levels: list[int], problems: int = 60, n: int = 16) -> None:
    tok = Tokenizer.load(f"{wd}/stages/data/tokenizer.model")
    dom = load_domain(f"{wd}/stages/data/domain")
    mesh = parallel.single_device_mesh()
    pm, pp, _ = load_model(f"{wd}/stages/sft/policy")
    rm, rp, _ = load_model(f"{wd}/stages/reward_models/prm")
    sampler = Sampler(pm, pp, tok, mesh=mesh, max_new_tokens=40)
    scorer = SequenceScorer(rm, rp, mesh, pad_id=tok.pad_id, batch_size=256)
    tb = tok.token_bytes()
    for lv in levels:
        probs = list(dom.test_problems(lv))[:problems]
        sols = sample_solutions(sampler, dom, probs, n=n, key=jax.random.PRNGKey(lv),
                                temperature=1.0, max_new_tokens=40, batch_rows=512, desc="s",
                                progress=False)
        pos, ver, texts = [], [], []
        for i in range(len(probs)):
            for j in range(n):
                t = sols.texts[i][j]
                pos.append(score_positions(tb, sols.prompt_ids[i], sols.response_ids(i, j), t,
                                           dom.parse(t)))
                ver.append(sols.verdicts[i][j])
                texts.append((probs[i].question, t))
        by, answers = per_step(pos, ver, scorer.score([p.tokens for p in pos], progress=False))
        print(f"L{lv}: outcome rate {np.mean([v.outcome_correct for v in ver]):.3f}")
        for k in sorted(by):
            y, s = map(np.array, by[k])
            pos_s = s[y == 1].mean() if (y == 1).any() else float("nan")
            neg_s = s[y == 0].mean() if (y == 0).any() else float("nan")
            print(f"  step {k}: n={len(y)} positive rate={y.mean():.3f} AUC={_auc(y, s):.3f} "
                  f"mean score | positive {pos_s:.3f} | negative {neg_s:.3f}")
        print(f"  answer token: n={len(answers[0])} outcome rate={np.mean(answers[0]):.3f} "
              f"AUC={_auc(*answers):.3f}")
        bad = [(q, t, list(v.step_labels)) for (q, t), v in zip(texts, ver, strict=True)
               if 0 in list(v.step_labels)][:3]
        for q, t, labels in bad:
            print(f"    e.g. {q!r} -> {t[:70]!r} labels {labels}")


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,4,5").split(",")])

"""Has a PRM fitted the last-step check? Gold solutions vs `operation_forward` corruptions.

    PYTHONPATH=src .venv/bin/python experiments/studies/prm_augment_fit_check.py WORKDIR...

For the first 300 train and test problems of each level: the gold solution and one
`failure_augment.corrupt(..., "operation_forward")` text (a "?" operation changed, later steps
computed, the last step's result written as the target: the policy's failure), kept when the
verifier passes steps 0-2, so the pair differs only in whether "x op b = target" holds. Prints
the ROC-AUC of the PRM's last-step score against the verifier's last-step label. On levels 1-3
train problems this is (a sample of) what an augmented PRM was fitted on: an AUC near 0.5 there
means the PRM has not fitted the check, before any question of easy-to-hard transfer.
Results of 2026-12-04: `experiments/results/e2h_prm_augment_2026-12-04/README.md`.
"""
import sys

import numpy as np

from scalign import parallel
from scalign.algorithms.failure_augment import corrupt
from scalign.algorithms.reward_labels import score_positions
from scalign.data import stepmath
from scalign.data.domain import load_domain
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.rerank import roc_auc
from scalign.evaluation.scoring import SequenceScorer
from scalign.training.checkpoint import load_model

for wd in sys.argv[1:]:
    tok = Tokenizer.load(f"{wd}/stages/data/tokenizer.model")
    dom = load_domain(f"{wd}/stages/data/domain")
    rm, rp, _ = load_model(f"{wd}/stages/reward_models/prm")
    sc = SequenceScorer(rm, rp, parallel.single_device_mesh(), pad_id=tok.pad_id, batch_size=256)
    rng = np.random.default_rng(0)
    tb = tok.token_bytes()
    for split in ("train", "test"):
        for lv in (1, 2, 3, 4, 5):
            probs = list(dom.train_problems(lv) if split == "train"
                         else dom.test_problems(lv))[:300]
            if not probs:
                continue
            ys, toks, poss = [], [], []
            for p in probs:
                for text in (p.solution, corrupt(p, p.ops, "operation_forward", rng)):
                    v = stepmath.verify(p, text)
                    if v.step_labels[:3] != (1, 1, 1):
                        continue
                    pi, ci = tok.encode_continuation(p.prompt, text)
                    pos = score_positions(tb, pi, ci + [tok.eos_id], text,
                                          stepmath.split_solution(text))
                    ys.append(v.step_labels[3])
                    toks.append(pos.tokens)
                    poss.append(pos.step_positions[3])
            probs_ = sc.score(toks, progress=False)
            s = [float(pr[q]) for pr, q in zip(probs_, poss, strict=True)]
            print(wd.split("/")[-1], split, f"L{lv}", "n", len(ys), "pos rate",
                  round(np.mean(ys), 3), "last-step AUC", round(roc_auc(ys, s), 3), flush=True)

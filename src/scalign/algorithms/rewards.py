"""Reward functions for the RL algorithms: a domain's verifier plus, optionally, a PRM.

    pool, problems = problem_pool(domain, tokenizer, {1: easy, 4: hard}, supervised_levels=(1, 2, 3))
    reward_fn = DomainReward(domain, tokenizer, problems, supervised_levels=(1, 2, 3),
                             prm=SequenceScorer(prm_config, prm_params, mesh))
    algo = PPO(rollout_spec, reward_fn, RewardSpec(use_prm=True))

`DomainReward` is a `rollout.RewardFn`: for each sampled completion it decodes the text, asks the
domain's verifier for the outcome (used only on problems of the supervised levels: the premise of
easy-to-hard generalization is that hard problems' answers are never read), finds whether an
answer section exists (else the stop penalty applies), and with a PRM reads each step's score
sigma(v) at the step's delimiter token, exactly where `stages.rerank` reads it
(`algorithms.reward_labels.score_positions`). That token is where `min`-shaped step rewards land.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scalign.algorithms.loop import PromptPool
from scalign.algorithms.reward_labels import score_positions
from scalign.algorithms.rollout import RolloutScores


def problem_pool(domain: Any, tokenizer: Any, problems_by_level: Mapping[int, Sequence[Any]], *,
                 supervised_levels: Sequence[int]) -> tuple[PromptPool, dict[str, Any]]:
    """A `PromptPool` of the problems ({"uid", "level", "easy", "prompt_ids"} each, prompts
    encoded with bos) and the uid -> problem map a `DomainReward` looks them up in."""
    entries, problems = [], {}
    for level, items in sorted(problems_by_level.items()):
        for i, problem in enumerate(items):
            uid = f"L{int(level)}:{i}"
            problems[uid] = problem
            entries.append({"uid": uid, "level": int(level),
                            "easy": int(level) in set(supervised_levels),
                            "prompt_ids": tokenizer.encode(domain.prompt(problem), add_bos=True)})
    return PromptPool.from_prompts(entries), problems


class DomainReward:
    """`RewardFn` from a domain's verifier (answers of supervised levels only) and a PRM.

    Args:
      domain: a `data.domain.Domain` (`verify`, `parse`).
      tokenizer: decodes completions when the sampler gave no texts; its `token_bytes` map the
        step ends to tokens.
      problems: uid -> problem (see `problem_pool`); pool payloads carry "uid" and "level".
      supervised_levels: levels whose answers may be used (easy); other problems get NaN.
      prm: an `evaluation.scoring.SequenceScorer` of the PRM, or None (answers only).
    """

    def __init__(self, domain: Any, tokenizer: Any, problems: Mapping[str, Any], *,
                 supervised_levels: Sequence[int], prm: Any = None):
        self.domain = domain
        self.tokenizer = tokenizer
        self.problems = dict(problems)
        self.supervised = {int(lv) for lv in supervised_levels}
        self.prm = prm
        self._token_bytes = tokenizer.token_bytes() if prm is not None else None

    def _text(self, out: Any, p: int, j: int) -> str:
        if out.texts is not None:
            return out.texts[p][j]
        return self.tokenizer.decode(out.tokens[p, j, :int(out.lengths[p, j])])

    def __call__(self, data: list[dict[str, Any]], out: Any) -> RolloutScores:
        P, N, M = out.tokens.shape
        correct = np.full((P, N), np.nan)
        has_answer = np.zeros((P, N), bool)
        positions = []
        for p, d in enumerate(data):
            problem = self.problems[d["uid"]]
            easy = int(d["level"]) in self.supervised
            for j in range(N):
                text = self._text(out, p, j)
                parsed = self.domain.parse(text)
                has_answer[p, j] = parsed.answer is not None
                if easy:
                    correct[p, j] = float(bool(self.domain.verify(problem, text).outcome_correct))
                if self.prm is not None:
                    response = out.tokens[p, j, :int(out.lengths[p, j])]
                    positions.append(score_positions(self._token_bytes, d["prompt_ids"],
                                                     response, text, parsed))
        if self.prm is None:
            return RolloutScores(correct=correct, has_answer=has_answer)
        probs = self.prm.score([pos.tokens for pos in positions], progress=False)
        S = max([len(pos.step_positions) for pos in positions] + [1])
        step_scores = np.zeros((P, N, S))
        step_mask = np.zeros((P, N, S))
        delimiters = np.full((P, N, M), -1, np.int32)
        for r, (pos, pr) in enumerate(zip(positions, probs, strict=True)):
            p, j = divmod(r, N)
            start = len(data[p]["prompt_ids"])
            for s, t in enumerate(pos.step_positions):
                step_scores[p, j, s] = float(pr[t])
                step_mask[p, j, s] = 1.0
                if delimiters[p, j, t - start] < 0:  # two steps on one token: the first wins
                    delimiters[p, j, t - start] = s
        return RolloutScores(correct=correct, has_answer=has_answer, step_scores=step_scores,
                             step_mask=step_mask, delimiters=delimiters)


# ============================================================================ eva's rewards
class VerifierReward:
    """eva's reward in the synthetic domain from the stepmath verifier, [P, K] in [0, 1]:

        r = 0.5 * 1{answer correct} + 0.5 * (steps in the valid prefix) / (steps expected)

    (the prefix share is `Verdict.num_leading_correct / num_expected_steps`, capped at 1), so a
    half-right chain ranks above a wrong one and pairs exist below full accuracy. Items are
    `stepmath.to_record` dicts (seed or evolved prompts: the gold answer is the problem's own).
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    @staticmethod
    def score_text(problem: Any, text: str) -> float:
        from scalign.data import stepmath

        v = stepmath.verify(problem, text)
        prefix = min(1.0, v.num_leading_correct / max(1, v.num_expected_steps))
        return 0.5 * float(bool(v.outcome_correct)) + 0.5 * prefix

    def __call__(self, items: Sequence[dict[str, Any]], out: Any) -> np.ndarray:
        from scalign.data import stepmath

        P, K = np.asarray(out.lengths).shape
        r = np.zeros((P, K))
        for p, item in enumerate(items):
            problem = stepmath.from_record(item)
            for j in range(K):
                r[p, j] = self.score_text(problem, _text(out, self.tokenizer, p, j))
        return r


class PRMReward:
    """eva x easy-to-hard: the reward of a completion is the easy-trained PRM's MINIMUM step
    score sigma(v) over its steps (Lightman et al. 2023's `min` aggregation; read at each step's
    delimiter token exactly as `DomainReward` and `stages.rerank` read it); a completion with
    no step gets 0. No gold answer is read, on any level.

    Args:
      scorer: an `evaluation.scoring.SequenceScorer` of the PRM.
      tokenizer: the policy's tokenizer (its `token_bytes` map step ends to tokens).
      encode: item -> prompt ids (as the solver saw them, bos included).
    """

    def __init__(self, scorer: Any, tokenizer: Any, encode: Any):
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.encode = encode
        self._token_bytes = tokenizer.token_bytes()

    def __call__(self, items: Sequence[dict[str, Any]], out: Any) -> np.ndarray:
        from scalign.data import stepmath

        P, K = np.asarray(out.lengths).shape
        positions = []
        for p, item in enumerate(items):
            prompt_ids = list(self.encode(item))
            for j in range(K):
                text = _text(out, self.tokenizer, p, j)
                response = out.tokens[p, j, :int(out.lengths[p, j])]
                positions.append(score_positions(self._token_bytes, prompt_ids, response, text,
                                                 stepmath.split_solution(text)))
        probs = self.scorer.score([pos.tokens for pos in positions], progress=False)
        r = np.zeros((P, K))
        for n, (pos, pr) in enumerate(zip(positions, probs, strict=True)):
            steps = [float(pr[t]) for t in pos.step_positions]
            r[divmod(n, K)] = min(steps) if steps else 0.0
        return r


def _text(out: Any, tokenizer: Any, p: int, j: int) -> str:
    if out.texts is not None:
        return out.texts[p][j]
    return tokenizer.decode(out.tokens[p, j, :int(out.lengths[p, j])])

"""Sampling solutions for many problems in fixed-size batches, and grading them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from scalign.data.domain import Domain
from scalign.utils import progress_bar


@dataclasses.dataclass
class Solutions:
    """N sampled solutions per problem, with their verdicts.

    texts[i][j]: solution j of problem i (completion text only); verdicts[i][j]: the domain
    verifier's verdict; tokens [P, N, M] and lengths [P, N]: the sampled ids (numpy);
    prompt_ids[i]: problem i's prompt as the sampler saw it (bos included).
    """

    problems: list[Any]
    texts: list[list[str]]
    verdicts: list[list[Any]]
    stop_reasons: list[list[str]]
    tokens: np.ndarray | None = None
    lengths: np.ndarray | None = None
    prompt_ids: list[list[int]] | None = None

    def correct(self) -> list[list[bool]]:
        return [[bool(v.outcome_correct) for v in row] for row in self.verdicts]

    def answers(self) -> list[list[str | None]]:
        return [[v.answer for v in row] for row in self.verdicts]

    def verified(self) -> list[list[bool]]:
        """Every step and the answer right (the verifier's `answer_label`)."""
        return [[bool(v.answer_label) for v in row] for row in self.verdicts]

    def step_verified(self) -> bool:
        """Does the domain's verifier check steps (stepmath), not only the answer?"""
        return any(getattr(v, "num_expected_steps", 0) for row in self.verdicts for v in row)

    def response_ids(self, i: int, j: int) -> np.ndarray:
        if self.tokens is None or self.lengths is None:
            raise ValueError("these solutions were sampled without keeping token ids")
        return self.tokens[i, j, : int(self.lengths[i, j])]


def sample_solutions(sampler: Any, domain: Domain, problems: Sequence[Any], *, n: int,
                     key: jax.Array | None, temperature: float, max_new_tokens: int,
                     batch_rows: int, top_p: float = 1.0, top_k: int = 0,
                     desc: str = "sampling", progress: bool = True) -> Solutions:
    """Sample `n` solutions per problem (prompts chunked so each call has <= batch_rows rows).

    Chunk c uses key fold_in(key, c), so results do not depend on anything but the key, the
    problem order and the chunk size.
    """
    per_call = max(1, batch_rows // n)
    texts: list[list[str]] = []
    reasons: list[list[str]] = []
    tokens: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    bar = progress_bar(total=len(problems), desc=desc, enabled=progress, unit="problem")
    for c, start in enumerate(range(0, len(problems), per_call)):
        chunk = problems[start:start + per_call]
        prompts = [domain.prompt(p) for p in chunk]
        out = sampler.generate(prompts, n, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               key=None if key is None else jax.random.fold_in(key, c))
        texts.extend(out.texts)
        reasons.extend([[str(r) for r in row] for row in out.stop_reason])
        tokens.append(out.tokens)
        lengths.append(out.lengths)
        bar.update(len(chunk))
    bar.close()
    verdicts = [[domain.verify(p, t) for t in row] for p, row in zip(problems, texts, strict=True)]
    prompt_ids = [sampler.tokenizer.encode(domain.prompt(p), add_bos=True) for p in problems]
    width = max((t.shape[-1] for t in tokens), default=0)
    tok = (np.concatenate([np.pad(t, ((0, 0), (0, 0), (0, width - t.shape[-1])))
                           for t in tokens]) if tokens else np.zeros((0, n, 0), np.int32))
    return Solutions(list(problems), texts, verdicts, reasons, tok,
                     np.concatenate(lengths) if lengths else np.zeros((0, n), np.int32),
                     prompt_ids)

"""Reward-model objectives on the scalar head: ORM / PRM / OPRM and Bradley-Terry.

A reward model is the policy backbone plus a scalar head (`scalign.models.heads`): one score
s[b, t] per token. Two ways of fitting it live here.

**Token-level binary classification** (ORM, PRM, OPRM). Labels y in {0, 1} (or soft labels in
[0, 1]) sit at some token positions, marked by `label_mask`; the loss is the binary
cross-entropy of sigma(s) there, averaged over the labelled positions (`token_bce_loss`):

    L = - sum_{b,t} m[b,t] [ y log sigma(s) + (1 - y) log sigma(-s) ] / sum_{b,t} m[b,t]

The three evaluators of Sun et al. (2024), "Easy-to-Hard Generalization: Scalable Alignment
Beyond Human Supervision", differ only in *where* the labels are placed:

- PRM (process reward model; Lightman et al. 2023, "Let's Verify Step by Step", PRM800K): one
  label per solution step at the step's end token -- the first token of the "\\n\\n" delimiter
  that follows the step -- and, for the final step, the answer's last token. 1 = the step is
  correct, 0 = wrong (`prm_example`).
- ORM (outcome reward model; Cobbe et al. 2021, Uesato et al. 2022): the outcome (final answer
  correct or not) at the final answer token, optionally at every response token
  (`orm_example(every_token=True)`, Uesato et al.'s token-level ORM).
- OPRM: trained on the union of the PRM and the ORM data sets (`oprm_records`). It is *read
  like a PRM*: one score per step at the step's end token plus the answer token as the final
  step, and its solution score aggregates them (min / prod / mean / max, or "last" = the
  answer-token score alone; `evaluation.rerank.aggregate`), as Sun et al. re-rank with PRMs
  and OPRMs alike. `algorithms.reward_labels.ScoredPositions.reads(kind)` is the one
  definition of which positions each evaluator's solution score reads.

A batch is `{"tokens": int32[B, T], "labels": float32[B, T], "label_mask": float32[B, T]}`;
`RewardFeaturizer` builds it from records with `scalign.data.pipeline.make_batch_iterator`.

**Pairwise preference** (`bradley_terry_loss`; Bradley & Terry 1952, Ouyang et al. 2022): the
score r = s[b, position] of a chosen and a rejected response, L = -log sigma(r_c - r_r - m).
A batch is `{"chosen_tokens", "rejected_tokens": int32[B, T], "chosen_position",
"rejected_position": int32[B]}` (plus optional `"margin"` float32[B]); see
`PairwiseRewardFeaturizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scalign.data.pipeline import Field
from scalign.data.tokenizer import token_positions_of_chars  # noqa: F401 (re-exported)
from scalign.models.config import ModelConfig
from scalign.models.heads import scalar_values

REWARD_KINDS = ("prm", "orm")


# --------------------------------------------------------------------------- losses


def token_bce_loss(scores: jax.Array, labels: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked binary cross-entropy of per-token reward logits.

        L = sum_{b,t} m[b,t] * bce(s[b,t], y[b,t]) / max(sum m, 1)
        bce(s, y) = -y log sigma(s) - (1 - y) log sigma(-s)     (computed from log-sigmoids)

    Args:
      scores: float [B, T] logits s of the scalar head.
      labels: [B, T] targets y in [0, 1] (hard 0/1 or soft); ignored where mask is 0.
      mask: [B, T] 1.0 at labelled positions, 0.0 elsewhere.

    Returns:
      (loss, metrics) with metrics `accuracy` ((sigma(s) > 0.5) == (y > 0.5) over labelled
      positions), `prob_pos` / `prob_neg` (mean sigma(s) over positions labelled y > 0.5 /
      y <= 0.5; 0 when there are none), `num_labels` and `num_positive` (counts) and `weight`
      (= num_labels, so gradient accumulation in the train step reproduces the full-batch loss).
    """
    scores = scores.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(scores, labels)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    loss = jnp.sum(bce * mask) / denom
    prob = jax.nn.sigmoid(scores)
    positive = (labels > 0.5).astype(jnp.float32)
    correct = ((scores > 0.0) == (labels > 0.5)).astype(jnp.float32)
    pos_mask, neg_mask = mask * positive, mask * (1.0 - positive)
    metrics = {
        "accuracy": jnp.sum(correct * mask) / denom,
        "prob_pos": jnp.sum(prob * pos_mask) / jnp.maximum(jnp.sum(pos_mask), 1.0),
        "prob_neg": jnp.sum(prob * neg_mask) / jnp.maximum(jnp.sum(neg_mask), 1.0),
        "num_labels": count,
        "num_positive": jnp.sum(pos_mask),
        "weight": count,
    }
    return loss, metrics


def make_reward_loss(config: ModelConfig):
    """ORM / PRM / OPRM loss for `make_train_step`: (params, batch, rng, frozen) -> (loss, metrics).

    Runs the backbone and the scalar head (`heads.scalar_values`, params must carry
    "scalar_head") on `batch["tokens"]` and applies `token_bce_loss` with `batch["labels"]`
    and `batch["label_mask"]`. `rng` and `frozen` are unused.
    """
    def loss_fn(params, batch, rng=None, frozen=None):
        del rng, frozen
        scores = scalar_values(config, params, batch["tokens"])
        return token_bce_loss(scores, batch["labels"], batch["label_mask"])
    return loss_fn


def bradley_terry_loss(chosen_scores: jax.Array, rejected_scores: jax.Array,
                       margin: jax.Array | float = 0.0
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pairwise Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022):

        L = mean_b -log sigma(r_c[b] - r_r[b] - m[b])

    The margin m (a scalar or [B]; 0 by default) asks for a larger score gap on pairs with a
    clearer preference (Touvron et al. 2023, Llama 2's margin term).

    Returns (loss, metrics): `accuracy` = mean[r_c > r_r], `margin` = mean(r_c - r_r),
    `rewards/chosen`, `rewards/rejected` (mean scores), `num_pairs` and `weight` (= B).
    """
    rc = chosen_scores.astype(jnp.float32)
    rr = rejected_scores.astype(jnp.float32)
    diff = rc - rr
    loss = -jnp.mean(jax.nn.log_sigmoid(diff - jnp.asarray(margin, jnp.float32)))
    n = jnp.asarray(rc.shape[0], jnp.float32)
    metrics = {
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "margin": jnp.mean(diff),
        "rewards/chosen": jnp.mean(rc),
        "rewards/rejected": jnp.mean(rr),
        "num_pairs": n,
        "weight": n,
    }
    return loss, metrics


def _pad_to(x: jax.Array, length: int, value: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def concat_pair(chosen: jax.Array, rejected: jax.Array, pad_value: int = 0) -> jax.Array:
    """[B, Tc], [B, Tr] -> [2B, max(Tc, Tr)] (chosen rows first), right-padding the shorter."""
    length = max(chosen.shape[1], rejected.shape[1])
    return jnp.concatenate([_pad_to(chosen, length, pad_value),
                            _pad_to(rejected, length, pad_value)], axis=0)


def make_pairwise_reward_loss(config: ModelConfig):
    """Bradley-Terry RM loss for `make_train_step`: (params, batch, rng, frozen) -> (loss, metrics).

    One scalar-head forward over the concatenated [2B, T] chosen + rejected tokens; the score
    of each response is read at its position (`chosen_position` / `rejected_position`,
    int32[B], e.g. the last response token), then `bradley_terry_loss` with the optional
    batch key `margin` (float32[B]).
    """
    def loss_fn(params, batch, rng=None, frozen=None):
        del rng, frozen
        tokens = concat_pair(batch["chosen_tokens"], batch["rejected_tokens"])
        scores = scalar_values(config, params, tokens)                      # [2B, T]
        positions = jnp.concatenate([batch["chosen_position"], batch["rejected_position"]])
        picked = jnp.take_along_axis(scores, positions[:, None].astype(jnp.int32), axis=1)[:, 0]
        b = batch["chosen_tokens"].shape[0]
        return bradley_terry_loss(picked[:b], picked[b:], batch.get("margin", 0.0))
    return loss_fn


# --------------------------------------------------------------------------- examples (numpy)


def _check_positions(name: str, positions: np.ndarray, length: int) -> None:
    if positions.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {positions.shape}")
    bad = positions[(positions < 0) | (positions >= length)]
    if bad.size:
        raise ValueError(f"{name} {bad.tolist()} outside the {length} tokens")


def _check_labels(name: str, labels: np.ndarray) -> None:
    if np.any(~np.isfinite(labels)) or np.any((labels < 0) | (labels > 1)):
        raise ValueError(f"{name} must lie in [0, 1], got {labels.tolist()}")


def _example(token_ids: Sequence[int] | np.ndarray, positions: np.ndarray,
             labels: np.ndarray) -> dict[str, np.ndarray]:
    tokens = np.asarray(token_ids, np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tokens.shape}")
    uniq = np.unique(positions)
    if len(uniq) != len(positions):
        # the same position labelled twice must agree
        for p in uniq:
            vals = labels[positions == p]
            if np.any(vals != vals[0]):
                raise ValueError(f"position {int(p)} has conflicting labels {vals.tolist()}")
    out_labels = np.zeros(len(tokens), np.float32)
    out_mask = np.zeros(len(tokens), np.float32)
    out_labels[positions] = labels
    out_mask[positions] = 1.0
    return {"tokens": tokens, "labels": out_labels, "label_mask": out_mask}


PRM_LABEL_SPANS = ("end", "around", "step")


def label_span_positions(step_end_positions: Sequence[int], span: str, length: int,
                         start: int | None = None) -> list[list[int]]:
    """The token positions that carry each step's label, as in the easy-to-hard code:

        end     [p_k]                      the delimiter's first token (Lightman et al. 2023)
        around  [p_k - 1, p_k, p_k + 1]    the positions around the step delimiter, where Sun
                                           et al. (2024) also read a step's score (the min)
        step    (p_{k-1}, p_k]             every token of the step and its delimiter
                                           (their `train_on_every_token`)

    clipped to [0, length); `start` is where step 1 begins (default p_0 itself). A position
    already claimed by an earlier step is left to it."""
    if span not in PRM_LABEL_SPANS:
        raise ValueError(f"PRM label span must be one of {PRM_LABEL_SPANS}, got {span!r}")
    out, taken = [], set()
    prev = None
    for k, p in enumerate(int(x) for x in step_end_positions):
        if span == "end":
            cand = [p]
        elif span == "around":
            cand = [p - 1, p, p + 1]
        else:
            lo = (p if start is None else int(start)) if k == 0 else prev + 1
            cand = list(range(min(lo, p), p + 1))
        prev = p
        keep = [c for c in cand if 0 <= c < length and c not in taken]
        taken.update(keep)
        out.append(keep)
    return out


def prm_example(token_ids: Sequence[int] | np.ndarray, step_end_positions: Sequence[int],
                step_labels: Sequence[float], answer_position: int | None = None,
                answer_label: float | None = None, *, span: str = "end",
                response_start: int | None = None) -> dict[str, np.ndarray]:
    """A PRM training example (Lightman et al. 2023; Sun et al. 2024).

    labels[p_k] = step_labels[k] and label_mask[p_k] = 1 at each step-end position p_k (the
    first token of the "\\n\\n" delimiter after step k); if `answer_position` is given, the
    answer segment is the final step: labels[answer_position] = answer_label (its last token).
    Everything else has mask 0. Positions index `token_ids` (the full sequence, bos and prompt
    included). `span` widens each step's label to more tokens (`label_span_positions`: "around"
    the delimiter, or every token of the "step" from `response_start` on); the answer label
    stays at its token.

    Returns dict(tokens int32[T], labels float32[T], label_mask float32[T]).
    """
    pos = np.asarray(step_end_positions, np.int64).reshape(-1)
    lab = np.asarray(step_labels, np.float32).reshape(-1)
    if len(pos) != len(lab):
        raise ValueError(f"{len(pos)} step_end_positions but {len(lab)} step_labels")
    if span != "end":
        groups = label_span_positions(pos, span, len(token_ids), response_start)
        if answer_position is not None:
            groups = [[q for q in g if q != int(answer_position)] for g in groups]
        lab = np.asarray([y for g, y in zip(groups, lab, strict=True) for _ in g], np.float32)
        pos = np.asarray([q for g in groups for q in g], np.int64)
    if (answer_position is None) != (answer_label is None):
        raise ValueError("pass both answer_position and answer_label, or neither")
    if answer_position is not None:
        pos = np.append(pos, int(answer_position))
        lab = np.append(lab, np.float32(answer_label))
    _check_positions("PRM label positions", pos, len(token_ids))
    _check_labels("PRM labels", lab)
    return _example(token_ids, pos, lab)


def orm_example(token_ids: Sequence[int] | np.ndarray, final_position: int, outcome: float,
                every_token: bool = False, response_start: int | None = None
                ) -> dict[str, np.ndarray]:
    """An ORM training example (Cobbe et al. 2021; Uesato et al. 2022; Sun et al. 2024).

    The outcome label (1 = final answer correct) at `final_position` (the final answer's last
    token); with `every_token=True` at every position response_start..final_position inclusive
    (Uesato et al.'s per-token ORM), which needs `response_start` (index of the first
    response token in `token_ids`).

    Returns dict(tokens int32[T], labels float32[T], label_mask float32[T]).
    """
    final_position = int(final_position)
    if every_token:
        if response_start is None:
            raise ValueError("orm_example(every_token=True) needs response_start")
        if not 0 <= int(response_start) <= final_position:
            raise ValueError(f"response_start={response_start} must be in "
                             f"[0, final_position={final_position}]")
        pos = np.arange(int(response_start), final_position + 1, dtype=np.int64)
    else:
        pos = np.asarray([final_position], np.int64)
    lab = np.full(len(pos), outcome, np.float32)
    _check_positions("ORM label positions", pos, len(token_ids))
    _check_labels("ORM outcome", lab[:1])
    return _example(token_ids, pos, lab)


def oprm_records(prm_records: Iterable[Mapping[str, Any]],
                 orm_records: Iterable[Mapping[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """The OPRM training set: the union of PRM and ORM data (Sun et al. 2024, Sec. 3).

    Each record is tagged with `"kind"` ("prm" / "orm") for `RewardFeaturizer(kind="oprm")`.
    With `orm_records=None`, every PRM record (which then also needs `final_position` and
    `outcome`) is used twice: once with its step labels and once with its outcome label.
    Order: all PRM records, then all ORM records.
    """
    prm = [{**r, "kind": "prm"} for r in prm_records]
    orm = [{**r, "kind": "orm"} for r in (prm if orm_records is None else orm_records)]
    return prm + orm


def _record_get(record: Mapping[str, Any], key: str, default: Any = KeyError) -> Any:
    if key in record:
        return record[key]
    if default is KeyError:
        raise KeyError(f"reward record has no key {key!r} (has {sorted(record)})")
    return default


def _optional_int(x: Any) -> int | None:
    if x is None:
        return None
    x = np.asarray(x)
    return None if x.size == 0 or int(x.reshape(-1)[0]) < 0 else int(x.reshape(-1)[0])


@dataclasses.dataclass(frozen=True)
class RewardFeaturizer:
    """Tokenised reward records -> {tokens, labels, label_mask} for `make_batch_iterator`.

    Record keys (token positions index `tokens`, the full bos + prompt + response sequence):

    - always: `tokens` (sequence of int ids);
    - PRM (`kind="prm"`, or a record tagged "prm"): `step_end_positions`, `step_labels`, and
      optionally `answer_position` + `answer_label` (None or -1 = no answer label);
    - ORM (`kind="orm"`, or a record tagged "orm"): `final_position`, `outcome`, and
      `response_start` when `orm_every_token=True`;
    - OPRM (`kind="oprm"`): each record carries `"kind"` ("prm" | "orm"); see `oprm_records`.

    Attributes:
      pad_id: token padding value.
      kind: "prm" | "orm" | "oprm".
      orm_every_token: ORM labels at every response token instead of the final one.
      prm_label_span: "end" | "around" | "step" (`label_span_positions`); "step" needs the
        record's `response_start`.
    """

    pad_id: int = 0
    kind: str = "prm"
    orm_every_token: bool = False
    prm_label_span: str = "end"

    def __post_init__(self):
        if self.prm_label_span not in PRM_LABEL_SPANS:
            raise ValueError(f"RewardFeaturizer.prm_label_span must be one of "
                             f"{PRM_LABEL_SPANS}, got {self.prm_label_span!r}")
        if self.kind not in (*REWARD_KINDS, "oprm"):
            raise ValueError(f"RewardFeaturizer.kind must be 'prm', 'orm' or 'oprm', "
                             f"got {self.kind!r}")

    @property
    def fields(self) -> Mapping[str, Field]:
        return {"tokens": Field(np.int32, self.pad_id),
                "labels": Field(np.float32, 0.0),
                "label_mask": Field(np.float32, 0.0)}

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        kind = self.kind
        if kind == "oprm" or "kind" in record:
            kind = _record_get(record, "kind")
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in REWARD_KINDS:
                raise ValueError(f"reward record 'kind' must be 'prm' or 'orm', got {kind!r}")
        tokens = _record_get(record, "tokens")
        if kind == "prm":
            answer_position = _optional_int(_record_get(record, "answer_position", None))
            return prm_example(
                tokens, _record_get(record, "step_end_positions"),
                _record_get(record, "step_labels"), answer_position,
                None if answer_position is None else _record_get(record, "answer_label"),
                span=self.prm_label_span,
                response_start=_optional_int(_record_get(record, "response_start", None)))
        return orm_example(
            tokens, int(_record_get(record, "final_position")),
            float(_record_get(record, "outcome")), every_token=self.orm_every_token,
            response_start=_optional_int(_record_get(record, "response_start", None)))


@dataclasses.dataclass(frozen=True)
class PairwiseRewardFeaturizer:
    """Preference-pair records -> Bradley-Terry batches for `make_pairwise_reward_loss`.

    Record keys: `chosen_tokens`, `rejected_tokens` (sequences of int ids); optional
    `chosen_position` / `rejected_position` (where the score is read; default: the last
    token); with `with_margin=True`, `margin` (float).
    Batch: chosen_tokens / rejected_tokens int32[B, T], chosen_position / rejected_position
    int32[B] (and margin float32[B]).
    """

    pad_id: int = 0
    with_margin: bool = False

    @property
    def fields(self) -> Mapping[str, Field]:
        out = {"chosen_tokens": Field(np.int32, self.pad_id),
               "rejected_tokens": Field(np.int32, self.pad_id),
               "chosen_position": Field(np.int32, 0, sequence=False),
               "rejected_position": Field(np.int32, 0, sequence=False)}
        if self.with_margin:
            out["margin"] = Field(np.float32, 0.0, sequence=False)
        return out

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for side in ("chosen", "rejected"):
            tokens = np.asarray(_record_get(record, f"{side}_tokens"), np.int32)
            if tokens.ndim != 1 or tokens.size == 0:
                raise ValueError(f"{side}_tokens must be a non-empty 1-D sequence, "
                                 f"got shape {tokens.shape}")
            pos = _optional_int(_record_get(record, f"{side}_position", None))
            pos = len(tokens) - 1 if pos is None else pos
            _check_positions(f"{side}_position", np.asarray([pos]), len(tokens))
            out[f"{side}_tokens"] = tokens
            out[f"{side}_position"] = np.int32(pos)
        if self.with_margin:
            out["margin"] = np.float32(_record_get(record, "margin"))
        return out

"""PRM800K human labels as reward-model records: layout, tokenization, filters, label placement."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from scalign.algorithms.reward_labels import (
    assert_levels,
    build_reward_records,
    prm800k_solutions,
    prm800k_text,
)
from scalign.data.domain import MathDomain
from scalign.data.math import read_prm800k
from scalign.data.tokenizer import Tokenizer

TRAIN = [
    {"problem": "What is $2+3$?", "level": "Level 1", "type": "Prealgebra",
     "solution": r"We add: $2+3=5$. So the answer is $\boxed{5}$."},
    {"problem": r"Simplify $\frac{6}{8}$.", "level": "Level 2", "type": "Prealgebra",
     "solution": r"Divide both by 2. We get $\boxed{\frac34}$."},
    {"problem": r"Compute $\sqrt{144}$.", "level": "Level 4", "type": "Algebra",
     "solution": r"Since $12^2=144$, $\sqrt{144}=\boxed{12}$."},
]
TEST = [{"problem": "What is $1+1$?", "solution": r"It is $\boxed{2}$.", "answer": "2",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}]


def step(text, rating):
    return {"completions": [{"text": text, "rating": rating, "flagged": False}],
            "human_completion": None, "chosen_completion": 0 if rating != -1 else None}


def record(problem, steps, answer="5", finish="solution", **extra):
    return {"labeler": "x", "timestamp": "2023-01-01T00:00:00", "generation": 1,
            "question": {"problem": problem, "ground_truth_answer": answer},
            "label": {"steps": [step(t, r) for t, r in steps], "total_time": 1,
                      "finish_reason": finish}, **extra}


PRM800K = [
    # 1. correct, reaches its answer
    record("What is $2+3$?", [("I add 2 and 3.", 1), ("That gives $5$.", 0), ("# Answer\n\n5", 1)]),
    # 2. stops at a wrong step: PRM labels [1, 0], no answer -> no ORM example
    record("What is $2+3$?", [("I add 2 and 3.", 1), ("That gives $6$.", -1), ("unseen", 1)],
           finish="found_error"),
    # 3. right steps, wrong answer, answer step rated -1
    record("What is $2+3$?", [("I add them.", 1), ("# Answer\n\n6", -1)]),
    # 4. a blank line inside a step stays inside that step
    record(r"Simplify $\frac{6}{8}$.", [("Divide by 2:\n\n$\\frac{3}{4}$.", 1),
                                        ("# Answer\n\n\\frac{3}{4}", 1)], answer=r"\frac34"),
    # 5. hard level: never used
    record(r"Compute $\sqrt{144}$.", [("It is 12.", 1), ("# Answer\n\n12", 1)], answer="12"),
    # 6. unknown problem: no level
    record("What is nine?", [("Nine.", 1), ("# Answer\n\n9", 1)], answer="9"),
    # 7. a test problem (level given in the record): never used
    record("What is $1+1$?", [("Two.", 1), ("# Answer\n\n2", 1)], answer="2", level=1),
    # 8. an answer header before the last step: labels cannot be aligned
    record("What is $2+3$?", [("# Answer\n\n5", 1), ("More.", 1)]),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    return MathDomain.build(str(write_jsonl(d / "train.jsonl", TRAIN)),
                            str(write_jsonl(d / "test.jsonl", TEST)), (1, 2, 3, 4, 5))


def _corpus(domain):
    texts = [domain.prompt(p) + domain.demonstration(p) for lv in domain.levels
             for p in domain.train_problems(lv)]
    texts += [s["completions"][0]["text"] for r in PRM800K for s in r["label"]["steps"]]
    texts += [r["question"]["problem"] for r in PRM800K]
    return texts + ["a single newline:\nthen more"]


@pytest.fixture(scope="module")
def tok(domain, tmp_path_factory):
    return Tokenizer.train(_corpus(domain), tmp_path_factory.mktemp("tok") / "t.model",
                           vocab_size=160, user_defined_symbols=("\n\n",))


@pytest.fixture(scope="module")
def prm800k(domain, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("prm") / "phase2_train.jsonl", PRM800K)
    return read_prm800k(str(path), levels=domain.level_index()).items


def test_prm800k_text_layout():
    assert prm800k_text(["A.", " B.\n\n\nC. ", "# Answer\n\n 7 "]) == (
        "A.\n\nB.\nC.\n\n# Answer\n\n7", True)
    assert prm800k_text(["A.", "B."]) == ("A.\n\nB.", False)
    assert prm800k_text(["A.", "  "]) is None
    assert prm800k_text(["# Answer\n\n5", "B."]) is None
    assert prm800k_text(["A.\n\n# Answer\n\n5"]) is None  # a step and the answer in one


def test_encode_continuation_avoids_the_dummy_prefix(domain):
    """A Llama-style tokenizer (add_dummy_prefix) puts "▁" before any encoded text; the
    response of a prompt must be tokenized as the sampler continues it, without one."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(domain)), model_writer=buf, vocab_size=150,
        model_type="bpe", add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n\n"],
        minloglevel=2)
    tok = Tokenizer.from_proto(buf.getvalue())
    tb = tok.token_bytes()
    prompt, text = "# Question\n\nWhat is $2+3$?\n\n# Solution\n\n", "That gives $5$."
    alone = tok.encode(text)
    assert tb[alone[0]].startswith(b" ")  # what a naive encode would train on
    p_ids, r_ids = tok.encode_continuation(prompt, text, add_bos=True)
    assert p_ids == tok.encode(prompt, add_bos=True)
    assert b"".join(tb[i] for i in r_ids).decode() == text


def test_records_from_human_labels(domain, tok, prm800k):
    labelled, drops = prm800k_solutions(prm800k, domain, tok, levels=(1, 2, 3))
    assert dict(drops) == {"level_not_supervised": 1, "level_unknown": 1, "test_problem": 1,
                           "unaligned_steps": 1}
    assert [p.problem for p in labelled.problems] == ["What is $2+3$?",
                                                      r"Simplify $\frac{6}{8}$."]
    v = labelled.verdicts[0]
    assert [x.step_labels for x in v] == [(1, 1), (1, 0), (1,)]
    assert [x.answer_label for x in v] == [1, 0, 0]
    assert [x.outcome_correct for x in v] == [True, False, False]
    assert [x.answer for x in v] == ["5", None, "6"]
    assert labelled.verdicts[1][0].outcome_correct  # "\frac{3}{4}" vs ground truth "\frac34"
    assert labelled.texts[1][0] == "Divide by 2:\n$\\frac{3}{4}$.\n\n# Answer\n\n\\frac{3}{4}"

    records, stats = build_reward_records(labelled, domain, tok.token_bytes(),
                                          labelled.prompt_ids, seed=0, orm_needs_answer=True)
    prm, orm = records["prm"], records["orm"]
    assert [(r["step_labels"], r["answer_label"]) for r in prm] == [
        ([1, 1], 1), ([1, 0], None), ([1], 0), ([1], 1)]
    assert sorted(r["outcome"] for r in orm) == [0, 1, 1]  # the stopped path gives none
    assert stats.orm_no_answer == 1 and stats.samples == 4 and stats.problems == 2
    assert len(records["oprm"]) == len(prm) + len(orm)
    assert_levels(records["oprm"], (1, 2, 3))
    assert {r["level"] for r in prm} == {1, 2}
    delim = tok.piece_to_id("\n\n")
    for r in prm:  # step ends: the delimiter's token; a path that stops: its last token
        last = len(r["tokens"]) - 1
        assert all(r["tokens"][q] == delim or q == last for q in r["step_end_positions"])
    assert prm[1]["step_end_positions"][-1] == len(prm[1]["tokens"]) - 1
    assert prm[0]["tokens"][prm[0]["step_end_positions"][-1]] == delim
    first = prm[0]
    answer_token = tok.decode([int(first["tokens"][first["answer_position"]])])
    assert answer_token.endswith("5")
    assert tok.decode(np.asarray(first["tokens"])).startswith(domain.prompt(labelled.problems[0]))
    correct = next(r for r in orm if r["uid"] == labelled.problems[0].uid and r["outcome"])
    assert correct["final_position"] == first["answer_position"]


def test_too_long_solutions_are_dropped_and_counted(domain, tok, prm800k):
    _, drops = prm800k_solutions(prm800k, domain, tok, levels=(1, 2, 3), max_tokens=20)
    assert drops["too_long"] == 4

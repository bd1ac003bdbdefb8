"""Tests for scalign.data.grading: answer extraction, normalization and equivalence."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalign.data import grading
from scalign.data.grading import extract_answer, is_equiv, normalize_answer

# ------------------------------------------------------------------------------------------
# Equivalence table. "rule": must hold by string/structure/numeric rules alone
# (symbolic=False) and with the default symbolic path; "sym": needs math-verify.
# ------------------------------------------------------------------------------------------

EQUIVALENT = [
    # \dfrac / \tfrac / \frac12
    ("rule", r"\frac{1}{2}", r"\dfrac{1}{2}"),
    ("rule", r"\frac{1}{2}", r"\tfrac12"),
    ("rule", r"\frac{1}{2}", r"\frac12"),
    ("rule", r"\frac{3}{4}", r"\frac3{4}"),
    ("rule", r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
    ("rule", r"\frac{\frac{1}{2}}{3}", r"\frac{\frac12}{3}"),
    # a/b and numeric forms
    ("rule", r"\frac{3}{4}", "3/4"),
    ("rule", r"\frac{\pi}{2}", r"\pi/2"),
    ("rule", "0.5", ".5"),
    ("rule", r"\frac{1}{2}", "0.5"),
    ("rule", r"\frac{1}{3}", "0.3333333"),
    ("rule", r"\frac{10}{4}", r"\frac{5}{2}"),
    ("rule", "2.50", "2.5"),
    ("rule", "0.1", r"\frac{1}{10}"),
    ("rule", r"-\frac{1}{2}", r"\frac{-1}{2}"),
    ("rule", "-0.5", r"-\frac{1}{2}"),
    ("rule", r"1.5\times10^{3}", "1500"),
    ("rule", "5.00", r"\$5"),
    ("rule", "3", "+3"),
    # \left / \right / \displaystyle / spacing
    ("rule", r"\left( 1, 2 \right)", "(1,2)"),
    ("rule", r"[1,2)", r"\left[1, 2\right)"),
    ("rule", r"\displaystyle \frac{1}{2}", "1/2"),
    ("rule", "x^2+1", "x^2 + 1"),
    ("rule", r"2\sqrt{3}", r"2 \sqrt 3"),
    # units
    ("rule", "10", r"10\text{ cm}"),
    ("rule", "10", "10 cm"),
    ("rule", "12", r"12 \mbox{ inches}"),
    ("rule", "25", r"25\text{ square units}"),
    ("rule", "6", r"6 \text{ sq ft}"),
    ("rule", "5", r"5 \text{ cm}^2"),
    ("rule", "100", r"100 \text{ dollars}"),
    ("rule", "12", "12 inches"),
    # degrees, percent, dollars
    ("rule", "30", r"30^\circ"),
    ("rule", "30", r"30^{\circ}"),
    ("rule", "90", "90 degrees"),
    ("rule", "50", r"50\%"),
    ("rule", "50", "50 percent"),
    ("rule", "10%", "10"),
    ("rule", "5", r"\$5"),
    ("rule", r"\$1,000.50", "1000.5"),
    # thousands separators
    ("rule", "1000", "1,000"),
    ("rule", "1000000", "1{,}000{,}000"),
    ("rule", "40000", r"40,\!000"),
    # \text unwrapping and words
    ("rule", r"\text{Monday}", "Monday"),
    ("rule", "Monday", "monday"),
    ("rule", r"\text{(A)}", "(A)"),
    # variable prefixes, trailing period, \sqrt2
    ("rule", "5", "x = 5"),
    ("rule", r"\frac{1}{2}", r"k = \frac12"),
    ("rule", "2x+1", "f(x) = 2x+1"),
    ("rule", "2x+3", "y = 2x + 3"),
    ("rule", "7", "7."),
    ("rule", r"\sqrt{2}", r"\sqrt2"),
    # tuples, intervals, sets, lists, unions
    ("rule", "(1,2)", "(1, 2)"),
    ("rule", r"(\frac{1}{2}, 3)", "(0.5, 3)"),
    ("rule", r"\{1,2,3\}", r"\{3,2,1\}"),
    ("rule", r"\left\{1, 2\right\}", r"\{1,2\}"),
    ("rule", "1, 2", "2,1"),
    ("rule", "-1, 3", "x=-1, x=3"),
    ("rule", r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,\infty)"),
    ("rule", "(3)", "3"),
    # boxed answers given as answers
    ("rule", r"\boxed{5}", "5"),
    # symbolic only
    ("sym", r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    ("sym", r"2\sqrt{2}", r"\sqrt{8}"),
    ("sym", r"(x+1)^2", r"x^2+2x+1"),
    ("sym", r"\frac{2\pi}{3}", r"\frac{2}{3}\pi"),
]

NOT_EQUIVALENT = [
    ("(1,2]", "[1,2]"),
    ("(1,2)", "[1,2]"),
    ("[1,2)", "(1,2]"),
    (r"(-\infty, 2)", r"(-\infty, 2]"),
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    ("0.5", "0.51"),
    ("1/3", "0.33"),
    ("1000000", "1000001"),
    ("0", "0.000001"),
    ("5", "-5"),
    ("30", "30.1"),
    ("10", "100"),
    ("1,000", "1"),
    (r"\frac{1}{2}", "2"),
    (r"\$5", "50"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "1,2"),
    ("(1,2)", "(1,2,3)"),
    ("1,2", "1,2,3"),
    ("-1,3", "-1,4"),
    (r"\{1,2\}", r"\{1,3\}"),
    ("Monday", "Tuesday"),
    ("Monday", "dynamo"),  # a product of letters to a CAS: must not reach it
    ("A", "B"),
    ("2", ""),
    ("", ""),
    (r"\sqrt{2}", r"\sqrt{3}"),
    ("x+1", "x-1"),
    (r"3\sqrt{2}", r"2\sqrt{3}"),
    ("x^2", "x^3"),
    (r"\frac{1}{2}", r"\frac{1}{2}\pi"),
    ("2x", "x^2"),
]


@pytest.fixture(scope="module", autouse=True)
def _warm_worker():
    grading.start_symbolic_workers(1)
    yield


def _cases():
    for kind, a, b in EQUIVALENT:
        yield pytest.param(kind, a, b, True, id=f"eq[{a}|{b}]")
    for a, b in NOT_EQUIVALENT:
        yield pytest.param("rule", a, b, False, id=f"ne[{a}|{b}]")


def test_boxed_solutions_grade_like_their_answers():
    """Grading a whole solution (extract_answer, then is_equiv against the gold answer) gives
    each rule-decidable table verdict: extraction from the boxed text keeps what decides it."""
    wrong = []
    for kind, gold, pred, expected in ([(k, a, b, True) for k, a, b in EQUIVALENT]
                                       + [("rule", a, b, False) for a, b in NOT_EQUIVALENT]):
        if kind != "rule":
            continue
        for g, p in ((gold, pred), (pred, gold)):
            text = f"We simplify step by step.\n\nSo the answer is $\\boxed{{{p}}}$."
            if is_equiv(g, extract_answer(text), symbolic=False) is not expected:
                wrong.append((g, p, expected))
    assert not wrong


@pytest.mark.parametrize("kind,a,b,expected", list(_cases()))
def test_equivalence_table_both_directions(kind, a, b, expected):
    assert is_equiv(a, b) is expected
    assert is_equiv(b, a) is expected
    if kind == "rule":
        assert is_equiv(a, b, symbolic=False) is expected
        assert is_equiv(b, a, symbolic=False) is expected
    else:
        # These really need the symbolic path.
        assert is_equiv(a, b, symbolic=False) is False


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        is_equiv("x", "y", timeout_s=0)


def test_none_and_non_strings_are_not_equivalent():
    assert is_equiv(None, "5") is False
    assert is_equiv("5", None) is False
    assert is_equiv(None, None) is False


@pytest.mark.parametrize("raw,normal", [
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right]", "(1,2]"),
    (r"\$1,000", "1000"),
    (r"k = \frac{1}{2}.", r"\frac{1}{2}"),
    (r"5 \text{ square units}", "5"),
    (".5", "0.5"),
    ("3/4", r"\frac{3}{4}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\frac{1", r"\frac{1"),  # truncated \frac is left alone
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


# ------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer", [
    (r"so the answer is $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"\boxed{\boxed{5}}", "5"),
    (r"outer \boxed{x = \boxed{7}} end", r"x = \boxed{7}"),
    (r"$\boxed 5$", "5"),
    (r"\boxed5", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{ 12 }", "12"),
    (r"\boxed{(1, 2]}", "(1, 2]"),
    ("Step 1.\n\n# Answer\n\n320,000", "320,000"),
    ("a\n# Answer\n\n1\n\n# Answer\n\n2\n", "2"),
    ("# Answer\n\n  42  \n\nmore text after a blank line", "42"),
    ("# Answer\n\n\\frac{1}{2}", r"\frac{1}{2}"),
    ("# Answer\n\n" + r"\boxed{9}", "9"),
    (r"box wins \boxed{1}" + "\n\n# Answer\n\n2", "1"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", [
    "",
    "The answer is 5.",
    r"\boxed{3} and then \boxed{\frac{1}{2",  # last box truncated
    r"\boxed",
    r"\boxed{}",
    "# Answer\n\n",
    "# Answers are below: 5",
])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


SOLUTION = (
    r"We have $x^2 - 5x + 6 = 0$, so $(x-2)(x-3) = 0$ and $x \in \{2, 3\}$. "
    r"Therefore the sum is $\boxed{\dfrac{5}{1}}$ and the set is $\left\{ 2, 3 \right\}$."
    "\n\n# Answer\n\n5"
)


def test_every_prefix_of_a_solution_is_safe():
    for k in range(len(SOLUTION) + 1):
        prefix = SOLUTION[:k]
        answer = extract_answer(prefix)
        assert answer is None or isinstance(answer, str)
        assert isinstance(is_equiv(prefix, "5", symbolic=False), bool)
    assert is_equiv(extract_answer(SOLUTION), "5", symbolic=False)


# ------------------------------------------------------------------------------------------
# Properties: never raises
# ------------------------------------------------------------------------------------------

LATEX_TOKENS = st.sampled_from([
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "(", ")", "[", "]", ",", ".",
    "\\frac", "\\dfrac", "\\sqrt", "\\text{", " cm", "\\%", "%", "$", "\\$", "^\\circ", "^{",
    "x", "=", "k =", "1", "2", "0", "5", "-", "+", "/", "\\left", "\\right", "\\cup",
    "\\infty", "# Answer\n", "\n\n", " ", "\\", "1,000", ".5", "\\pi", "units", "\\!",
])
latexish = st.lists(LATEX_TOKENS, max_size=30).map("".join)
anytext = st.text(max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(latexish, anytext))
def test_extract_answer_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or (isinstance(answer, str) and answer == answer.strip() and answer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(latexish, anytext), st.one_of(latexish, anytext))
def test_is_equiv_string_path_never_raises_and_is_symmetric(a, b):
    result = is_equiv(a, b, symbolic=False)
    assert isinstance(result, bool)
    assert result == is_equiv(b, a, symbolic=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(latexish, anytext))
def test_is_equiv_is_reflexive_exactly_for_nonempty_answers(a):
    assert is_equiv(a, a, symbolic=False) == bool(normalize_answer(a))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(latexish, latexish)
def test_is_equiv_symbolic_path_never_raises(a, b):
    assert isinstance(is_equiv(a, b, symbolic=True, timeout_s=1.0), bool)


# ------------------------------------------------------------------------------------------
# Symbolic path: gating, time limit, safety
# ------------------------------------------------------------------------------------------


def test_common_path_does_not_use_the_worker_and_is_fast():
    grading.reset_symbolic_stats()
    pairs = [(r"\frac{1}{2}", "0.5"), ("(1,2]", "[1,2]"), ("Monday", "dynamo"),
             ("1,000", "1000"), ("30^\\circ", "30"), ("0.25", "0.24")]
    start = time.perf_counter()
    for i in range(200):
        for a, b in pairs:
            is_equiv(a, f"{b} ") if i % 2 else is_equiv(a, b)
    elapsed = time.perf_counter() - start
    assert grading.symbolic_stats()["calls"] == 0
    assert elapsed < 2.0, f"{len(pairs) * 200} string-path comparisons took {elapsed:.2f}s"


def test_pathological_input_respects_time_limit():
    grading.reset_symbolic_stats()
    timeout_s = 1.0
    start = time.perf_counter()
    assert is_equiv(r"10^{10^{10}}", r"x + 1", timeout_s=timeout_s) is False
    elapsed = time.perf_counter() - start
    assert elapsed < timeout_s + 1.0, elapsed
    stats = grading.symbolic_stats()
    assert stats["timeouts"] == 1
    # The worker survives a soft timeout and still answers.
    assert is_equiv(r"2\sqrt{2}", r"\sqrt{8}") is True


def test_stuck_worker_is_killed_and_replaced():
    grading.shutdown_symbolic_workers()
    grading.start_symbolic_workers(1)
    grading.reset_symbolic_stats()
    pids = grading._pool().pids()
    assert len(pids) == 1
    for pid in pids:  # A stopped process ignores SIGALRM: only the parent's kill gets it out.
        os.kill(pid, signal.SIGSTOP)
    timeout_s = 0.5
    start = time.perf_counter()
    assert is_equiv(r"3\sqrt{3}", r"\sqrt{27}", timeout_s=timeout_s) is False
    elapsed = time.perf_counter() - start
    assert elapsed < timeout_s + 1.0, elapsed
    stats = grading.symbolic_stats()
    assert stats["hard_timeouts"] == 1 and stats["timeouts"] == 1
    assert is_equiv(r"3\sqrt{3}", r"\sqrt{27}") is True  # a fresh worker (timeouts aren't cached)
    assert grading.symbolic_stats()["worker_starts"] >= 1


def test_symbolic_path_never_evaluates_python(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert grading.symbolic_equiv(payload, "1") is False
    assert grading.symbolic_equiv("1", payload) is False
    assert not marker.exists()

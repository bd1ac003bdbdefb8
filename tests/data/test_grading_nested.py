"""Issue 16, finding 8: `\\frac` normalisation is linear in the input, however deep fractions
nest (it was quadratic: 5k nested levels took 17 s, outside the grader's time limit).

The checks count work instead of timing it: every character read by index and every
character copied by a slice of the input is counted through a `str` subclass.
"""

import random
import re

import pytest

from scalign.data import grading
from scalign.data.grading import _fix_fracs, normalize_answer


class CountingStr(str):
    """A str that counts the characters its `[]` reads (1 per index, the length per slice)."""

    reads = 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            CountingStr.reads += len(range(*key.indices(len(self))))
        else:
            CountingStr.reads += 1
        return str.__getitem__(self, key)


_COMMAND = re.compile(r"\\[A-Za-z]+|\\.")


def _reference_fix_fracs(s: str) -> str:
    """The previous implementation (right to left, each argument re-read): the reference."""
    def read_args(s, k, count):
        args = []
        n = len(s)
        for _ in range(count):
            while k < n and s[k].isspace():
                k += 1
            if k >= n:
                return None
            if s[k] == "{":
                close = grading._match_brace(s, k)
                if close is None:
                    return None
                args.append(s[k + 1: close])
                k = close + 1
            elif s[k] == "\\":
                m = _COMMAND.match(s, k)
                token = m.group(0) if m else s[k]
                args.append(token)
                k += len(token)
            elif s[k] == "}":
                return None
            else:
                args.append(s[k])
                k += 1
        return args, k

    cls = type(s)  # (keeps a CountingStr counting after each rewrite)
    for pos in reversed([m.start() for m in re.finditer(r"\\frac", s)]):
        read = read_args(s, pos + 5, 2)
        if read is not None:
            (num, den), end = read
            s = cls(f"{s[:pos]}\\frac{{{num}}}{{{den}}}{s[end:]}")
    return str(s)


def _nested(levels: int) -> str:
    """\\frac{\\frac{...\\frac12...}{3}}{3}: `levels` fractions nested in the numerator."""
    return "\\frac{" * (levels - 1) + "\\frac12" + "}{3}" * (levels - 1)


def _reads(fn, text: str) -> int:
    CountingStr.reads = 0
    fn(CountingStr(text))
    return CountingStr.reads


def test_previous_implementation_was_quadratic():
    """Reproduces the finding: doubling the depth roughly quadruples the characters read."""
    small, large = _reads(_reference_fix_fracs, _nested(200)), _reads(_reference_fix_fracs,
                                                                      _nested(400))
    assert large > 3.5 * small


@pytest.mark.parametrize("levels", [1_000, 20_000])
def test_nested_fracs_are_linear(levels):
    text = _nested(levels)
    reads = _reads(_fix_fracs, text)
    assert reads <= 8 * len(text), (reads, len(text))
    assert _reads(_fix_fracs, _nested(2 * levels)) <= 2.2 * reads


def test_nested_fracs_result():
    assert _fix_fracs(_nested(3)) == r"\frac{\frac{\frac{1}{2}}{3}}{3}"
    deep = _fix_fracs(_nested(20_000))
    assert deep == "\\frac{" * 19_999 + "\\frac{1}{2}" + "}{3}" * 19_999
    assert normalize_answer(r"\dfrac{\frac12}{3}") == r"\frac{\frac{1}{2}}{3}"


def test_same_output_as_the_previous_implementation():
    """Random LaTeX-ish strings (nested, truncated, escaped, commands as arguments)."""
    tokens = ["\\frac", "{", "}", "1", "2", " ", "\\pi", "x", "\\{", "\\}", "\\\\", "{3}",
              "\\sqrt"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 14)))
        assert _fix_fracs(text) == _reference_fix_fracs(text), text

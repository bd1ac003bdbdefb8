"""Final-answer extraction and equivalence for MATH-style problems.

Public API:

* `extract_answer(text)`: the content of the last ``\\boxed{...}`` / ``\\boxed x`` /
  ``\\fbox{...}`` (braces matched, nested braces allowed), else the PRM800K ``# Answer``
  section, else ``None``. Never raises.
* `is_equiv(a, b, *, symbolic=True, timeout_s=2.0)`: whether two final answers are the same.
  ``a`` is the reference (ground truth), ``b`` the candidate. Never raises on strings;
  ``None`` on either side is "no answer" and compares unequal.

How `is_equiv` decides, cheapest first:

1. **String normalization** (`normalize_answer`), in the spirit of the MATH answer
   normalization (Hendrycks et al., 2021, "Measuring Mathematical Problem Solving With the
   MATH Dataset") and the PRM800K grader (Lightman et al., 2023, "Let's Verify Step by
   Step"): math delimiters, LaTeX spacing, ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``,
   degrees, percent, dollars, trailing units (``\\text{ cm}``, ``5 inches``, ...),
   ``\\text{}`` wrappers, ``x =`` prefixes, trailing periods, thousands separators,
   ``.5`` -> ``0.5``, ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\frac12`` -> ``\\frac{1}{2}``,
   ``a/b`` -> ``\\frac{a}{b}``, then all whitespace removed.
2. **Structure**: tuples / intervals ``(a,b]`` compare element-wise in order and the bracket
   types must match; sets ``\\{...\\}`` and bare comma lists compare as multisets; unions
   ``A \\cup B`` compare part by part.
3. **Numbers**: elements that parse as numbers (integers, decimals, ``\\frac{p}{q}``,
   ``p/q``, ``m\\times10^{k}``) are exact rationals; two exact values must be equal, and when
   either side is a decimal the test is ``|x - y| <= 1e-6 * max(|x|, |y|)``.
4. **Symbolic** (only if ``symbolic=True``, 1-3 failed, at least one side is not purely
   numeric, and both sides look like mathematics rather than prose): ``math-verify``
   (``parse`` with its LaTeX extractor only, then ``verify(gold, pred)``) runs in a reused
   worker *process* with a hard wall-clock limit. Inside the worker an ``ITIMER_REAL`` alarm
   interrupts Python-level work at ``timeout_s``; if the worker still has not answered after
   ``timeout_s + 0.25`` s (stuck in C code, or stopped), it is killed and replaced. A timeout
   returns ``False`` and is counted in `symbolic_stats()`. The worker is a fresh interpreter
   (not a fork: safe next to JAX threads, and it imports neither JAX nor scalign); the first
   symbolic call waits for it to start (about 1 s; `start_symbolic_workers` pre-starts it).

Other helpers: `normalize_answer` / `clean_answer` (the string forms used above),
`symbolic_equiv` (step 4 alone), `symbolic_stats` / `reset_symbolic_stats` (counters:
calls, timeouts, hard kills, errors, cache hits, worker starts), `start_symbolic_workers` /
`shutdown_symbolic_workers` (worker lifetime; at most 2 workers per process, shared by
threads; a forked child starts its own).

Safety: nothing here calls ``eval``/``exec`` on model output. math-verify's LaTeX path
parses with an ANTLR grammar (``latex2sympy2_extended``) into SymPy constructors; its other
extractor (``ExprExtractionConfig``) uses ``sympy.parse_expr``, which evaluates Python code,
so it is never enabled here. The worker also caps its address space (default 4 GiB).
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_HEADER_RE = re.compile(r"^[ \t]*#[ \t]*Answer[ \t]*:?[ \t]*$", re.IGNORECASE)


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` matching ``text[open_idx] == "{"``, or None if unbalanced.

    Escaped braces ``\\{`` / ``\\}`` (LaTeX set braces) do not count.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_span(text: str, start: int, end: int) -> tuple[str | None, int]:
    """Content of the box command ``text[start:end]`` and the index where the box ends.

    ``\\boxed{...}`` takes the brace group; ``\\boxed x`` takes the token up to the next
    whitespace or ``$``. Returns ``(None, len(text))`` for a truncated box.
    """
    i = end
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None, n
    if text[i] == "{":
        close = _match_brace(text, i)
        if close is None:
            return None, n
        return text[i + 1 : close], close + 1
    j = i
    while j < n and not text[j].isspace() and text[j] != "$":
        j += 1
    return (text[i:j] if j > i else None), max(j, i + 1)


def _unwrap_box(content: str) -> str:
    """Strips redundant whole-content box wrappers: ``\\boxed{\\boxed{5}}`` -> ``5``."""
    for _ in range(8):
        s = content.strip()
        m = _BOX_RE.match(s)
        if not m:
            break
        inner, stop = _box_span(s, m.start(), m.end())
        if inner is None or stop != len(s):
            break
        content = inner
    return content


def _answer_section(text: str) -> str | None:
    """Text after the last ``# Answer`` line up to the next blank line (PRM800K layout)."""
    lines = text.splitlines()
    header = None
    for idx, line in enumerate(lines):
        if _ANSWER_HEADER_RE.match(line):
            header = idx
    if header is None:
        return None
    body: list[str] = []
    for line in lines[header + 1 :]:
        if not line.strip():
            if body:
                break
            continue
        body.append(line)
    answer = "\n".join(body).strip()
    return answer or None


def extract_answer(text: str) -> str | None:
    """The final answer in a solution text, or None.

    Rules: the last top-level ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` wins (braces
    matched, ``\\{``/``\\}`` ignored, a box that is itself just a box is unwrapped); if the
    last box is truncated (unbalanced braces) the answer is None. Without any box, the text
    after the last ``# Answer`` line (up to the next blank line) is the answer. Never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    last: str | None = None
    found = False
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            break
        found = True
        content, stop = _box_span(text, m.start(), m.end())
        last = content
        pos = max(stop, m.end())
    if found:
        if last is None:
            return None
        last = _unwrap_box(last).strip()
        return last or None
    return _answer_section(text)


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    "units?", "cm", "mm", "km", "meters?", "metres?", "centimeters?", "millimeters?",
    "kilometers?", "inch(?:es)?", "feet", "foot", "ft", "yards?", "yd", "miles?", "mph",
    "kg", "grams?", "pounds?", "lbs?", "ounces?", "oz", "seconds?", "sec", "minutes?",
    "mins?", "hours?", "hrs?", "days?", "weeks?", "months?", "years?", "dollars?", "cents?",
    "degrees?", "percent", "liters?", "litres?", "gallons?", "people", "students",
    "ways", "cups?",
)
_UNIT_ALT = "|".join(_UNIT_WORDS)
_UNIT_PHRASE = rf"(?:(?:square|sq\.?|cubic|cu\.?)\s*)?(?:{_UNIT_ALT})(?:\s*\^\s*\{{?\d\}}?)?"
# A trailing plain unit phrase after a number / group, e.g. "5 cm^2", "12 square units".
_TRAILING_UNIT_RE = re.compile(rf"(?<=[\d}})\].\s])\s*(?:{_UNIT_PHRASE})\s*$", re.IGNORECASE)
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|rm)"
# A trailing \text{ ...} group (leading space inside, the MATH convention for units) or a
# \text{unit}; an optional ^2 / ^{3} after it.
_TRAILING_TEXT_UNIT_RE = re.compile(
    rf"{_TEXT_CMD}\s*\{{(?:\s+[^{{}}]*|\s*(?:{_UNIT_PHRASE})\s*)\}}(?:\s*\^\s*\{{?\d\}}?)?\s*$",
    re.IGNORECASE,
)
_TEXT_WRAP_RE = re.compile(rf"{_TEXT_CMD}\s*\{{([^{{}}]*)\}}")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)[lr]?(?![A-Za-z])")
_VAR_PREFIX_RE = re.compile(
    r"^\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?\s*=(?!=)\s*(.+)$",
    re.DOTALL,
)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LEADING_DOT_RE = re.compile(r"(?<![\d.])\.(\d)")
_SQRT_RE = re.compile(r"\\sqrt\s*([^\s{\[\\])")
_SIMPLE_SLASH_RE = re.compile(r"^(-?)([0-9A-Za-z\\{}^.]+)/([0-9A-Za-z\\{}^.]+)$")
_WS_RE = re.compile(r"\s+")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")
_COMMAND_RE = re.compile(r"\\[A-Za-z]+|\\.")
_FRAC_CMD_RE = re.compile(r"\\frac")


def _brace_partners(s: str) -> dict[int, int]:
    """{index of "{": index of its matching "}"} for every balanced brace, in one pass.

    Same matching as `_match_brace` (escaped ``\\{`` / ``\\}`` do not count), for every brace.
    """
    partners: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            partners[stack.pop()] = i
        i += 1
    return partners


def _fix_fracs(s: str) -> str:
    r"""Adds braces to ``\frac`` arguments: ``\frac12`` / ``\frac1{2}`` -> ``\frac{1}{2}``.

    Each ``\frac`` becomes ``\frac{num}{den}`` (whitespace before its arguments dropped), its
    arguments read as LaTeX macro arguments: a ``{...}`` group, a ``\cmd`` or one character.
    A truncated ``\frac`` is left as it is. Braces are matched once for the whole string and
    the edits (braces around bare arguments, dropped whitespace) are applied in one pass, so the
    work is linear in the length however deeply fractions nest (re-reading each argument made
    5,000 nested levels take 17 s). Fractions are read right to left, as if the ones to the
    right had already been rewritten: a bare argument that is itself a rewritten ``\frac``
    is the five characters ``\frac``, and the argument after it is that fraction's numerator.
    """
    starts = [m.start() for m in _FRAC_CMD_RE.finditer(s)]
    if not starts:
        return s
    partners = _brace_partners(s)
    n = len(s)
    rewritten: dict[int, int] = {}  # \frac start -> start of its numerator (rewritten ones)
    wraps: set[tuple[int, int]] = set()
    drops: dict[int, int] = {}  # whitespace [a, b) to drop
    for pos in reversed(starts):
        k, spans, ok = pos + 5, [], True
        gap_from = k
        while len(spans) < 2:
            while k < n and s[k].isspace():
                k += 1
            if k >= n or s[k] == "}":
                ok = False
                break
            if s[k] == "{":
                close = partners.get(k)
                if close is None:
                    ok = False
                    break
                spans.append((gap_from, k, k, close + 1, False))
                k = close + 1
            elif k in rewritten:  # a rewritten \frac: the token, then its numerator is next
                spans.append((gap_from, k, k, k + 5, True))
                if len(spans) == 2:
                    k += 5
                    break
                spans.append((k + 5, k + 5, rewritten[k], rewritten[k], False))  # no-op
                break
            else:
                m = _COMMAND_RE.match(s, k) if s[k] == "\\" else None
                end = m.end() if m else k + 1
                spans.append((gap_from, k, k, end, True))
                k = end
            gap_from = k
        if not ok:
            continue
        rewritten[pos] = spans[0][1]
        for gap_a, gap_b, a, b, bare in spans:
            if gap_b > gap_a:
                drops[gap_a] = gap_b
            if bare:
                wraps.add((a, b))
    opens = {a: "{" for a, _ in wraps}
    closes = {b: "}" for _, b in wraps}
    out, i = [], 0
    for p in sorted(set(opens) | set(closes) | set(drops)):
        if p > i:
            out.append(s[i:p])
            i = p
        out.append(closes.get(p, "") + opens.get(p, ""))
        if p in drops:
            i = max(i, drops[p])
    out.append(s[i:])
    return "".join(out)


def _strip_trailing_units(s: str) -> str:
    """Removes trailing unit phrases (``\\text{ cm}``, ``5 inches``, ``12 sq units``)."""
    if not _HAS_LETTER_RE.search(s):
        return s
    for _ in range(4):
        m = _TRAILING_TEXT_UNIT_RE.search(s) or _TRAILING_UNIT_RE.search(s)
        if m is None or not s[: m.start()].strip():
            break
        s = s[: m.start()].rstrip()
    return s


def _unwrap_text(s: str) -> str:
    """``\\text{X}`` / ``\\mbox{X}`` / ``\\mathrm{X}`` ... -> ``X`` (innermost first)."""
    for _ in range(8):
        new = _TEXT_WRAP_RE.sub(lambda m: m.group(1), s)
        if new == s:
            break
        s = new
    return s


def _strip_var_prefix(s: str) -> str:
    """``x = 5`` / ``k=3`` / ``f(x) = ...`` -> the right-hand side (single ``=`` only)."""
    m = _VAR_PREFIX_RE.match(s)
    if m and "=" not in m.group(1):
        return m.group(1)
    return s


@functools.lru_cache(maxsize=1 << 16)
def clean_answer(answer: str) -> str:
    """Normalizes an answer but keeps its whitespace (input for the symbolic checker)."""
    s = answer.strip()
    if _BOX_RE.search(s):
        inner = extract_answer(s)
        if inner is not None:
            s = inner
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("{,}", ",").replace(",\\!", ",")
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\displaystyle", "")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_trailing_units(s.strip())
    s = _unwrap_text(s)
    s = _strip_trailing_units(s.strip())
    s = s.strip()
    while s.endswith(".") and not s.endswith("\\."):
        s = s[:-1].rstrip()
    s = _strip_var_prefix(s).strip()
    if s.startswith("+"):
        s = s[1:]
    return s


def _compact_atom(s: str) -> str:
    """Rules on whitespace-free text of one answer or one element of a tuple/list."""
    s = _strip_var_prefix(s)
    while s.endswith(".") and not s.endswith("\\."):
        s = s[:-1]
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _LEADING_DOT_RE.sub(r"0.\1", s)
    m = _SIMPLE_SLASH_RE.match(s)
    if m and m.group(2) and m.group(3):
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    return s


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """Canonical whitespace-free string form of an answer (see the module docstring)."""
    s = clean_answer(answer)
    s = _WS_RE.sub("", s)
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    return _compact_atom(s)


# --------------------------------------------------------------------------------------------
# Structure and numbers
# --------------------------------------------------------------------------------------------

_OPENERS = "([{"
_CLOSERS = ")]}"
_MAX_DIGITS = 60
_INT_RE = re.compile(r"^-?\d+$")
_DEC_RE = re.compile(r"^-?(?:\d+\.\d*|\.\d+)$")
_SCI_RE = re.compile(r"^(-?(?:\d+\.?\d*|\.\d+))(?:e|\\times10\^|\\cdot10\^)\{?([-+]?\d{1,3})\}?$")
_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_SLASH_NUM_RE = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z ]*$")
REL_TOL = 1e-6
_MAX_ELEMENTS = 64
_REL_TOL_Q = Fraction(1, 10**6)


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Splits at ``sep`` outside any ``()``, ``[]``, ``{}`` nesting (``\\{``/``\\}`` nest too)."""
    if sep not in s:
        return [s]
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _outer_group(s: str) -> tuple[str, str, str] | None:
    """``(open, close, body)`` if one bracket pair encloses all of ``s``, else None.

    Any of ``(`` / ``[`` closes with any of ``)`` / ``]`` so half-open intervals are groups;
    ``\\{ ... \\}`` is a set.
    """
    if len(s) >= 4 and s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        if _balanced(inner):
            return "\\{", "\\}", inner
        return None
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, c in enumerate(s):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return None
    return (s[0], s[-1], s[1:-1]) if depth == 0 else None


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


@functools.lru_cache(maxsize=1 << 14)
def _parse_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, exact)`` if ``s`` is a plain number, else None.

    ``exact`` is False when a decimal point or a power of ten is involved (those compare
    with relative tolerance `REL_TOL`); integers and fractions of integers are exact.
    """
    if len(s) > 2 * _MAX_DIGITS:
        return None
    try:
        if _INT_RE.match(s):
            return Fraction(int(s)), True
        if _DEC_RE.match(s):
            return Fraction(s), False
        m = _SCI_RE.match(s)
        if m:
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)), False
        m = _FRAC_RE.match(s) or _SLASH_NUM_RE.match(s)
        if m:
            groups = m.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            num, den = groups[-2], groups[-1]
            if Fraction(den) == 0:
                return None
            exact = "." not in num and "." not in den
            return sign * Fraction(num) / Fraction(den), exact
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def numbers_equal(x: tuple[Fraction, bool], y: tuple[Fraction, bool]) -> bool:
    """Exact equality for two exact values, else ``|x - y| <= REL_TOL * max(|x|, |y|)``."""
    (vx, ex), (vy, ey) = x, y
    if vx == vy:
        return True
    if ex and ey:
        return False
    return abs(vx - vy) <= _REL_TOL_Q * max(abs(vx), abs(vy))


def _atoms_equal(x: str, y: str) -> bool:
    """Equality of two normalized scalar answers: string, number, or case-folded words."""
    x, y = _compact_atom(x), _compact_atom(y)
    if not x or not y:
        return False
    if x == y:
        return True
    nx, ny = _parse_number(x), _parse_number(y)
    if nx is not None and ny is not None:
        return numbers_equal(nx, ny)
    if _WORDS_RE.match(x) and _WORDS_RE.match(y):
        return x.casefold() == y.casefold()
    return False


def _multiset_equal(xs: list[str], ys: list[str], depth: int) -> bool:
    """Whether the elements can be paired up one-to-one regardless of order.

    A maximum bipartite matching (Kuhn's augmenting paths), so the result does not depend
    on the order of either side even though tolerant numeric equality is not transitive.
    """
    n = len(xs)
    if n != len(ys):
        return False
    if n > _MAX_ELEMENTS:
        return False
    adj = [[j for j, y in enumerate(ys) if _structured_equal(x, y, depth + 1)] for x in xs]
    match_of_y: list[int | None] = [None] * n

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                owner = match_of_y[j]
                if owner is None or augment(owner, seen):
                    match_of_y[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def _structured_equal(x: str, y: str, depth: int = 0) -> bool:
    """Equivalence of normalized answers with tuple / interval / set / list structure."""
    if x == y:
        return bool(x)
    if depth > 8:
        return False
    ux, uy = _split_top_level(x, "\\cup"), _split_top_level(y, "\\cup")
    if len(ux) > 1 or len(uy) > 1:
        return len(ux) == len(uy) and all(
            _structured_equal(a, b, depth + 1) for a, b in zip(ux, uy, strict=True))
    gx, gy = _outer_group(x), _outer_group(y)
    if gx is not None and gy is not None:
        (ox, cx, bx), (oy, cy, by) = gx, gy
        if (ox == "\\{") != (oy == "\\{"):
            return False
        ex, ey = _split_top_level(bx), _split_top_level(by)
        if ox == "\\{":
            return _multiset_equal(ex, ey, depth)
        if ox != oy or cx != cy or len(ex) != len(ey):
            return False
        return all(_structured_equal(a, b, depth + 1) for a, b in zip(ex, ey, strict=True))
    lx, ly = _split_top_level(x), _split_top_level(y)
    if len(lx) > 1 or len(ly) > 1:
        # Bare comma lists ("all solutions") compare as multisets; a set equals a bare list.
        if gx is not None and gx[0] == "\\{":
            lx = _split_top_level(gx[2])
        if gy is not None and gy[0] == "\\{":
            ly = _split_top_level(gy[2])
        if (gx is not None and gx[0] != "\\{") or (gy is not None and gy[0] != "\\{"):
            return False
        return _multiset_equal(lx, ly, depth)
    # A single parenthesized value equals the bare value: "(5)" == "5".
    if gx is not None and gx[0] == "(" and gx[1] == ")" and gy is None:
        return _structured_equal(gx[2], y, depth + 1)
    if gy is not None and gy[0] == "(" and gy[1] == ")" and gx is None:
        return _structured_equal(x, gy[2], depth + 1)
    return _atoms_equal(x, y)


def _all_numeric(s: str) -> bool:
    """True if every element of ``s`` (a number, or a group/list of numbers) is a number."""
    group = _outer_group(s)
    body = group[2] if group is not None else s
    parts = [p for u in _split_top_level(body, "\\cup") for p in _split_top_level(u)]
    return all(_parse_number(_compact_atom(p)) is not None for p in parts)


_FUNCTION_WORDS = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "arcsin",
    "arccos", "arctan", "sinh", "cosh", "tanh", "infty", "frac", "cdot", "times",
})
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_MAX_SYMBOLIC_LEN = 300


def looks_mathematical(s: str) -> bool:
    """Heuristic gate for the symbolic checker: short, balanced LaTeX without prose words.

    A run of 3+ letters that is not a ``\\command`` or a known function name counts as
    prose (math-verify would read "Monday" as a product of five variables).
    """
    if not s or len(s) > _MAX_SYMBOLIC_LEN or not _balanced(s.replace("\\{", "").replace("\\}", "")):
        return False
    return all(w.lower() in _FUNCTION_WORDS for w in _WORD_RE.findall(s))


# --------------------------------------------------------------------------------------------
# Symbolic checking in a worker process
# --------------------------------------------------------------------------------------------

_KILL_GRACE_S = 0.25
_STARTUP_TIMEOUT_S = 60.0
_WORKER_MEMORY_LIMIT = 4 << 30
_MAX_WORKERS = 2
_CACHE_SIZE = 4096

_WORKER_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_scalign_grading_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main(int(sys.argv[2]))\n"
)


class _SoftTimeout(BaseException):
    """Raised by the worker's interval timer; a BaseException so library code can't swallow it."""


def _worker_verify(gold: str, pred: str, timeout_s: float) -> dict[str, object]:
    """Runs in the worker: math-verify parse + verify under an ``ITIMER_REAL`` alarm."""
    import signal

    from math_verify import LatexExtractionConfig, parse, verify

    def on_alarm(signum: int, frame: object) -> None:
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    config = [LatexExtractionConfig()]
    try:
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3))
        try:
            g = parse(f"${gold}$", extraction_config=config, fallback_mode="no_fallback",
                      parsing_timeout=None)
            p = parse(f"${pred}$", extraction_config=config, fallback_mode="no_fallback",
                      parsing_timeout=None)
            if not g or not p:
                return {"status": "unparsed", "equal": False}
            equal = bool(verify(g, p, timeout_seconds=None))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        return {"status": "timeout", "equal": False}
    except Exception as e:  # noqa: BLE001 - report any parser/sympy failure as "not equal"
        return {"status": "error", "equal": False, "error": type(e).__name__}
    return {"status": "ok", "equal": equal}


def _worker_main(memory_limit: int) -> None:
    """Entry point of the worker process: one JSON request per stdin line, one reply per line."""
    import resource

    if memory_limit > 0:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        except (ValueError, OSError):
            pass
    logging.disable(logging.CRITICAL)
    # Replies go to a private copy of stdout; anything a library prints goes to stderr.
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    import math_verify  # noqa: F401  (import cost paid before "ready")

    reply.write('{"ready": true}\n')
    reply.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            out = _worker_verify(str(req["gold"]), str(req["pred"]), float(req["timeout_s"]))
        except MemoryError:
            out = {"status": "error", "equal": False, "error": "MemoryError"}
        except Exception as e:  # noqa: BLE001
            out = {"status": "error", "equal": False, "error": type(e).__name__}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


class _WorkerGone(Exception):
    """The worker exited, closed its pipes or sent garbage."""


class _WorkerTimeout(_WorkerGone):
    """The worker did not answer before the deadline."""


class _Worker:
    """One symbolic worker process and its line-based pipe protocol."""

    def __init__(self, memory_limit: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_BOOTSTRAP, os.path.abspath(__file__),
             str(memory_limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._buf = b""
        try:
            ready = json.loads(self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S))
            if not isinstance(ready, dict) or ready.get("ready") is not True:
                raise _WorkerGone(f"unexpected first line from worker: {ready!r}")
        except _WorkerGone:
            self.kill()
            raise
        except ValueError as e:
            self.kill()
            raise _WorkerGone("garbled first line from worker") from e

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerTimeout("deadline passed")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _WorkerGone("worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, gold: str, pred: str, timeout_s: float) -> dict[str, object]:
        """Sends one comparison; raises `_WorkerGone` past ``timeout_s + grace``."""
        assert self.proc.stdin is not None
        msg = json.dumps({"gold": gold, "pred": pred, "timeout_s": timeout_s}) + "\n"
        deadline = time.monotonic() + timeout_s + _KILL_GRACE_S
        try:
            self.proc.stdin.write(msg.encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerGone("worker pipe closed") from e
        try:
            reply = json.loads(self._read_line(deadline))
        except ValueError as e:
            raise _WorkerGone("garbled reply") from e
        if not isinstance(reply, dict):
            raise _WorkerGone("garbled reply")
        return reply

    def kill(self) -> None:
        """Kills the worker process (SIGKILL works on stuck or stopped processes)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class _Pool:
    """Up to ``max_workers`` reusable workers, shared by threads of one process."""

    def __init__(self, max_workers: int, memory_limit: int) -> None:
        self.max_workers = max_workers
        self.memory_limit = memory_limit
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_workers)

    def acquire(self) -> _Worker:
        self._slots.acquire()
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is not None and worker.proc.poll() is None:
            return worker
        if worker is not None:
            worker.kill()
        try:
            worker = _Worker(self.memory_limit)
        except BaseException:
            self._slots.release()
            raise
        _count("worker_starts")
        return worker

    def release(self, worker: _Worker, healthy: bool) -> None:
        if healthy:
            with self._lock:
                self._idle.append(worker)
        else:
            worker.kill()
        self._slots.release()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._idle]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_STATS_LOCK = threading.Lock()
_STATS: collections.Counter[str] = collections.Counter()
_POOL_LOCK = threading.Lock()
_POOL: _Pool | None = None
_CACHE: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()


def _count(key: str, n: int = 1) -> None:
    with _STATS_LOCK:
        _STATS[key] += n


def symbolic_stats() -> dict[str, int]:
    """Counters of the symbolic path since start (or the last `reset_symbolic_stats`).

    Keys: ``calls`` (worker requests), ``equal``, ``not_equal``, ``timeouts`` (soft + hard),
    ``hard_timeouts`` (worker killed), ``errors`` (parser/worker failures), ``unparsed``,
    ``cache_hits``, ``worker_starts``.
    """
    keys = ("calls", "equal", "not_equal", "timeouts", "hard_timeouts", "errors", "unparsed",
            "cache_hits", "worker_starts")
    with _STATS_LOCK:
        return {k: _STATS.get(k, 0) for k in keys}


def reset_symbolic_stats() -> None:
    """Zeros the `symbolic_stats` counters and clears the result cache."""
    with _STATS_LOCK:
        _STATS.clear()
        _CACHE.clear()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool(_MAX_WORKERS, _WORKER_MEMORY_LIMIT)
        return _POOL


def start_symbolic_workers(n: int = 1) -> None:
    """Starts up to ``n`` symbolic workers now, so the first `is_equiv` doesn't wait."""
    pool = _pool()
    workers: list[_Worker] = []
    try:
        for _ in range(min(n, pool.max_workers)):
            workers.append(pool.acquire())
    except _WorkerGone as e:
        raise RuntimeError(f"symbolic grading worker failed to start: {e} (is math-verify "
                           "installed for this interpreter?)") from e
    finally:
        for worker in workers:
            pool.release(worker, healthy=True)


def shutdown_symbolic_workers() -> None:
    """Kills idle symbolic workers (they restart on demand); also runs at interpreter exit."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


def _forget_pool_after_fork() -> None:
    # A forked child must not talk to its parent's workers over the inherited pipes.
    global _POOL
    _POOL = None


atexit.register(shutdown_symbolic_workers)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def symbolic_equiv(gold: str, pred: str, timeout_s: float = 2.0) -> bool:
    """math-verify equivalence of two cleaned answers in a worker, with a hard time limit.

    Returns False on timeout (counted), parse failure or worker failure; results other
    than timeouts are cached (LRU, 4096 pairs).
    """
    key = (gold, pred)
    with _STATS_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            _STATS["cache_hits"] += 1
            return _CACHE[key]
    pool = _pool()
    try:
        worker = pool.acquire()
    except (_WorkerGone, OSError) as e:
        if not symbolic_stats()["errors"]:
            _log.warning("symbolic grading worker failed to start: %s", e)
        _count("errors")
        return False
    _count("calls")
    try:
        reply = worker.request(gold, pred, timeout_s)
    except _WorkerTimeout:
        pool.release(worker, healthy=False)
        _count("timeouts")
        _count("hard_timeouts")
        return False
    except _WorkerGone:
        pool.release(worker, healthy=False)
        _count("errors")
        return False
    pool.release(worker, healthy=True)
    status = reply.get("status")
    equal = bool(reply.get("equal")) and status == "ok"
    if status == "timeout":
        _count("timeouts")
        return False
    _count({"ok": "equal" if equal else "not_equal", "unparsed": "unparsed"}.get(
        str(status), "errors"))
    with _STATS_LOCK:
        _CACHE[key] = equal
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return equal


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


def is_equiv(a: str | None, b: str | None, *, symbolic: bool = True,
             timeout_s: float = 2.0) -> bool:
    """Whether answer ``b`` is equivalent to reference answer ``a``.

    Steps (module docstring has the details): string normalization, tuple / interval /
    set structure, numeric comparison (exact rationals; ``rel_tol=1e-6`` when a decimal is
    involved), then, if ``symbolic`` and both sides look mathematical and not both are
    purely numeric, math-verify in a worker process killed after ``timeout_s`` (+0.25 s).
    Empty or missing answers are never equivalent. Never raises on strings.
    """
    if symbolic and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        na, nb = normalize_answer(a), normalize_answer(b)
        if not na or not nb:
            return False
        if na == nb or _structured_equal(na, nb):
            return True
        if not symbolic or (_all_numeric(na) and _all_numeric(nb)):
            return False
        ca, cb = clean_answer(a), clean_answer(b)
        if not (looks_mathematical(ca) and looks_mathematical(cb)):
            return False
    except RecursionError:
        return False
    return symbolic_equiv(ca, cb, timeout_s)

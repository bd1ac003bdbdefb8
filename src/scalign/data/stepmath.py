"""stepmath: a synthetic, graded, step-verifiable math domain.

Why it exists: the easy-to-hard experiments (Sun et al. 2024, "Easy-to-Hard Generalization:
Scalable Alignment Beyond Human Supervision") need problems with difficulty levels whose every
solution step can be checked; with no human labeller here, a program labels the steps.

**Problems.** A problem is a left-to-right chain of single-digit operations modulo M (M = 7 in
the default design)::

    # Question

    Mod 7, left to right: 3+4*5-2

    # Solution

    3+4=0

    0*5=0

    0-2=5

    # Answer

    5

`v_0 = start`, `v_k = (v_{k-1} op_k b_k) mod M`, answer = `v_n`. Step k is the text
``"{v_{k-1}}{op_k}{b_k}={v_k}"``; steps are joined by ``"\n\n"`` and followed by
``"\n\n# Answer\n\n{v_n}"``: the PRM800K layout (Lightman et al. 2023) that the paper uses.
Operands: `start` in 0..M-1, `+`/`-` operands in 1..M-1, `*` operands in 2..M-1 (no trivial
steps). With a prime M every operation by a non-zero operand is a bijection, so answers are
close to uniform at every level (a constant guess scores about 1/M).

**Levels.** A `Design` maps each level to a `LevelSpec` (chain length, number of `*` and of
`-`, and which multipliers), plus the modulus and two layout switches (`spaced`: "3 + 4 = 0";
`reverse`: operations written right to left, next to the start value). Designs never let two
levels produce the same problem. `graded99` (the default until issue 15): every level has four
operations; levels 1-3 add, subtract and multiply by small numbers, levels 4-5 multiply two or
three times by 4-6, facts that level-3 problems show only rarely (3 in 99 draws). There the
evaluator needs the same rare facts as the generator, so an easy-trained PRM barely judged hard
steps (hard outcome ROC-AUC 0.53-0.57 over 3 seeds, `experiments/results/e2h_stepmath_2026-11-27`).

**Search designs** (`ReachSpec`; "reach4", and its goal layouts below, "reach4c" being
`DEFAULT_DESIGN` since 2026-12-05): "Mod 10, reach 7: 3+4?5*2?6"
-- the solver chooses the "?" operations so that the chain ends at the target; steps are the
same "a op b = c" lines, the answer is the filled chain ("3+4*5*2-6"; any filling that reaches
the target is right). Every level has 4 single-digit steps; a level fixes how many "?" there are
and how many of the fillings reach the target, so hard problems need more search (Gandhi et al.
2024, Stream of Search: Countdown) while checking a step stays the same local arithmetic. What a
tiny policy learns of each design is measured by `experiments/studies/stepmath_learnability.py`
(numbers in that script's docstring). Every demonstration's last result is the target, so a
policy SFT'd on them learns to copy it there instead of computing the step; `goal_spans` marks
those characters, and the demo's SFT leaves them out of the loss (`config.sft.exclude_goal`):
the policy then computes the last step, and a chain that misses the target fails by
`ERR_TARGET`, a comparison an easy-trained PRM can learn -- in one of three study seeds
(issue 15, 2026-12-05; experiments/results/e2h_stepmath_2026-12-05/).

**Goal layouts** (`Design.goal_layout`, `GOAL_LAYOUTS`): the same search levels with the goal
written into every step, so that checking the last step against it needs nothing outside the
step's own line. "reach4g" ("Mod 10, goal 7: ...", steps "[7] 3+4=7") carries a copy of the
target first; "reach4c" ("Mod 10, target 7: ...", steps "3+4=7, 7-7=0") writes each step's
distance to the target as a second step, result minus target mod M, so the last step is right
iff that arithmetic is right and reads 0 -- a check made of the arithmetic the policy is trained
on at every step. Each copy of the target is checked against the question (`ERR_GOAL`).
In every gold demonstration the last step's result, its copy of the goal and its distance
agree, so copying fits them as well as computing; `Problem.miss_demonstration` (and
`miss_records`) writes out a filling that misses the target, the counterexample whose last step
only computing fits (`config.sft.miss_demos`).

**Path designs** (`PathSpec`, `PathProblem`; opt-in, e.g. "path5"): "Go from q to h: q>v k>g
..." -- the question lists, in random order, the edges of a star of `arms` chains of `arm_len`
single-letter nodes hanging off the source; the target sits `depth` edges down one arm. Steps
are "u>v", the answer is the path ("q>b>h"). Choosing the first edge needs depth - 1 backward
lookups from the target (Bachmann & Nagarajan 2024, "The pitfalls of next-token prediction":
path-star graphs); checking a step is a lookup (does it start at the current node, is it
listed, was the target already reached) and the target check a comparison at the answer. A
node must be one token wherever it stands, so these designs need a character tokenizer
(`config.data.tokenizer_model_type = "char"`). What a tiny policy learns of them (2026-12-05,
`experiments/studies/stepmath_learnability.py`): not the lookups, in 2000 SFT steps; see that
script's docstring.

**Verifier.** `verify(problem, text)` labels every step of any generated solution: step k is
correct iff it reads ``"a op b = c"`` (spaces optional) with `a` the correct running value,
`op`/`b` the k-th operation of the question and `c = (a op b) mod M`. In a search problem `a` is
the result of the solver's own previous step and any operation is valid at a "?" (local
validity, as PRM800K rates steps: a valid step that cannot reach the target is still positive),
except the last step, whose result must be the target (`ERR_TARGET`: a local comparison with
the question, so a chain that misses the target has a negative step); the answer is graded by
whether the filled chain reaches the target. In a path problem step k is correct iff it reads
"u>v" with u the node the path stands at and u>v a listed edge, and the path has not reached
the target yet (`ERR_EXTRA`); a path of valid steps that stops away from the target fails at
the answer (`ERR_TARGET`, `first_error` = the number of steps). Labels follow the PRM800K
convention: 1 for correct steps up to the first error, 0 for the first wrong step and every
step after it. The final answer is graded separately (`outcome_correct`), and `answer_label`
is 1 iff every step is correct, the chain is complete and the answer is right. Malformed text
(garbage, truncation, no answer section) is labelled, never raised on.

**Determinism.** Problem i of (level, seed, design name) is drawn from SHA-256 in counter mode
keyed by those values, so the same arguments give the same problems on every platform, process
and numpy version, and `generate(level, n, seed)` is a prefix of `generate(level, m, seed)` for
n <= m. `splits` draws test problems first and then train problems that are not in the test set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence

OPS = ("+", "-", "*")
QUESTION_TEMPLATE = "Mod {modulus}, left to right: {expression}"
# Right-to-left layout: the first operation to apply is written last, next to the start value.
QUESTION_TEMPLATE_RTL = "Mod {modulus}, apply right to left: {operations} to {start}"
# Search layout ("reach" designs): "?" marks an operation the solver chooses.
# Goal layouts of search designs (`Design.goal_layout`), named by the question's word:
#   ""       "Mod 10, reach 7: 3+4?5*2?6", steps "3+4=7" (reach4);
#   "prefix" "Mod 10, goal 7: ...", every step carries the goal first: "[7] 3+4=7" (reach4g);
#   "check"  "Mod 10, target 7: ...", every step ends with its distance to the goal written
#            as a second step, "3+4=7, 7-7=0" (result minus target mod M; reach4c), so the
#            last step's check against the goal is arithmetic plus "is it 0".
GOAL_LAYOUTS = {"": "reach", "prefix": "goal", "check": "target"}
_LAYOUT_OF_WORD = {word: layout for layout, word in GOAL_LAYOUTS.items()}
QUESTION_TEMPLATE_SEARCH = "Mod {modulus}, {word} {target}: {pattern}"
GOAL_PREFIX = "[{goal}] "
GOAL_CHECK_SEP = ", "
FREE_OP = "?"
# Path layout ("path" designs): edges "u>v" of a graph whose nodes are single letters.
QUESTION_TEMPLATE_PATH = "Go from {source} to {target}: {edges}"
NODE_NAMES = "abcdefghijklmnopqrstuvwxyz"
STEP_DELIMITER = "\n\n"
ANSWER_HEADER = "# Answer"
PROMPT_TEMPLATE = "# Question\n\n{question}\n\n# Solution\n\n"


# Error categories of `Verdict.error` (the first error of a solution).
ERR_MALFORMED = "malformed"        # a step that does not read "a op b = c"
ERR_OPERAND = "wrong_operand"      # `a` is not the running value
ERR_OPERATION = "wrong_operation"  # `op` or `b` is not the question's k-th operation
ERR_ARITHMETIC = "wrong_arithmetic"  # `c != (a op b) mod M`
ERR_EXTRA = "extra_step"           # more steps than the chain has operations
ERR_INCOMPLETE = "incomplete"      # all steps right, but fewer than the chain needs
ERR_TARGET = "missed_target"       # search problems: the last step does not end at the target
ERR_GOAL = "wrong_goal"            # goal layouts: a step's copy of the goal is not the target
ERROR_TYPES = (ERR_MALFORMED, ERR_OPERAND, ERR_OPERATION, ERR_ARITHMETIC, ERR_EXTRA,
               ERR_INCOMPLETE, ERR_TARGET, ERR_GOAL)


# ------------------------------------------------------------------------------ designs
@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """What a level's problems look like.

    Attributes:
      num_ops: chain lengths n to draw from (uniformly).
      num_mul: numbers m of `*` operations to draw from (uniformly, among values <= n).
      num_sub: None: every other operation is `+` or `-` with probability 1/2; else the
        numbers s of `-` operations to draw from (uniformly, among values <= n - m), the rest
        being `+`.
      mul_operands: None: `*` operands uniform in 2..M-1; else the values to draw from
        (uniformly over the tuple, so repeating a value weights it).
    """

    num_ops: tuple[int, ...]
    num_mul: tuple[int, ...]
    num_sub: tuple[int, ...] | None = None
    mul_operands: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.num_ops or min(self.num_ops) < 1:
            raise ValueError(f"LevelSpec.num_ops must be non-empty positive ints, got "
                             f"{self.num_ops}")
        if not self.num_mul or min(self.num_mul) < 0:
            raise ValueError(f"LevelSpec.num_mul must be non-empty ints >= 0, got {self.num_mul}")
        if min(self.num_mul) > max(self.num_ops):
            raise ValueError(f"LevelSpec: every num_mul {self.num_mul} exceeds every num_ops "
                             f"{self.num_ops}")
        if self.num_sub is not None and (not self.num_sub or min(self.num_sub) < 0):
            raise ValueError(f"LevelSpec.num_sub must be None or non-empty ints >= 0, got "
                             f"{self.num_sub}")
        for n in self.num_ops:
            if not any(m <= n and self.sub_choices(n, m) for m in self.num_mul):
                raise ValueError(f"LevelSpec: no (num_mul, num_sub) choice fits num_ops={n}")

    def mul_choices(self, n: int) -> list[int]:
        return [m for m in self.num_mul if m <= n and self.sub_choices(n, m)]

    def sub_choices(self, n: int, m: int) -> list[int]:
        """Allowed numbers of `-` among the n - m additive operations."""
        allowed = range(n - m + 1) if self.num_sub is None else self.num_sub
        return [s for s in allowed if s <= n - m]

    def shapes(self) -> set[tuple[int, int, int]]:
        """The (n, m, s) = (operations, multiplications, subtractions) triples of this level."""
        return {(n, m, s) for n in self.num_ops for m in self.mul_choices(n)
                for s in self.sub_choices(n, m)}


@dataclasses.dataclass(frozen=True)
class ReachSpec:
    """A level of a search ("reach") design: every problem has `num_ops` operations with
    operands in 2..M-1; `free` of them (random positions) are "?" -- the solver chooses + - or
    * -- and the question gives a target value that at least one filling reaches. The level
    also fixes how many of the 3^free fillings reach the target (`solutions`, inclusive range):
    fewer solving fillings = more search for the generator, while checking a step stays the
    same local arithmetic at every level."""

    num_ops: int
    free: int
    solutions: tuple[int, int]
    # The "?"s are drawn among the last `horizon` operations (None: among all of them), so
    # `Problem.horizon` <= horizon: 1 puts the one "?" on the last operation, a local choice.
    horizon: int | None = None

    def __post_init__(self):
        if not 1 <= self.free <= self.num_ops:
            raise ValueError(f"ReachSpec.free={self.free} must be in 1..num_ops={self.num_ops}")
        if self.horizon is not None and not self.free <= self.horizon <= self.num_ops:
            raise ValueError(f"ReachSpec.horizon={self.horizon} must be in free={self.free}.."
                             f"num_ops={self.num_ops}")
        lo, hi = self.solutions
        if not 1 <= lo <= hi <= 3 ** self.free:
            raise ValueError(f"ReachSpec.solutions={self.solutions} must satisfy "
                             f"1 <= lo <= hi <= 3^free = {3 ** self.free}")

    def shapes(self) -> set[tuple[int, int, int]]:
        """(num_ops, free, solution count) triples: levels of a design must not share one."""
        return {(self.num_ops, self.free, k) for k in range(self.solutions[0],
                                                             self.solutions[1] + 1)}


@dataclasses.dataclass(frozen=True)
class PathSpec:
    """A level of a path design: the question lists the edges of a star of `arms` chains of
    `arm_len` nodes each, hanging off the source; the target is the node `depth` edges down
    one arm. Every level draws the same graph shape (same question length); only the target's
    depth differs. The solver's one choice is the first edge, and choosing it needs `depth - 1`
    lookups backwards from the target (which node leads to it, which to that one, ...); every
    later step is forced (the current node's one successor), and checking any step is a local
    lookup: does the edge start at the current node, is it in the question's list, has the path
    already reached the target."""

    depth: int
    arms: int = 4
    arm_len: int = 5

    def __post_init__(self):
        if self.arms < 2 or self.arm_len < 1:
            raise ValueError(f"PathSpec needs arms >= 2 and arm_len >= 1, got arms={self.arms} "
                             f"arm_len={self.arm_len}")
        if not 1 <= self.depth <= self.arm_len:
            raise ValueError(f"PathSpec.depth={self.depth} must be in 1..arm_len={self.arm_len}")
        if 1 + self.arms * self.arm_len > len(NODE_NAMES):
            raise ValueError(f"PathSpec: {1 + self.arms * self.arm_len} nodes do not fit the "
                             f"{len(NODE_NAMES)} node names")

    @property
    def num_nodes(self) -> int:
        return 1 + self.arms * self.arm_len

    def shapes(self) -> set[tuple[int, int, int]]:
        """(arms, arm_len, depth): levels of a design must not share one."""
        return {(self.arms, self.arm_len, self.depth)}


@dataclasses.dataclass(frozen=True)
class Design:
    """A named level table: `LevelSpec` per level, the modulus M (values are 0..M-1) and two
    layout switches (`spaced` "3 + 4 = 0"; `reverse`: operations listed right to left, next to
    the start value), and for search designs `goal_layout` (how steps carry the goal:
    `GOAL_LAYOUTS`; "prefix": "[7] 3+4=7", "check": "3+4=7, 7-7=0", so checking the last step
    against the goal needs nothing outside its line). Levels must not share an (n, m, s)
    shape, so no problem can belong to two levels (test problems of a hard level never appear
    in an easy level's train split). The name keys the random stream: two designs with the same
    spec and different names draw different problems."""

    name: str
    levels: Mapping[int, LevelSpec | ReachSpec | PathSpec]
    modulus: int = 7
    spaced: bool = False
    reverse: bool = False
    goal_layout: str = ""

    def __post_init__(self):
        if self.goal_layout not in GOAL_LAYOUTS:
            raise ValueError(f"Design {self.name!r}: unknown goal_layout {self.goal_layout!r}; "
                             f"known: {sorted(GOAL_LAYOUTS)}")
        if self.goal_layout and not all(isinstance(s, ReachSpec) for s in self.levels.values()):
            raise ValueError(f"Design {self.name!r}: goal_layout needs a search design (ReachSpec "
                             f"levels): only a search problem has a goal to carry")
        if self.modulus < 3 or self.modulus > 10:
            raise ValueError(f"Design {self.name!r}: modulus must be in 3..10 (single-digit "
                             f"values), got {self.modulus}")
        kinds = {type(spec) for spec in self.levels.values()}
        if len(kinds) > 1:
            raise ValueError(f"Design {self.name!r}: mixes level kinds (chain LevelSpec, "
                             f"search ReachSpec, path PathSpec)")
        owner: dict[tuple[int, int, int], int] = {}
        for level, spec in self.levels.items():
            for shape in spec.shapes():
                if shape in owner:
                    raise ValueError(f"Design {self.name!r}: levels {owner[shape]} and {level} "
                                     f"both produce chains with (num_ops, num_mul, num_sub)="
                                     f"{shape}")
                owner[shape] = level

    @property
    def search(self) -> bool:
        """True for a "reach" design (levels are `ReachSpec`)."""
        return any(isinstance(spec, ReachSpec) for spec in self.levels.values())

    @property
    def path(self) -> bool:
        """True for a path design (levels are `PathSpec`)."""
        return any(isinstance(spec, PathSpec) for spec in self.levels.values())

    @property
    def kind(self) -> str:
        """"chain", "reach" or "path"."""
        return "reach" if self.search else "path" if self.path else "chain"

    def spec(self, level: int) -> LevelSpec | ReachSpec | PathSpec:
        if level not in self.levels:
            raise ValueError(f"design {self.name!r} has no level {level}; levels: "
                             f"{sorted(self.levels)}")
        return self.levels[level]


def _design(name: str, table: Mapping[int, tuple[Sequence[int], Sequence[int]]],
            **kwargs: object) -> Design:
    return Design(name, {lv: LevelSpec(tuple(n), tuple(m)) for lv, (n, m) in table.items()},
                  **kwargs)  # type: ignore[arg-type]


_MOSTLY_SMALL_MULTIPLIERS = (2,) * 24 + (3,) * 24 + (4, 5, 6)
# The search levels of reach4 and its goal layouts (see "reach4" below).
_REACH4_LEVELS = {1: ReachSpec(4, 1, (1, 3)), 2: ReachSpec(4, 2, (3, 9)),
                  3: ReachSpec(4, 2, (1, 2)), 4: ReachSpec(4, 3, (1, 3)),
                  5: ReachSpec(4, 4, (1, 6))}

DESIGNS: dict[str, Design] = {
    # School order, four operations in every level, modulo 7:
    #   1 additions only; 2 additions and subtractions (at least one subtraction);
    #   3 one multiplication, by 2 or 3 in 48 of 51 draws and by 4, 5 or 6 in 3 of 51;
    #   4 two multiplications by 4-6; 5 three multiplications by 4-6.
    # Hard problems are as long as easy ones and made of the same kinds of steps, but lean on
    # the multiplication facts that easy problems show rarely ("larger numbers").
    "graded": Design("graded", {1: LevelSpec((4,), (0,), (0,)),
                                2: LevelSpec((4,), (0,), (1, 2, 3, 4)),
                                3: LevelSpec((4,), (1,), None, _MOSTLY_SMALL_MULTIPLIERS),
                                4: LevelSpec((4,), (2,), None, (4, 5, 6)),
                                5: LevelSpec((4,), (3,), None, (4, 5, 6))}, modulus=7),
    # Hard = longer: level L has L+2 operations of any kind, modulo 7. A tiny model trained on
    # levels 1-3 solves them all and fails levels 4-5 from the first step on (it locates the
    # k-th operation by its distance from the end of the question); kept as the reference.
    # The default: "graded" with rarer hard facts, level 3 multiplying by 4-6 in 3 of 99 draws
    # (by 2 or 3 in 96). In the demo's SFT budget (1200 steps) a tiny policy learns the easy
    # arithmetic on every seed measured and the rare facts only partly (see the module doc).
    "graded99": Design("graded99", {1: LevelSpec((4,), (0,), (0,)),
                                    2: LevelSpec((4,), (0,), (1, 2, 3, 4)),
                                    3: LevelSpec((4,), (1,), None,
                                                 (2,) * 48 + (3,) * 48 + (4, 5, 6)),
                                    4: LevelSpec((4,), (2,), None, (4, 5, 6)),
                                    5: LevelSpec((4,), (3,), None, (4, 5, 6))}, modulus=7),
    "length": _design("length", {lv: ((lv + 2,), tuple(range(lv + 3))) for lv in range(1, 6)},
                      modulus=7),
    # Search ("Countdown-like"; Gandhi et al. 2024, Stream of Search): 4 operations modulo 10
    # with operands 2-9 at every level; "?" marks operations the solver chooses so that the
    # chain reaches the target. Level = how many "?" (1 / 2 / 2 / 3 / 4) and how many of the
    # 3^? fillings reach the target (1-3 of 3 / 3-9 of 9 / 1-2 of 9 / 1-3 of 27 / 1-6 of 81).
    # Every step is the same local single-digit check at every level and every question has
    # the same length; the answer is the filled chain (structured: up to 81 values).
    "reach4": Design("reach4", _REACH4_LEVELS, modulus=10),
    # "reach4" with the goal carried in every step: "Mod 10, goal 7: 3+4?5*2?6", steps
    # "[7] 3+4=7". The last step's check against the goal ("[7] 1*5=5" is wrong) becomes a
    # comparison within one line, like the arithmetic check, instead of a look-up of the
    # question's target, which an easy-trained PRM learned in 2 of 6 reach4 seeds; each step's
    # copy of the goal is checked against the question (`ERR_GOAL`). Measured on reach4's
    # failing seed 0: the PRM still does not learn the check (hard outcome ROC-AUC 0.52).
    "reach4g": Design("reach4g", _REACH4_LEVELS, modulus=10, goal_layout="prefix"),
    # "reach4" with each step's distance to the goal written as a second step: "Mod 10,
    # target 7: 3+4?5*2?6", steps "3+4=7, 7-7=0" (result minus target, mod 10). The policy is
    # trained to compute that distance at every step, so a backbone shared with the PRM has it,
    # and the last step is right iff its distance step is right and reads 0. The default since
    # 2026-12-05: hard outcome ROC-AUC of the easy-trained PRM 0.978 / 0.911 / 0.521 and of the
    # OPRM 0.990 / 0.964 / 0.869 on seeds 0-2 (experiments/results/e2h_stepmath_reach4c_*).
    "reach4c": Design("reach4c", _REACH4_LEVELS, modulus=10, goal_layout="check"),
    # "reach4c" with hardness = planning horizon: easy problems have 2, 3 or 4 operations
    # (levels 1-3) whose one "?" is the LAST operation -- a local choice, the op whose result
    # is the target -- and hard problems have 4 operations with 2 (level 4) or 3 (level 5) "?"
    # anywhere, so their first choice must look 2-4 operations ahead. Hard questions are as
    # long as level 3's; steps and their checks are reach4c's at every level. Measured
    # (2026-12-06, seed 0, the demo's SFT, experiments/results/e2h_stepmath_reach4h_probe_*):
    # the local choice is not learned either (easy greedy 55.0%, random filling 37%), and a "?"
    # before the last operation is a form SFT never showed: hard pass@16 with every step
    # verified 11.5% (reach4c, same seed: 56%), 19% of hard greedy failures malformed. Not a
    # default.
    "reach4h": Design("reach4h", {1: ReachSpec(2, 1, (1, 3), horizon=1),
                                  2: ReachSpec(3, 1, (1, 3), horizon=1),
                                  3: ReachSpec(4, 1, (1, 3), horizon=1),
                                  4: ReachSpec(4, 2, (1, 3)), 5: ReachSpec(4, 3, (1, 6))},
                      modulus=10, goal_layout="check"),
    # Path ("graph search"; Lee et al. 2025 train on mazes, Bachmann & Nagarajan 2024 on path-star
    # graphs): 4 arms of 5 letters off the source at every level, edges listed in random order;
    # the target sits 1-5 edges down one arm (level = depth). Choosing the first edge needs
    # depth - 1 backward lookups from the target; checking any step is one lookup and a
    # comparison. A random first edge is right 1 time in 4; the answer is the path.
    "path5": Design("path5", {lv: PathSpec(lv) for lv in range(1, 6)}),
}
DEFAULT_DESIGN = "reach4c"


def get_design(design: str | Design | None) -> Design:
    """A `Design` by name (None = `DEFAULT_DESIGN`), or the given one."""
    if isinstance(design, Design):
        return design
    name = DEFAULT_DESIGN if design is None else design
    if name not in DESIGNS:
        raise ValueError(f"unknown stepmath design {name!r}; known: {sorted(DESIGNS)}")
    return DESIGNS[name]


def levels(design: str | Design | None = None) -> tuple[int, ...]:
    """The levels of a design, ascending."""
    return tuple(sorted(get_design(design).levels))


# ------------------------------------------------------------------------------ problems
def apply_op(a: int, op: str, b: int, modulus: int) -> int:
    """(a op b) mod modulus for op in + - * (Python's % is non-negative for a positive modulus)."""
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")


def operand_range(op: str | None, modulus: int) -> tuple[int, int]:
    """Inclusive range of the start value (op None) or of an operand: no trivial steps
    (+0, -0, *0, *1)."""
    if op is None:
        return 0, modulus - 1
    return (2 if op == "*" else 1), modulus - 1


def format_expression(start: int, ops: Sequence[str], operands: Sequence[int], *,
                      spaced: bool) -> str:
    """"3+4*7-2" (or "3 + 4 * 7 - 2" when spaced)."""
    sep = " " if spaced else ""
    return sep.join([str(start)] + [f"{op}{sep}{b}" for op, b in
                                     zip(ops, operands, strict=True)])


def format_step(a: int, op: str, b: int, c: int, *, spaced: bool = False) -> str:
    """The canonical text of one step: "a op b = c" ("3+4=7", or "3 + 4 = 7" when spaced)."""
    return f"{a} {op} {b} = {c}" if spaced else f"{a}{op}{b}={c}"


class _Layout:
    """The PRM800K text layout shared by chain and path problems; subclasses give `level`,
    `question`, `steps` and `answer`."""

    @property
    def prompt(self) -> str:
        """"# Question\\n\\n{q}\\n\\n# Solution\\n\\n"."""
        return PROMPT_TEMPLATE.format(question=self.question)

    @property
    def solution(self) -> str:
        """The gold solution: steps joined by "\\n\\n", then "\\n\\n# Answer\\n\\n{a}"."""
        return (STEP_DELIMITER.join(self.steps) + STEP_DELIMITER + ANSWER_HEADER
                + STEP_DELIMITER + self.answer)

    @property
    def key(self) -> str:
        """Identity of the problem's content (level excluded: designs keep levels disjoint)."""
        return self.question

    @property
    def uid(self) -> str:
        """"stepmath-L{level}-{first 12 hex of sha256(question)}"."""
        digest = hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:12]
        return f"stepmath-L{self.level}-{digest}"


@dataclasses.dataclass(frozen=True)
class Problem(_Layout):
    """One chain problem: v_0 = start, v_k = (v_{k-1} ops[k] operands[k]) mod `modulus`.

    A search problem ("reach" designs) also has a `target` and `free` positions: the question
    shows "?" there and the solver chooses the operation; `ops` is then one filling that reaches
    the target (the gold solution), and any filling that reaches it is a correct answer.
    """

    level: int
    start: int
    ops: tuple[str, ...]
    operands: tuple[int, ...]
    modulus: int = 7
    spaced: bool = False
    reverse: bool = False
    target: int | None = None
    free: tuple[int, ...] = ()
    goal_layout: str = ""

    def __post_init__(self):
        if len(self.ops) != len(self.operands) or not self.ops:
            raise ValueError(f"Problem needs as many operands as ops (>= 1), got ops={self.ops} "
                             f"operands={self.operands}")
        bad = [op for op in self.ops if op not in OPS]
        if bad:
            raise ValueError(f"Problem has unknown operations {bad}; expected {OPS}")
        if (self.target is None) != (not self.free):
            raise ValueError("Problem: a search problem needs both a target and free positions")
        if self.goal_layout not in GOAL_LAYOUTS:
            raise ValueError(f"Problem: unknown goal_layout {self.goal_layout!r}")
        if self.goal_layout and self.target is None:
            raise ValueError("Problem: goal_layout needs a search problem (a target to carry)")
        if self.target is not None and self.values[-1] != self.target:
            raise ValueError(f"Problem: the gold filling {self.ops} ends at {self.values[-1]}, "
                             f"not at the target {self.target}")

    @property
    def search(self) -> bool:
        return self.target is not None

    @property
    def pattern(self) -> str:
        """The question's chain with "?" at the free positions: "3+4?5*2?6"."""
        return format_expression(
            self.start, [FREE_OP if k in self.free else op for k, op in enumerate(self.ops)],
            self.operands, spaced=False)

    def solves(self, ops: Sequence[str]) -> bool:
        """Is `ops` a filling of this search problem (the given operations kept) that reaches
        the target?"""
        if len(ops) != len(self.ops) or any(op not in OPS for op in ops):
            return False
        if any(op != self.ops[k] for k, op in enumerate(ops) if k not in self.free):
            return False
        v = self.start
        for op, b in zip(ops, self.operands, strict=True):
            v = apply_op(v, op, b, self.modulus)
        return v == self.target

    def fillings(self) -> Iterator[tuple[str, ...]]:
        """Every filling of the "?"s as a full `ops` tuple (the given operations kept), in
        `itertools.product(OPS)` order; nothing for a chain problem."""
        if not self.search:
            return
        for fill in itertools.product(OPS, repeat=len(self.free)):
            ops = list(self.ops)
            for k, op in zip(self.free, fill, strict=True):
                ops[k] = op
            yield tuple(ops)

    def num_solutions(self) -> int:
        """How many of the 3^len(free) fillings reach the target."""
        return sum(self.solves(ops) for ops in self.fillings())

    @property
    def horizon(self) -> int:
        """How many operations a search problem's first choice must look ahead: from its first
        free position to the end of the chain (1 = the only "?" is the last operation, a local
        choice: the op whose result is the target)."""
        if not self.search:
            raise ValueError("Problem.horizon: not a search problem")
        return len(self.ops) - min(self.free)

    def random_fill_rate(self) -> float:
        """The chance that a uniformly random filling of the "?"s reaches the target: the
        accuracy of a solver that computes every step right but does not plan."""
        return self.num_solutions() / 3 ** len(self.free)

    @property
    def values(self) -> tuple[int, ...]:
        """Running values v_0 .. v_n."""
        out = [self.start]
        for op, b in zip(self.ops, self.operands, strict=True):
            out.append(apply_op(out[-1], op, b, self.modulus))
        return tuple(out)

    @property
    def expression(self) -> str:
        """"3+4*7-2" (or "3 + 4 * 7 - 2")."""
        return format_expression(self.start, self.ops, self.operands, spaced=self.spaced)

    def step_text(self, a: int, op: str, b: int, c: int) -> str:
        """One step "a op b = c" in this problem's layout: with the goal carried first
        ("[7] 3+4=7", goal layout "prefix") or its distance to the goal written after it
        ("3+4=7, 7-7=0", layout "check": c minus the target, mod M)."""
        text = format_step(a, op, b, c, spaced=self.spaced)
        if self.goal_layout == "prefix":
            return GOAL_PREFIX.format(goal=self.target) + text
        if self.goal_layout == "check":
            assert self.target is not None
            return text + GOAL_CHECK_SEP + format_step(
                c, "-", self.target, apply_op(c, "-", self.target, self.modulus),
                spaced=self.spaced)
        return text

    def _search_question(self, target: object) -> str:
        return QUESTION_TEMPLATE_SEARCH.format(modulus=self.modulus, target=target,
                                               word=GOAL_LAYOUTS[self.goal_layout],
                                               pattern=self.pattern)

    @property
    def question(self) -> str:
        if self.search:
            return self._search_question(self.target)
        if self.reverse:
            sep = " " if self.spaced else ""
            operations = sep.join(f"{op}{sep}{b}" for op, b in
                                  zip(self.ops[::-1], self.operands[::-1], strict=True))
            return QUESTION_TEMPLATE_RTL.format(modulus=self.modulus, operations=operations,
                                                start=self.start)
        return QUESTION_TEMPLATE.format(modulus=self.modulus, expression=self.expression)

    @property
    def steps(self) -> tuple[str, ...]:
        return self._steps_of(self.ops)

    def _steps_of(self, ops: Sequence[str]) -> tuple[str, ...]:
        """The steps of the chain with operations `ops` (this problem's operands), each step
        computed right."""
        out, v = [], self.start
        for op, b in zip(ops, self.operands, strict=True):
            c = apply_op(v, op, b, self.modulus)
            out.append(self.step_text(v, op, b, c))
            v = c
        return tuple(out)

    @property
    def answer(self) -> str:
        """The final value; for a search problem the filled chain ("3+4*5*2-6"), since the
        target itself is in the question."""
        if self.search:
            return format_expression(self.start, self.ops, self.operands, spaced=False)
        return str(self.values[-1])

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    @property
    def num_mul(self) -> int:
        return self.ops.count("*")

    @property
    def blind_prompt(self) -> str:
        """The prompt with the goal hidden: a search problem's target shown as "?" ("Mod 10,
        reach ?: 3+4?5*2?6"); a chain problem's prompt unchanged (it has no goal to copy).

        Demonstrations of a search problem always end their last step at the target, so a
        model trained on them can learn to *write* the target there instead of computing the
        step ("7+5=5" for target 5). Trained on the same demonstrations with the goal hidden,
        a model has to compute every step's result from its inputs: the backbone an evaluator
        needs to check the last step (`stages.reward_models`, backbone "blind").
        """
        if not self.search:
            return self.prompt
        question = self._search_question(FREE_OP)
        return PROMPT_TEMPLATE.format(question=question)

    def _last_step(self) -> tuple[str, int]:
        """The last step's text and its start offset in `solution`."""
        last = self.steps[-1]
        return last, len(STEP_DELIMITER.join(self.steps)) - len(last)

    @property
    def goal_spans(self) -> tuple[tuple[int, int], ...]:
        """[start, end) character spans of `solution` that repeat the question's goal: in a
        search problem the last step's result, which every demonstration writes as the target
        (so a model can learn to copy it there instead of computing the step: the "Clever
        Hans" shortcut of teacher forcing, Bachmann & Nagarajan 2024); in the "check" goal
        layout also the last distance to the goal, which every demonstration writes as 0; ()
        for a chain problem."""
        if not self.search:
            return ()
        last, start = self._last_step()
        spans, offset = [], start
        for part in last.split(GOAL_CHECK_SEP) if self.goal_layout == "check" else [last]:
            result = part.rindex("=") + 1
            while part[result] == " ":
                result += 1
            spans.append((offset + result, offset + len(part)))
            offset += len(part) + len(GOAL_CHECK_SEP)
        return tuple(spans)

    @property
    def goal_copy_spans(self) -> tuple[tuple[int, int], ...]:
        """`goal_spans` plus the last step's copy of the goal: the subtrahend of the "check"
        layout's distance step ("3+4=[7], 7-[7]=[0]") or the "prefix" layout's "[[7]] 3+4=[7]".
        Every demonstration's last step writes that copy equal to its own result, so in that
        one line "copy the target" and "copy my result" fit the demonstrations alike; a policy
        that learns the second (`ERR_GOAL` failures, "3-3=0" for target 2) hides a missed
        target from a step check. Left out of the loss, the slot is learned from the earlier
        steps only, where the goal's copy is the target and differs from the result. The echo
        of the result stays in. Same as `goal_spans` in the layout without a goal copy.
        Measured (reach4c, seed 2, 2026-12-06): the policy does not carry the target into the
        unsupervised slot but writes an arbitrary digit there (`config.sft.exclude_goal_span`)."""
        spans = list(self.goal_spans)
        if not spans or not self.goal_layout:
            return tuple(spans)
        last, start = self._last_step()
        if self.goal_layout == "check":
            sep = last.index(GOAL_CHECK_SEP) + len(GOAL_CHECK_SEP)
            m = re.match(r"\s*\d+\s*-\s*(\d+)", last[sep:])
            spans.append((start + sep + m.start(1), start + sep + m.end(1)))
        else:  # "prefix": "[7] 3+4=7"
            m = re.match(r"\[(\d+)\]", last)
            spans.append((start + m.start(1), start + m.end(1)))
        return tuple(sorted(spans))

    @property
    def goal_line_spans(self) -> tuple[tuple[int, int], ...]:
        """The spans of every number of the last step from its result on: in the "check"
        layout also the echo of the result and the copy of the goal in its distance step
        ("3+4=[7], [7]-[7]=[0]"), which every demonstration writes equal to each other, so a
        model can learn to copy its own result into the goal's slot there. The separators
        stay in the loss (without them a policy does not learn to write the last step's
        distance at all). Same as `goal_spans` for the other layouts' single result; () for a
        chain problem."""
        spans = self.goal_spans
        if not spans:
            return ()
        end = len(STEP_DELIMITER.join(self.steps))
        tail = self.solution[spans[0][0]:end]
        return tuple((spans[0][0] + m.start(), spans[0][0] + m.end())
                     for m in re.finditer(r"\d+", tail))

    def missed_fillings(self) -> tuple[tuple[str, ...], ...]:
        """The fillings (full `ops` tuples, the given operations kept) of a search problem that
        do NOT reach the target, in `itertools.product(OPS)` order; () for a chain problem."""
        return tuple(ops for ops in self.fillings() if not self.solves(ops))

    def miss_demonstration(self, ops: Sequence[str]) -> tuple[str, tuple[tuple[int, int], ...]]:
        """A worked solution of the filling `ops`, which misses the target, and the character
        spans of it that check the miss: (text, spans).

        Every step is computed right, so the verifier rates all steps but the last one valid
        and the last one `ERR_TARGET` (its result is not the target); the answer is the filled
        chain. `spans` cover the last step from its result on -- the result, and in the goal
        layouts the copy of the goal and the distance ("3+4=[5, 5-7=8]"; "[[7]] 3+4=[5]") --
        the only characters of the text a trained SFT loss should see: its operations are
        chosen to miss, and those choices must not be learned.

        Why: every gold demonstration's last step writes the target as its result and (goal
        layouts) its copy of the goal equal to that result, so "copy the target" and "copy my
        own result" fit them alike; a policy that learns the second hides a missed target from
        a step check (`ERR_GOAL`, reach4c seed 2: `experiments/results/
        e2h_stepmath_reach4c_batch16_2026-12-06/`). In a miss demonstration the result, the
        target and the distance all differ, so only computing the last step fits both kinds
        (the Clever-Hans cue of teacher forcing, Bachmann & Nagarajan 2024, removed by a
        counterexample). `config.sft.miss_demos` adds them to the SFT records.
        """
        if not self.search:
            raise ValueError("Problem.miss_demonstration: not a search problem")
        ops = tuple(ops)
        if len(ops) != len(self.ops) or self.solves(ops) or any(
                op != self.ops[k] for k, op in enumerate(ops) if k not in self.free):
            raise ValueError(f"Problem.miss_demonstration: {ops} is not a filling of "
                             f"{self.pattern!r} that misses the target {self.target}")
        steps = self._steps_of(ops)
        answer = format_expression(self.start, ops, self.operands, spaced=False)
        text = (STEP_DELIMITER.join(steps) + STEP_DELIMITER + ANSWER_HEADER + STEP_DELIMITER
                + answer)
        last = steps[-1]
        start = len(STEP_DELIMITER.join(steps)) - len(last)
        main = last.split(GOAL_CHECK_SEP)[0] if self.goal_layout == "check" else last
        result = main.rindex("=") + 1
        while main[result] == " ":
            result += 1
        spans = [(start + result, start + len(last))]
        if self.goal_layout == "prefix":  # "[7] 3+4=5": the goal's copy comes first
            m = re.match(r"\[(\d+)\]", last)
            spans.insert(0, (start + m.start(1), start + m.end(1)))
        return text, tuple(spans)

@dataclasses.dataclass(frozen=True)
class PathProblem(_Layout):
    """One path problem ("path" designs): go from `source` to `target` along the listed edges.

    `edges` are (u, v) pairs of single-letter nodes, in the question's order. The gold solution
    is the shortest path (breadth-first, edges in question order); in the star graphs the path
    designs draw it is the only path. Steps are "u>v", the answer the whole path ("s>x>t").
    """

    level: int
    source: str
    target: str
    edges: tuple[tuple[str, str], ...]

    def __post_init__(self):
        nodes = {self.source, self.target, *(n for e in self.edges for n in e)}
        bad = sorted(n for n in nodes if len(n) != 1 or n not in NODE_NAMES)
        if bad:
            raise ValueError(f"PathProblem: node names must be single letters of {NODE_NAMES!r}, "
                             f"got {bad}")
        if len(set(self.edges)) != len(self.edges) or any(u == v for u, v in self.edges):
            raise ValueError("PathProblem: edges must be distinct and join two different nodes")
        if self.source == self.target:
            raise ValueError("PathProblem: the source must differ from the target")
        if self.gold_path is None:
            raise ValueError(f"PathProblem: {self.target!r} cannot be reached from "
                             f"{self.source!r}")

    search = False
    path = True

    @functools.cached_property
    def edge_set(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.edges)

    @functools.cached_property
    def successors(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for u, v in self.edges:
            out.setdefault(u, []).append(v)
        return {u: tuple(vs) for u, vs in out.items()}

    @functools.cached_property
    def gold_path(self) -> tuple[str, ...] | None:
        """Nodes of the shortest path from source to target (None if there is none)."""
        succ, parent = self.successors, {self.source: ""}
        frontier = [self.source]
        while frontier and self.target not in parent:
            nxt = []
            for u in frontier:
                for v in succ.get(u, ()):
                    if v not in parent:
                        parent[v] = u
                        nxt.append(v)
            frontier = nxt
        if self.target not in parent:
            return None
        path = [self.target]
        while path[-1] != self.source:
            path.append(parent[path[-1]])
        return tuple(path[::-1])

    def is_path(self, nodes: Sequence[str]) -> bool:
        """Do `nodes` start at the source, end at the target and follow listed edges?"""
        return (len(nodes) >= 2 and nodes[0] == self.source and nodes[-1] == self.target
                and all(e in self.edge_set for e in itertools.pairwise(nodes)))

    @property
    def question(self) -> str:
        return QUESTION_TEMPLATE_PATH.format(source=self.source, target=self.target,
                                             edges=" ".join(f"{u}>{v}" for u, v in self.edges))

    @property
    def steps(self) -> tuple[str, ...]:
        path = self.gold_path or ()
        return tuple(f"{u}>{v}" for u, v in itertools.pairwise(path))

    @property
    def answer(self) -> str:
        return ">".join(self.gold_path or ())

    @property
    def num_steps(self) -> int:
        return len(self.gold_path or ()) - 1

    @property
    def blind_prompt(self) -> str:
        """The prompt unchanged: a path's last step ends at the target only when that edge is
        listed, so there is no result to copy (see `Problem.blind_prompt`)."""
        return self.prompt

    goal_spans = ()  # no response text repeats the goal (see `Problem.goal_spans`)



def to_record(problem: Problem | PathProblem) -> dict[str, str | int]:
    """SFT record: {"prompt", "response", "level", "answer", "uid"} (pipeline convention)."""
    return {"prompt": problem.prompt, "response": problem.solution, "level": problem.level,
            "answer": problem.answer, "uid": problem.uid}


def miss_records(problems: Sequence[Problem], fraction: float, seed: int
                 ) -> list[dict[str, object]]:
    """SFT records of miss demonstrations (`Problem.miss_demonstration`) for about `fraction`
    of the search `problems`: `to_record`'s keys, with the response replaced and
    "exclude_spans" = every response character outside the spans that check the miss (so the
    SFT loss sees only the last step from its result on, and the end of text), "kind" = "miss".

    Each problem is picked with probability `fraction`, and its missing filling drawn
    uniformly, from SHA-256 keyed by (seed, uid): the same records on every platform and in any
    order of `problems`. Problems every filling of which reaches the target (and chain or path
    problems) give none.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"miss_records: fraction must be in [0, 1], got {fraction}")
    out: list[dict[str, object]] = []
    if fraction == 0.0:
        return out
    scale = 1 << 30
    for p in problems:
        if not isinstance(p, Problem) or not p.search:
            continue
        rng = _HashRng("miss", seed, p.uid)
        if rng.below(scale) >= fraction * scale:
            continue
        misses = p.missed_fillings()
        if not misses:
            continue
        text, keep = p.miss_demonstration(misses[rng.below(len(misses))])
        exclude, pos = [], 0
        for a, b in keep:
            if a > pos:
                exclude.append([pos, a])
            pos = b
        if pos < len(text):
            exclude.append([pos, len(text)])
        out.append({**to_record(p), "response": text, "exclude_spans": exclude, "kind": "miss"})
    return out


def from_record(record: Mapping[str, object]) -> Problem | PathProblem:
    """The `Problem` of a record written by `to_record` (or a TFDS stepmath example).

    Reads "prompt" (str or UTF-8 bytes) and "level"; raises ValueError naming the key if the
    prompt is not a stepmath question.
    """
    prompt = record.get("prompt")
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
        raise ValueError(f"record key 'prompt': expected str, got {type(prompt).__name__}")
    return parse_prompt(prompt, level=int(record["level"]))


_QUESTION_RE = re.compile(r"Mod (\d+), left to right: (\d)((?: ?[+\-*] ?\d)+)")
_QUESTION_REACH_RE = re.compile(r"Mod (\d+), (reach|goal|target) (\d): (\d)((?:[+\-*?]\d)+)")
_QUESTION_RTL_RE = re.compile(r"Mod (\d+), apply right to left: ((?:[+\-*] ?\d ?)+) to (\d)")
_QUESTION_PATH_RE = re.compile(r"Go from ([a-z]) to ([a-z]): ([a-z]>[a-z](?: [a-z]>[a-z])*)")


def parse_prompt(prompt: str, *, level: int) -> Problem | PathProblem:
    """Inverse of `Problem.prompt` / `PathProblem.prompt` (ValueError if `prompt` is neither)."""
    head, tail = PROMPT_TEMPLATE.split("{question}")
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        raise ValueError(f"not a stepmath prompt: {prompt[:60]!r}")
    question = prompt[len(head): len(prompt) - len(tail)]
    m = _QUESTION_PATH_RE.fullmatch(question)
    if m is not None:
        edges = tuple((e[0], e[2]) for e in m.group(3).split(" "))
        return PathProblem(level, m.group(1), m.group(2), edges)
    m = _QUESTION_REACH_RE.fullmatch(question)
    if m is not None:
        return _parse_reach(m, question, level)
    m = _QUESTION_RE.fullmatch(question)
    if m is not None:
        modulus, start, rest, reverse = m.group(1), m.group(2), m.group(3), False
        spaced = rest.startswith(" ")
    else:
        m = _QUESTION_RTL_RE.fullmatch(question)
        if m is None:
            raise ValueError(f"not a stepmath question: {question[:60]!r}")
        modulus, rest, start, reverse = m.group(1), m.group(2), m.group(3), True
        spaced = " " in rest.strip()
    rest = rest.replace(" ", "")
    ops, operands = tuple(rest[0::2]), tuple(int(t) for t in rest[1::2])
    if reverse:
        ops, operands = ops[::-1], operands[::-1]
    p = Problem(level, int(start), ops, operands, modulus=int(modulus), spaced=spaced,
                reverse=reverse)
    if p.question != question:
        raise ValueError(f"not a canonical stepmath question: {question[:60]!r}")
    return p


def _parse_reach(m: re.Match, question: str, level: int) -> Problem:
    """A search question -> Problem, its gold filling the first solving one in OPS order."""
    modulus, target, start, rest = int(m.group(1)), int(m.group(3)), int(m.group(4)), m.group(5)
    goal_layout = _LAYOUT_OF_WORD[m.group(2)]
    marks, operands = rest[0::2], tuple(int(t) for t in rest[1::2])
    free = tuple(k for k, op in enumerate(marks) if op == FREE_OP)
    if not free:
        raise ValueError(f"not a stepmath search question (no '?'): {question[:60]!r}")
    for fill in itertools.product(OPS, repeat=len(free)):
        ops = list(marks)
        for k, op in zip(free, fill, strict=True):
            ops[k] = op
        v = start
        for op, b in zip(ops, operands, strict=True):
            v = apply_op(v, op, b, modulus)
        if v == target:
            p = Problem(level, start, tuple(ops), operands, modulus=modulus, target=target,
                        free=free, goal_layout=goal_layout)
            if p.question != question:
                raise ValueError(f"not a canonical stepmath question: {question[:60]!r}")
            return p
    raise ValueError(f"stepmath search question without a solution: {question[:60]!r}")


# ------------------------------------------------------------------------------ randomness
class _HashRng:
    """Uniform integers from SHA-256 in counter mode: stable across platforms and versions."""

    def __init__(self, *key: object):
        self._key = "\x1f".join(str(k) for k in key).encode("utf-8")
        self._counter = 0
        self._pool = 0
        self._bits = 0

    def _refill(self) -> None:
        block = hashlib.sha256(self._key + self._counter.to_bytes(8, "little")).digest()
        self._counter += 1
        self._pool |= int.from_bytes(block, "little") << self._bits
        self._bits += 256

    def below(self, n: int) -> int:
        """Uniform in [0, n) by rejection sampling on ceil(log2 n) bits (no modulo bias)."""
        if n <= 0:
            raise ValueError(f"below(n) needs n > 0, got {n}")
        width = max(1, (n - 1).bit_length())
        while True:
            if self._bits < width:
                self._refill()
            x = self._pool & ((1 << width) - 1)
            self._pool >>= width
            self._bits -= width
            if x < n:
                return x

    def uniform_int(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi]."""
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence[object]) -> object:
        return seq[self.below(len(seq))]

    def sample_positions(self, n: int, k: int) -> list[int]:
        """k distinct positions of range(n), uniformly (partial Fisher-Yates)."""
        pool = list(range(n))
        for i in range(k):
            j = i + self.below(n - i)
            pool[i], pool[j] = pool[j], pool[i]
        return sorted(pool[:k])


def _draw_reach(level: int, design: Design, rng: _HashRng) -> Problem:
    """Rejection-sample a search problem of the level: random start, operands 2..M-1, free
    positions and a random filling whose end value becomes the target, until the number of
    solving fillings is in the level's range. The gold filling is the first solving one in
    OPS order (so `parse_prompt` recovers the same problem)."""
    spec, mod = design.spec(level), design.modulus
    assert isinstance(spec, ReachSpec)
    lo, hi = spec.solutions
    for _ in range(100_000):
        start = rng.uniform_int(0, mod - 1)
        operands = tuple(rng.uniform_int(2, mod - 1) for _ in range(spec.num_ops))
        if spec.horizon is None:
            free = tuple(rng.sample_positions(spec.num_ops, spec.free))
        else:  # among the last `horizon` operations
            free = tuple(spec.num_ops - spec.horizon + k
                         for k in rng.sample_positions(spec.horizon, spec.free))
        ops = tuple(str(rng.choice(OPS)) for _ in range(spec.num_ops))
        v = start
        for op, b in zip(ops, operands, strict=True):
            v = apply_op(v, op, b, mod)
        p = Problem(level, start, ops, operands, modulus=mod, target=v, free=free,
                    goal_layout=design.goal_layout)
        if lo <= p.num_solutions() <= hi:
            return parse_prompt(p.prompt, level=level)
    raise RuntimeError(f"stepmath: no level-{level} problem of design {design.name!r} found")


def _draw_path(level: int, design: Design, rng: _HashRng) -> PathProblem:
    """A star of `arms` chains of `arm_len` random distinct letters off a random source, the
    target `depth` edges down a random arm, the edges listed in a random order."""
    spec = design.spec(level)
    assert isinstance(spec, PathSpec)
    names = list(NODE_NAMES)
    for i in range(spec.num_nodes):  # partial Fisher-Yates: the first num_nodes names, shuffled
        j = i + rng.below(len(names) - i)
        names[i], names[j] = names[j], names[i]
    source, rest = names[0], names[1:spec.num_nodes]
    arms = [rest[a * spec.arm_len:(a + 1) * spec.arm_len] for a in range(spec.arms)]
    target = arms[rng.below(spec.arms)][spec.depth - 1]
    edges = [(u, v) for arm in arms for u, v in itertools.pairwise([source, *arm])]
    for i in range(len(edges) - 1):
        j = i + rng.below(len(edges) - i)
        edges[i], edges[j] = edges[j], edges[i]
    return PathProblem(level, source, target, tuple(edges))


def _draw(level: int, design: Design, rng: _HashRng) -> Problem | PathProblem:
    if design.search:
        return _draw_reach(level, design, rng)
    if design.path:
        return _draw_path(level, design, rng)
    spec, mod = design.spec(level), design.modulus
    n = int(rng.choice(spec.num_ops))
    m = int(rng.choice(spec.mul_choices(n)))
    mul_at = set(rng.sample_positions(n, m))
    sub_at: set[int] | None = None
    if spec.num_sub is not None:
        additive = [k for k in range(n) if k not in mul_at]
        s = int(rng.choice(spec.sub_choices(n, m)))
        sub_at = {additive[i] for i in rng.sample_positions(len(additive), s)}
    start = rng.uniform_int(*operand_range(None, mod))
    ops, operands = [], []
    for k in range(n):
        if k in mul_at:
            op = "*"
        elif sub_at is None:
            op = str(rng.choice(("+", "-")))
        else:
            op = "-" if k in sub_at else "+"
        ops.append(op)
        if op == "*" and spec.mul_operands is not None:
            operands.append(int(rng.choice(spec.mul_operands)))
        else:
            operands.append(rng.uniform_int(*operand_range(op, mod)))
    return Problem(level, start, tuple(ops), tuple(operands), modulus=mod,
                   spaced=design.spaced, reverse=design.reverse)


def num_distinct(level: int, design: str | Design | None = None) -> int:
    """How many distinct problems a level has (a split cannot ask for more)."""
    d = get_design(design)
    spec = d.spec(level)
    if isinstance(spec, PathSpec):
        # an upper bound (letters for the nodes x target arm x edge orders)
        edges = spec.arms * spec.arm_len
        return (math.perm(len(NODE_NAMES), spec.num_nodes) * spec.arms
                * math.factorial(edges))
    if isinstance(spec, ReachSpec):
        # an upper bound (start x operands x free positions x fixed ops x target): levels
        # split the space by solution count, and the streams stop long before it
        fixed = 3 ** (spec.num_ops - spec.free)
        places = spec.num_ops if spec.horizon is None else spec.horizon
        return (d.modulus * (d.modulus - 2) ** spec.num_ops * _comb(places, spec.free)
                * fixed * d.modulus)

    def count(op: str | None) -> int:
        if op == "*" and spec.mul_operands is not None:
            return len(set(spec.mul_operands))
        lo, hi = operand_range(op, d.modulus)
        return hi - lo + 1

    total = 0
    for n, m, s in spec.shapes():  # positions of the *, then of the - among the rest
        total += (_comb(n, m) * _comb(n - m, s) * count("*") ** m * count("-") ** s
                  * count("+") ** (n - m - s))
    return count(None) * total


def _comb(n: int, k: int) -> int:
    out = 1
    for i in range(k):
        out = out * (n - i) // (i + 1)
    return out


def _stream(level: int, seed: int, design: Design, purpose: str) -> Iterator[Problem]:
    """Distinct problems of one level, in a fixed order (prefix-stable)."""
    limit = num_distinct(level, design)
    seen: set[str] = set()
    index = 0
    misses = 0
    while len(seen) < limit:
        p = _draw(level, design, _HashRng("stepmath", design.name, purpose, level, seed, index))
        index += 1
        if p.key in seen:
            misses += 1
            if misses > 50 * limit:  # unreachable in practice; guards against an endless loop
                raise RuntimeError(f"stepmath: could not draw new level-{level} problems")
            continue
        seen.add(p.key)
        yield p


def generate(level: int, n: int, seed: int, *, design: str | Design | None = None
             ) -> list[Problem]:
    """n distinct problems of `level`, deterministic in (level, seed, design)."""
    d = get_design(design)
    if n < 0:
        raise ValueError(f"generate: n must be >= 0, got {n}")
    available = num_distinct(level, d)
    if n > available:
        raise ValueError(f"generate: level {level} of design {d.name!r} has only {available} "
                         f"distinct problems, asked for {n}")
    out: list[Problem] = []
    for p in _stream(level, seed, d, "generate"):
        if len(out) == n:
            break
        out.append(p)
    return out


@dataclasses.dataclass(frozen=True)
class LevelSplit:
    """Train and test problems of one level; no problem is in both."""

    level: int
    train: tuple[Problem, ...]
    test: tuple[Problem, ...]


def splits(level_list: Sequence[int], n_train: int | Mapping[int, int],
           n_test: int | Mapping[int, int], seed: int, *,
           design: str | Design | None = None) -> dict[int, LevelSplit]:
    """Per-level train/test splits with no overlap.

    The first `n_test` distinct problems of the level's stream are the test set, the next
    `n_train` the train set, so the test set does not depend on `n_train`. Sizes may be ints or
    {level: size} maps. Raises ValueError (naming the level) when a level has fewer than
    n_train + n_test distinct problems.
    """
    d = get_design(design)
    out: dict[int, LevelSplit] = {}
    for level in level_list:
        tr = n_train[level] if isinstance(n_train, Mapping) else n_train
        te = n_test[level] if isinstance(n_test, Mapping) else n_test
        if tr < 0 or te < 0:
            raise ValueError(f"splits: level {level}: sizes must be >= 0, got train={tr} "
                             f"test={te}")
        available = num_distinct(level, d)
        if tr + te > available:
            raise ValueError(f"splits: level {level} of design {d.name!r} has {available} "
                             f"distinct problems, fewer than n_train + n_test = {tr + te}")
        drawn: list[Problem] = []
        for p in _stream(level, seed, d, "split"):
            if len(drawn) == tr + te:
                break
            drawn.append(p)
        out[level] = LevelSplit(level, tuple(drawn[te:]), tuple(drawn[:te]))
    return out


# ------------------------------------------------------------------------------ verifier
@dataclasses.dataclass(frozen=True)
class ParsedSolution:
    """A solution text cut into steps and an answer section.

    Attributes:
      steps: the stripped text of each non-empty "\\n\\n"-separated chunk before the answer
        header (all chunks when there is none).
      step_ends: character offset in the text just after each step's last character (where a
        process reward model reads the step's score).
      answer: the answer section's first chunk, stripped ("" if empty), or None when the text
        has no answer header.
      answer_end: character offset after the answer, or None.
    """

    steps: tuple[str, ...]
    step_ends: tuple[int, ...]
    answer: str | None
    answer_end: int | None


_ANSWER_RE = re.compile(r"(?m)^[ \t]*#[ \t]*Answer[ \t]*:?[ \t]*$")
_CHUNK_RE = re.compile(r"(?:(?!\n\n).)+", re.S)


def split_solution(text: str) -> ParsedSolution:
    """Cut generated text into steps and answer (never raises on str input).

    The first line that reads "# Answer" (spaces and a trailing ":" tolerated) starts the answer
    section; the answer is the first non-empty "\\n\\n"-chunk after it. Everything after the
    answer is ignored.
    """
    m = _ANSWER_RE.search(text)
    body = text if m is None else text[: m.start()]
    steps, ends = [], []
    for chunk in _CHUNK_RE.finditer(body):
        s = chunk.group(0)
        if s.strip():
            steps.append(s.strip())
            ends.append(chunk.start() + len(s.rstrip()))
    if m is None:
        return ParsedSolution(tuple(steps), tuple(ends), None, None)
    answer, answer_end = "", None
    for chunk in _CHUNK_RE.finditer(text, m.end()):
        s = chunk.group(0)
        if s.strip():
            answer = s.strip()
            answer_end = chunk.start() + len(s.rstrip())
            break
    return ParsedSolution(tuple(steps), tuple(ends), answer, answer_end)


_STEP_RE = re.compile(r"(?:\[\s*(-?\d+)\s*\]\s*)?(-?\d+)\s*([+\-*×−])\s*(-?\d+)\s*=\s*(-?\d+)"
                      r"(?:\s*,\s*(-?\d+)\s*[-−]\s*(-?\d+)\s*=\s*(-?\d+))?")
_INT_RE = re.compile(r"-?\d+")
_OP_ALIASES = {"×": "*", "−": "-"}


@dataclasses.dataclass(frozen=True)
class ParsedStep:
    """The numbers and operation of a step text "a op b = c", and how it carries the goal:
    `goal` = t of "[t] a op b = c" (goal layout "prefix"), or `check` = (c', t, d) of
    "a op b = c, c'-t=d" (layout "check"); None without."""

    a: int
    op: str
    b: int
    c: int
    goal: int | None = None
    check: tuple[int, int, int] | None = None

    @property
    def layout(self) -> str:
        """The goal layout this step is written in ("", "prefix" or "check"; "?" for both)."""
        if self.goal is not None and self.check is not None:
            return "?"
        return "prefix" if self.goal is not None else "check" if self.check is not None else ""


def parse_step(step: str) -> ParsedStep | None:
    """"a op b = c", "[t] a op b = c" or "a op b = c, c'-t=d" (spaces optional; × and −
    accepted) -> ParsedStep, else None."""
    if len(step) > 64:  # no canonical step is this long; keeps the int() calls small
        return None
    m = _STEP_RE.fullmatch(step.strip())
    if m is None:
        return None
    goal, a, op, b, c, echo, target, diff = m.groups()
    check = None if echo is None else (int(echo), int(target), int(diff))
    return ParsedStep(int(a), _OP_ALIASES.get(op, op), int(b), int(c),
                      None if goal is None else int(goal), check)


def check_step(problem: Problem, k: int, step: str, current: int | None = None) -> str | None:
    """None if `step` is a correct k-th step of `problem` (0-based), else its error type.

    `current` is the running value the step must start from (default: the gold chain's v_k;
    for a search problem, the result of the solver's own previous step). At a free position of
    a search problem any of + - * is a valid operation (PRM800K: a step is judged by local
    validity, not by whether it leads to the target), and the last step must end at the target
    (its job: a comparison with the question's target, `ERR_TARGET`). A step not written in
    the problem's goal layout is `ERR_MALFORMED`. Layout "prefix" ("[t] a op b = c"): t must be
    the target (`ERR_GOAL`, checked first), so the last step's comparison is with its own line.
    Layout "check" ("a op b = c, c'-t=d"), after the step itself: c' must be c (`ERR_OPERAND`),
    t the target (`ERR_GOAL`), d = (c - t) mod M (`ERR_ARITHMETIC`); the last step's result is
    the target iff its d is 0."""
    if k >= problem.num_steps:
        return ERR_EXTRA
    parsed = parse_step(step)
    if parsed is None or parsed.layout != problem.goal_layout:
        return ERR_MALFORMED
    if parsed.goal is not None and parsed.goal != problem.target:
        return ERR_GOAL
    if parsed.a != (problem.values[k] if current is None else current):
        return ERR_OPERAND
    op_ok = parsed.op in OPS if k in problem.free else parsed.op == problem.ops[k]
    if not op_ok or parsed.b != problem.operands[k]:
        return ERR_OPERATION
    if parsed.c != apply_op(parsed.a, parsed.op, parsed.b, problem.modulus):
        return ERR_ARITHMETIC
    if parsed.check is not None:
        echo, target, diff = parsed.check
        if echo != parsed.c:
            return ERR_OPERAND
        if target != problem.target:
            return ERR_GOAL
        if diff != apply_op(echo, "-", target, problem.modulus):
            return ERR_ARITHMETIC
    if problem.search and k == problem.num_steps - 1 and parsed.c != problem.target:
        return ERR_TARGET
    return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` says about one solution.

    Attributes:
      step_labels: one label per parsed step: 1 up to the first wrong step, 0 from it on
        (PRM800K convention).
      outcome_correct: the answer section holds the gold answer (an integer equal to it).
      answer: the extracted answer text, or None without an answer section.
      answer_label: 1 iff every step is correct, the chain is complete and the answer is right
        (the label of the answer segment for step-level models); 0 otherwise.
      first_error: index of the first wrong step; `len(step_labels)` when every step is right
        but the chain is incomplete or the answer is wrong/missing; None for a perfect solution.
      error: category of the first error (see ERROR_TYPES), "wrong_answer" / "no_answer" when
        the steps are right but the answer is not, or None.
      num_expected_steps: the chain length of the problem.
    """

    step_labels: tuple[int, ...]
    outcome_correct: bool
    answer: str | None
    answer_label: int
    first_error: int | None
    error: str | None
    num_expected_steps: int

    @property
    def all_steps_correct(self) -> bool:
        return all(self.step_labels) and len(self.step_labels) == self.num_expected_steps

    @property
    def num_leading_correct(self) -> int:
        """Number of correct steps before the first error."""
        return sum(self.step_labels)


_FILLING_RE = re.compile(r"(\d)((?:[+\-*]\d)+)")


def parse_filling(problem: Problem, answer: str | None) -> tuple[str, ...] | None:
    """The operations of a search answer "3+4*5*2-6" (spaces ignored) if it is the question's
    chain (same start and operands), else None."""
    if answer is None or len(answer) > 64:
        return None
    m = _FILLING_RE.fullmatch(answer.replace(" ", ""))
    if m is None or int(m.group(1)) != problem.start:
        return None
    rest = m.group(2)
    if tuple(int(t) for t in rest[1::2]) != problem.operands:
        return None
    return tuple(rest[0::2])


_PATH_STEP_RE = re.compile(r"([a-z])\s*>\s*([a-z])")
_PATH_ANSWER_RE = re.compile(r"[a-z](?:\s*>\s*[a-z])*")


def parse_path(answer: str | None) -> tuple[str, ...] | None:
    """The nodes of a path answer "s>x>t" (spaces ignored), else None."""
    if answer is None or len(answer) > 128 or _PATH_ANSWER_RE.fullmatch(answer.strip()) is None:
        return None
    return tuple(answer.replace(" ", "").strip().split(">"))


def check_path_step(problem: PathProblem, step: str, current: str) -> str | None:
    """None if `step` ("u>v") is a valid next step of a path problem standing at `current`,
    else its error type: `ERR_EXTRA` once the target is reached, `ERR_MALFORMED`, `ERR_OPERAND`
    (u is not the current node), `ERR_OPERATION` (u>v is not a listed edge). Local validity as
    in PRM800K: a step down an arm without the target is still valid; a path that stops away
    from the target is judged at the answer (`ERR_TARGET`)."""
    if current == problem.target:
        return ERR_EXTRA
    m = _PATH_STEP_RE.fullmatch(step.strip()) if len(step) <= 64 else None
    if m is None:
        return ERR_MALFORMED
    u, v = m.groups()
    if u != current:
        return ERR_OPERAND
    if (u, v) not in problem.edge_set:
        return ERR_OPERATION
    return None


def grade_answer(problem: Problem | PathProblem, answer: str | None) -> bool:
    """The answer text is an integer equal to the gold answer; for a search problem, a filling
    of the question's chain that reaches the target; for a path problem, a path of listed edges
    from the source to the target."""
    if isinstance(problem, PathProblem):
        nodes = parse_path(answer)
        return nodes is not None and problem.is_path(nodes)
    if problem.search:
        ops = parse_filling(problem, answer)
        return ops is not None and problem.solves(ops)
    if answer is None or _INT_RE.fullmatch(answer.strip()) is None or len(answer) > 32:
        return False
    return int(answer.strip()) == int(problem.answer)


def verify(problem: Problem | PathProblem, solution_text: str | bytes) -> Verdict:
    """Per-step labels and outcome of a generated solution (never raises on str/bytes input).

    `solution_text` is the text after the prompt; a text that repeats the prompt first is
    accepted (the prompt is stripped). Bytes are decoded as UTF-8 with replacement.
    """
    if isinstance(solution_text, bytes):
        solution_text = solution_text.decode("utf-8", errors="replace")
    text = str(solution_text)
    if text.startswith(problem.prompt):
        text = text[len(problem.prompt):]
    parsed = split_solution(text)
    if isinstance(problem, PathProblem):
        return _verify_path(problem, parsed)
    labels: list[int] = []
    first_error: int | None = None
    error: str | None = None
    current = problem.start if problem.search else None
    for k, step in enumerate(parsed.steps):
        if first_error is None:
            err = check_step(problem, k, step, current)
            if err is not None:
                first_error, error = k, err
            elif problem.search:
                current = parse_step(step).c  # type: ignore[union-attr]
        labels.append(1 if first_error is None else 0)
    outcome = grade_answer(problem, parsed.answer)
    if first_error is None:
        if len(labels) < problem.num_steps:
            first_error, error = len(labels), ERR_INCOMPLETE
        elif parsed.answer is None:
            first_error, error = len(labels), "no_answer"
        elif not outcome:
            first_error, error = len(labels), "wrong_answer"
    answer_label = int(first_error is None and outcome)
    return Verdict(tuple(labels), outcome, parsed.answer, answer_label, first_error, error,
                   problem.num_steps)


def _verify_path(problem: PathProblem, parsed: ParsedSolution) -> Verdict:
    """`verify` for a path problem: steps checked by `check_path_step` from the source; a path
    whose steps are all valid but which stops away from the target fails at the answer
    (`first_error` = number of steps, `ERR_TARGET`; `ERR_INCOMPLETE` with no step at all)."""
    labels: list[int] = []
    first_error: int | None = None
    error: str | None = None
    current = problem.source
    for k, step in enumerate(parsed.steps):
        if first_error is None:
            err = check_path_step(problem, step, current)
            if err is not None:
                first_error, error = k, err
            else:
                current = step.strip()[-1]
        labels.append(1 if first_error is None else 0)
    outcome = grade_answer(problem, parsed.answer)
    if first_error is None:
        if current != problem.target:
            first_error = len(labels)
            error = ERR_TARGET if labels else ERR_INCOMPLETE
        elif parsed.answer is None:
            first_error, error = len(labels), "no_answer"
        elif not outcome:
            first_error, error = len(labels), "wrong_answer"
    answer_label = int(first_error is None and outcome)
    return Verdict(tuple(labels), outcome, parsed.answer, answer_label, first_error, error,
                   problem.num_steps)

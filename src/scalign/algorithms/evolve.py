"""Evolvers: eva's creator turns selected prompts into new ones (Ye et al. 2024, section 3).

One protocol, `Evolver.mutate(items, rng) -> [item | None]`: one proposal per input item, or
None when the proposal was rejected (empty, duplicate, over-long, not understood by the
domain); rejections are counted in `evolver.counts`. `evolve_chain` applies it `steps` times
in a chain — evolution s + 1 rewrites evolution s, as EvolInstruct does (Xu et al. 2023,
*WizardLM*) — and adds *every* intermediate to the `PromptPool` with its parent, so each
prompt's lineage leads back to a seed prompt. A chain whose proposal is rejected stops there.

`LLMEvolver` rewrites prompts with a creator language model through the project's `Sampler`
(the paper uses GPT-4 at temperature 0.88; any causal LM loaded with `load_hf` / `load_gguf`
works here). Its instructions (`EVOLVE_TEMPLATES`) are the project's own wording of the
EvolInstruct operations: in-depth (add a constraint, deepen, concretise, ask for more reasoning
steps) and in-breadth (a new prompt of the same domain and difficulty).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from scalign.algorithms.loop import PromptPool

Item = dict[str, Any]


class Evolver(Protocol):
    counts: collections.Counter

    def mutate(self, items: Sequence[Item], rng: np.random.Generator) -> list[Item | None]:
        """One proposal per item (None: rejected, counted in `counts`)."""
        ...


def evolve_chain(pool: PromptPool, ids: Sequence[int], evolver: Evolver, steps: int,
                 rng: np.random.Generator, *, iteration: int) -> list[int]:
    """Evolve each prompt `steps` times in a chain; every intermediate joins the pool with its
    parent. Returns the new ids (chain order: all first evolutions, then all second, ...)."""
    if steps < 1:
        raise ValueError(f"evolution steps must be >= 1, got {steps}")
    new: list[int] = []
    frontier = [int(i) for i in ids]
    for _ in range(steps):
        if not frontier:
            break
        proposals = evolver.mutate([pool[i].data for i in frontier], rng)
        if len(proposals) != len(frontier):
            raise ValueError(f"{type(evolver).__name__}.mutate returned {len(proposals)} "
                             f"proposals for {len(frontier)} prompts")
        nxt = []
        for parent, item in zip(frontier, proposals, strict=True):
            if item is None:
                continue
            child = pool.add(item, parent=parent, iteration=iteration)
            new.append(child)
            nxt.append(child)
        frontier = nxt
    return new


# ============================================================================ LLM evolver
EVOLVE_TEMPLATES: dict[str, str] = {
    "constraints": ("Rewrite the task below so that it adds exactly one new requirement or "
                    "constraint. Keep it self-contained and answerable. Reply with the new "
                    "task only.\n\nTask:\n{prompt}\n\nNew task:\n"),
    "deepen": ("Rewrite the task below so that answering it needs deeper knowledge or a "
               "broader view of the topic. Keep it self-contained. Reply with the new task "
               "only.\n\nTask:\n{prompt}\n\nNew task:\n"),
    "concretise": ("Rewrite the task below, replacing general notions with specific, concrete "
                   "ones. Keep it self-contained. Reply with the new task only.\n\nTask:\n"
                   "{prompt}\n\nNew task:\n"),
    "reasoning": ("Rewrite the task below so that it clearly requires several steps of "
                  "reasoning to answer. Keep it self-contained. Reply with the new task only."
                  "\n\nTask:\n{prompt}\n\nNew task:\n"),
    "breadth": ("Write one new task of the same domain and about the same difficulty as the "
                "task below, but on a different, less common topic. Reply with the new task "
                "only.\n\nTask:\n{prompt}\n\nNew task:\n"),
}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclasses.dataclass
class LLMEvolver:
    """EvolInstruct-style rewriting by a creator LM (see the module docstring).

    Args:
      sampler: a `Sampler` of the creator model (with its tokenizer).
      params: the creator's params (passed per call: the sampler keeps no copy).
      encode: instruction text -> the creator's prompt ids, e.g.
        `lambda s: render_chat([{"role": "user", "content": s}], "gemma").encode(tok)` for a
        chat model (`models.chat`); default: bos + the tokenizer's encoding of the text.
      templates: names of `EVOLVE_TEMPLATES` to draw from uniformly (one per item).
      key_field: the item field holding the prompt text.
      temperature / top_p / max_new_tokens: creator decoding.
      max_chars: proposals longer than this are rejected ("too_long").
      stop_strings: where a rewrite ends (default: a blank line, i.e. one paragraph); a chat
        model also stops at its end-of-turn id (the sampler's `eos_ids`).
    """

    sampler: Any
    params: Any = None
    encode: Callable[[str], Sequence[int]] | None = None
    templates: Sequence[str] = tuple(EVOLVE_TEMPLATES)
    key_field: str = "prompt"
    temperature: float = 0.88
    top_p: float = 1.0
    max_new_tokens: int = 96
    max_chars: int = 600
    stop_strings: Sequence[str] = ("\n\n",)
    seen: set[str] = dataclasses.field(default_factory=set)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self):
        unknown = [t for t in self.templates if t not in EVOLVE_TEMPLATES]
        if unknown or not self.templates:
            raise ValueError(f"unknown evolve templates {unknown}; known: "
                             f"{sorted(EVOLVE_TEMPLATES)}")

    def mutate(self, items: Sequence[Item], rng: np.random.Generator) -> list[Item | None]:
        if not items:
            return []
        names = [self.templates[int(i)] for i in rng.integers(0, len(self.templates),
                                                              len(items))]
        encode = self.encode or (lambda s: self.sampler.tokenizer.encode(s, add_bos=True))
        prompts = [list(encode(EVOLVE_TEMPLATES[n].format(prompt=it[self.key_field])))
                   for n, it in zip(names, items, strict=True)]
        key = jax.random.PRNGKey(int(rng.integers(0, 2**31 - 1)))
        kw = {} if self.params is None else {"params": self.params}
        out = self.sampler.generate_ids(prompts, 1, key=key, temperature=self.temperature,
                                        top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                        stop_strings=tuple(self.stop_strings),
                                        include_stop_string=False, **kw)
        proposals: list[Item | None] = []
        for name, item, row in zip(names, items, out.texts, strict=True):
            proposals.append(self._accept(name, item, row[0]))
        return proposals

    def state_dict(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = set(state["seen"])
        self.counts = collections.Counter(state["counts"])

    def _accept(self, name: str, item: Item, text: str) -> Item | None:
        text = text.strip()
        self.seen.add(_normalise(str(item[self.key_field])))
        if not text:
            self.counts["empty"] += 1
            return None
        if len(text) > self.max_chars:
            self.counts["too_long"] += 1
            return None
        norm = _normalise(text)
        if _normalise(EVOLVE_TEMPLATES[name].split(".")[0]) in norm:
            self.counts["echo"] += 1  # the creator repeated its instruction, not a task
            return None
        if norm in self.seen:
            self.counts["duplicate"] += 1
            return None
        self.seen.add(norm)
        self.counts["accepted"] += 1
        return {**{k: v for k, v in item.items() if k != self.key_field},
                self.key_field: text, "evolution": name}


# ============================================================================ StepMath evolver
REACH_MUTATIONS = ("free", "target", "operand", "breadth")
CHAIN_MUTATIONS = ("harder_op", "operand", "longer", "breadth")


def classify_level(problem: Any, design: Any) -> int | None:
    """The level of `design` whose problems look like `problem` (None if no level does):
    for a search design the (operations, "?" count, solving fillings) shape; for a chain
    design the (operations, multiplications, subtractions) shape and the allowed multipliers."""
    from scalign.data import stepmath

    d = stepmath.get_design(design)
    if problem.modulus != d.modulus or problem.search != d.search:
        return None
    for level in sorted(d.levels):
        spec = d.spec(level)
        if problem.search:
            shape = (problem.num_steps, len(problem.free), problem.num_solutions())
        else:
            shape = (problem.num_steps, problem.num_mul, problem.ops.count("-"))
            mults = getattr(spec, "mul_operands", None)
            if mults is not None and any(b not in mults for op, b in
                                         zip(problem.ops, problem.operands, strict=True)
                                         if op == "*"):
                continue
        if shape in spec.shapes():
            return level
    return None


@dataclasses.dataclass
class StepMathEvolver:
    """eva's creator for the synthetic domain: every proposal is a stepmath problem the verifier
    understands, with its level (`classify_level`) recorded — a level of the design, so the
    evolved prompt distribution can be read as a level histogram.

    Search ("reach") designs, in depth: `free` turns a given operation into "?" (more search),
    `target` moves the target to a value fewer fillings reach (the gold filling updated),
    `operand` changes one operand (the target follows the gold filling); chain designs, in
    depth: `harder_op` turns a + or - into *, `operand`, `longer` appends an operation; in
    breadth (both): `breadth`, a fresh problem of the same level. A mutation whose result is in
    no level of the design, or was seen before, is retried (`tries` draws) and else rejected
    ("no_level" / "duplicate").

    Items are `stepmath.to_record` dicts ({"prompt", "response", "level", "answer", "uid"});
    proposals add "mutation".
    """

    design: Any = None
    mutations: Sequence[str] | None = None
    tries: int = 8
    seen: set[str] = dataclasses.field(default_factory=set)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self):
        from scalign.data import stepmath

        self._design = stepmath.get_design(self.design)
        if self._design.path:
            raise ValueError(f"StepMathEvolver: design {self._design.name!r} is a path design; "
                             f"the evolver knows chain and reach mutations only")
        allowed = REACH_MUTATIONS if self._design.search else CHAIN_MUTATIONS
        self.mutations = tuple(self.mutations or allowed)
        bad = [m for m in self.mutations if m not in allowed]
        if bad:
            raise ValueError(f"mutations {bad} do not apply to design {self._design.name!r}; "
                             f"allowed: {allowed}")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = set(state["seen"])
        self.counts = collections.Counter(state["counts"])

    def mutate(self, items: Sequence[Item], rng: np.random.Generator) -> list[Item | None]:
        from scalign.data import stepmath

        out: list[Item | None] = []
        for item in items:
            parent = stepmath.from_record(item)
            self.seen.add(parent.key)
            proposal, why = None, "no_level"
            for _ in range(self.tries):
                name = self.mutations[int(rng.integers(0, len(self.mutations)))]
                child = self._apply(name, parent, rng)
                if child is None:
                    continue
                level = classify_level(child, self._design)
                if level is None:
                    why = "no_level"
                    continue
                if child.key in self.seen:
                    why = "duplicate"
                    continue
                child = stepmath.parse_prompt(child.prompt, level=level)  # canonical gold
                verdict = stepmath.verify(child, child.solution)
                if not (verdict.all_steps_correct and verdict.outcome_correct):
                    raise AssertionError(f"evolved problem fails its own verifier: "
                                         f"{child.question!r}")
                self.seen.add(child.key)
                proposal = {**stepmath.to_record(child), "mutation": name}
                break
            self.counts["accepted" if proposal is not None else why] += 1
            out.append(proposal)
        return out

    # ------------------------------------------------------------------ mutations
    def _apply(self, name: str, p: Any, rng: np.random.Generator) -> Any:
        from scalign.data import stepmath

        M, n = p.modulus, p.num_steps
        if name == "breadth":
            level = p.level if p.level in self._design.levels else min(self._design.levels)
            seed = int(rng.integers(0, 2**31 - 1))
            return stepmath.generate(level, 1, seed, design=self._design)[0]
        if p.search:
            ops, operands, free = list(p.ops), list(p.operands), set(p.free)
            if name == "free":
                fixed = [k for k in range(n) if k not in free]
                if not fixed:
                    return None
                free.add(fixed[int(rng.integers(0, len(fixed)))])
            elif name == "operand":
                k = int(rng.integers(0, n))
                choices = [b for b in range(2, M) if b != operands[k]]
                operands[k] = choices[int(rng.integers(0, len(choices)))]
            elif name == "target":
                ends: dict[int, list[list[str]]] = collections.defaultdict(list)
                for fill in itertools.product(stepmath.OPS, repeat=len(free)):
                    trial = list(ops)
                    for k, op in zip(sorted(free), fill, strict=True):
                        trial[k] = op
                    v = p.start
                    for op, b in zip(trial, operands, strict=True):
                        v = stepmath.apply_op(v, op, b, M)
                    ends[v].append(trial)
                harder = [v for v in ends if v != p.target
                          and len(ends[v]) <= len(ends.get(p.target, []))]
                if not harder:
                    return None
                target = harder[int(rng.integers(0, len(harder)))]
                ops = ends[target][0]
            v = p.start
            for op, b in zip(ops, operands, strict=True):
                v = stepmath.apply_op(v, op, b, M)
            return stepmath.Problem(p.level, p.start, tuple(ops), tuple(operands), modulus=M,
                                    target=v, free=tuple(sorted(free)),
                                    goal_layout=p.goal_layout)
        ops, operands = list(p.ops), list(p.operands)
        if name == "harder_op":
            additive = [k for k, op in enumerate(ops) if op != "*"]
            if not additive:
                return None
            k = additive[int(rng.integers(0, len(additive)))]
            ops[k], operands[k] = "*", int(rng.integers(2, M))
        elif name == "operand":
            k = int(rng.integers(0, n))
            lo, hi = stepmath.operand_range(ops[k], M)
            operands[k] = int(rng.integers(lo, hi + 1))
        elif name == "longer":
            op = stepmath.OPS[int(rng.integers(0, 3))]
            lo, hi = stepmath.operand_range(op, M)
            ops.append(op)
            operands.append(int(rng.integers(lo, hi + 1)))
        return stepmath.Problem(p.level, p.start, tuple(ops), tuple(operands), modulus=M,
                                spaced=p.spaced, reverse=p.reverse)

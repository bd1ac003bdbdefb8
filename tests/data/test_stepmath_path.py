"""The path designs of stepmath: graphs, levels, verifier, answers, records."""

import pytest

from scalign.data import stepmath
from scalign.data.domain import StepMathDomain

PATH = "path5"


def _walk(p, first):
    """Nodes of the walk that takes `first` out of the source and then each node's only
    successor until a node has none."""
    succ = p.successors
    nodes = [p.source, first]
    while nodes[-1] in succ:
        nodes.append(succ[nodes[-1]][0])
    return nodes


def _text(nodes, answer=None):
    steps = [f"{u}>{v}" for u, v in zip(nodes, nodes[1:], strict=False)]
    answer = ">".join(nodes) if answer is None else answer
    return "\n\n".join([*steps, "# Answer", answer])


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_path_levels_keep_the_graph_shape_and_put_the_target_at_depth(level):
    spec = stepmath.get_design(PATH).spec(level)
    for p in stepmath.generate(level, 20, seed=3, design=PATH):
        assert isinstance(p, stepmath.PathProblem)
        assert len(p.edges) == spec.arms * spec.arm_len          # same question at every level
        nodes = {n for e in p.edges for n in e}
        assert len(nodes) == spec.num_nodes
        assert len(p.successors[p.source]) == spec.arms           # the one choice
        assert all(len(v) == 1 for u, v in p.successors.items() if u != p.source)
        assert p.num_steps == level == len(p.steps)
        v = stepmath.verify(p, p.solution)
        assert v.all_steps_correct and v.outcome_correct and v.answer_label == 1
        assert stepmath.from_record(stepmath.to_record(p)) == p
        # only one first edge reaches the target: a random choice is right 1 time in arms
        wins = [w for u, w in p.edges if u == p.source
                if p.target in _walk(p, w)]
        assert wins == [p.gold_path[1]]


def test_path_labels_are_local_validity_and_the_target_is_judged_at_the_answer():
    p = stepmath.generate(4, 1, seed=0, design=PATH)[0]
    wrong = next(w for u, w in p.edges if u == p.source and w != p.gold_path[1])
    walk = _walk(p, wrong)
    # a valid walk down the wrong arm: every step positive, the miss is the answer's
    v = stepmath.verify(p, _text(walk))
    assert v.step_labels == (1,) * (len(walk) - 1)
    assert (v.first_error, v.error, v.outcome_correct, v.answer_label) == (
        len(walk) - 1, stepmath.ERR_TARGET, False, 0)
    # a made-up edge into the target is the first error
    fake = walk + [p.target]
    v = stepmath.verify(p, _text(fake))
    assert v.step_labels == (1,) * (len(walk) - 1) + (0,)
    assert (v.first_error, v.error) == (len(walk) - 1, stepmath.ERR_OPERATION)
    # a step that does not start at the current node (gold[1] -> gold[2] skipped), a malformed
    # step
    gold = list(p.gold_path)
    v = stepmath.verify(p, "\n\n".join([f"{gold[0]}>{gold[1]}", f"{gold[2]}>{gold[3]}",
                                        "# Answer", ">".join(gold)]))
    assert (v.step_labels, v.error) == ((1, 0), stepmath.ERR_OPERAND)
    v = stepmath.verify(p, "no idea\n\n# Answer\n\n" + p.answer)
    assert (v.step_labels, v.error, v.outcome_correct) == ((0,), stepmath.ERR_MALFORMED, True)
    # walking on past the target is an extra step
    v = stepmath.verify(p, p.solution.replace("# Answer", f"{p.target}>x\n\n# Answer"))
    assert v.step_labels == (1,) * p.num_steps + (0,) and v.error == stepmath.ERR_EXTRA
    # no steps at all, an answer that is not a path of listed edges
    assert stepmath.verify(p, "# Answer\n\n" + p.answer).error == stepmath.ERR_INCOMPLETE
    assert not stepmath.grade_answer(p, f"{p.source}>{p.target}")
    assert stepmath.grade_answer(p, " > ".join(p.gold_path))


def test_path_answers_vote_as_paths_and_levels_are_disjoint():
    dom = StepMathDomain.build((1, 4), 5, 5, seed=0, design=PATH)
    assert dom.answer_key(" a > b>c ") == "a>b>c"
    assert dom.answer_key("a>") is None and dom.answer_key("a") is None
    keys = {p.key for lv in (1, 4) for p in (*dom.train_problems(lv), *dom.test_problems(lv))}
    assert len(keys) == 20
    with pytest.raises(ValueError, match="depth"):
        stepmath.PathSpec(6)
    with pytest.raises(ValueError, match="mixes level kinds"):
        stepmath.Design("mixed", {1: stepmath.PathSpec(1), 2: stepmath.ReachSpec(4, 1, (1, 3))})
    with pytest.raises(ValueError, match="share|both produce"):
        stepmath.Design("dup", {1: stepmath.PathSpec(2), 2: stepmath.PathSpec(2)})


def test_path_problem_rejects_bad_graphs_and_parses_only_canonical_prompts():
    with pytest.raises(ValueError, match="cannot be reached"):
        stepmath.PathProblem(1, "a", "c", (("a", "b"),))
    with pytest.raises(ValueError, match="single letters"):
        stepmath.PathProblem(1, "a", "B", (("a", "B"),))
    p = stepmath.generate(2, 1, seed=1, design=PATH)[0]
    assert stepmath.parse_prompt(p.prompt, level=2) == p
    with pytest.raises(ValueError):
        stepmath.parse_prompt(p.prompt.replace(" to ", "  to "), level=2)
    assert p.blind_prompt == p.prompt


def test_path_generation_matches_pinned_stream():
    got = [stepmath.generate(lv, 1, seed=123, design=PATH)[0].question for lv in (1, 5)]
    assert got == PINNED


PINNED = ["Go from h to f: u>k l>j h>w h>r f>q e>l v>u r>v x>s b>e d>n w>d h>f j>y i>p s>t h>b "
          "q>x n>i k>g",
          "Go from d to b: z>n s>t d>z n>p e>k y>a w>o d>s d>w t>v a>b v>l x>e d>h p>f l>r h>u "
          "u>y f>j o>x"]

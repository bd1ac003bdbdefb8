"""The RL comparison in the layout of Sun et al. (2024), Table 2.

Rows are methods that all start from the same SFT policy (trained on easy demonstrations);
columns say which supervision each method trains on and give greedy answer accuracy on easy
(supervised levels), hard (the rest) and all test problems, plus the RL wall time. The paper's
rows: SFT; ReST-EM, iterative DPO and PPO with the easy-trained PRM on all problems; PPO with
final answers of easy problems only. GRPO is added in both settings, as for PPO.

Input rows are the `rl` stage's (`results.json["rl"]["rows"]`, one seed: `std` 0) or their
aggregate over seeds (`scalign.aggregate`): {"method", "split", "mean", "std", "seeds",
"wall_s"}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scalign.reporting import markdown_table

#: method -> (label, answers used in training, PRM used on), in the table's row order
METHODS: dict[str, tuple[str, str, str]] = {
    "sft": ("SFT (start of every row)", "easy demos", "-"),
    "rest_em": ("ReST-EM", "easy", "all"),
    "iterative_dpo": ("Iterative DPO", "easy", "all"),
    "ppo_answers": ("PPO, easy answers only", "easy", "-"),
    "ppo_prm": ("PPO, all problems + PRM", "easy", "all"),
    "grpo_answers": ("GRPO, easy answers only", "easy", "-"),
    "grpo_prm": ("GRPO, all problems + PRM", "easy", "all"),
}
SPLITS = ("easy", "hard", "all")


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if int(row.get("seeds", 1)) > 1:
        return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    return f"{100 * row['mean']:.1f}"


def table2(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per method present in `rows` (known methods first, in the
    order of `METHODS`), greedy accuracy % per split and the mean RL wall time in seconds."""
    idx = {(r["method"], r["split"]): r for r in rows}
    present = list(dict.fromkeys(r["method"] for r in rows))
    order = [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]
    seeds = max((int(r.get("seeds", 1)) for r in rows), default=1)
    lines = []
    for m in order:
        label, answers, prm = METHODS.get(m, (m, "?", "?"))
        walls = [idx[(m, s)]["wall_s"] for s in SPLITS if (m, s) in idx and "wall_s" in idx[(m, s)]]
        line = {"method": label, "answers": answers, "PRM on": prm,
                **{s: _cell(idx.get((m, s))) for s in SPLITS},
                "RL wall s": "-" if m == "sft" or not walls else f"{walls[0]:.0f}"}
        lines.append(line)
    cols = ["method", "answers", "PRM on", *SPLITS, "RL wall s"]
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    note = (f"Greedy answer accuracy (%), {over}; "
            "easy = supervised levels, hard = the others. 'answers': whose final answers the "
            "reward uses; 'PRM on': where the easy-trained PRM scores samples. RL wall s: "
            "training loop only (no evaluation), mean over seeds.")
    return markdown_table(lines, cols) + "\n\n" + note

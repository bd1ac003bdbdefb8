"""Plot `prm_loss_curves.json` (the seed-0 PRM levers and the study's seeds 0 and 1) to
`prm_loss_curves.png`: `python experiments/results/e2h_stepmath_2026-12-05/prm_levers_seed0/plot.py`.

Each curve is the PRM's logged train BCE (`stage` "rm_prm" of the run's `metrics.jsonl`);
the flags that made each run are in the JSON next to it."""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).parent
STUDY = {"study_seed0": ("k", "--", "study seed 0 (2 epochs)"),
         "study_seed1": ("k", ":", "study seed 1 (2 epochs) - learned the check")}


def main():
    curves = json.loads((HERE / "prm_loss_curves.json").read_text())
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for name, run in curves.items():
        steps = [p["step"] for p in run["curve"]]
        loss = [p["loss"] for p in run["curve"]]
        if name in STUDY:
            color, style, label = STUDY[name]
            ax.plot(steps, loss, color=color, linestyle=style, linewidth=2, label=label)
        else:
            ax.plot(steps, loss, linewidth=1.2, label=f"seed 0: {name}")
    ax.set_ylim(0, 0.25)
    ax.set_xlabel("PRM step (batch 64)")
    ax.set_ylabel("train BCE (logged batch)")
    ax.set_title("No lever makes seed 0's PRM learn the target check; seed 1's loss drops")
    ax.legend(ncol=2, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "prm_loss_curves.png", dpi=100)


if __name__ == "__main__":
    main()

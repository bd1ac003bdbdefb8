"""Report helpers: markdown tables and matplotlib figures (Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etils import epath


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   headers: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table of `rows` (dicts), columns in the given order."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: epath.Path, **layout: Any) -> epath.Path:
    """tight_layout, write PNG bytes through epath (local or gs://), close the figure."""
    fig.tight_layout(**layout)
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png")
    pyplot().close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def line_plot(path: epath.Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
              title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
              errors: dict[str, Sequence[float]] | None = None) -> epath.Path:
    """One axes, one line per series name -> (xs, ys); optional error bars; saved as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (xs, ys) in series.items():
        if errors and name in errors:
            ax.errorbar(xs, ys, yerr=errors[name], label=name, marker="o", ms=3, capsize=2)
        else:
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, ms=3)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def bar_plot(path: epath.Path, groups: Sequence[str], series: dict[str, Sequence[float]], *,
             title: str, ylabel: str, ylim: tuple[float, float] | None = None) -> epath.Path:
    """Grouped bars: one group per label, one bar per series."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def panels_plot(path: epath.Path, panels: dict[str, dict[str, tuple[Sequence[float],
                                                                 Sequence[float],
                                                                 Sequence[float] | None]]],
                *, title: str, xlabel: str, ylabel: str, logx: bool = True,
                styles: dict[str, dict[str, Any]] | None = None) -> epath.Path:
    """Side-by-side panels sharing a y axis; each panel maps series -> (xs, ys, yerr|None)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), dpi=110,
                             sharey=True, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys, err) in series.items():
            style = dict((styles or {}).get(label, {}))
            ax.errorbar(xs, ys, yerr=err, label=label, capsize=2, ms=3,
                        marker=style.pop("marker", "o"), **style)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    return _save(fig, path, rect=(0, 0.1, 1, 1))

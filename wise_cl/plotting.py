"""The project's figures: forgetting curves, route-margin histograms and a stream's costs, drawn to files."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    """One panel per metric, one line per run, edits seen on the x axis (perplexity on a log scale)."""
    plt = pyplot()
    metrics = [
        m
        for m in ("reliability", "generalization", "ood_generalization", "locality", "forgetting", "perplexity")
        if any(m in h[0] for h in histories.values())
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    colors = plt.get_cmap("tab20" if len(histories) > 10 else "tab10").colors  # one color per run
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (name, history), color in zip(histories.items(), itertools.cycle(colors)):
            edits, values = [p["edits"] for p in history], [p.get(metric, float("nan")) for p in history]
            ax.plot(edits, values, marker="o", label=name, color=color)
        ax.set_title(metric)
        ax.set_xlabel("edits seen")
        if metric == "perplexity":  # of the targets, lower is better
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    save(fig, path)


def plot_histograms(panels: dict[str, dict[str, list[float]]], path: Path, xlabel: str, line_at: float) -> None:
    """One panel per entry of `panels`, one histogram per named set of positive values (log x axis), and a
    vertical line at `line_at`."""
    import numpy as np
    from matplotlib.ticker import NullFormatter

    values = [v for sets in panels.values() for vs in sets.values() for v in vs if v > 0]
    low, high = min([*values, line_at]) / 1.5, max([*values, line_at]) * 1.5
    bins = np.geomspace(low, high, 40)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, sets) in zip(axes[0], panels.items(), strict=True):
        for name, vs in sets.items():
            ax.hist(np.clip(vs, low, high), bins=bins, alpha=0.5, label=name)
        ax.axvline(line_at, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the powers of ten only
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    save(fig, path)


def plot_stream_costs(runs: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """Per run (name -> seconds per edit, `last.ckpt` size per write): seconds along the stream (log scale)
    and the checkpoint's size along its writes."""
    fig, (time_ax, size_ax) = pyplot().subplots(1, 2, figsize=(9, 3.2))
    for name, (seconds, sizes) in runs.items():
        time_ax.plot(range(1, len(seconds) + 1), seconds, linewidth=0.8, label=name)
        size_ax.plot(range(1, len(sizes) + 1), sizes, label=name)
    time_ax.set(title="seconds per edit (editing + memory)", xlabel="edit", yscale="log")
    size_ax.set(title="last.ckpt (MiB)", xlabel="checkpoint write")
    for ax in (time_ax, size_ax):
        ax.grid(alpha=0.3)
    save(fig, path)


def save(fig: Figure, path: Path) -> None:
    """Legend right of the panels, then the figure to `path` (folders made) and closed."""
    plt = pyplot()
    fig.tight_layout()
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

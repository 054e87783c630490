"""Forgetting curves as a picture: one panel per metric, one line per run."""

from __future__ import annotations

from pathlib import Path


def plot_curves(histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    """One panel per metric, one line per run, edits seen on the x axis (perplexity on a log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        m
        for m in ("reliability", "generalization", "ood_generalization", "locality", "forgetting", "perplexity")
        if any(m in h[0] for h in histories.values())
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, history in histories.items():
            ax.plot(
                [p["edits"] for p in history], [p.get(metric, float("nan")) for p in history], marker="o", label=name
            )
        ax.set_title(metric)
        ax.set_xlabel("edits seen")
        if metric == "perplexity":  # of the targets, lower is better
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The ablation table as a picture: one dot per seed and the mean, per row, for AUROC, Dice and negatives marked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_ablations"]

PANELS = (
    ("malignant_auroc", "malignant AUROC"),
    ("malignant_dice", "malignant Dice"),
    ("malignant_negatives_marked", "negatives marked (malignant)"),
)


def plot_ablations(runs: Sequence[dict[str, Any]]) -> Figure:
    """Per-seed rows of ``mammogmic ablate`` (``group``, ``variant``, ``seed`` and the metrics) as dot plots.

    Rows keep their table order, top to bottom; each seed has its own marker, the mean is a vertical bar, and the
    base row's mean is a dashed line across the panel. Non-finite values (diverged runs) are left out.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    order: list[str] = []
    for r in runs:
        if r["variant"] not in order:
            order.append(r["variant"])
    seeds = sorted({int(r["seed"]) for r in runs})
    markers = "osD^v<>p*h"
    fig = Figure(figsize=(11.0, 0.45 * len(order) + 1.4), dpi=120)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for y, variant in enumerate(order):
            values = {
                int(r["seed"]): float(r[key])
                for r in runs
                if r["variant"] == variant and math.isfinite(float(r[key]))
            }
            for i, seed in enumerate(seeds):
                if seed in values:
                    label = f"seed {seed}" if y == 0 else None
                    ax.scatter(
                        values[seed], y, marker=markers[i % len(markers)], s=28, color=f"C{i}", label=label
                    )
            if values:
                mean = sum(values.values()) / len(values)
                ax.plot([mean, mean], [y - 0.3, y + 0.3], color="black", lw=2)
                if y == 0:
                    ax.axvline(mean, color="grey", ls="--", lw=1)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # AUROC ticks to 4 places ran into each other
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(order)), order)
    axes[0].invert_yaxis()
    # Below the panels, not in them: inside, the legend covered the dots of a row that sat under it.
    handles, labels = axes[0].get_legend_handles_labels()
    legend_height = 0.32 / fig.get_figheight()  # one row of markers, in figure fractions
    fig.legend(handles, labels, loc="lower center", ncols=max(1, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, legend_height, 1.0, 1.0))
    return fig

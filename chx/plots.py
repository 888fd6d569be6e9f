"""Evaluation plots: AP per class, best/worst precision-recall curves, reliability diagram.

Each function writes one PNG atomically (a temp name in the same folder, then a rename) and
returns its path. matplotlib is imported inside the functions, on the Agg backend (no display),
so importing chx stays fast and works on headless machines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from chx.atomic import atomic_path
from chx.metrics import GROUP_NAMES, calibration, classes_by_frequency

DPI = 120
GROUP_COLOURS = {"head": "#1f4e79", "medium": "#4f8fc0", "tail": "#a9cce3", None: "#7f7f7f"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # before pyplot: never open a window, never need a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically over ``path`` and close it."""
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _is_nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def plot_ap_per_class(result: dict, path: str | os.PathLike) -> Path:
    """Bar chart of AP per class (``result`` from :func:`chx.metrics.evaluate_scores`), ordered by
    training frequency, shaded by head/medium/tail, unscored classes hatched "n/a", mAP as a line."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = classes_by_frequency(result)
    per_class = result["per_class"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.3 * k), 4.8), layout="constrained")
    x = np.arange(k)
    for i, c in enumerate(names):
        ap = per_class[c].get("ap")
        colour = GROUP_COLOURS[per_class[c].get("group")]
        if _is_nan(ap):
            # an empty slot with a short "n/a" marker at the base: never a bar that reads as AP = 1
            ax.plot([i - 0.35, i + 0.35], [0, 0], color="#7f7f7f", linewidth=2.5, solid_capstyle="butt")
            ax.text(i, 0.015, "n/a", ha="center", va="bottom", rotation=90, fontsize=8, color="#555555")
        else:
            ax.bar(i, ap, width=0.8, color=colour, edgecolor="white", linewidth=0.5)
    handles = [Patch(color=GROUP_COLOURS[g], label=g) for g in GROUP_NAMES if result.get("groups", {}).get(g)]
    if any(_is_nan(per_class[c].get("ap")) for c in names):
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], color="#7f7f7f", linewidth=2.5, label="n/a: not scored (no positive)"))
    m = result.get("mAP")
    if not _is_nan(m):
        handles.append(ax.axhline(m, color="#c0392b", linestyle="--", linewidth=1.2, label=f"mAP {m:.3f}"))
    ax.set_xticks(x, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylim(0, 1.12)   # the band above 1.0 holds the legend, so it never hides a bar
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("average precision")
    ax.set_title("AP per class (ordered by training frequency)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if handles:
        ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                  borderaxespad=0.2, columnspacing=1.2)
    return _save(fig, path)


def plot_pr_curves(scores: np.ndarray, labels: np.ndarray, class_names: list[str], result: dict,
                   path: str | os.PathLike, n: int = 3) -> Path:
    """Precision-recall curves of the ``n`` best and ``n`` worst classes by AP (scored classes only).

    ``scores``/``labels``: [N, K] (NaN labels = not annotated); ``result`` supplies the AP values.
    """
    plt = _pyplot()
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    aps = {c: result["per_class"][c]["ap"] for c in class_names}
    scored = sorted((c for c in class_names if not _is_nan(aps[c])), key=lambda c: -aps[c])
    best = scored[:n]
    worst = [c for c in scored[::-1][:n] if c not in best][::-1]
    fig, ax = plt.subplots(figsize=(8.6, 5.2), layout="constrained")
    cmap_best, cmap_worst = plt.get_cmap("Blues"), plt.get_cmap("Reds")
    for group, style, cmap in ((best, "-", cmap_best), (worst, "--", cmap_worst)):
        for j, c in enumerate(group):
            k = class_names.index(c)
            annotated = ~np.isnan(labels[:, k])
            precision, recall, _ = precision_recall_curve(labels[annotated, k] >= 0.5, scores[annotated, k])
            ax.step(recall, precision, where="post", linestyle=style, linewidth=1.5,
                    color=cmap(0.9 - 0.45 * j / max(len(group) - 1, 1)), label=f"{c} (AP {aps[c]:.3f})")
    if not scored:
        ax.text(0.5, 0.5, "no class could be scored", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall: {len(best)} best and {len(worst)} worst classes by AP")
    ax.grid(alpha=0.3)
    if scored:   # outside the axes: inside, it covered the worst classes' curves (bottom left)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                  borderaxespad=0.0)
    return _save(fig, path)


def plot_reliability(scores: np.ndarray, labels: np.ndarray, path: str | os.PathLike, bins: int = 15) -> Path:
    """Reliability diagram over all annotated (image, class) pairs: observed positive rate against
    mean predicted probability per bin, the diagonal, and the bin counts as a light histogram."""
    plt = _pyplot()

    cal = calibration(scores, labels, bins=bins)
    edges, count = cal["edges"], cal["count"]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.6, 6.0), sharex=True, height_ratios=(3, 1),
                                   layout="constrained")
    ax.plot([0, 1], [0, 1], color="#7f7f7f", linestyle=":", linewidth=1, label="perfect calibration")
    filled = count > 0
    ax.plot(cal["confidence"][filled], cal["accuracy"][filled], marker="o", markersize=4,
            color="#1f4e79", linewidth=1.5, label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed positive rate")
    ece = cal["ece"]
    ax.set_title(f"Reliability (ECE {'n/a' if _is_nan(ece) else f'{ece:.4f}'}, {int(count.sum())} pairs)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="#d5d8dc", edgecolor="white")
    nonzero = count[count > 0]
    if len(nonzero) and nonzero.max() > 100 * nonzero.min():
        hist.set_yscale("log")   # long-tailed labels put most pairs in the lowest bin
    hist.set_xlabel("mean predicted probability")
    hist.set_ylabel("pairs", color="#7f8c8d")
    hist.grid(axis="y", alpha=0.3)
    return _save(fig, path)

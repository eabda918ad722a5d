"""The demo's PNG plots, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

LOSS_PNG = "loss_curves.png"
SCORES_PNG = "held_out.png"
LABELS = {
    "base": "base model,\nno prefix",
    "offsite": "offsite,\nintegrated",
    "single_split": "one party,\nsplit-tuned",
    "federated": "federated",
    "central": "centralized\nreference",
}
"""Bar labels of the scored prefixes, in the order they are drawn."""


def loss_curves(curves: dict[str, Any], out: Path) -> Path:
    """Four panels: offsite (per party), split (party 0), federation (per round), central."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), constrained_layout=True)
    for k, losses in enumerate(curves["offsite"]):
        axes[0].plot(range(1, len(losses) + 1), losses, label=f"party {k}", lw=1)
    axes[0].set_title("offsite, on the emulator")
    axes[0].legend()
    single = curves["single_split"]
    axes[1].plot(range(1, len(single) + 1), single, color="C3", lw=1)
    axes[1].set_title("split training, party 0")
    rounds = curves["federation"]
    x = [r["round"] for r in rounds]
    axes[2].plot(x, [r["train_loss"] for r in rounds], "o-", label="parties' train loss")
    axes[2].plot(x, [r["eval_loss"] for r in rounds], "s-", label="held-out loss")
    axes[2].set_title("federation")
    axes[2].set_xlabel("round")
    axes[2].legend()
    central = curves["central"]
    axes[3].plot(range(1, len(central) + 1), central, color="C4", lw=1)
    axes[3].set_title("centralized reference, whole model")
    for ax in (axes[0], axes[1], axes[3]):
        ax.set_xlabel("step")
    for ax in axes:
        ax.set_ylabel("token loss")
        ax.grid(alpha=0.3)
    path = out / LOSS_PNG
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def score_bars(scores: dict[str, Any], out: Path) -> Path:
    """Held-out exact match and loss of each scored prefix, side by side."""
    names = list(LABELS)
    fig, (em, loss) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    colors = [f"C{k}" for k in range(len(names))]
    ticks = [LABELS[n] for n in names]
    em.bar(ticks, [scores[n]["exact_match"] for n in names], color=colors)
    em.set_title("held-out exact match (higher is better)")
    em.set_ylim(0, max(0.25, 1.25 * max(scores[n]["exact_match"] for n in names)))
    loss.bar(ticks, [scores[n]["loss"] for n in names], color=colors)
    loss.set_title("held-out loss (lower is better)")
    for ax, key, fmt in ((em, "exact_match", "{:.2f}"), (loss, "loss", "{:.2f}")):
        for i, n in enumerate(names):
            ax.annotate(fmt.format(scores[n][key]), (i, scores[n][key]), ha="center", va="bottom")
        ax.grid(axis="y", alpha=0.3)
    path = out / SCORES_PNG
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""``history.png`` of a run: accuracy, loss and structures kept, epoch by epoch."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write

__all__ = ["plot_history"]


def plot_history(history: list[dict], structures: int, path: str | Path, title: str = "") -> bool:
    """Draw a run's per-epoch records into ``path`` (PNG, written atomically); False when matplotlib is missing.

    Examples:
        plot_history(metrics["history"], metrics["structures"], "runs/default/history.png")
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (acc, loss, kept) = plt.subplots(1, 3, figsize=(13, 3.6))
    acc.plot(epochs, [h.get("train_accuracy") for h in history], label="train")
    acc.plot(epochs, [h.get("val_accuracy") for h in history], label="validation")
    acc.set_ylabel("accuracy")
    acc.legend()
    loss.plot(epochs, [h.get("train_loss") for h in history], label="loss")
    loss.plot(epochs, [h.get("train_ce") for h in history], label="cross-entropy")
    loss.set_ylabel("training loss")
    loss.legend()
    kept.plot(epochs, [structures - h.get("structures_pruned", 0) for h in history], marker=".")
    kept.set_ylabel(f"structures kept (of {structures})")
    from matplotlib.ticker import MaxNLocator

    for ax in (acc, loss, kept):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True

"""The figures of lbe-train, drawn from results.json's content with matplotlib's Agg backend."""

import os

import matplotlib

matplotlib.use("Agg")  # headless: lbe-train runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

RUN_STYLES = {
    "lbe": {"label": "LBE", "color": "#1f77b4"},
    "baseline": {"label": "baseline (no LBE)", "color": "#d62728"},
}


def _series(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _title(config):
    return (f"{config['arch'].upper()}, depth {config['depth']}, width {config['width']}, "
            f"{config['data']}, init {config['init']}, seed {config['seed']}")


def plot_curves(results, path):
    """Test accuracy and task loss per epoch, for each run."""
    config = results["config"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for name, run in results["runs"].items():
        style = RUN_STYLES[name]
        history = run["history"]
        epochs = history["epoch"]
        ax_acc.plot(epochs, _series(history["test_accuracy"]), color=style["color"],
                    label=f"{style['label']}, test: {run['final_test_accuracy']:.3f}")
        if any(v is not None for v in history.get("validation_accuracy", [])):
            ax_acc.plot(epochs, _series(history["validation_accuracy"]), color=style["color"],
                        linestyle="--", linewidth=0.9, alpha=0.8,
                        label=f"{style['label']}, validation")
        reported = run.get("reported_epoch")
        if reported is not None:  # the epoch whose weights the run reports
            ax_acc.axvline(reported, color=style["color"], linestyle=":", linewidth=1)
            ax_acc.plot([reported], [run["final_test_accuracy"]], marker="o",
                        color=style["color"], markersize=5)
        ax_loss.plot(epochs, _series(history["train_task_loss"]), color=style["color"],
                     label=f"{style['label']}, train")
        ax_loss.plot(epochs, _series(history["test_task_loss"]), color=style["color"],
                     linestyle="--", label=f"{style['label']}, test")
    chance = 1.0 / config["num_classes"]
    ax_acc.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02),
               title="Accuracy (dotted line, dot: the reported epoch)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="center right", fontsize=9)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Task loss (cross-entropy)")
    losses = np.concatenate([_series(run["history"][key]) for run in results["runs"].values()
                             for key in ("train_task_loss", "test_task_loss")])
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if losses.size and losses.max() > 10 * losses.min():  # a wide range: log scale, plain labels
        ax_loss.set_yscale("log")
        plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax_loss.yaxis.set_major_formatter(plain)
        ax_loss.yaxis.set_minor_formatter(plain if losses.max() < 100 * losses.min()
                                          else ticker.NullFormatter())
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=9)
    fig.suptitle(_title(config), fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_entropy_heatmaps(results, path):
    """Per-layer batch entropy (test set, end of each epoch) as a layer x epoch heatmap per run."""
    config = results["config"]
    runs = [(name, run) for name, run in results["runs"].items()
            if run["layer_entropy"]["test"]]
    if not runs:
        return False
    grids = [np.array(run["layer_entropy"]["test"], dtype=float) for _, run in runs]  # [layer, epoch]
    vmax = max(float(np.nanmax(grid)) for grid in grids)
    vmax = max(vmax, 1e-3)
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs) + 1.0, 4.6),
                             constrained_layout=True, squeeze=False)
    image = None
    for ax, (name, run), grid in zip(axes[0], runs, grids):
        epochs = run["history"]["epoch"]
        layers = grid.shape[0]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                          vmin=0.0, vmax=vmax, interpolation="nearest",
                          extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0.5, layers + 0.5))
        ax.set(xlabel="epoch (0: before training)", ylabel="layer (1: next to the input)",
               title=f"{RUN_STYLES[name]['label']}: final test accuracy "
                     f"{run['final_test_accuracy']:.3f}")
        if layers <= 12:
            ax.set_yticks(range(1, layers + 1))
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    colorbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
    colorbar.set_label("batch entropy H (nats)")
    fig.suptitle("Per-layer batch entropy on the test set, end of each epoch\n" + _title(config),
                 fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(results, out_dir):
    """Writes the figures into out_dir; returns their file names."""
    written = []
    curves = os.path.join(out_dir, "curves.png")
    plot_curves(results, curves)
    written.append("curves.png")
    heatmap = os.path.join(out_dir, "layer_entropy.png")
    if plot_entropy_heatmaps(results, heatmap):
        written.append("layer_entropy.png")
    return written


__all__ = ["plot_curves", "plot_entropy_heatmaps", "write_plots"]

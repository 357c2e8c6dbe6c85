"""PNG plots of training runs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(metrics_file: str | Path, out: str | Path, smooth: int = 50) -> Path:
    """Loss (raw and running mean over ``smooth`` steps) and, where logged, the analyser's sample scores."""
    rows = read_metrics(metrics_file)
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    mean = [sum(loss[max(0, i - smooth + 1) : i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(loss))]
    sampled = [r for r in rows if "sample/found" in r]
    fig, axes = plt.subplots(1, 2 if sampled else 1, figsize=(11 if sampled else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps, mean, lw=1.5, label=f"running mean ({smooth})")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="training loss")
    ax.legend()
    if sampled:
        ax = axes[0, 1]
        for key in ["found", "colour_fidelity", "coherence", "shape_correct", "background_clean", "frame_ok"]:
            if f"sample/{key}" not in sampled[0]:
                continue
            ax.plot([r["step"] for r in sampled], [r[f"sample/{key}"] for r in sampled], marker="o", label=key)
        ax.set(xlabel="step", ylim=(0, 1.05), title="analyser scores of samples (EMA weights)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def curve_styles(models: list[str]) -> dict[str, dict]:
    """One line style per model, the same in every panel: real videos first, black and dashed; the
    others a colour each, in the order given."""
    others = [m for m in dict.fromkeys(models) if m != "real"]
    palette = plt.get_cmap("tab10" if len(others) <= 10 else "tab20").colors
    styles = {m: {"color": palette[i % len(palette)], "ls": "-"} for i, m in enumerate(others)}
    return {"real": {"color": "black", "ls": "--"}, **styles} if "real" in models else styles


def plot_drift_curves(summary: list[dict], out: str | Path, figure: str = "frame_ok") -> Path:
    """Per-frame ``figure`` of every model (rows of ``evaluate.aggregate``), one panel per video length.
    A model keeps its colour across panels; one legend (real first, then the summary's order) sits beside them."""
    lengths = sorted({r["length"] for r in summary})
    styles = curve_styles([r["model"] for r in summary])
    width = 5 * len(lengths) + 2  # inches: 5 per panel, 2 for the legend
    fig, axes = plt.subplots(1, len(lengths), figsize=(width, 3.8), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths, strict=True):
        rows = {r["model"]: r for r in summary if r["length"] == length}
        for model in (m for m in styles if m in rows):
            curve = rows[model]["curves"][figure]
            ax.plot(range(1, len(curve) + 1), curve, label=model, lw=1.5, **styles[model])
        ax.set(xlabel="frame", title=f"{length}x the training length", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(figure.replace("_", " "))
    handles = [Line2D([], [], lw=1.5, **style) for style in styles.values()]  # models of any panel
    fig.legend(handles, list(styles), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2 / width, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

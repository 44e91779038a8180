"""The demo report's figures (PNG, beside report.md): held-out loss curves of every student with the teacher's
held-out loss, and bytes per token of each teacher cache. Read from the TensorBoard runs the trainer wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_FIGURE = "loss_curves.png"
BYTES_FIGURE = "cache_bytes.png"
# Held-out CE is comparable across students (the weighted eval loss adds KD for some of them only).
EVAL_TAGS = ("eval/ce", "eval/loss")


def logged_curve(run_dir: Path, tags: tuple[str, ...]) -> tuple[str, list[int], list[float]] | None:
    """(tag, steps, values) of the first of `tags` a TensorBoard run logged, or None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = acc.Tags().get("scalars", [])
    for tag in tags:
        if tag in have:
            events = acc.Scalars(tag)
            return tag, [e.step for e in events], [e.value for e in events]
    return None


def write_figures(out_dir: Path, runs: Path, labels: dict[str, str], teacher_loss: float | None,
                  bytes_per_token: dict[str, float]) -> dict[str, Path]:
    """Write the two PNGs into `out_dir`; returns {"loss": path, "bytes": path} (empty without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figures: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, label in labels.items():
        curve = logged_curve(runs / name, EVAL_TAGS)
        if curve is not None:
            tag, steps, values = curve
            ax.plot(steps, values, marker="o", markersize=3, label=f"{label} ({tag})")
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="black", linestyle="--", linewidth=1,
                   label="teacher (held-out, final; per token of its own tokenizer)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures["loss"] = out_dir / LOSS_FIGURE
    fig.savefig(figures["loss"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    names = list(bytes_per_token)
    bars = ax.bar(names, [bytes_per_token[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("bytes / token")
    ax.set_title("Teacher cache size")
    fig.tight_layout()
    figures["bytes"] = out_dir / BYTES_FIGURE
    fig.savefig(figures["bytes"])
    plt.close(fig)
    return figures


def markdown(figures: dict[str, Any]) -> list[str]:
    """Report lines embedding the figures (relative paths: they sit beside report.md)."""
    if not figures:
        return ["Figures: install matplotlib (`pip install -e '.[demo]'`) to get the PNG plots in this report.", ""]
    return [f"![Held-out loss curves]({Path(figures['loss']).name})", "",
            f"![Teacher cache bytes per token]({Path(figures['bytes']).name})", ""]

"""The table and the figure of `bench.bench_distillkit`: quality (KD loss error, gradient cosine against the exact
full-vocabulary KD) against targets bytes/token, per format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STUDENT_SIGMAS = (0.5, 2.0)


def markdown(per_set: dict[str, Any]) -> list[str]:
    """One row per format: B/token on repeating / non-repeating rows (plain teacher), then KD loss error and gradient
    cosine at each student sigma on the non-repeating rows, as plain / sharp teacher."""
    names = list(per_set)
    plain = [n for n in names if "non-repeating" not in n][0]
    noisy = [n for n in names if "non-repeating" in n]
    head = "| format | targets B/token, plain teacher (repeating / non-repeating rows) |"
    head += "".join(f" KD loss error, student sigma {s} (plain / sharp) | grad cosine, sigma {s} (plain / sharp) |"
                    for s in STUDENT_SIGMAS)
    rows = [head, "|---" * (2 + 2 * len(STUDENT_SIGMAS)) + "|"]
    for fmt in per_set[plain]["sizes"]:
        b = [per_set[plain]["sizes"][fmt]["bytes"], per_set[noisy[0]]["sizes"][fmt]["bytes"]]
        cells = [fmt + (" (estimate)" if "estimate" in per_set[plain]["sizes"][fmt] else ""),
                 f"{b[0]:.1f} / {b[1]:.1f}"]
        for s in STUDENT_SIGMAS:
            q = [per_set[n]["quality"][fmt][f"sigma={s}"] for n in noisy]
            # a sampled row's loss is KL to its draw's empirical distribution: no estimate of the full KL's value
            cells.append("n/a" if "sampled" in fmt else " / ".join(f"{x['rel_err']:+.2%}" for x in q))
            cells.append(" / ".join(f"{x['cos']:.4f}" for x in q))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def short_label(fmt: str) -> str:
    """A figure label: 'DistillKit recommended k=128 exact 16 normalize_t' -> 'DK rec k=128 norm_t'."""
    label = fmt.replace("DistillKit ", "DK ").replace("recommended", "rec").replace(" exact 16", "")
    label = label.replace(" exact 1", "").replace("normalize_t", "norm_t").replace(" values", "")
    return label.replace("ours ", "").replace("compact ", "")


def figure(per_set: dict[str, Any], path: Path) -> None:
    """Two panels against targets bytes/token (non-repeating rows): 1 - gradient cosine and |KD loss error|, each
    the mean over the non-repeating teacher sets; one marker per student sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    noisy = [n for n in per_set if "non-repeating" in n]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for fmt in per_set[noisy[0]]["sizes"]:
        x = float(np.mean([per_set[n]["sizes"][fmt]["bytes"] for n in noisy]))
        dk = fmt.startswith("DistillKit")
        color = "tab:purple" if "values" in fmt else "tab:red" if dk else "tab:blue" if "top" in fmt else "tab:green"
        for ax, key in zip(axes, ("cos", "rel_err"), strict=True):
            if key == "rel_err" and "sampled" in fmt:  # its loss value estimates nothing (see `markdown`)
                continue
            ys = []
            for s, marker in zip(STUDENT_SIGMAS, ("o", "s"), strict=True):
                vals = [per_set[n]["quality"][fmt][f"sigma={s}"][key] for n in noisy]
                ys.append(max(float(np.mean([1 - v for v in vals] if key == "cos" else np.abs(vals))), 1e-6))
                ax.scatter(x, ys[-1], color=color, marker=marker, s=36)
            ax.annotate(short_label(fmt), (x, ys[0]), fontsize=7, color=color,
                        xytext=(5, -11 if dk and "norm_t" in short_label(fmt) else 4), textcoords="offset points")
    for ax, label in zip(axes, ("1 - gradient cosine vs exact full-vocabulary KD",
                                "|KD loss error| vs exact full-vocabulary KL"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="targets bytes/token (V = 151,936, rows that never repeat)",
               ylabel=label)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("circle: student near the teacher (sigma 0.5), square: early student (sigma 2); "
                      "mean of 2 teachers", fontsize=8)
    axes[1].set_title("sampled targets left out: their loss value is KL to one draw", fontsize=8)
    fig.suptitle("Quality per byte: DistillKit's own codec (red) vs ours (blue: compact top-k, green: sampled); "
                 "purple: our id coding + DistillKit's values (estimate). Lower left is better.", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

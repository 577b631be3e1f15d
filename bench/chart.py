"""The bench chart: each row's memory against its median latency, labelled, as a PNG (matplotlib, Agg)."""

from __future__ import annotations

import io
from pathlib import Path

from sdxl_split.bench.results import memory_gib, metric_label
from sdxl_split.shared.atomic import atomic_write_bytes

_LINE_PX = 12
_CHAR_PX = 6.5


def _place_labels(ax, items: list[tuple[str, float, float]], **style) -> None:
    """Label points, stacking a label upwards while it would overlap one already placed (rows often cluster)."""
    ax.autoscale_view()
    placed: list[tuple[float, float, float]] = []  # (left px, right px, baseline px)
    for text, x, y in sorted(items, key=lambda item: (item[2], item[1])):
        px, py = ax.transData.transform((x, y))
        left, right = px + 5, px + 5 + _CHAR_PX * len(text)
        lift = 4
        while any(left < r and lo < right and abs(py + lift - b) < _LINE_PX for lo, r, b in placed):
            lift += _LINE_PX
        placed.append((left, right, py + lift))
        ax.annotate(text, (x, y), textcoords="offset pixels", xytext=(5, lift), **style)


def write_chart(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    metric = payload["metric"]
    env = payload["environment"]
    ours = [(r["row"], r["median_ms"], memory_gib(r, metric)) for r in payload["rows"] if r["status"] == "ok"]
    ours = [(name, ms, gib) for name, ms, gib in ours if ms is not None and gib is not None]
    # Named by the row they match: the seed's technique names are too long to stack legibly.
    seed = [(f"seed {r['row']}", r["seed_latency_ms"], r["seed_memory_gib"])
            for r in payload.get("seed") or []]
    fig, ax = plt.subplots(figsize=(11, 7), dpi=110)
    if ours:
        ax.scatter([p[1] for p in ours], [p[2] for p in ours], color="tab:blue", zorder=3, label="this run")
    if seed:
        ax.scatter([p[1] for p in seed], [p[2] for p in seed], marker="x", color="tab:gray", zorder=2,
                   label="seed (A100 40GB, 1024x1024, 25 steps, 4 images)")
    if not ours and not seed:
        ax.text(0.5, 0.5, "no row finished", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.set_xscale("log")
        if seed:
            ax.set_yscale("log")  # tiny or CPU runs sit orders of magnitude away from the seed's figures
        ax.margins(x=0.12, y=0.12)
        ax.legend(loc="best", fontsize=8)
        _place_labels(ax, ours, fontsize=8)
        _place_labels(ax, seed, fontsize=7, color="tab:gray")
    base = payload["bench"]["base"]
    ax.set_xlabel("median latency per repeat (ms, log scale)")
    ax.set_ylabel(f"{metric_label(metric)} per process (GiB)")
    ax.set_title(f"sdxl-split bench on {env['gpu'] or 'cpu'}: {env['model']['spec']}, "
                 f"{base['width']}x{base['height']}, {base['steps']} steps, "
                 f"{base['images_per_prompt']} images per prompt", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

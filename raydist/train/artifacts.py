"""What a run leaves in its directory besides checkpoints: metrics.jsonl, curves.png, summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raydist.atomic import append_line, read_lines, write_atomic

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
CONFIG = "config.yaml"

# column name in the table -> key in summary.json (the papers' column order)
_COLUMNS = {"clean": "Clean", "fgsm": "FGSM", "pgd10": "PGD-10", "pgd20": "PGD-20", "pgd50": "PGD-50"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a row torn by a crash mid-append (no newline yet) is not one of them."""
    path = Path(run_dir) / METRICS
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {i}: not a JSON row (a damaged file; --overwrite starts the run "
                             "again)") from None
    return rows


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only epochs <= last_epoch, so a resumed run's history has each epoch exactly once."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] <= last_epoch]
    write_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    append_line(Path(run_dir) / METRICS, json.dumps(row))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def plot_curves(run_dir: Path, rows: list[dict[str, Any]], title: str = "") -> Path:
    """curves.png: accuracy per epoch — training examples, validation clean and validation PGD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(epochs, [100 * r["train_acc"] for r in rows], "-", color="tab:gray",
            label="train (on its training examples)")
    ax.plot(epochs, [100 * r["val_clean_acc"] for r in rows], "-o", color="tab:blue", ms=3, label="validation clean")
    ax.plot(epochs, [100 * r["val_pgd_acc"] for r in rows], "-o", color="tab:red", ms=3,
            label=f"validation PGD-{rows[0].get('val_steps', 10)}" if rows else "validation PGD")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(run_dir) / CURVES
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: one row per checkpoint (best, last), accuracies in percent."""
    attacks = summary["attacks"]
    head = ["checkpoint", "epoch"] + [_COLUMNS.get(a, a) for a in attacks]
    rows = []
    for which in ("best", "last"):
        res = summary[which]
        rows.append([which, str(res["epoch"])] + [f"{100 * res['accuracy'][a]:.2f}" for a in attacks])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"test images: {summary['n_test']}, eps = {summary['epsilon_text']}, "
               f"method {summary['method']}, model {summary['model']}, train time {summary['train_minutes']:.1f} min")
    workers = summary.get("workers") or []
    if len(workers) > 1:
        nodes = {w["node_id"] for w in workers}
        out.append(f"{len(workers)} workers on {len(nodes)} node(s): " + ", ".join(
            f"rank {w['rank']} on {w['node_ip']} trained {w['images']} images from epoch {w['first_epoch']}"
            for w in workers))
    return "\n".join(out)

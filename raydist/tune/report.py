"""What a sweep leaves behind: trials.csv, best.yaml, a plot and a printed table."""

from __future__ import annotations

import copy
import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from raydist.atomic import write_atomic
from raydist.tune.sweep import job_for

METRIC, TIME = "val_pgd_acc", "elapsed"


def _rows(sweep: dict[str, Any], grid) -> list[dict[str, Any]]:
    epochs = sweep["base"]["optim"]["epochs"]
    rows = []
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items() if "." in k}
        df = result.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        done = int(max((h.get("epoch", 0) or 0) for h in history)) if history else 0
        best = max(history, key=lambda h: (h.get(METRIC, -1), h.get("val_clean_acc", -1))) if history else {}
        last = history[-1] if history else {}
        if result.error is not None:
            state = "failed"
        elif done < epochs:
            state = "stopped early"
        else:
            state = "completed"
        name = Path(result.path).name if result.path else "?"
        rows.append({
            "trial": name, "state": state, "epochs": done, **params,
            "best_val_pgd_acc": best.get(METRIC), "best_epoch": best.get("epoch"),
            "best_val_clean_acc": best.get("val_clean_acc"),
            "last_val_pgd_acc": last.get(METRIC), "train_minutes": (last.get(TIME) or 0) / 60.0,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:200] if result.error else "",
        })
    return sorted(rows, key=lambda r: r["trial"])


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials no other completed trial beats on both robust accuracy (up) and training time (down)."""
    done = [r for r in rows if r["state"] == "completed" and r["best_val_pgd_acc"] is not None]
    front = []
    for r in done:
        dominated = any(o["best_val_pgd_acc"] >= r["best_val_pgd_acc"] and o["train_minutes"] <= r["train_minutes"]
                        and (o["best_val_pgd_acc"] > r["best_val_pgd_acc"] or o["train_minutes"] < r["train_minutes"])
                        for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["train_minutes"])


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["state"] != "failed" and r["best_val_pgd_acc"] is not None]
    full = [r for r in ok if r["state"] == "completed"] or ok
    if not full:
        return None
    return max(full, key=lambda r: (r["best_val_pgd_acc"], r["best_val_clean_acc"] or 0, -r["train_minutes"]))


def _plot(sweep: dict[str, Any], rows: list[dict[str, Any]], out: Path, multi: bool) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["best_val_pgd_acc"] is not None and r["state"] != "failed"]
    if not ok:
        return None
    colour_key = "model.activation" if "model.activation" in sweep["space"] else None
    numeric = [k for k, e in sweep["space"].items() if e["type"] != "choice"]
    x_key = "method.k" if "method.k" in sweep["space"] else (numeric[0] if numeric else None)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(str(r.get(colour_key, "all")) if colour_key else "all", []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, members in sorted(groups.items()):
        xs = [r["train_minutes"] if multi else r.get(x_key, math.nan) for r in members]
        ys = [100 * r["best_val_pgd_acc"] for r in members]
        marker = ["o" if r["state"] == "completed" else "x" for r in members]
        for x, y, m in zip(xs, ys, marker):
            ax.scatter([x], [y], marker=m, color=f"C{sorted(groups).index(label) % 10}")
        ax.scatter([], [], marker="o", color=f"C{sorted(groups).index(label) % 10}", label=label)
    if multi:
        front = pareto_front(rows)
        ax.plot([r["train_minutes"] for r in front], [100 * r["best_val_pgd_acc"] for r in front], "k--", lw=1,
                label="Pareto front")
        if "method.k" in sweep["space"]:
            for r in ok:
                if r.get("method.k") is not None:
                    ax.annotate(f"k={r['method.k']}", (r["train_minutes"], 100 * r["best_val_pgd_acc"]), fontsize=7)
        ax.set_xlabel("training time (minutes)")
    else:
        ax.set_xlabel(x_key or "trial")
        if x_key and sweep["space"][x_key]["type"] == "loguniform":
            ax.set_xscale("log")
    ax.set_ylabel("best validation PGD accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=colour_key, title_fontsize=8)
    ax.set_title(f"{sweep['run']['name']}: x = stopped early by ASHA", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _table(rows: list[dict[str, Any]], params: list[str]) -> str:
    head = ["trial", "state", "epochs", *params, "val PGD %", "val clean %", "train min"]
    body = []
    for r in sorted(rows, key=lambda r: -(r["best_val_pgd_acc"] or -1)):
        cells = [r["trial"], r["state"], str(r["epochs"])]
        for p in params:
            v = r.get(p)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
        cells += [f"{100 * r['best_val_pgd_acc']:.1f}" if r["best_val_pgd_acc"] is not None else "-",
                  f"{100 * r['best_val_clean_acc']:.1f}" if r["best_val_clean_acc"] is not None else "-",
                  f"{r['train_minutes']:.2f}"]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


def write_trials_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """trials.csv, replaced whole (a sweep killed while writing it leaves the previous table)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, text.getvalue())


def write_outputs(sweep: dict[str, Any], d: Path, grid) -> dict[str, Any]:
    rows = _rows(sweep, grid)
    params = list(sweep["space"])
    columns = ["trial", "state", "epochs", *params, "best_val_pgd_acc", "best_epoch", "best_val_clean_acc",
               "last_val_pgd_acc", "train_minutes", "error"]
    write_trials_csv(d / "trials.csv", rows, columns)
    multi = sweep["objective"] == "multi"
    plot = _plot(sweep, rows, d / ("pareto.png" if multi else "search.png"), multi)
    best = _best(rows)
    out: dict[str, Any] = {"rows": rows, "best": best, "plot": str(plot) if plot else None}
    print("\n" + _table(rows, params))
    if best is not None:
        chosen = {p: best[p] for p in params if best.get(p) is not None}
        job = job_for(sweep, chosen, f"{sweep['run']['name']}_best", sweep["base"]["run"]["output_dir"])
        header = (f"# best trial of sweep {sweep['run']['name']} ({best['trial']}): validation PGD accuracy "
                  f"{100 * best['best_val_pgd_acc']:.2f}% at epoch {best['best_epoch']}\n"
                  f"# parameters: {chosen}\n# run it: raydist train {d / 'best.yaml'}\n")
        write_atomic(d / "best.yaml", header + yaml.safe_dump(copy.deepcopy(job), sort_keys=False))
        out["best_job"] = str(d / "best.yaml")
        print(f"\nbest: {best['trial']} {chosen} -> validation PGD {100 * best['best_val_pgd_acc']:.2f}%")
    if multi:
        out["pareto"] = pareto_front(rows)
        print("Pareto front (robust accuracy up, training time down): "
              + ", ".join(f"{r['trial']} ({100 * r['best_val_pgd_acc']:.1f}%, {r['train_minutes']:.2f} min)"
                          for r in out["pareto"]))
    print(f"\nsweep directory: {d} (trials.csv, best.yaml, {Path(plot).name if plot else 'no plot'}, "
          "optuna.db, trials/)")
    return out

"""What `raydist compare` leaves in its directory: compare.md (the papers' table), compare.json, val_pgd.png."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

MD, JSON, PLOT = "compare.md", "compare.json", "val_pgd.png"
# the papers' column names; apgd-ce is their "APGD", cw20 their "C&W"
NAMES = {"clean": "Clean", "fgsm": "FGSM", "cw20": "C&W", "apgd-ce": "APGD", "apgd-dlr": "APGD-DLR",
         "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square", "aa": "AA"}
ORDER = ("clean", "fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "aa")
# a run whose validation PGD accuracy ends this far below its peak (and under half of it) overfitted
COLLAPSE_DROP = 0.2


def _minutes(value: float | None) -> str:
    """Training minutes for the table: one decimal, two significant digits below a minute (a short digits run
    would otherwise read 0.0)."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def column(attack: str) -> str:
    if attack in NAMES:
        return NAMES[attack]
    m = re.fullmatch(r"(pgd|cw)([0-9]+)", attack)
    if m:
        return f"PGD-{m.group(2)}" if m.group(1) == "pgd" else f"C&W-{m.group(2)}"
    return attack


def column_order(attacks: list[str]) -> list[str]:
    """The papers' order: Clean, FGSM, PGD-10/20/50, C&W, APGD, ..., AA."""
    def key(a: str) -> tuple[int, int]:
        m = re.fullmatch(r"(pgd|cw)([0-9]+)", a)
        if m:
            return ORDER.index(m.group(1)), int(m.group(2))
        return (ORDER.index(a) if a in ORDER else len(ORDER)), 0

    return sorted(attacks, key=key)


def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def overfitting(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Catastrophic overfitting, read off the validation curve: PGD accuracy that peaked and then collapsed."""
    if len(history) < 2:
        return None
    peak = max(history, key=lambda r: (r["val_pgd_acc"], r.get("val_clean_acc", 0.0)))
    last = history[-1]
    drop = peak["val_pgd_acc"] - last["val_pgd_acc"]
    if drop < COLLAPSE_DROP or last["val_pgd_acc"] > peak["val_pgd_acc"] / 2:
        return None
    collapse = next(r for r in history if r["epoch"] > peak["epoch"]
                    and peak["val_pgd_acc"] - r["val_pgd_acc"] >= COLLAPSE_DROP)
    return {"peak_epoch": peak["epoch"], "peak": peak["val_pgd_acc"], "collapse_epoch": collapse["epoch"],
            "last_epoch": last["epoch"], "last": last["val_pgd_acc"]}


def table_rows(results: list[dict[str, Any]], attacks: list[str]) -> tuple[list[str], list[list[str]]]:
    head = ["Method", "Checkpoint", "Epoch"] + [column(a) for a in attacks] + ["Train time (min)"]
    rows = []
    for r in results:
        minutes = _minutes(r.get("train_minutes"))
        if r["error"]:
            rows.append([r["label"], "failed", "-"] + ["-"] * len(attacks) + [minutes])
            continue
        for which in ("best", "last"):
            res = r[which]
            cells = [f"{100 * res['accuracy'][a]:.2f}" if a in res["accuracy"] else "-" for a in attacks]
            rows.append([r["label"], which, str(res["epoch"])] + cells + [minutes])
    return head, rows


def format_text(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_markdown(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def notes(spec: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    ev = spec["eval"]
    out = []
    for r in results:
        if r["error"]:
            out.append(f"{r['label']}: training failed: {r['error']}")
            continue
        co = r["overfitting"]
        steps = r["history"][-1].get("val_steps", 10) if r["history"] else 10
        if co:
            out.append(f"{r['label']}: catastrophic overfitting: validation PGD-{steps} accuracy fell from "
                       f"{100 * co['peak']:.1f}% (epoch {co['peak_epoch']}) to {100 * co['last']:.1f}% (epoch "
                       f"{co['last_epoch']}); it was below {100 * (co['peak'] - COLLAPSE_DROP):.0f}% from epoch "
                       f"{co['collapse_epoch']} on")
        for which in ("best", "last"):
            out += [f"{r['label']} ({which}): {f}" for f in r[which]["flags"]]
    if ev["budgets"]:
        out.append("attack budgets below the papers' defaults: " + "; ".join(
            f"{column(a)}: " + ", ".join(f"{k}={v}" for k, v in kw.items()) for a, kw in ev["budgets"].items()))
    return out


def plot_val_pgd(path: Path, results: list[dict[str, Any]], eps: float) -> None:
    """Validation PGD accuracy per epoch for every method on one figure (where catastrophic overfitting shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    steps = 10
    for r in results:
        h = r["history"]
        if not h:
            continue
        steps = h[-1].get("val_steps", steps)
        # Free-AT runs epochs / m epochs of m replays: drawn on the schedule's epoch axis like the others
        scale = r["job"]["optim"]["epochs"] / max(1, r["expected_epochs"])
        line, = ax.plot([row["epoch"] * scale for row in h], [100 * row["val_pgd_acc"] for row in h], "-o", ms=3,
                        label=r["label"])
        best = r.get("best")
        if best and not r["error"]:
            hit = [row for row in h if row["epoch"] == best["epoch"]]
            if hit:
                ax.plot([best["epoch"] * scale], [100 * hit[0]["val_pgd_acc"]], "*", ms=11, color=line.get_color(),
                        markeredgecolor="black", markeredgewidth=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation PGD-{steps} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"Robustness during training, eps = {_eps_text(eps)} (star: best checkpoint)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(spec: dict[str, Any], results: list[dict[str, Any]], *, wall_seconds: float) -> dict[str, Any]:
    """compare.json, compare.md and val_pgd.png in the comparison's directory; prints the table."""
    from raydist.compare.spec import expected_epochs

    d = Path(spec["dir"])
    ev = spec["eval"]
    attacks = column_order(ev["attacks"])
    for r in results:
        h = r["history"]
        r["train_minutes"] = h[-1]["elapsed"] / 60 if h else None
        r["expected_epochs"] = expected_epochs(r["job"])
        r["overfitting"] = overfitting(h)
    head, rows = table_rows(results, attacks)
    text_notes = notes(spec, results)
    n = next((r["best"]["n"] for r in results if not r["error"]), 0)
    caption = (f"Accuracy (%) of each method's best (highest validation PGD accuracy) and last checkpoint on "
               f"{n} test images of {spec['runs'][0]['job']['data']['dataset']}, eps = {_eps_text(ev['eps'])} "
               f"(L-inf); train time excludes the per-epoch validation.")
    md = "\n".join([f"# {spec['run']['name']}", "", caption, "", format_markdown(head, rows), ""]
                   + [f"- {x}" for x in text_notes] + ["", f"![validation PGD accuracy per epoch]({PLOT})", ""])
    (d / MD).write_text(md)
    plot_val_pgd(d / PLOT, results, ev["eps"])
    data = {
        "name": spec["run"]["name"], "compare_file": spec["path"], "base": spec["base_path"],
        "dataset": spec["runs"][0]["job"]["data"]["dataset"], "epsilon": ev["eps"], "attacks": attacks,
        "columns": [column(a) for a in attacks], "eval": {k: v for k, v in ev.items() if k != "attacks"},
        "wall_minutes": wall_seconds / 60, "notes": text_notes,
        "runs": [{
            "label": r["label"], "method": r["job"]["method"]["name"], "method_params": r["job"]["method"],
            "run_dir": r["run_dir"], "action": r["action"], "error": r["error"],
            "started_at": r["started_at"], "finished_at": r["finished_at"], "train_minutes": r["train_minutes"],
            "epochs": r["history"][-1]["epoch"] if r["history"] else 0, "overfitting": r["overfitting"],
            "best": None if r["error"] else _clean_json(r["best"]),
            "last": None if r["error"] else _clean_json(r["last"]),
            "val_curve": [{k: row[k] for k in ("epoch", "val_clean_acc", "val_pgd_acc", "train_acc", "elapsed")}
                          for row in r["history"]],
        } for r in results],
    }
    (d / JSON).write_text(json.dumps(data, indent=2) + "\n")
    print("\n" + caption + "\n\n" + format_text(head, rows))
    if text_notes:
        print("\n" + "\n".join(text_notes))
    print(f"\nwritten: {d}/{MD}, {JSON}, {PLOT} (runs/, eval/) in {wall_seconds / 60:.1f} min")
    return data


def _clean_json(res: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}

"""One table and one figure for a Hydra multirun: how each job of the sweep did.

    python -m ssl_lab.report outputs/multirun/2026-11-25_10-00-00

Writes report.md, report.csv and report.png into that dir (or --out) and prints the table. It reads only
the files the runs wrote (metrics.jsonl, run_info.json, .hydra/overrides.yaml, final.pt), so it works on a
sweep that is still running, one copied off a cluster, or one logged without W&B.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssl_lab.errors import fail

# (row key, Markdown header, decimals): the numbers every job gets, in table order.
NUMBERS = [
    ("steps", "steps", 0),
    ("epochs", "epochs", 0),
    ("train/loss", "train/loss", 4),
    ("knn_top1_final", "kNN top-1 final", 2),
    ("knn_top1_best", "kNN top-1 best", 2),
    ("knn_top1_init", "kNN top-1 at init", 2),
]
MD_NUMBERS = [n for n in NUMBERS if n[0] != "steps"]
FIXED = {"job", "status", "error", *(key for key, _, _ in NUMBERS)}
USAGE_HINT = "pass a multirun dir such as outputs/multirun/<date>"


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run dir under `sweep_dir`, or for `sweep_dir` itself when it is a single run."""
    root = Path(sweep_dir)
    return [summarize(run, root) for run in find_runs(root)]


def find_runs(root: Path) -> list[Path]:
    runs = {p.parent for name in ("metrics.jsonl", "run_info.json") for p in root.rglob(name)}
    runs |= {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}

    def order(run: Path) -> list[tuple[int, int, str]]:  # job dirs are numbers: 2 comes before 10
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in run.relative_to(root).parts]

    return sorted(runs, key=order)


def summarize(run: Path, root: Path) -> dict[str, Any]:
    info = load(read(run / "run_info.json"), json.loads, dict)
    overrides = [str(o) for o in load(read(run / ".hydra" / "overrides.yaml"), yaml.safe_load, list)]
    lines = read(run / "metrics.jsonl").splitlines()
    metrics = [row for row in (load(line, json.loads, dict) for line in lines) if row]
    train = [m for m in metrics if "train/loss" in m]
    loss = [(m.get("step"), number(m["train/loss"])) for m in train]
    knn = [(m.get("epoch"), number(m["val/knn_top1"])) for m in metrics if "val/knn_top1" in m]
    epochs = [m["epoch"] for m in train if isinstance(m.get("epoch"), int)]
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
    rel = run.relative_to(root)
    return {
        "job": rel.as_posix() if rel.parts else run.name,
        "overrides": " ".join(overrides),
        # key=value -> {key: value}; +key= and ++key= (add a key) name the same knob for the table.
        "params": dict(o.lstrip("+").partition("=")[::2] for o in overrides),
        "status": info.get("status") or ("finished" if (run / "final.pt").exists() else "incomplete"),
        "error": " ".join(str(info.get("error") or "").split()),
        "steps": steps[-1] if steps else None,
        "epochs": epochs[-1] + 1 if epochs else 0,
        "train/loss": loss[-1][1] if loss else None,
        "knn_top1_final": knn[-1][1] if knn else None,
        "knn_top1_best": max((v for _, v in knn if v is not None and math.isfinite(v)), default=None),
        "knn_top1_init": knn[0][1] if knn else None,
        # top-1 of each evaluation protocol run on it (eval_after or python -m ssl_lab.eval); the latest
        "eval": {
            k: number(v)
            for m in metrics
            for k, v in m.items()
            if k.startswith("eval/") and k.endswith("_top1")
        },
        # The curves for the figure: (x, y) pairs with both known.
        "loss_curve": [(x, y) for x, y in loss if x is not None and y is not None],
        "knn_curve": [(x, y) for x, y in knn if x is not None and y is not None],
    }


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def load(text: str, parse: Callable[[str], Any], kind: type) -> Any:
    """`text` parsed, or an empty `kind` when it was cut short (a job killed or caught mid-write)."""
    try:
        data = parse(text)
    except (ValueError, yaml.YAMLError):
        return kind()
    return data if isinstance(data, kind) else kind()


def number(value: Any) -> float | None:
    """A metric as a float; the logger writes non-finite values as the strings "nan"/"inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def override_keys(rows: list[dict[str, Any]], varying_only: bool) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    if varying_only:
        keys = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    return keys


def column(key: str) -> str:
    # An override such as epochs=100 would otherwise share its header with a result column.
    return f"{key} (override)" if key in FIXED else key


def label(row: dict[str, Any], keys: list[str]) -> str:
    text = " ".join(f"{k}={row['params'][k]}" for k in keys if k in row["params"]) or row["job"]
    return text if row["status"] == "finished" else f"{text} ({row['status']})"


def fmt(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r["eval"]})


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = override_keys(rows, varying_only=True)
    evals = eval_keys(rows)
    errors = any(r["error"] for r in rows)
    header = [
        "job",
        *map(column, keys),
        "status",
        *(h for _, h, _ in MD_NUMBERS),
        *evals,
        *(["error"] * errors),
    ]
    align = ["---"] * (len(keys) + 2) + ["---:"] * (len(MD_NUMBERS) + len(evals)) + ["---"] * errors
    lines = [header, align]
    for r in rows:
        cells = [r["job"], *(r["params"].get(k, "") for k in keys), r["status"]]
        cells += [fmt(r[key], d) for key, _, d in MD_NUMBERS] + [fmt(r["eval"].get(k), 2) for k in evals]
        cells += [r["error"]] * errors
        lines.append(cells)
    table = ["| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |" for cells in lines]
    counts = Counter(r["status"] for r in rows)
    statuses = ["finished", "failed", *sorted(set(counts) - {"finished", "failed"})]
    summary = ", ".join(f"{counts[s]} {s}" for s in statuses)
    return "\n".join(table) + f"\n\n{len(rows)} jobs: {summary}."


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = override_keys(rows, varying_only=False)
    evals = eval_keys(rows)
    fields = ["job", *map(column, keys), "status", *(key for key, _, _ in NUMBERS), *evals, "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            values = {column(k): r["params"].get(k, "") for k in keys}
            values |= {key: "" if r[key] is None else r[key] for key, _, _ in NUMBERS}
            values |= {key: "" if r["eval"].get(key) is None else r["eval"][key] for key in evals}
            writer.writerow({"job": r["job"], "status": r["status"], "error": r["error"], **values})


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    # A bare Figure on the Agg canvas: no pyplot state, no display needed (clusters, CI).
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, knn_ax = fig.subplots(1, 2)
    keys = override_keys(rows, varying_only=True)
    for i, r in enumerate(rows):
        style = {"color": f"C{i % 10}", "label": label(r, keys)}
        if r["loss_curve"]:  # a marker keeps a job that logged one point visible
            loss_ax.plot(*zip(*r["loss_curve"]), marker="." if len(r["loss_curve"]) == 1 else "", **style)
        if r["knn_curve"]:
            knn_ax.plot(*zip(*r["knn_curve"]), marker="o", **style)
    loss_ax.set(title="Training loss", xlabel="step", ylabel="train/loss")
    knn_ax.set(title="kNN top-1 on the validation set", xlabel="epoch", ylabel="val/knn_top1 (%)")
    knn_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, knn_ax):
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "report.png"}
    paths["md"].write_text(markdown(rows) + "\n")
    write_csv(rows, paths["csv"])
    plot(rows, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_lab.report", description="Summarize a Hydra multirun as a table and a figure."
    )
    parser.add_argument("run_dir", type=Path, help="a multirun dir, e.g. outputs/multirun/<date>")
    parser.add_argument("--out", type=Path, help="where report.{md,csv,png} go (default: run_dir)")
    args = parser.parse_args(argv)

    if not args.run_dir.is_dir():
        problem = "is not a directory" if args.run_dir.exists() else "does not exist"
        fail(f"{args.run_dir} {problem}; {USAGE_HINT}")
    rows = collect(args.run_dir)
    if not rows:
        fail(f"no runs (metrics.jsonl or .hydra/overrides.yaml) under {args.run_dir}; {USAGE_HINT}")
    try:
        paths = write_report(rows, args.out or args.run_dir)
    except OSError as e:
        fail(f"cannot write the report ({e}); pass --out <a writable dir>")
    print(markdown(rows))
    for path in paths.values():
        print(f"Wrote {path}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()

"""One table and one figure for a Hydra multirun: how each job of the sweep did.

    python -m ssl_lab.report outputs/multirun/2026-11-25_10-00-00
    python -m ssl_lab.report benchmarks/results/lightly_cifar10.jsonl     # python -m ssl_lab.fill_table's rows

Writes report.md, report.csv and report.png into that dir (or --out) and prints the table. It reads only
the files the runs wrote (metrics.jsonl, run_info.json, .hydra/overrides.yaml, final.pt), so it works on a
sweep that is still running, one copied off a cluster, or one logged without W&B.

Validation and test figures stand side by side, and only validation picks: the "best" line uses the
validation kNN (`val/knn_top1`, on images held out of training), never a test figure (`test/knn_top1`,
`eval/*`), since a test set that chose the winner no longer measures it. Jobs that differ only in `seed`
form a group, summarised as mean ± std and a 95 % Student-t interval (report_seeds.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssl_lab.errors import fail

# (row key, Markdown header, decimals): the numbers every job gets, in table order. The CSV keeps the row
# keys (knn_top1_* are the validation monitor), so scripts that read report.csv keep working.
NUMBERS = [
    ("steps", "steps", 0),
    ("epochs", "epochs", 0),
    ("train/loss", "train/loss", 4),
    ("knn_top1_final", "val/knn_top1 final", 2),
    ("knn_top1_best", "val/knn_top1 best", 2),
    ("knn_top1_init", "val/knn_top1 at init", 2),
]
METRICS = NUMBERS[2:]  # what a seed group averages: the figures, not how far the job got
# Columns of the runs that logged them (report.csv has them always): the online linear probe
# (monitor.online_linear) beside the validation kNN, and the cost after the test figures.
ONLINE = [("online_top1_final", "val/online_top1 final", 2)]
# Training health at the end (ssl_lab.health; the last logged value): collapse shows as a std near 0, a
# rank near 1; the teacher's entropy for the methods that log it (DINO's).
HEALTH = [
    ("train/feature_std", "feature std", 4),
    ("train/feature_rank", "feature rank", 1),
    ("train/teacher_entropy", "teacher entropy", 2),
]
COST = [
    ("img_per_s", "img/s", 0),  # training throughput: the median of the logged train/img_per_s
    ("wall_min", "wall min", 1),  # minutes from start to end (all starts of a resumed run), eval included
]
NUMBERS += ONLINE + HEALTH + COST
FIXED = {"job", "status", "error", *(key for key, _, _ in NUMBERS)}
SELECT = "knn_top1_final"  # the one figure that may pick a winner: validation kNN at the end
PUBLISHED = "published top-1 (protocol, source, budget)"  # the recipe's `published` key
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
    knn = curve(metrics, "val/knn_top1")
    test_knn = curve(metrics, "test/knn_top1")  # the monitor when data.val_size=0: no validation split
    online, test_online = curve(metrics, "val/online_top1"), curve(metrics, "test/online_top1")
    rates = sorted(v for v in (number(m.get("train/img_per_s")) for m in train) if v is not None)
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
        "online_top1_final": online[-1][1] if online else None,
        **{key: last_logged(train, key) for key, _, _ in HEALTH},
        "img_per_s": rates[len(rates) // 2] if rates else None,
        "wall_min": wall_minutes(info),
        "published": published(read(run / "config.yaml")),
        # Test figures only at the end: a best over epochs would be an epoch chosen on the test set.
        **({"test/knn_top1_final": test_knn[-1][1]} if test_knn else {}),
        # ... except lightly's benchmark figure, which is that best (monitor.test_every: its protocol)
        **({"test/knn_top1_best": max(v for _, v in test_knn)} if test_knn and lightly_protocol(run) else {}),
        **({"test/online_top1_final": test_online[-1][1]} if test_online else {}),
        # The raw-pixel kNN baseline (logged once) and the top-1 of each evaluation protocol run on the
        # weights (eval_after or python -m ssl_lab.eval, on the test set); the latest of each.
        **{
            k: number(v)
            for m in metrics
            for k, v in m.items()
            if k.endswith("_pixels") or (k.startswith("eval/") and k.endswith("_top1"))
        },
        # The curves for the figure: (x, y) pairs with both known.
        "loss_curve": [(x, y) for x, y in loss if x is not None and y is not None],
        "knn_curve": [(x, y) for x, y in knn if x is not None and y is not None],
        "test_knn_curve": [(x, y) for x, y in test_knn if x is not None and y is not None],
    }


def lightly_protocol(run: Path) -> bool:
    """Whether the run logged the test kNN after every few epochs for lightly's benchmark figure."""
    config = load(read(run / "config.yaml"), yaml.safe_load, dict)
    return bool((config.get("monitor") or {}).get("test_every"))


def wall_minutes(info: dict[str, Any]) -> float | None:
    """Minutes the run's starts took, each from its start to its end (run_info.json); None while one
    has not ended."""
    starts = info.get("starts") or []
    try:
        spans = [datetime.fromisoformat(s["ended"]) - datetime.fromisoformat(s["time"]) for s in starts]
    except (KeyError, TypeError, ValueError):
        return None
    return sum(span.total_seconds() for span in spans) / 60 if spans else None


def published(config_text: str) -> str | None:
    """The recipe's published figure (its `published` key: top1, protocol, source, budget) in words."""
    config = load(config_text, yaml.safe_load, dict)
    ref = config.get("published")
    if not isinstance(ref, dict) or number(ref.get("top1")) is None:
        return None
    details = ", ".join(str(ref[k]) for k in ("protocol", "source", "budget") if ref.get(k))
    return f"{number(ref['top1']):.2f}" + (f" ({details})" if details else "")


def curve(metrics: list[dict[str, Any]], key: str) -> list[tuple[Any, float | None]]:
    return [(m.get("epoch"), number(m[key])) for m in metrics if key in m]


def last_logged(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((number(r[key]) for r in reversed(rows) if key in r), None)


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


def logged_keys(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The columns only some sweeps have: (raw-pixel references, test figures), in table order."""
    keys = {k for r in rows for k in r}
    references = sorted(k for k in keys if k.endswith("_pixels"))
    tests = [
        k for k in ["test/knn_top1_final", "test/knn_top1_best", "test/online_top1_final"] if k in keys
    ] + sorted(k for k in keys if k.startswith("eval/"))
    return references, tests


def test_header(key: str) -> str:
    if key.startswith("eval/"):
        return f"{key} (test)"
    return key.replace("_final", " final").replace("_best", " best (lightly's figure)")


def figures(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(row key, Markdown header, decimals) of every result column: validation first, then test."""
    references, tests = logged_keys(rows)

    def logged(columns: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        return [c for c in columns if any(r.get(c[0]) is not None for r in rows)]

    return [
        *METRICS,
        *logged(ONLINE),
        *logged(HEALTH),
        *((k, k, 2) for k in references),
        *((k, test_header(k), 2) for k in tests),
        *logged(COST),
    ]


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


def md_table(lines: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |" for cells in lines]


# --- Seed groups: the same run with other seeds, summarised as mean ± std and a t-interval ---------------


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile t_{p, df} for p in (0.5, 1), by bisection on the exact CDF.

    For whole degrees of freedom the t distribution's CDF is a finite sum of powers of cos θ,
    θ = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4), so it is exact for every n in a dozen lines,
    without scipy (not a dependency) and without a table that turns into the normal's 1.96 at some n
    (t_{0.975, 30} is 2.042, 4 % wider). Agrees with scipy.stats.t.ppf to 1e-9 (tests/test_report.py).
    Each CDF costs df/2 terms: nothing beside a sweep, even for thousands of seeds.
    """

    def coverage(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:
            term = math.cos(theta)
            total = term if df > 1 else 0.0
            for k in range(3, df - 1, 2):
                term *= c2 * (k - 1) / k
                total += term
            return 2 / math.pi * (theta + math.sin(theta) * total)
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return math.sin(theta) * total

    target = 2 * p - 1
    low, high = 0.0, 1.0
    while coverage(high) < target:
        high *= 2
    for _ in range(100):  # halves [low, high] down to float resolution
        middle = (low + high) / 2
        low, high = (middle, high) if coverage(middle) < target else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float | None  # sample std (n - 1); None for one value
    half_width: float | None  # of the 95 % interval of the mean

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.half_width is None else (self.mean - self.half_width, self.mean + self.half_width)


def describe(values: list[float]) -> Stats | None:
    """n, mean, sample std and the 95 % Student-t half-width t_{0.975, n-1} * std / sqrt(n).

    Written out rather than with `statistics`: a diverged seed (NaN) should make the group's figure NaN,
    not be dropped or raise."""
    n = len(values)
    if not n:
        return None
    mean = math.fsum(values) / n
    if n == 1:
        return Stats(1, mean, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stats(n, mean, std, t_quantile(0.975, n - 1) * std / math.sqrt(n))


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs whose overrides are the same but for `seed` (none: the default seed), in job order. Only
    finished jobs enter the statistics: a failed seed's numbers are from a run that did not end."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(sorted((k, v) for k, v in r["params"].items() if k != "seed")), []).append(r)
    metrics = [key for key, _, _ in figures(rows)]
    result = []
    for key, members in groups.items():
        finished = [r for r in members if r["status"] == "finished"]
        stats = {m: describe([r[m] for r in finished if r.get(m) is not None]) for m in metrics}
        result.append({"params": dict(key), "rows": members, "finished": finished, "stats": stats})
    return result


def seeds(group: dict[str, Any]) -> str:
    return ", ".join(str(r["params"].get("seed", "default")) for r in group["rows"])


def jobs_cell(group: dict[str, Any]) -> str:
    """How many jobs the statistics use, and why the others are left out: n=2 of 3, 1 failed."""
    left_out = Counter(r["status"] for r in group["rows"] if r["status"] != "finished")
    why = "".join(f", {count} {status}" for status, count in sorted(left_out.items()))
    return f"n={len(group['finished'])} of {len(group['rows'])}{why}"


def stats_cell(stats: Stats | None, n: int, decimals: int) -> str:
    if stats is None:
        return "–"
    text = f"{stats.mean:.{decimals}f}"
    if stats.interval is not None:
        low, high = stats.interval
        text += f" ± {stats.std:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"
    return text if stats.n == n else f"{text} (n={stats.n})"


def seeds_markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    keys = [k for k in override_keys(rows, varying_only=True) if k != "seed"]
    numbers = figures(rows)
    refs = any(r.get("published") for r in rows)
    header = [*map(column, keys), "seeds", "jobs", *(h for _, h, _ in numbers), *[PUBLISHED] * refs]
    lines = [header, ["---"] * (len(keys) + 2) + ["---:"] * len(numbers) + ["---"] * refs]
    for g in groups:
        n = len(g["finished"])
        lines.append(
            [*(g["params"].get(k, "") for k in keys), seeds(g), jobs_cell(g)]
            + [stats_cell(g["stats"][key], n, d) for key, _, d in numbers]
            + [next((r["published"] for r in g["rows"] if r.get("published")), "–")] * refs
        )
    intro = (
        "Seed groups (jobs that differ only in seed): mean ± sample std [95 % Student-t interval of the "
        "mean]; failed and incomplete jobs are left out of the statistics."
    )
    return intro + "\n\n" + "\n".join(md_table(lines))


def has_seed_groups(groups: list[dict[str, Any]]) -> bool:
    return any(len(g["rows"]) >= 2 for g in groups)


def group_label(group: dict[str, Any], keys: list[str]) -> str:
    params = group["params"]
    return (
        " ".join(f"{k}={params[k]}" for k in keys if k in params)
        or " ".join(f"{k}={v}" for k, v in params.items())
        or "the defaults"
    )


def best_line(rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """The winner by validation kNN (final): the job, or with seeds the group with the best mean, and its
    test figures beside it. Never chosen on a test figure, even when there is nothing else."""
    if not any(r["status"] == "finished" for r in rows):
        return "No finished job yet: no winner picked."
    scored = [g for g in groups if g["stats"][SELECT] is not None and math.isfinite(g["stats"][SELECT].mean)]
    if not scored:
        return (
            "No validation split (no val/knn_top1 in the finished jobs): no winner picked; "
            "test figures are never used to choose."
        )
    best = max(scored, key=lambda g: g["stats"][SELECT].mean)  # ties: the first in job order
    _, tests = logged_keys(rows)
    keys = [k for k in override_keys(rows, varying_only=True) if k != "seed"]
    if has_seed_groups(groups):
        n = len(best["finished"])
        who = f"{group_label(best, keys)} (seeds {seeds(best)}; {jobs_cell(best)})"
        what = f"mean val/knn_top1 final over seeds): {who}"
        cells = {key: stats_cell(best["stats"][key], n, 2) for key in [SELECT, *tests]}
    else:
        (job,) = best["finished"]
        what = f"val/knn_top1 final): job {job['job']}, {label(job, keys)}"
        cells = {key: fmt(job.get(key), 2) for key in [SELECT, *tests]}
    test = ", ".join(f"{k.removesuffix('_final')} {cells[k]}" for k in tests) or "none logged"
    return f"Best on validation ({what}: {cells[SELECT]}; its test figures: {test}."


# --- The report ----------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = override_keys(rows, varying_only=True)
    numbers = [("epochs", "epochs", 0), *figures(rows)]
    errors = any(r["error"] for r in rows)
    refs = any(r.get("published") for r in rows)
    header = ["job", *map(column, keys), "status", *(h for _, h, _ in numbers)]
    header += [PUBLISHED] * refs + ["error"] * errors
    align = ["---"] * (len(keys) + 2) + ["---:"] * len(numbers) + ["---"] * (refs + errors)
    lines = [header, align]
    for r in rows:
        cells = [r["job"], *(r["params"].get(k, "") for k in keys), r["status"]]
        cells += [fmt(r.get(key), d) for key, _, d in numbers]
        cells += [r.get("published") or "–"] * refs + [r["error"]] * errors
        lines.append(cells)
    counts = Counter(r["status"] for r in rows)
    statuses = ["finished", "failed", *sorted(set(counts) - {"finished", "failed"})]
    summary = ", ".join(f"{counts[s]} {s}" for s in statuses)
    parts = ["\n".join(md_table(lines)), f"{len(rows)} jobs: {summary}."]
    groups = seed_groups(rows)
    if has_seed_groups(groups):
        parts.append(seeds_markdown(rows, groups))
    parts.append(best_line(rows, groups))
    return "\n\n".join(parts)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = override_keys(rows, varying_only=False)
    numbers = [key for key, _, _ in NUMBERS] + [key for keys_ in logged_keys(rows) for key in keys_]
    fields = ["job", *map(column, keys), "status", *numbers, "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            values = {column(k): r["params"].get(k, "") for k in keys}
            values |= {key: "" if r.get(key) is None else r[key] for key in numbers}
            writer.writerow({"job": r["job"], "status": r["status"], "error": r["error"], **values})


def write_seeds_csv(rows: list[dict[str, Any]], groups: list[dict[str, Any]], path: Path) -> None:
    """One row per group and metric (the shape pandas and spreadsheets pivot), named as in report.csv."""
    keys = [k for k in override_keys(rows, varying_only=False) if k != "seed"]
    fields = [
        *map(column, keys),
        "seeds",
        "jobs",
        "finished",
        "metric",
        "n",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for g in groups:
            for metric, stats in g["stats"].items():
                if stats is None:
                    continue
                low, high = stats.interval or ("", "")
                writer.writerow(
                    {column(k): g["params"].get(k, "") for k in keys}
                    | {"seeds": seeds(g), "jobs": len(g["rows"]), "finished": len(g["finished"])}
                    | {
                        "metric": metric,
                        "n": stats.n,
                        "mean": stats.mean,
                        "std": "" if stats.std is None else stats.std,
                    }
                    | {"ci95_low": low, "ci95_high": high}
                )


def palette(i: int, n: int) -> Any:
    """Matplotlib's 10 default colours, or tab20's 20 for more lines (a zoo of 11+ methods)."""
    return f"C{i % 10}" if n <= 10 else colormaps["tab20"](i % 20)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    # A bare Figure on the Agg canvas: no pyplot state, no display needed (clusters, CI).
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, knn_ax = fig.subplots(1, 2)
    keys = override_keys(rows, varying_only=True)
    groups = seed_groups(rows)
    together = has_seed_groups(groups)  # seeds of a group share a colour and one legend entry
    colour = {id(r): i for i, g in enumerate(groups) for r in g["rows"]} if together else {}
    named: set[int] = set()
    for i, r in enumerate(rows):
        c = colour.get(id(r), i)
        name = group_label(groups[c], [k for k in keys if k != "seed"]) if together else label(r, keys)
        style = {
            "color": palette(c, len(groups) if together else len(rows)),
            "label": None if c in named else name,
        }
        named.add(c)
        if r["loss_curve"]:  # a marker keeps a job that logged one point visible
            loss_ax.plot(*zip(*r["loss_curve"]), marker="." if len(r["loss_curve"]) == 1 else "", **style)
        if r["knn_curve"]:
            knn_ax.plot(*zip(*r["knn_curve"]), marker="o", **style)
        elif r["test_knn_curve"]:  # no validation split: the monitor ran on test, drawn dashed to say so
            knn_ax.plot(*zip(*r["test_knn_curve"]), marker="o", linestyle="--", **style)
    dashed = any(r["test_knn_curve"] and not r["knn_curve"] for r in rows)
    knn_ax.set(
        title="kNN top-1 per epoch" + (" (dashed: test split, no validation)" if dashed else ", validation"),
        xlabel="epoch",
        ylabel="val/knn_top1 (%)" + (", dashed test/knn_top1" if dashed else ""),
    )
    loss_ax.set(title="Training loss", xlabel="step", ylabel="train/loss")
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
    groups = seed_groups(rows)
    seeds_csv = out_dir / "report_seeds.csv"
    if has_seed_groups(groups):
        paths["seeds_csv"] = seeds_csv
        write_seeds_csv(rows, groups, seeds_csv)
    else:  # one left by an earlier report into this dir would describe other jobs than report.md
        seeds_csv.unlink(missing_ok=True)
    return paths


# --- The benchmark table: python -m ssl_lab.fill_table's rows beside lightly's figures ------------------

FINDING = 1.5  # points below lightly's figure that make a row a finding to explain, not a result


def results_markdown(lines: list[dict[str, Any]]) -> str:
    """One table row per results line: lightly's figure (the best test kNN over epochs) for ssl_lab and
    for lightly, their difference, ssl_lab's own figures (validation kNN, online linear probe on
    validation and test), the wall times and their ratio, img/s and what ran it."""
    header = ["row", "kNN test best (epoch)", "lightly", "difference", "val kNN", "online val / test",
              "wall min", "lightly wall min", "wall ratio", "img/s", "device, torch, commit"]  # fmt: skip
    table = [header, ["---"] * len(header)]
    findings = []
    for line in lines:
        best, theirs = line.get("knn_test_best"), line.get("lightly_knn")
        # a row run with overrides (the suite's tiny rehearsal, another batch) is not lightly's protocol
        protocol = not line.get("overrides")
        diff = best - theirs if protocol and best is not None and theirs is not None else None
        wall, their_wall = line.get("wall_s", 0) / 60, line.get("lightly_wall_minutes")
        ratio = f"{wall / their_wall:.2f}" if protocol and their_wall else "–"
        name = line["row"].removeprefix("lightly_cifar10_")
        if line.get("overrides"):
            name += " (" + " ".join(line["overrides"]) + ")"
        if diff is not None and diff < -FINDING:
            findings.append(name)
            name += " **finding**"
        table.append([
            name,
            f"{fmt(best, 2)} ({line.get('knn_test_best_epoch', '–')}/{line.get('epochs', '–')})",
            fmt(theirs, 1),
            "–" if diff is None else f"{diff:+.2f}",
            fmt(line.get("val_knn"), 2),
            f"{fmt(line.get('val_online'), 2)} / {fmt(line.get('test_online'), 2)}",
            fmt(wall, 1),
            fmt(their_wall, 1),
            ratio,
            fmt(line.get("img_per_s"), 0),
            f"{line.get('device', '?')}, torch {line.get('torch', '?')}, {str(line.get('commit'))[:7]}",
        ])  # fmt: skip
    text = "\n".join(md_table(table))
    if findings:
        text += (f"\n\n**finding**: more than {FINDING} points below lightly's figure ({', '.join(findings)}): "
                 "a difference to explain against lightly's script, not a result.")  # fmt: skip
    return text


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file of python -m ssl_lab.fill_table (none when it does not exist yet); a
    line that is not one of its rows ends the program with a one-line error."""
    lines = []
    for number, text in enumerate(read(path).splitlines(), 1):
        if text.strip():
            line = load(text, json.loads, dict)
            if line is None or "row" not in line:
                fail(f"{path}:{number} is not a line of python -m ssl_lab.fill_table; fix or remove it")
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_lab.report", description="Summarize a Hydra multirun as a table and a figure."
    )
    parser.add_argument(
        "run_dir", type=Path,
        help="a multirun dir (e.g. outputs/multirun/<date>) or a results file of python -m ssl_lab.fill_table",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="where report.{md,csv,png} go (default: run_dir)")
    args = parser.parse_args(argv)

    if args.run_dir.suffix == ".jsonl" and args.run_dir.is_file():  # the benchmark table's rows
        lines = read_results(args.run_dir)
        if not lines:
            fail(f"{args.run_dir} holds no rows yet; python -m ssl_lab.fill_table fills it")
        text = results_markdown(lines)
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{args.run_dir.stem}.md").write_text(text + "\n")
            print(f"Wrote {args.out / f'{args.run_dir.stem}.md'}")
        return 0
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

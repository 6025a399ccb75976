import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from ssl_lab.report import collect, main, t_quantile, write_report

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [("simclr", "sgd"), ("simclr", "lars"), ("nnclr", "sgd"), ("nnclr", "lars")]


def run_report(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.report ARGS`, as a user runs it."""
    return run_cli(*args, cwd=ROOT, module="ssl_lab.report", timeout=120, fresh=fresh)


def write_run(
    run: Path,
    overrides: list[str],
    knn: list[float],
    losses: list[float],
    status: str | None = "finished",
    error: str | None = None,
    tail: str = "",
    monitor: str = "val/knn_top1",
) -> None:
    """A run dir as ssl_lab.train leaves it: one training row per epoch, kNN at init and after each epoch
    (`monitor`: val/knn_top1, or test/knn_top1 when the run has no validation split)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"step": 0, monitor: knn[0], "epoch": 0}]
    for epoch, loss in enumerate(losses):
        step = (epoch + 1) * 10
        rows.append(
            {"step": step, "train/loss": loss, "train/lr": 0.1, "train/img_per_s": 900.0, "epoch": epoch}
        )
        if epoch + 1 < len(knn):
            rows.append({"step": step, monitor: knn[epoch + 1], "epoch": epoch + 1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    info = {"starts": [{"time": "2026-11-25T10:00:00", "command": "python -m ssl_lab.train -m"}]}
    if status is not None:
        info["status"] = status
    if error is not None:
        info["error"] = error
    (run / "run_info.json").write_text(json.dumps(info))
    if status == "finished":
        (run / "final.pt").write_bytes(b"")


def make_sweep(root: Path, failed: int | None = None) -> Path:
    """A 2x2 sweep; job i ends at kNN 30 + i (best 31 + i, one epoch earlier); job `failed` dies early."""
    sweep = root / "multirun" / "2026-11-25_10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for i, (method, opt) in enumerate(SWEEP):
        overrides = [f"method={method}", f"optimizer={opt}"]
        if i == failed:
            write_run(sweep / str(i), overrides, [10.0, 12.0], [5.0], status="failed", error="CUDA OOM")
        else:
            write_run(sweep / str(i), overrides, [10.0, 31.0 + i, 30.0 + i], [5.0, 4.5 - i / 10])
    return sweep


def test_two_by_two_sweep(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["overrides"] for r in rows][1] == "method=simclr optimizer=lars"
    assert [r["knn_top1_final"] for r in rows] == [30.0, 31.0, 32.0, 33.0]
    assert [r["knn_top1_best"] for r in rows] == [31.0, 32.0, 33.0, 34.0]
    assert rows[0]["knn_top1_init"] == 10.0
    assert (rows[0]["status"], rows[0]["epochs"], rows[0]["steps"], rows[0]["train/loss"]) == (
        "finished",
        2,
        20,
        4.5,
    )

    paths = write_report(rows, sweep)
    md = paths["md"].read_text()
    header = md.splitlines()[0]
    assert "| method | optimizer |" in header and "error" not in header
    assert "| 1 | simclr | lars | finished | 2 | 4.4000 | 31.00 | 32.00 | 10.00 |" in md
    assert "4 jobs: 4 finished, 0 failed." in md

    with open(paths["csv"], newline="") as f:
        parsed = list(csv.DictReader(f))
    assert [(r["method"], r["optimizer"]) for r in parsed] == SWEEP
    assert [float(r["knn_top1_final"]) for r in parsed] == [30.0, 31.0, 32.0, 33.0]
    assert [float(r["train/loss"]) for r in parsed] == [r["train/loss"] for r in rows]

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_job_shows_its_error(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, failed=2)
    rows = collect(sweep)
    assert (rows[2]["status"], rows[2]["error"], rows[2]["epochs"]) == ("failed", "CUDA OOM", 1)
    assert [rows[i]["knn_top1_final"] for i in (0, 1, 3)] == [30.0, 31.0, 33.0]

    md = write_report(rows, tmp_path / "report")["md"].read_text()
    assert md.splitlines()[0].endswith("| error |")
    assert "| 2 | nnclr | sgd | failed | 1 | 5.0000 | 12.00 | 12.00 | 10.00 | 900 | CUDA OOM |" in md
    assert "4 jobs: 3 finished, 1 failed." in md


def test_missing_status_and_cut_off_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, ["method=simclr"], [10.0, 20.0], [5.0, 4.0], status=None, tail='{"step": 30, "train/lo')
    (row,) = collect(run)  # pointed at a single run dir
    assert (row["status"], row["steps"], row["train/loss"], row["knn_top1_final"]) == (
        "incomplete",
        20,
        4.0,
        20.0,
    )

    (run / "final.pt").write_bytes(b"")
    assert collect(run)[0]["status"] == "finished"


def test_non_finite_loss_and_missing_knn(tmp_path: Path) -> None:
    run = tmp_path / "0"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": "nan", "epoch": 0}) + "\n")
    (row,) = collect(tmp_path)
    assert row["train/loss"] != row["train/loss"]  # NaN
    assert row["knn_top1_final"] is row["knn_top1_best"] is row["knn_top1_init"] is None
    assert "| 0 | incomplete | 1 | nan | – | – | – |" in write_report([row], tmp_path)["md"].read_text()


def test_cli_prints_table_and_leaves_runs_alone(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    result = run_report(str(sweep), fresh=True)  # a new interpreter: the report's own imports suffice
    assert result.returncode == 0, result.stderr
    assert "| job | method | optimizer | status |" in result.stdout
    assert f"Wrote {sweep / 'report.png'}" in result.stdout
    after = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    assert {p.name for p in after.keys() - before.keys()} == {"report.md", "report.csv", "report.png"}
    assert all(after[p] == content for p, content in before.items())


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_dir_is_one_error_line(tmp_path: Path, case: str) -> None:
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    result = run_report(str(target))
    assert result.returncode == 2
    err = result.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("does not exist" if case == "missing" else "no runs") in err[0]
    assert not list(tmp_path.rglob("report.*"))


def test_eval_results_get_a_column(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    with open(sweep / "1" / "metrics.jsonl", "a") as f:  # as eval_after / python -m ssl_lab.eval append them
        f.write(json.dumps({"step": 20, "eval/linear_top1": 41.5, "eval/linear_top5": 90.0}) + "\n")
    write_report(collect(sweep), sweep)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["eval/linear_top1"] for r in rows] == ["", "41.5", "", ""]
    assert "eval/linear_top5" not in rows[0]
    assert "| eval/linear_top1 (test) |" in (sweep / "report.md").read_text()


def append_metrics(run: Path, **metrics: float) -> None:
    """A row as python -m ssl_lab.eval (or eval_after) appends it; eval__linear_top1 names eval/linear_top1."""
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, **{k.replace("__", "/"): v for k, v in metrics.items()}}) + "\n")


# `-m seed=0,1,2 method=simclr,nnclr`: Hydra's job order, the last override varying fastest.
SEEDS = [(seed, method) for seed in (0, 1, 2) for method in ("simclr", "nnclr")]
# val kNN final and test linear top-1 per (method, seed): simclr is better on validation, nnclr on test.
VAL = {"simclr": [50.0, 52.0, 54.0], "nnclr": [49.0, 50.0, 51.0]}
TEST = {"simclr": [40.0, 41.0, 42.0], "nnclr": [60.0, 61.0, 62.0]}


def make_seed_sweep(root: Path, failed: int | None = None) -> Path:
    sweep = root / "multirun" / "2026-11-25_11-00-00"
    for job, (seed, method) in enumerate(SEEDS):
        run = sweep / str(job)
        if job == failed:  # a high kNN from before it died: it must neither count nor win
            write_run(run, [f"seed={seed}", f"method={method}"], [10.0, 99.0], [5.0], status="failed")
            continue
        write_run(run, [f"seed={seed}", f"method={method}"], [10.0, 40.0, VAL[method][seed]], [5.0, 4.0])
        append_metrics(run, eval__linear_top1=TEST[method][seed], eval__linear_top5=90.0)
    return sweep


@pytest.mark.parametrize(
    "df, expected",  # t_{0.975, df} from a printed table (scipy.stats.t.ppf gives the same to 1e-9)
    [
        (1, 12.706205),
        (2, 4.302653),
        (4, 2.776445),
        (9, 2.262157),
        (29, 2.045230),
        (30, 2.042272),
        (100, 1.983972),
    ],
)
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # not a dependency; checked where it is installed
    for df in [*range(1, 61), 257, 1000]:
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-9)


def test_seed_groups_mean_std_and_t_interval(tmp_path: Path) -> None:
    sweep = make_seed_sweep(tmp_path)
    paths = write_report(collect(sweep), sweep)
    md = paths["md"].read_text()
    # simclr 50, 52, 54: mean 52, std 2, half-width t_{0.975,2} * 2 / sqrt(3) = 4.3027 * 1.1547 = 4.968
    # nnclr 49, 50, 51: mean 50, std 1, half-width 4.3027 / sqrt(3) = 2.484
    assert "| method | seeds | jobs | train/loss | val/knn_top1 final |" in md
    assert (
        "| simclr | 0, 1, 2 | n=3 of 3 | 4.0000 ± 0.0000 [4.0000, 4.0000] | 52.00 ± 2.00 [47.03, 56.97] |"
        in md
    )
    assert (
        "| nnclr | 0, 1, 2 | n=3 of 3 | 4.0000 ± 0.0000 [4.0000, 4.0000] | 50.00 ± 1.00 [47.52, 52.48] |"
        in md
    )
    seed_table = [line for line in md.partition("Seed groups")[2].splitlines() if line.startswith("|")]
    assert len({line.count(" | ") for line in seed_table}) == 1  # header, alignment, rows: one width

    with open(paths["seeds_csv"], newline="") as f:
        parsed = {(r["method"], r["metric"]): r for r in csv.DictReader(f)}
    simclr = parsed[("simclr", "knn_top1_final")]
    assert (simclr["seeds"], simclr["jobs"], simclr["finished"], simclr["n"]) == ("0, 1, 2", "3", "3", "3")
    assert (float(simclr["mean"]), float(simclr["std"])) == (52.0, 2.0)
    half = 4.302652729911275 * 2 / 3**0.5
    assert float(simclr["ci95_low"]) == pytest.approx(52 - half, abs=1e-9)
    assert float(simclr["ci95_high"]) == pytest.approx(52 + half, abs=1e-9)
    nnclr_test = parsed[("nnclr", "eval/linear_top1")]
    assert (float(nnclr_test["mean"]), float(nnclr_test["std"]), nnclr_test["n"]) == (61.0, 1.0, "3")
    assert "seed" not in next(iter(parsed.values()))  # the seed is what a group averages over


def test_winner_is_the_best_group_mean_on_validation_not_test(tmp_path: Path) -> None:
    sweep = make_seed_sweep(tmp_path)
    md = write_report(collect(sweep), sweep)["md"].read_text()
    # nnclr is ahead on test (61 against 41) but behind on validation (50 against 52): simclr wins
    assert md.splitlines()[-1] == (
        "Best on validation (mean val/knn_top1 final over seeds): method=simclr (seeds 0, 1, 2; n=3 of 3): "
        "52.00 ± 2.00 [47.03, 56.97]; its test figures: eval/linear_top1 41.00 ± 1.00 [38.52, 43.48]."
    )


def test_winner_job_is_picked_on_validation_not_test(tmp_path: Path) -> None:
    for job, (method, val, test) in enumerate([("simclr", 60.0, 40.0), ("nnclr", 55.0, 70.0)]):
        write_run(tmp_path / str(job), [f"method={method}"], [10.0, val], [5.0])
        append_metrics(tmp_path / str(job), eval__linear_top1=test, val__knn_top1_pixels=20.0 + job)
    md = write_report(collect(tmp_path), tmp_path / "report")["md"].read_text()
    assert "Seed groups" not in md and not (tmp_path / "report" / "report_seeds.csv").exists()
    # the raw-pixel baseline is a reference column between the validation and the test figures
    assert "| val/knn_top1 at init | val/knn_top1_pixels | eval/linear_top1 (test) |" in md
    assert "| 1 | nnclr | finished | 1 | 5.0000 | 55.00 | 55.00 | 10.00 | 21.00 | 70.00 |" in md
    assert md.splitlines()[-1] == (
        "Best on validation (val/knn_top1 final): job 0, method=simclr: 60.00; "
        "its test figures: eval/linear_top1 40.00."
    )


def test_no_validation_split_picks_no_winner(tmp_path: Path) -> None:
    """data.val_size=0: the monitor logs test/knn_top1; it is shown as test and never chooses."""
    for job, (seed, method) in enumerate(SEEDS[:4]):
        run = tmp_path / str(job)
        write_run(
            run, [f"seed={seed}", f"method={method}"], [10.0, 30.0 + job], [5.0], monitor="test/knn_top1"
        )
        append_metrics(run, eval__linear_top1=50.0 + job)
    rows = collect(tmp_path)
    assert [r["knn_top1_final"] for r in rows] == [None] * 4
    assert [r["test/knn_top1_final"] for r in rows] == [30.0, 31.0, 32.0, 33.0]
    paths = write_report(rows, tmp_path)
    md = paths["md"].read_text()
    header = md.splitlines()[0]
    assert header.endswith(
        "| val/knn_top1 final | val/knn_top1 best | val/knn_top1 at init | test/knn_top1 final "
        "| eval/linear_top1 (test) | img/s |"
    )
    assert "| 3 | 1 | nnclr | finished | 1 | 5.0000 | – | – | – | 33.00 | 53.00 |" in md
    seeds_row = "| simclr | 0, 1 | n=2 of 2 | 5.0000 ± 0.0000 [5.0000, 5.0000] | – | – | – | 31.00 ± 1.41"
    assert seeds_row in md
    assert md.splitlines()[-1] == (
        "No validation split (no val/knn_top1 in the finished jobs): no winner picked; "
        "test figures are never used to choose."
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_seed_is_left_out_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = make_seed_sweep(tmp_path, failed=4)  # simclr, seed 2 (val 99 before it died)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    # simclr 50, 52: mean 51, std sqrt(2), half-width t_{0.975,1} * sqrt(2) / sqrt(2) = 12.706
    assert (
        "| simclr | 0, 1, 2 | n=2 of 3, 1 failed | 4.0000 ± 0.0000 [4.0000, 4.0000] "
        "| 51.00 ± 1.41 [38.29, 63.71] |" in out
    )
    assert (
        "Best on validation (mean val/knn_top1 final over seeds): method=simclr "
        "(seeds 0, 1, 2; n=2 of 3, 1 failed): 51.00 ± 1.41 [38.29, 63.71];" in out
    )
    assert f"Wrote {sweep / 'report_seeds.csv'}" in out
    rows = list(csv.DictReader((sweep / "report_seeds.csv").open()))
    simclr = next(r for r in rows if (r["method"], r["metric"]) == ("simclr", "knn_top1_final"))
    assert (simclr["jobs"], simclr["finished"], simclr["n"], float(simclr["mean"])) == ("3", "2", "2", 51.0)
    assert float(simclr["ci95_high"]) - 51.0 == pytest.approx(12.706205, abs=1e-6)


def test_a_method_comparison_shows_online_probe_time_speed_and_the_published_figure(tmp_path: Path) -> None:
    """-m compare=...: per recipe and seed group, validation kNN and online linear (mean ± interval), the
    test figures, img/s, wall minutes from run_info's starts, and the recipe's `published` figure."""
    sweep = tmp_path / "multirun" / "2026-12-06_10-00-00"
    published = {"cifar10_simclr": 93.3, "cifar10_byol": 92.58}
    for job, (seed, recipe) in enumerate((s, r) for s in (0, 1) for r in published):
        run = sweep / str(job)
        write_run(run, [f"experiment={recipe}", f"seed={seed}"], [10.0, 40.0 + job], [5.0, 4.0])
        append_metrics(run, val__online_top1=30.0 + seed, test__online_top1=35.0 + seed)
        info = json.loads((run / "run_info.json").read_text())
        info["starts"][0]["ended"] = "2026-11-25T10:12:30"  # 12.5 minutes after its start
        (run / "run_info.json").write_text(json.dumps(info))
        (run / "config.yaml").write_text(
            f"published:\n  top1: {published[recipe]}\n  protocol: online linear\n  source: solo-learn README\n"
            "  budget: 1000 epochs, batch 256\n"
        )
    rows = collect(sweep)
    assert [r["online_top1_final"] for r in rows] == [30.0, 30.0, 31.0, 31.0]
    assert {r["wall_min"] for r in rows} == {12.5} and {r["img_per_s"] for r in rows} == {900.0}
    assert rows[1]["published"] == "92.58 (online linear, solo-learn README, 1000 epochs, batch 256)"
    write_report(rows, sweep)
    text = (sweep / "report.md").read_text()
    assert "| val/online_top1 final |" in text.splitlines()[0] and "test/online_top1 final" in text
    seeds_table = text.split("Seed groups")[1]
    assert "30.50 ± 0.71" in seeds_table and "92.58 (online linear" in seeds_table
    assert (sweep / "report.png").stat().st_size > 0


def test_the_health_columns_show_each_runs_last_logged_signals(tmp_path: Path) -> None:
    """feature std, feature rank and (for teacher methods) teacher entropy: each run's last logged value,
    a dash where a run logs none (a method without a teacher); no column when no run logs them."""
    sweep = tmp_path / "multirun" / "2026-12-07_10-00-00"
    health = {
        "dino": [{"train/feature_std": 0.02, "train/feature_rank": 40.0, "train/teacher_entropy": 7.1},
                 {"train/feature_std": 0.0213, "train/feature_rank": 38.5, "train/teacher_entropy": 0.06}],
        "simclr": [{"train/feature_std": 0.03, "train/feature_rank": 50.0},
                   {"train/feature_std": 0.0311, "train/feature_rank": 49.0}],
    }  # fmt: skip
    for job, (method, rows) in enumerate(health.items()):
        run = sweep / str(job)
        write_run(run, [f"method={method}"], [10.0, 20.0, 30.0], [5.0, 4.0])
        lines = (run / "metrics.jsonl").read_text().splitlines()
        train_rows = [i for i, line in enumerate(lines) if "train/loss" in line]
        for i, signals in zip(train_rows, rows):
            lines[i] = json.dumps({**json.loads(lines[i]), **signals})
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = collect(sweep)
    assert [r["train/teacher_entropy"] for r in rows] == [0.06, None]
    assert [r["train/feature_rank"] for r in rows] == [38.5, 49.0]
    write_report(rows, sweep)
    table = (sweep / "report.md").read_text().splitlines()
    header = [c.strip() for c in table[0].split("|")]
    assert {"feature std", "feature rank", "teacher entropy"} <= set(header)
    dino = [c.strip() for c in next(line for line in table if "dino" in line).split("|")]
    simclr = [c.strip() for c in next(line for line in table if "simclr" in line).split("|")]
    assert dino[header.index("feature std")] == "0.0213" and dino[header.index("teacher entropy")] == "0.06"
    assert simclr[header.index("feature rank")] == "49.0" and simclr[header.index("teacher entropy")] == "–"

    plain = tmp_path / "multirun" / "2026-12-07_11-00-00"
    write_run(plain / "0", ["method=simclr"], [10.0, 20.0], [5.0])
    write_report(collect(plain), plain)
    assert "feature std" not in (plain / "report.md").read_text().splitlines()[0]

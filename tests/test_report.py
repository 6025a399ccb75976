import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_lab.report import collect, write_report

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [("simclr", "sgd"), ("simclr", "lars"), ("nnclr", "sgd"), ("nnclr", "lars")]


def run_report(*args: str) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.report ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ssl_lab.report", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def write_run(
    run: Path,
    overrides: list[str],
    knn: list[float],
    losses: list[float],
    status: str | None = "finished",
    error: str | None = None,
    tail: str = "",
) -> None:
    """A run dir as ssl_lab.train leaves it: one training row per epoch, kNN at init and after each epoch."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"step": 0, "val/knn_top1": knn[0], "epoch": 0}]
    for epoch, loss in enumerate(losses):
        step = (epoch + 1) * 10
        rows.append(
            {"step": step, "train/loss": loss, "train/lr": 0.1, "train/img_per_s": 900.0, "epoch": epoch}
        )
        if epoch + 1 < len(knn):
            rows.append({"step": step, "val/knn_top1": knn[epoch + 1], "epoch": epoch + 1})
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
    assert "| 2 | nnclr | sgd | failed | 1 | 5.0000 | 12.00 | 12.00 | 10.00 | CUDA OOM |" in md
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
    result = run_report(str(sweep))
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
    assert "| eval/linear_top1 |" in (sweep / "report.md").read_text()

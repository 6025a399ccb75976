"""python -m ssl_lab.fill_table, the harness that fills lightly's CIFAR-10 table in short GPU windows,
rehearsed on the CPU with tiny rows as a user runs it (another directory, the real CLI), and the table
python -m ssl_lab.report makes of its results file."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from ssl_lab import fill_table
from ssl_lab.report import results_markdown

TINY = ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.image_size=16", "batch_size=32",
        "epochs=2", "backbone=resnet_tiny", "trainer.device=cpu"]  # fmt: skip
FIELDS = {"row", "method", "overrides", "knn_test_best", "knn_test_best_epoch", "val_knn", "val_online",
          "test_online", "img_per_s", "wall_s", "predicted_s", "s_per_epoch", "epochs", "batch_size",
          "lightly_knn", "lightly_wall_minutes", "device", "torch", "commit", "command", "date"}  # fmt: skip


@pytest.mark.slow
def test_the_harness_fills_missing_rows_skips_done_ones_and_starts_none_that_cannot_fit(
    tmp_path: Path,
) -> None:
    out, results = tmp_path / "out", tmp_path / "results.jsonl"
    args = ["--out", str(out), "--results", str(results), "--rows", "simclr,byol", *TINY]
    first = run_cli("--budget", "900", *args, cwd=tmp_path, module="ssl_lab.fill_table")
    assert first.returncode == 0, first.stderr[-2000:]
    lines = [json.loads(t) for t in (out / "lightly_cifar10.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == ["lightly_cifar10_simclr", "lightly_cifar10_byol"]
    for line in lines:
        assert set(line) >= FIELDS and line["overrides"] == TINY
        assert line["epochs"] == 2 and line["knn_test_best_epoch"] in (1, 2)
        assert 0 <= line["knn_test_best"] <= 100 and line["val_knn"] is not None
        assert line["lightly_knn"] in (84.8, 86.8) and line["device"] == "cpu"
        assert line["command"].startswith(f"python -m ssl_lab.train experiment={line['row']} data=synthetic")
        assert line["wall_s"] > 0 and line["predicted_s"] > 0
    # the rows a results file holds (for the same overrides) are not run again
    results.write_text((out / "lightly_cifar10.jsonl").read_text())
    again = run_cli("--budget", "900", "--out", str(tmp_path / "out2"), "--results", str(results),
                    "--rows", "simclr,byol", *TINY, cwd=tmp_path, module="ssl_lab.fill_table")  # fmt: skip
    assert again.returncode == 0 and "2 of 2 rows done" in again.stdout
    assert not (tmp_path / "out2" / "lightly_cifar10.jsonl").exists()
    # a row that would not finish in the budget is not started: no line, and the reason
    short = run_cli("--budget", "3", "--out", str(tmp_path / "out3"), "--results", str(tmp_path / "none.jsonl"),
                    "--rows", "simclr", *TINY, cwd=tmp_path, module="ssl_lab.fill_table")  # fmt: skip
    assert short.returncode == 0 and "does not fit" in short.stdout and "not started" in short.stdout
    assert not (tmp_path / "out3" / "lightly_cifar10.jsonl").exists()
    table = run_cli(str(out / "lightly_cifar10.jsonl"), cwd=tmp_path, module="ssl_lab.report")
    assert (
        table.returncode == 0 and table.stdout.count("\n| ") >= 3 and "simclr (data=synthetic" in table.stdout
    )


def test_the_prediction_counts_every_kNN_pass_and_the_first_step() -> None:
    cost = {"step_s": 0.02, "first_step_s": 30.0, "knn_s": 0.5, "load_s": 10.0, "steps_per_epoch": 97,
            "epochs": 200, "test_every": 1, "monitor_every": 0}  # fmt: skip
    expected = fill_table.STARTUP_S + 10 + 200 * 97 * 0.02 + 30 + (3 + 200) * 0.5
    assert fill_table.predict(cost) == pytest.approx(expected)


def test_unknown_rows_and_broken_results_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = run_cli("--budget", "10", "--rows", "simclr,moco", cwd=tmp_path, module="ssl_lab.fill_table")
    assert bad.returncode == 2 and "no row lightly_cifar10_moco" in bad.stderr and "mocov2" in bad.stderr
    broken = tmp_path / "r.jsonl"
    broken.write_text('{"row": "lightly_cifar10_simclr"}\nnot json\n')
    bad = run_cli("--budget", "10", "--results", str(broken), cwd=tmp_path, module="ssl_lab.fill_table")
    assert bad.returncode == 2 and "r.jsonl:2 is not a line of python -m ssl_lab.fill_table" in bad.stderr


def test_the_table_sets_ssl_labs_figure_beside_lightlys_and_flags_a_gap_as_a_finding() -> None:
    row = {"row": "lightly_cifar10_byol", "overrides": [], "knn_test_best": 84.9, "knn_test_best_epoch": 190,
           "epochs": 200, "val_knn": 85.2, "val_online": 86.0, "test_online": 85.5, "wall_s": 405.0,
           "lightly_knn": 86.8, "lightly_wall_minutes": 108.3, "img_per_s": 24000, "device": "NVIDIA H100",
           "torch": "2.11", "commit": "abcdef123"}  # fmt: skip
    near = {**row, "row": "lightly_cifar10_simclr", "knn_test_best": 84.0, "lightly_knn": 84.8}
    text = results_markdown([row, near])
    assert "| byol **finding** | 84.90 (190/200) | 86.8 | -1.90 |" in text
    assert "| simclr | 84.00 (190/200) | 84.8 | -0.80 |" in text
    assert "6.8 | 108.3 | 0.06 |" in text  # 405 s against lightly's 108.3 min
    assert "**finding**: more than 1.5 points below lightly's figure (byol **finding**" not in text
    assert "(byol)" in text


def test_a_row_is_measured_as_it_trains_not_with_the_benchs_defaults() -> None:
    cfg = fill_table.row_config("lightly_cifar10_mocov2", [])
    assert (cfg.batch_size, cfg.data.name, cfg.backbone.cifar_stem, cfg.backbone.bn_splits) == (
        512,
        "cifar10",
        True,
        8,
    )
    assert fill_table.row_config("lightly_cifar10_simclr", ["batch_size=64"]).batch_size == 64

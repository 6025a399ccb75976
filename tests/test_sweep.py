"""Sweeps as the README shows them: a Hydra multirun grid (one W&B group, a report), a failing job
that leaves the others' results, the Optuna search, the SLURM launcher config, the native W&B sweep."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, compose_cfg, run_cli, wandb_records

from ssl_lab.loggers import read_metrics

QUIET = [*FAST, "trainer.progress=false"]


def sweep_dir(workdir: Path) -> Path:
    (found,) = (workdir / "outputs" / "multirun").iterdir()
    return found


def wandb_run_record(run_dir: Path):
    """The `run` record of the offline W&B run in `run_dir`."""
    return next(wandb_records(run_dir, "run"))


@pytest.mark.slow
def test_grid_multirun_runs_each_job_in_one_wandb_group_and_reports(workdir: Path) -> None:
    result = run_cli("-m", *QUIET, "logger=wandb", "method=simclr,nnclr", "optimizer=sgd,lars", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(workdir)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "final.pt").exists() and json.loads((job / "run_info.json").read_text())[
            "status"
        ] == "finished"
        assert any("val/knn_top1" in r for r in read_metrics(job))
    runs = {job.name: wandb_run_record(job) for job in jobs}
    assert {r.run_group for r in runs.values()} == {sweep.name}  # one group: the sweep
    assert [r.job_type for r in runs.values()] == ["simclr", "simclr", "nnclr", "nnclr"]
    # the name says the job's overrides (Hydra's override_dirname: sorted by key)
    assert (
        runs["3"].display_name
        == "#3 backbone.name=test_resnet,backbone=timm,debug=smoke,logger=wandb,method=nnclr,optimizer=lars"
    )
    assert "job #3: " in result.stdout

    report = run_cli(str(sweep), cwd=workdir, module="ssl_lab.report")
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [(r["method"], r["optimizer"], r["status"]) for r in rows] == [
        ("simclr", "sgd", "finished"), ("simclr", "lars", "finished"),
        ("nnclr", "sgd", "finished"), ("nnclr", "lars", "finished"),
    ]  # fmt: skip
    final = [r for r in read_metrics(jobs[2]) if "val/knn_top1" in r][-1]["val/knn_top1"]
    assert float(rows[2]["knn_top1_final"]) == pytest.approx(final)
    assert "| method | optimizer |" in report.stdout and (sweep / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_keep_their_results(workdir: Path) -> None:
    result = run_cli("-m", *QUIET, "logger=none", "batch_size=32,100000,64", cwd=workdir)
    assert result.returncode == 1  # the sweep says that something failed
    assert "error: batch_size=100000 is larger than the 256 training images" in result.stderr
    sweep = sweep_dir(workdir)
    assert (sweep / "0" / "final.pt").exists() and (
        sweep / "2" / "final.pt"
    ).exists()  # after the failure too
    failed = json.loads((sweep / "1" / "run_info.json").read_text())
    assert failed["status"] == "failed" and "batch_size=100000" in failed["error"]
    report = run_cli(str(sweep), cwd=workdir, module="ssl_lab.report")
    assert report.returncode == 0 and "2 finished, 1 failed" in report.stdout


@pytest.mark.slow
def test_optuna_search_maximises_knn_top1(workdir: Path) -> None:
    result = run_cli(
        "hparams_search=lr_temperature", "hydra.sweeper.n_trials=2", *QUIET, "logger=none", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(workdir)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    knn = [
        [r for r in read_metrics(sweep / j) if "val/knn_top1" in r][-1]["val/knn_top1"] for j in ("0", "1")
    ]
    assert best["best_value"] == pytest.approx(max(knn))  # what the runner returned, maximised
    assert set(best["best_params"]) == {"optimizer.base_lr", "method.temperature"}


def test_slurm_launcher_config_composes_with_one_task_per_gpu() -> None:
    cfg = compose_cfg(
        ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2"],
        hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.nodes == 2 and launcher.signal_delay_s > 0


def test_native_wandb_sweep_drives_the_hydra_app() -> None:
    """The agent runs `command` with ${args_no_hyphens} -> key=value: those overrides must compose, and
    the metric must be what the runner logs."""
    sweep = yaml.safe_load((ROOT / "experiments" / "wandb_sweep_lr_temperature.yml").read_text())
    assert sweep["metric"] == {"name": "val/knn_top1", "goal": "maximize"}
    command = sweep["command"]
    assert command[1:4] == ["python", "-m", "ssl_lab.train"] and command[-1] == "${args_no_hyphens}"
    sampled = {"optimizer.base_lr": 0.0012, "method.temperature": 0.31}
    assert set(sampled) == set(sweep["parameters"])
    overrides = [*command[4:-1], *(f"{k}={v}" for k, v in sampled.items())]
    cfg = compose_cfg(overrides, hydra_config=True)
    assert cfg.optimizer.base_lr == 0.0012 and cfg.method.temperature == 0.31 and cfg.logger.mode == "online"

import subprocess
import sys

from conftest import ROOT

FIGURES = (
    "augment alone",
    "model step alone",
    "full ssl_lab step",
    "reference (per-sample PIL)",
    "reference data path alone",
)


def test_bench_prints_the_four_figures_and_the_ratios():
    """`python -m ssl_lab.bench` with a tiny setting, as benchmarks/README.md shows it (no timing asserts)."""
    args = ["backbone=resnet_tiny", "batch_size=16", "data.limit_train=64", "--steps", "1", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "ssl_lab.bench", *args, "--workers", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for figure in FIGURES:
        assert any(line.strip().startswith(figure) and "img/s" in line for line in lines), figure
    assert any(line.strip().startswith("full / model step alone") for line in lines)
    assert any(line.strip().startswith("full / reference") for line in lines)
    assert "test_resnet" in result.stdout and "batch 16" in result.stdout


def test_bench_rejects_a_bad_override_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "ssl_lab.bench", "backbone=nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown backbone 'nope'")

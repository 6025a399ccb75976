import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# A small, fast composition for tests that train: a tiny timm ResNet on a few hundred images.
FAST = ["debug=smoke", "backbone=timm", "backbone.name=test_resnet"]


def compose_cfg(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The composed config (with its `hydra` node when asked: launcher and sweeper settings)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.train ARGS` in a subprocess, as the README shows it."""
    return subprocess.run(
        [sys.executable, "-m", "ssl_lab.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch working directory: run dirs land in its outputs/."""
    return tmp_path

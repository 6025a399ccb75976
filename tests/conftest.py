import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import ssl_lab.config  # noqa: F401  (registers the schemas and resolvers the configs name)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# A small, fast composition for tests that train: a tiny timm ResNet on a few hundred images.
FAST = ["debug=smoke", "backbone=timm", "backbone.name=test_resnet"]


def compose_cfg(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The composed config (with its `hydra` node when asked: launcher and sweeper settings)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 600, module: str = "ssl_lab.train"
) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.train ARGS` (or another module) in a subprocess, as the README shows it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
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


def wandb_records(run_dir: Path, kind: str) -> Iterator:
    """Records of one kind ("run", "history", ...) of the offline W&B runs in `run_dir`, read from the
    .wandb files with wandb's own protobuf schema (a LevelDB-style log: 7-byte header, then 32 KiB
    blocks of chunks). wandb 0.31 ships no Python reader for them."""
    from wandb.proto import wandb_internal_pb2 as pb

    paths = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert paths, f"no offline W&B run in {run_dir}"
    for path in paths:
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer
                pos += 32768 - pos % 32768
                continue
            length, chunk = struct.unpack("<HB", data[pos + 4 : pos + 7])
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if chunk in (1, 4):  # a whole record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == kind:
                    yield getattr(record, kind)

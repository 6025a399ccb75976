import atexit
import multiprocessing
import os
import runpy
import struct
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import ssl_lab.config  # noqa: F401  (registers the schemas and resolvers the configs name)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# A small, fast composition for tests that train: a tiny timm ResNet on a few hundred images.
FAST = ["debug=smoke", "backbone=timm", "backbone.name=test_resnet"]
# Every method option: tests that train, resume, compile and compare 1 with 2 processes iterate over
# it, so that a new method (one file + one YAML) is covered without editing a test.
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# Narrow heads for the tests that train every method: the papers' 4096- and 8192-wide heads and 65,536
# prototypes cost minutes a run on a 2-core CPU (Barlow Twins' 8192 x 3 projector: ~140M parameters).
SMALL_HEADS = {
    "proj_hidden_dim": 64, "proj_output_dim": 32, "pred_hidden_dim": 64, "bottleneck_dim": 32,
    "num_prototypes": 256, "queue_size": 256, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
    "patch_prototypes": 256, "pred_dim": 32, "pred_depth": 1,
}  # fmt: skip
# Methods that need another backbone than FAST's ResNet: a small timm ViT (64 wide) with 8 px patches.
VIT = ["backbone.name=test_vit", "++backbone.kwargs.patch_size=8"]
BACKBONES = {"mae": VIT, "simmim": VIT, "ibot": VIT, "dinov2": VIT, "msn": VIT, "ijepa": VIT}


class FlatBackbone(nn.Module):
    """A stand-in backbone for method tests: flat inputs (images are flattened) go straight into the
    heads; `scaled` gives it one weight per feature (ones at init) so that a momentum teacher has a
    parameter to follow. Records each call's input shape (views of equal size share a pass)."""

    def __init__(self, dim: int, scaled: bool = False) -> None:
        super().__init__()
        self.num_features = dim
        self.scale = nn.Parameter(torch.ones(dim)) if scaled else None
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        x = x.flatten(1)
        return x if self.scale is None else x * self.scale


def method_args(method: str) -> list[str]:
    """`method=<method>`, the SMALL_HEADS overrides of the settings it has, and the backbone it needs
    (after FAST's, which they override)."""
    settings = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    small = [f"method.{k}={v}" for k, v in SMALL_HEADS.items() if k in settings]
    return [f"method={method}", *small, *BACKBONES.get(method, [])]


def compose_cfg(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The composed config (with its `hydra` node when asked: launcher and sweeper settings)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def run_cli(
    *args: str,
    cwd: Path,
    env: dict | None = None,
    timeout: int = 600,
    module: str = "ssl_lab.train",
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.train ARGS` (or another module), as the README shows it: see start_cli.
    fresh=True starts a new interpreter (for what happens before the first import)."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
        )  # fmt: skip
    return start_cli(*args, cwd=cwd, env=env, module=module).finish(timeout)


class CLI:
    """A started `python -m MODULE ARGS`: its pid (for signals) and, once it ends, its result."""

    def __init__(self, module: str, args: list[str], cwd: Path, env: dict) -> None:
        self.args = ["python", "-m", module, *args]
        self._dir = tempfile.TemporaryDirectory()
        self._out, self._err = Path(self._dir.name, "stdout"), Path(self._dir.name, "stderr")
        io = (str(cwd), env, str(self._out), str(self._err))
        self._process = FORKSERVER.Process(target=_run_module, args=(module, list(args), *io))
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.args, timeout, self._out.read_text(), self._err.read_text())
        result = subprocess.CompletedProcess(
            self.args, self._process.exitcode, self._out.read_text(), self._err.read_text()
        )
        self._dir.cleanup()
        return result


def start_cli(*args: str, cwd: Path, env: dict | None = None, module: str = "ssl_lab.train") -> CLI:
    """Starts `python -m MODULE ARGS` in a process forked from one that has imported ssl_lab's entry
    points already: the module runs as `__main__` with its argv, cwd, environment, stdout, stderr and
    exit status as under `python -m`, minus the ~10 s an interpreter spends importing torch,
    torchvision and timm on a 2-core machine."""
    return CLI(module, list(args), cwd, {**os.environ, "WANDB_SILENT": "true", **(env or {})})


# What the forking process imports once: every entry point and what they import on first use.
PRELOAD = [
    "conftest",
    "ssl_lab.launch",
    "ssl_lab.eval.run",
    "ssl_lab.export",
    "ssl_lab.report",
    "ssl_lab.bench",
    "ssl_lab.check_ddp",
    "wandb",
    "torchvision.datasets",
]
FORKSERVER = multiprocessing.get_context("forkserver")  # started by the first start_cli
FORKSERVER.set_forkserver_preload(PRELOAD)


def _run_module(module: str, args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: what `python -m MODULE ARGS` does after start-up, then exit with its
    status (atexit handlers included, as an interpreter's exit runs them)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # python -m puts the working directory first
    multiprocessing.set_start_method(None, force=True)  # the interpreter's default, not the forkserver's
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [module, *args]
    # python -m imports the module once, as __main__; here the forking process imported it already
    warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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

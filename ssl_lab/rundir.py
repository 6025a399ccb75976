"""The run directory: where a run lives, what it records about itself, and how a resume finds it.

    outputs/<name>/<date>/   config.yaml, run_info.json (status, command, code, versions), metrics.jsonl,
                             train.log (the console), last.pt (resume), final.pt (evaluation),
                             eval.json, eval.log, export/, .hydra/

Only rank 0 writes here. `run_dir` and `hydra_subdir` are the resolvers conf/train.yaml names its
run dir with (resume=true finds the newest run with the same overrides).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_lab import distributed
from ssl_lab.errors import Interrupted, PeerFailed, UserError, one_line, user_message


def shared_run_dir(own_dir: Path) -> Path:
    """Rank 0's run dir on every process, made by rank 0; the placeholder Hydra made for another rank
    (see `run_dir`) is removed."""
    run_dir = Path(distributed.broadcast_object(str(own_dir)))
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    elif own_dir != run_dir:
        with contextlib.suppress(OSError):
            own_dir.rmdir()
    return run_dir


class _Tee:
    """A console stream that also appends what it shows to a log file: whole lines, as a terminal ends up
    showing them (a progress bar redrawn with carriage returns leaves its last state, or nothing)."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = line.rsplit("\r", 1)[-1].rstrip()
            if shown:
                self.log.write(shown + "\n")
        if lines:
            self.log.flush()
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_log(path: Path) -> Iterator[None]:
    """Everything this process prints (stdout and stderr) is also appended to `path`; a resumed run
    adds to its log. Only the main process writes one."""
    if not distributed.is_main():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr = sys.stdout, sys.stderr
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"--- {datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
        sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
        try:
            yield
        except Exception:  # ours are printed as one line inside; a crash's traceback is printed after
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = stdout, stderr


def find_checkpoint(path: str | Path) -> Path:
    """A .pt file, or a run dir: its final.pt, else its last.pt."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        found = next((path / n for n in ("final.pt", "last.pt") if (path / n).exists()), None)
        if found is None:
            raise UserError(
                f"checkpoint={path} holds no final.pt or last.pt; pass a pretraining run dir or .pt file"
            )
        return found
    if not path.exists():
        raise UserError(
            f"checkpoint={path} does not exist; pass a pretraining run dir or its final.pt/last.pt"
        )
    return path


def resume_checkpoint(run_dir: Path, resume: object) -> Path:
    path = run_dir / "last.pt"
    if not path.exists():
        raise UserError(
            f"resume={resume} but there is nothing to resume: no {path}. Run without resume to start "
            "a new run, or pass resume=<run dir> of a run that wrote last.pt"
        )
    return path


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Rows logged after the checkpoint belong to work that is now redone: move them aside."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            kept = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError):  # a line cut short by kill -9
            kept = False
        (keep if kept else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(run_dir / "metrics.discarded.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def write_run_info(run_dir: Path, resolved: dict, resumed: bool) -> None:
    """What a run needs to be repeated: the resolved config, the command, the code and its versions."""
    if not resumed:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if resumed and info_path.exists() else {"starts": []}
    info["status"] = "running"
    info.pop("error", None)  # of an earlier start that failed
    info["starts"].append(
        {
            "time": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "ssl_lab.train", *sys.argv[1:]]),
            "cwd": str(Path.cwd()),
            "host": platform.node(),
            "git": git_state(),
            "versions": package_versions(),
        }
    )
    write_json(info_path, info)


def set_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """run_info.json's `status` (running, finished, failed, interrupted) and the error of a failed run:
    what `python -m ssl_lab.report` shows for each job of a sweep."""
    path = run_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {"starts": []}
    info["status"] = status
    if info["starts"]:  # when this start ended: the report's wall time is the starts' sum
        info["starts"][-1]["ended"] = datetime.now().isoformat(timespec="seconds")
    if error:
        info["error"] = error
    write_json(path, info)


@contextlib.contextmanager
def recorded(run_dir: Path, logger, step: object) -> Iterator[None]:
    """The run's status in run_info.json and W&B follows how the block ends: finished, interrupted or
    failed (with its one-line error). A collective that fails because another process died becomes
    PeerFailed. `step()` tells the step reached, for that message. Leaves the process group.

    A SIGTERM during the wrap-up of a failure waits for it: torchrun sends one to every survivor within
    0.1 s of a process's death, and its default action ended rank 0 before it had written its status
    and said why (seen in CI; reproduced by delaying the wrap-up). After a lost peer the group is left
    as it is: a collective of it has failed, and destroying it can wait on the dead member."""
    exit_code, status, error, held, group_lost = 1, "failed", None, None, False
    try:
        yield
        exit_code, status = 0, "finished"
    except Interrupted as e:
        exit_code, status = 128 + e.signum, "interrupted"
        raise
    except Exception as e:
        held = hold_sigterm()
        if not distributed.lost_peer(e):
            error = user_message(e)
            raise
        group_lost = True
        error = (
            f"process {distributed.rank()} lost contact with the others at step {step()} "
            f"({one_line(str(e))[:90]}...): another process failed, see its message. "
            f"{run_dir / 'last.pt'} holds the last epoch: fix the cause, then run the same command with resume=true"
        )
        raise PeerFailed(error) from None
    finally:
        try:
            logger.finish(exit_code)
            if distributed.is_main():
                set_status(run_dir, status, error)
            if not group_lost:  # together after a run that ended well; at once after a failure
                distributed.shutdown(together=status == "finished")
        finally:
            if held is not None:
                signal.signal(signal.SIGTERM, held)


def hold_sigterm() -> Any:
    """Ignore SIGTERM from here on (main thread only); returns the handler to put back."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: None)


def write_json(path: Path, data: dict) -> None:
    """Atomically (temp file + rename): a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "pyproject.toml").exists():  # an installed wheel: its version says which code ran
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("ssl_lab", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


# ---------------------------------------------------------------------------- Hydra resolvers


def find_run_to_resume(outputs: Path, overrides: list[str]) -> Path | None:
    """The newest run under `outputs` with a last.pt whose command-line overrides (resume aside)
    are these."""
    wanted = sorted(o for o in overrides if not o.startswith("resume="))
    runs = sorted(outputs.rglob("last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in runs:
        saved = ckpt.parent / ".hydra" / "overrides.yaml"  # of the run's first start
        if saved.exists():
            previous = yaml.safe_load(saved.read_text()) or []
            if sorted(o for o in previous if not o.startswith("resume=")) == wanted:
                return ckpt.parent
    return None


def run_dir(resume: object, default: str, *, _root_: DictConfig) -> str:
    """hydra.run.dir: a new dated dir, the dir resume=<path> names, or for resume=true the newest run
    with the same overrides."""
    if distributed.rank() > 0:  # only rank 0 makes the run dir; it tells the others (shared_run_dir)
        return str(Path(tempfile.gettempdir()) / f"ssl_lab-rank{distributed.rank()}-{os.getpid()}")
    if resume in (False, None) or str(resume).lower() == "false":
        return default
    if resume is not True and str(resume).lower() != "true":
        return str(Path(str(resume)).expanduser())
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    found = find_run_to_resume(Path(Path(default).parts[0]), overrides)
    return str(found) if found else default


def hydra_subdir(resume: object) -> str | None:
    """A resumed run keeps the .hydra/ files of its first start; each resume gets its own folder.
    Processes other than rank 0 write none (Hydra issue #2070: each rank its own output dir)."""
    if distributed.rank() > 0:
        return None
    if resume in (False, None) or str(resume).lower() == "false":
        return ".hydra"
    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def eval_dir(checkpoint: str) -> str:
    """python -m ssl_lab.eval works in the pretraining run's dir (that of checkpoint=<dir or .pt>);
    checked here, before Hydra makes the dir, so that a wrong path creates nothing."""
    return str(find_checkpoint(checkpoint).parent)

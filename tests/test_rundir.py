"""The run dir's bookkeeping: metrics trimmed on resume, finding the checkpoint to evaluate or resume."""

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import FORKSERVER

from ssl_lab.errors import UserError
from ssl_lab.loggers import read_metrics
from ssl_lab.rundir import console_log, drop_metrics_after, find_checkpoint, recorded, resume_checkpoint


def test_resume_moves_rows_after_the_checkpoint_aside(tmp_path: Path) -> None:
    rows = [{"step": s, "train/loss": 1.0} for s in (0, 8, 16, 17)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 18, "train/lo'  # cut by kill -9
    (tmp_path / "metrics.jsonl").write_text(text)
    drop_metrics_after(tmp_path, step=16)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 8, 16]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert len(discarded) == 2 and json.loads(discarded[0])["step"] == 17


def test_find_checkpoint_prefers_final_and_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no final.pt or last.pt"):
        find_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "final.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path) == tmp_path / "final.pt"
    assert resume_checkpoint(tmp_path, True) == tmp_path / "last.pt"
    with pytest.raises(UserError, match="nothing to resume"):
        resume_checkpoint(tmp_path / "other", True)


def test_console_log_keeps_what_the_terminal_shows(tmp_path: Path, capsys) -> None:
    """Lines as printed; a progress bar redrawn with carriage returns leaves only its last state; stderr
    too (the one-line errors); a crash's traceback; and a second start appends."""
    log = tmp_path / "train.log"
    with console_log(log):
        print("kNN top-1 at random init: 30.20%")
        sys.stderr.write("\repoch 1/4:  10%|#  |\repoch 1/4:  90%|## |\r              \r")
        sys.stderr.write("epoch 1/4  loss 4.92\n")
        print("error: epochs=-1 must not be negative", file=sys.stderr)
    with pytest.raises(ZeroDivisionError), console_log(log):
        print("second start")
        1 / 0  # noqa: B018
    lines = log.read_text().splitlines()
    assert lines[0].startswith("--- ") and lines[4].startswith("--- ")
    assert lines[1:4] == [
        "kNN top-1 at random init: 30.20%",
        "epoch 1/4  loss 4.92",
        "error: epochs=-1 must not be negative",
    ]
    assert lines[5] == "second start" and lines[-1] == "ZeroDivisionError: division by zero"
    assert "epoch 1/4:  90%" in capsys.readouterr().err  # the console itself is unchanged


def _fail_while_sigterm_arrives(run_dir: str) -> None:
    """A run that fails, and is sent SIGTERM while it wraps up (as torchrun does to the survivors of a
    process that died): exit 7 once the wrap-up is done."""

    class Logger:
        def finish(self, exit_code: int) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the signal is handled here, in the middle of the wrap-up

    with contextlib.suppress(RuntimeError), recorded(Path(run_dir), Logger(), lambda: 0):
        raise RuntimeError("boom")
    os._exit(7)


def test_a_sigterm_during_the_wrap_up_of_a_failure_waits_for_it(tmp_path: Path) -> None:
    """Without the hold, SIGTERM's default action ends the process in the middle of the wrap-up: no
    status written, no error said (rank 0's "lost contact" message went missing in CI)."""
    process = FORKSERVER.Process(target=_fail_while_sigterm_arrives, args=(str(tmp_path),))
    process.start()
    process.join(60)
    assert process.exitcode == 7
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "failed" and info["error"] == "boom"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's own handler is untouched

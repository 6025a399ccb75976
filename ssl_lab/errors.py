"""What the user sees when something goes wrong: one line on stderr, no traceback, and an exit status
that says whose problem it is. Every entry point (train, eval, bench, report) reports through here.

    UserError         bad input: a config value, a path, a data set              exit 2
    TrainingDiverged  the loss became NaN/inf                                      exit 1
    PeerFailed        another process of a multi-process run died                 exit 1
    Interrupted       a signal stopped the run after it saved last.pt             exit 128 + signal
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


class TrainingDiverged(Exception):
    """The loss became NaN or inf."""


class PeerFailed(Exception):
    """Another process of a multi-process run died, so this one cannot go on."""


class Interrupted(Exception):
    """The run was asked to stop by a signal, after saving last.pt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class JobFailed(Exception):
    """A sweep job's error, already reported on one line: Hydra marks the job failed and goes on with
    the others (a plain sys.exit would end the whole sweep)."""


REPORTED = {e.__name__: e for e in (UserError, TrainingDiverged, PeerFailed)}  # one line, no traceback
# what the entry points turn into one line (Hydra's and OmegaConf's errors are about the user's input)
USER_FACING = (*REPORTED.values(), HydraException, OmegaConfBaseException)


def exit_status(e: BaseException) -> int:
    """1 when the run itself failed (diverged, lost a process), 2 for bad input."""
    return 1 if isinstance(e, TrainingDiverged | PeerFailed) else 2


def user_message(e: BaseException) -> str:
    """One line for the user; a UserError raised while Hydra instantiates arrives wrapped."""
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, UserError):
        e = e.__cause__
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is missing: add {e.full_key}=<value> to the command line"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group = e.missing_cfg_file.rsplit("/", 1)[0]
        option = e.missing_cfg_file.rsplit("/", 1)[-1]
        return f"unknown {group} {option!r}; choose one of: {', '.join(sorted(e.options))}"
    if isinstance(e, tuple(REPORTED.values())):
        return str(e)
    message = one_line(str(e))
    if isinstance(e.__cause__, OmegaConfBaseException):  # Hydra's "Error merging override x=y": why
        message = f"{message}: {one_line(str(e.__cause__))}"
    return message


def one_line(message: str) -> str:
    skip = ("full_key", "object_type", "reference_type", "Set the environment variable", "Config search path")
    lines = [
        line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(skip)
    ]
    return " ".join(lines)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

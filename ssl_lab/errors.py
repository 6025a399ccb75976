"""What the user sees when something goes wrong: one line on stderr, no traceback, and an exit status
that says whose problem it is. Every entry point (train, eval, bench, report) reports through here.

    UserError         bad input: a config value, a path, a data set              exit 2
    TrainingDiverged  the loss became NaN/inf                                      exit 1
    PeerFailed        another process of a multi-process run died                 exit 1
    Interrupted       a signal stopped the run after it saved last.pt             exit 128 + signal
"""

from __future__ import annotations

import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import NoReturn

from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import (
    ConfigAttributeError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from ssl_lab import distributed


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
    """One line for the user: ours as raised (also when Hydra wraps one raised while it instantiates
    or resolves), Hydra's and OmegaConf's about the config said in the same words."""
    for cause in causes(e):
        if isinstance(cause, tuple(REPORTED.values())):
            return str(cause)
    for cause in causes(e):
        if isinstance(cause, MissingMandatoryValue | InterpolationToMissingValueError):
            # the missing key itself: an interpolation's error names it only in its message
            key = cause.full_key
            if isinstance(cause, InterpolationToMissingValueError) or not key:
                key = str(cause).splitlines()[0].rsplit(": ", 1)[-1]
            return f"{key} is missing: add {key}=<value> to the command line"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"unknown {group} {option!r}; choose one of: {', '.join(sorted(e.options))}"
    if isinstance(e.__cause__, ValidationError) and is_dataclass(e.__cause__.object_type):
        return invalid_value(e.__cause__)
    if isinstance(e.__cause__, ConfigAttributeError) and str(e).startswith("Could not override"):
        key = str(e).split("'")[1]
        return f"{key} is not a key of this config; `--cfg job` shows them ({one_line(str(e.__cause__))})"
    message = one_line(str(e))
    if isinstance(e.__cause__, OmegaConfBaseException):  # Hydra's summary, then OmegaConf's reason
        message = f"{message} ({one_line(str(e.__cause__))})"
    return message


def causes(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling (Hydra and OmegaConf wrap ours)."""
    found: list[BaseException] = []
    while e is not None and e not in found:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


def invalid_value(e: ValidationError) -> str:
    """`wrong_type`'s line for a value OmegaConf refused for a structured config's field
    (ssl_lab/config.py), with the field's example."""
    wanted = next((f for f in fields(e.object_type) if f.name == e.key), None)
    hint = typing.get_type_hints(e.object_type).get(str(e.key), typing.Any)
    example = wanted.metadata["range"].example if wanted and "range" in wanted.metadata else None
    return wrong_type(e.full_key, e.value, hint, example)


def wrong_type(key: str, value: object, hint: object, example: str | None = None) -> str:
    """`key=value should be <type> (got <type>); e.g. <example>`."""
    got = "a mapping or list" if isinstance(value, DictConfig | ListConfig) else type(value).__name__
    shown = repr(value) if isinstance(value, str) else value
    message = f"{key}={shown} should be {describe_type(hint)} (got {got})"
    return message + (f"; e.g. {example}" if example else "")


def describe_type(hint: object) -> str:
    """A type hint in the words of an error message: int, int or float, one of a, b, a list, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return describe_type(args[0])
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if hint is float:
        return "int or float"
    container = origin or hint
    if isinstance(container, type) and issubclass(container, Mapping):
        return "a mapping"
    if isinstance(container, type) and issubclass(container, Sequence) and container is not str:
        return "a list"
    return getattr(hint, "__name__", str(hint))


def one_line(message: str) -> str:
    skip = ("full_key", "object_type", "reference_type", "Set the environment variable", "Config search path")
    lines = [
        line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(skip)
    ]
    return " ".join(lines)


def run_reporting_errors(main: Callable[[], object]) -> None:
    """Run an entry point (a Hydra app's main, or a plain one) so that every error about the user's
    input or the run ends as one line on stderr and its exit status: Hydra's own (an unknown option
    or key, a value of the wrong type) reach here instead of Hydra's multi-line report."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report
    try:
        main()
    except JobFailed:  # a sweep with a failed job, reported when it failed
        sys.exit(1)
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except USER_FACING as e:
        if distributed.is_main():  # the same error on every process: say it once
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(e))


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

"""What a config value may be, checked where the value is defined, and the Hydra resolvers.

Types and ranges live next to the values, not in a table beside them:

- keys ssl_lab's runner reads itself (seed, batch_size, epochs, monitor.*, trainer.*, and the evaluation
  app's top level) are Hydra structured configs: the dataclasses below, registered in the ConfigStore
  as the schema of conf/train.yaml and conf/eval.yaml. OmegaConf checks their types as it composes
  (command-line overrides included); `check_config` checks their ranges and choices (`knob`).
- a group option that builds an object (`_target_`: a method, backbone, data set, augmentation,
  schedule, evaluation protocol, optimizer) is checked against the signature of what it builds: its
  type hints, with ranges as `Annotated[int, Range(min=1)]` (`PositiveInt`, ...). The optimizer's
  own keys (base_lr, ...) are typed by `ssl_lab.optim.OptimizerKeys` and the logger's by
  `ssl_lab.loggers.LoggerSettings`, which read them.

Every failure is a UserError of one line with the key, the value, what it should be and an example.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from hydra.core.config_store import ConfigStore
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ssl_lab import rundir
from ssl_lab.errors import UserError, fail, wrong_type

# An installed wheel carries the configs as ssl_lab/conf; a source checkout (editable install) has them
# at the top level, beside ssl_lab/.
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


@dataclass(frozen=True)
class Range:
    """Allowed values of a number (min/max inclusive, gt exclusive) or a string (choices)."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None
    example: str | None = None  # e.g. "batch_size=256", for error messages

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.choices is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            return None if text in self.choices else f"is not one of {', '.join(self.choices)}"
        if self.gt is not None and not value > self.gt:
            return "must be positive" if self.gt == 0 else f"must be greater than {self.gt:g}"
        if self.min is not None and value < self.min:
            return "must not be negative" if self.min == 0 else f"must be at least {self.min:g}"
        if self.max is not None and value > self.max:
            return f"must be at most {self.max:g}"
        return None


PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Probability = Annotated[float, Range(min=0, max=1)]
LabelFraction = Annotated[float, Range(gt=0, max=1)]


def knob(example: str | None = None, **limits: Any) -> Any:
    """A structured-config field whose value comes from the YAML (MISSING here), with its range."""
    return field(default=MISSING, metadata={"range": Range(example=example, **limits)})


# ---------------------------------------------------------------------------- structured configs


@dataclass
class MonitorConfig:
    every: int = knob("monitor.every=10", min=0)  # epochs; 0 = only at the end
    test_every: int = knob("monitor.test_every=1", min=0)  # epochs; 0 = never (lightly's test kNN)
    k: int = knob("monitor.k=200", min=1)
    temperature: float = knob("monitor.temperature=0.1", gt=0)
    batch_size: int = knob("monitor.batch_size=512", min=1)
    online_linear: bool = knob("monitor.online_linear=false")
    online_linear_lr: float = knob("monitor.online_linear_lr=0.1", gt=0)
    health: bool = knob("monitor.health=false")


@dataclass
class TrainerConfig:
    device: str = knob("trainer.device=cuda")
    precision: str = knob("trainer.precision=bf16", choices=("auto", "32", "bf16", "16"))
    channels_last: bool = knob("trainer.channels_last=true")
    compile: bool = knob("trainer.compile=true")
    compile_augment: bool = knob("trainer.compile_augment=true")
    overlap: bool = knob("trainer.overlap=false")
    grad_clip: float | None = knob("trainer.grad_clip=1.0", min=0)  # 0 or null: off
    num_workers: int = knob("trainer.num_workers=4", min=0)
    log_every: int = knob("trainer.log_every=10", min=1)
    checkpoint_every: int = knob("trainer.checkpoint_every=1", min=1)
    progress: bool = knob("trainer.progress=false")
    # ssl_lab | torch | false (true: ssl_lab): ssl_lab.build.sync_batchnorm
    sync_batchnorm: Any = knob("trainer.sync_batchnorm=torch", choices=("ssl_lab", "torch", "true", "false"))
    deterministic: bool = knob("trainer.deterministic=true")
    nproc_per_node: int = knob("trainer.nproc_per_node=2", min=1)
    dist_timeout_s: float = knob("trainer.dist_timeout_s=1800", gt=0)


@dataclass
class TrainConfig:
    """conf/train.yaml: the groups (checked against what they build) and the runner's own keys."""

    seed: int = knob("seed=0")
    batch_size: int = knob("batch_size=256", min=1)
    epochs: int = knob("epochs=100", min=0)
    resume: Any = False  # false | true | a run dir
    name: str = MISSING
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval_after: list[str] = field(default_factory=list)
    published: Any = None  # a recipe's published figure: {top1, protocol, source, budget} (ssl_lab.report)
    method: Any = MISSING
    backbone: Any = MISSING
    augment: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING


@dataclass
class EvalConfig:
    """conf/eval.yaml: python -m ssl_lab.eval."""

    checkpoint: str = MISSING
    seed: int = knob("seed=0")
    eval: Any = MISSING
    data: Any = None  # null: the pretraining run's
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = None  # null: the pretraining run's


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)


# ---------------------------------------------------------------------------- checks

# Nodes whose keys ssl_lab's own code reads besides (or instead of) their _target_: the function
# whose signature types them.
CONSUMERS = {"optimizer": "ssl_lab.optim.OptimizerKeys", "logger": "ssl_lab.loggers.LoggerSettings"}


def check_config(cfg: DictConfig) -> None:
    """Ranges and choices of the structured keys, and every option against what it builds."""
    check_structured(cfg, "")
    for key in ("data", "method", "backbone", "augment", "optimizer", "scheduler", "eval", "logger"):
        node = OmegaConf.select(cfg, key, default=None)
        if isinstance(node, DictConfig):
            check_against_signatures(node, key)
    for entry in OmegaConf.select(cfg, "eval_after", default=None) or []:
        protocol = str(entry).split()[0]
        if not (CONF_DIR / "eval" / f"{protocol}.yaml").exists():
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")))
            raise UserError(f"eval_after: unknown protocol {protocol!r}; choose from: {options}")


def check_structured(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        value = node[f.name]
        if isinstance(value, DictConfig):
            check_structured(value, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            problem = f.metadata["range"].problem(value)
            if problem:
                raise UserError(f"{prefix}{f.name}={value} {problem}")


def check_against_signatures(node: DictConfig, prefix: str) -> None:
    """Each key of `node` that a parameter of its _target_ (or of its CONSUMERS entry) names, against
    that parameter's type hint and range. Keys no signature names are left to the callable."""
    hints: dict[str, tuple[Any, inspect.Parameter]] = {}
    for path in (node.get("_target_"), CONSUMERS.get(prefix)):  # ssl_lab's own reading wins
        if path:
            hints.update(parameter_hints(get_object(str(path))))
    for key, (hint, parameter) in hints.items():
        if key not in node or key == "name":
            continue
        try:
            value = node[key]
        except InterpolationResolutionError:  # e.g. eval's logger.job_type=${method.name}: not ours yet
            continue
        check_value(f"{prefix}.{key}", value, hint, parameter.default)
    if prefix == "method":
        check_known_keys(node, prefix)


def check_known_keys(node: DictConfig, prefix: str) -> None:
    """A key the method does not take (e.g. a predictor's width on a method without one) is a one-line
    error naming the ones it does take, not a TypeError from deep inside Hydra."""
    target = get_object(str(node.get("_target_")))
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [k for k in node if not str(k).startswith("_") and k not in parameters]
    if unknown:
        known = ", ".join(k for k in parameters if k not in ("backbone", "name"))
        raise UserError(
            f"{prefix}.{unknown[0]} is not a setting of {prefix}={node.get('name')}; "
            f"its settings are: {known}"
        )


def parameter_hints(fn: Callable) -> dict[str, tuple[Any, inspect.Parameter]]:
    """name -> (type hint with its Annotated extras, parameter) of a function's or class's parameters."""
    target = fn.__init__ if inspect.isclass(fn) and not dataclasses.is_dataclass(fn) else fn
    try:
        hints = typing.get_type_hints(target, include_extras=True)
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError, NameError):  # a builtin, or hints that do not resolve: unchecked
        return {}
    return {name: (hints[name], p) for name, p in parameters.items() if name in hints}


def check_value(key: str, value: Any, hint: Any, default: Any = inspect.Parameter.empty) -> None:
    hint, ranges = unannotated(hint)
    if typing.get_origin(hint) is Literal and not matches(value, hint):
        raise UserError(f"{key}={value} is not one of {', '.join(map(str, typing.get_args(hint)))}")
    if not matches(value, hint):
        example = next((r.example for r in ranges if r.example), None)
        if example is None and default not in (inspect.Parameter.empty, None):
            example = f"{key}={default}"
        raise UserError(wrong_type(key, value, hint, example))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # the range of the arm it matched
        arm = next(a for a in typing.get_args(hint) if matches(value, a))
        ranges = ranges + unannotated(arm)[1]
    for r in ranges:
        problem = r.problem(value)
        if problem:
            raise UserError(f"{key}={value} {problem}")


def unannotated(hint: Any) -> tuple[Any, list[Range]]:
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, [e for e in extras if isinstance(e, Range)]
    return hint, []


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a type hint: int, float (an int too), bool, str, None, X | Y,
    Literal[...], lists/tuples/sequences, mappings; anything else passes."""
    hint, _ = unannotated(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return str(value) in {str(a) for a in args}
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if inspect.isclass(container) and issubclass(container, Mapping):
        return isinstance(value, DictConfig | dict)
    if inspect.isclass(container) and issubclass(container, Sequence) and container is not str:
        return isinstance(value, ListConfig | list | tuple)
    return True


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml with these overrides, outside a Hydra app (the bench, check_ddp) or
    inside a running one (eval_after in the runner)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def check_command_line(args: list[str]) -> None:
    """What can be said before Hydra starts: an option whose Hydra plugin is not installed."""
    check_plugins(args)


# options that need a Hydra plugin from an extra: (option prefix, plugin module, extra)
PLUGINS = (
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hparams_search=lr_temperature", "hydra_plugins.hydra_optuna_sweeper", "search"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "search"),
)


def check_plugins(args: list[str]) -> None:
    import importlib.util

    for arg in args:
        for prefix, module, extra in PLUGINS:
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                fail(f"{arg} needs the {module.split('.')[-1]} plugin: pip install -e '.[{extra}]'")


def _sweep_group() -> str | None:
    """In a multirun, the sweep dir's name (its date, or what hydra.sweep.dir says): one W&B group per
    sweep. Outside one, no group."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).name


def _wandb_name(default: str) -> str:
    """A run name that says the overrides: `simclr-synthetic optimizer=lars,optimizer.base_lr=0.6`,
    and in a multirun the job number first (`#3 optimizer=lars,...`)."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return default
    overrides = hydra_cfg.job.override_dirname
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"#{hydra_cfg.job.num} {overrides}".strip()
    return f"{default} {overrides}".strip()


def _hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ssl_lab_run_dir"):
        OmegaConf.register_new_resolver("ssl_lab_run_dir", rundir.run_dir)
        OmegaConf.register_new_resolver("ssl_lab_hydra_subdir", rundir.hydra_subdir, use_cache=True)
        OmegaConf.register_new_resolver("ssl_lab_sweep_group", _sweep_group)
        OmegaConf.register_new_resolver("ssl_lab_eval_dir", rundir.eval_dir)
        OmegaConf.register_new_resolver("ssl_lab_wandb_name", _wandb_name)


register_schemas()

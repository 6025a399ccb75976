"""Config checks that Hydra cannot do for plain YAML (types, group choices) and the run-dir resolver."""

from __future__ import annotations

from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ssl_lab import rundir
from ssl_lab.errors import UserError, fail, one_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# key -> (accepted types, example); checked after composition so typos in overrides fail early.
TYPED_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "seed": ((int,), "seed=0"),
    "batch_size": ((int,), "batch_size=256"),
    "epochs": ((int,), "epochs=100"),
    "monitor.every": ((int,), "monitor.every=10"),
    "monitor.k": ((int,), "monitor.k=200"),
    "monitor.temperature": ((int, float), "monitor.temperature=0.1"),
    "monitor.batch_size": ((int,), "monitor.batch_size=512"),
    "method.temperature": ((int, float), "method.temperature=0.5"),
    "optimizer.base_lr": ((int, float), "optimizer.base_lr=0.3"),
    "optimizer.weight_decay": ((int, float), "optimizer.weight_decay=1e-6"),
    "scheduler.warmup_epochs": ((int, float), "scheduler.warmup_epochs=10"),
    "data.image_size": ((int,), "data.image_size=32"),
    "trainer.num_workers": ((int,), "trainer.num_workers=4"),
    "trainer.log_every": ((int,), "trainer.log_every=10"),
    "trainer.checkpoint_every": ((int,), "trainer.checkpoint_every=1"),
    "trainer.grad_clip": ((int, float, type(None)), "trainer.grad_clip=1.0"),
    "trainer.channels_last": ((bool,), "trainer.channels_last=true"),
    "trainer.compile": ((bool,), "trainer.compile=true"),
    "trainer.nproc_per_node": ((int,), "trainer.nproc_per_node=2"),
    # python -m ssl_lab.eval
    "eval.k": ((int,), "eval.k=200"),
    "eval.temperature": ((int, float), "eval.temperature=0.1"),
    "eval.epochs": ((int,), "eval.epochs=100"),
    "eval.batch_size": ((int,), "eval.batch_size=256"),
    "eval.base_lr": ((int, float), "eval.base_lr=0.1"),
    "eval.weight_decay": ((int, float), "eval.weight_decay=0"),
    "eval.label_fraction": ((int, float), "eval.label_fraction=0.1"),
    "eval.augment": ((bool,), "eval.augment=true"),
}
POSITIVE = (
    "batch_size",
    "monitor.k",
    "monitor.batch_size",
    "data.image_size",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.nproc_per_node",
    "eval.k",
    "eval.epochs",
    "eval.batch_size",
)
_ABSENT = object()
CHOICES = {
    "trainer.precision": ("auto", "32", "bf16", "16"),
    "logger.mode": ("offline", "online", "disabled"),
}


def check_config(cfg: DictConfig) -> None:
    for key, (types, example) in TYPED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:  # not part of this composition (e.g. a method without a temperature)
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UserError(
                f"{key}={value!r} should be {wanted} (got {type(value).__name__}); e.g. {example}"
            )
    for key in POSITIVE:
        if OmegaConf.select(cfg, key, default=1) < 1:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1")
    if OmegaConf.select(cfg, "epochs", default=0) < 0:
        raise UserError(f"epochs={cfg.epochs} must not be negative")
    for entry in OmegaConf.select(cfg, "eval_after", default=None) or []:
        protocol = str(entry).split()[0]
        if not (CONF_DIR / "eval" / f"{protocol}.yaml").exists():
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")))
            raise UserError(f"eval_after: unknown protocol {protocol!r}; choose from: {options}")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in allowed:
            raise UserError(f"{key}={value} is not one of {', '.join(allowed)}")


def check_command_line(args: list[str], config_name: str = "train") -> DictConfig | None:
    """Compose the config once before Hydra runs, so that a typo in an override ends with one line
    and exit status 2 instead of Hydra's report; returns it. Sweeps (-m) and Hydra's own flags are
    left to Hydra (None)."""
    check_plugins(args)
    if any(a.startswith("-") for a in args):
        return None
    for override in args:  # `method=foo`: say which options exist
        key, sep, value = override.lstrip("+~").partition("=")
        group = CONF_DIR / key
        known = sep and "." not in key and group.is_dir()
        if known and value not in ("null", "") and not (group / f"{value}.yaml").exists():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            fail(f"unknown {key} {value!r}; choose one of: {', '.join(options)}")
    from hydra import compose, initialize_config_dir

    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=[a for a in args if not a.startswith("hydra.")])
    except Exception as e:  # Hydra's and OmegaConf's errors about the overrides themselves
        fail(one_line(str(e)))


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

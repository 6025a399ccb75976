"""Config checks that Hydra cannot do for plain YAML (types, group choices) and the run-dir resolver."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_lab import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# key -> (accepted types, example); checked after composition so typos in overrides fail early.
TYPED_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "seed": ((int,), "seed=0"),
    "batch_size": ((int,), "batch_size=256"),
    "epochs": ((int,), "epochs=100"),
    "eval.every": ((int,), "eval.every=10"),
    "eval.k": ((int,), "eval.k=200"),
    "eval.temperature": ((int, float), "eval.temperature=0.1"),
    "eval.batch_size": ((int,), "eval.batch_size=512"),
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
}
POSITIVE = (
    "batch_size",
    "eval.k",
    "eval.batch_size",
    "data.image_size",
    "trainer.log_every",
    "trainer.checkpoint_every",
)
_ABSENT = object()
CHOICES = {"trainer.precision": ("32", "bf16", "16"), "logger.mode": ("offline", "online", "disabled")}


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
    if cfg.epochs < 0:
        raise UserError(f"epochs={cfg.epochs} must not be negative")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in allowed:
            raise UserError(f"{key}={value} is not one of {', '.join(allowed)}")


def check_group_choices(overrides: list[str]) -> None:
    """`method=foo` with no conf/method/foo.yaml: say which options exist, in one line."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or "." in key or key.startswith("hydra") or "," in value or "(" in value:
            continue
        group = CONF_DIR / key
        if group.is_dir() and value not in ("null", "") and not (group / f"{value}.yaml").exists():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            raise SystemExit(f"error: unknown {key} {value!r}; choose one of: {', '.join(options)}")


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


def _run_dir(resume: object, default: str, *, _root_: DictConfig) -> str:
    if resume in (False, None) or str(resume).lower() == "false":
        return default
    if resume is not True and str(resume).lower() != "true":
        return str(Path(str(resume)).expanduser())
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    found = find_run_to_resume(Path(Path(default).parts[0]), overrides)
    return str(found) if found else default


def _hydra_subdir(resume: object) -> str:
    """A resumed run keeps the .hydra/ files of its first start; each resume gets its own folder."""
    if resume in (False, None) or str(resume).lower() == "false":
        return ".hydra"
    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ssl_lab_run_dir"):
        OmegaConf.register_new_resolver("ssl_lab_run_dir", _run_dir)
        OmegaConf.register_new_resolver("ssl_lab_hydra_subdir", _hydra_subdir, use_cache=True)

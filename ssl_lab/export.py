"""A pretraining run's backbone as files that load without ssl_lab.

    python -m ssl_lab.export checkpoint=outputs/simclr-synthetic/2026-11-25_10-00-00 [out=<new dir>]

writes into `out` (default: the checkpoint's dir/export):

    backbone.safetensors   the backbone's own state dict (no `backbone.` prefix, no heads)
    backbone.pt            the same, for torch.load(..., weights_only=True)
    backbone.json          how to build the module with torchvision or timm alone, its width
                           (num_features), the input size and normalisation it trained with, and where
                           it came from (method, epoch, step, checkpoint, ssl_lab version)

The files are written into a temporary sibling dir that is renamed to `out` at the end, so a failure
leaves no half-written export, and an existing `out` is never overwritten. `load_backbone(path)`
(also `ssl_lab.load_backbone`) reads an export or a pretraining run back as an nn.Module.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import hydra
import timm
import torch
import torch.nn as nn
import torchvision
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from ssl_lab.config import CONF_DIR, check_command_line, register_resolvers
from ssl_lab.errors import USER_FACING, UserError, exit_status, fail, run_reporting_errors, user_message
from ssl_lab.eval.run import load_checkpoint
from ssl_lab.models.backbones import timm_model, torchvision_resnet
from ssl_lab.rundir import find_checkpoint

FORMAT = "ssl_lab.backbone/1"
JSON, SAFETENSORS, TORCH = "backbone.json", "backbone.safetensors", "backbone.pt"
# torchvision ResNet parts that ssl_lab's backbone replaces, spelled as backbone.json says them
CIFAR_CONV = "torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)"
IDENTITY = "torch.nn.Identity()"
REPLACEMENTS = {
    CIFAR_CONV: lambda: nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False),
    IDENTITY: nn.Identity,
}


# ---------------------------------------------------------------------------- what is exported


def evaluated_prefix(config: Mapping[str, Any]) -> str:
    """Where the evaluated network's weights are in a run's model state: `backbone.` (the student's),
    or what the method declares (Method.evaluated, e.g. DINO's `teacher.backbone.`)."""
    method = get_object(config["method"]["_target_"])
    return getattr(method, "evaluated", "backbone") + "."


def backbone_weights(
    model_state: Mapping[str, torch.Tensor], source: Path, prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    """The evaluated network's own state dict out of a method's: its `prefix` and any DDP (`module.`)
    or torch.compile (`_orig_mod.`) wrapper stripped; contiguous CPU tensors that share no storage
    (safetensors refuses shared or strided ones; channels_last runs save strided weights)."""
    weights = {}
    for key, value in model_state.items():
        key = unwrapped(key)
        if key.startswith(prefix):
            name = unwrapped(key.removeprefix(prefix))
            weights[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if not weights:
        raise UserError(
            f"{source} holds no backbone weights (no {prefix}* keys in its model); "
            "pass an ssl_lab final.pt or last.pt"
        )
    return weights


def unwrapped(key: str) -> str:
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key.removeprefix("module.")
    return key


def model_spec(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """backbone.json's `model`: the torchvision or timm constructor, its arguments and, for torchvision,
    the parts ssl_lab's factory replaces (timm's img_size is settled by `exported_model`)."""
    target = str(backbone.get("_target_"))
    try:
        factory = get_object(target)
    except Exception:
        factory = None
    if factory is torchvision_resnet:
        name, stem = backbone.get("name", "resnet18"), bool(backbone.get("cifar_stem", False))
        replace = {"conv1": CIFAR_CONV, "maxpool": IDENTITY} if stem else {}
        return {
            "library": "torchvision", "constructor": f"torchvision.models.{name}", "name": name,
            "kwargs": {"weights": None}, "cifar_stem": stem, "replace": {**replace, "fc": IDENTITY},
        }  # fmt: skip
    if factory is timm_model:
        kwargs = {"pretrained": False, "num_classes": 0, **(backbone.get("kwargs") or {})}
        return {
            "library": "timm",
            "constructor": "timm.create_model",
            "name": backbone["name"],
            "kwargs": kwargs,
        }
    raise UserError(
        f"the run's backbone is built by {target}, and export knows how to describe only "
        f"{torchvision_resnet.__module__}.torchvision_resnet and .timm_model backbones; "
        "load it with ssl_lab.load_backbone(<run dir>) instead"
    )


def build(spec: Mapping[str, Any]) -> nn.Module:
    """The module backbone.json's `model` describes (random weights), with `num_features`."""
    if spec["library"] == "torchvision":
        model = getattr(torchvision.models, spec["name"])(**spec["kwargs"])
        num_features = model.fc.in_features
        for attr, replacement in spec["replace"].items():
            if replacement not in REPLACEMENTS:
                raise UserError(f"{JSON}: unknown replacement {attr} = {replacement}")
            setattr(model, attr, REPLACEMENTS[replacement]())
        model.num_features = num_features
        return model
    if spec["library"] == "timm":
        return timm.create_model(spec["name"], **spec["kwargs"])
    raise UserError(f"{JSON}: unknown library {spec['library']!r}; expected torchvision or timm")


def exported_model(backbone: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """`build(model_spec(...))`, with timm's img_size exactly when ssl_lab's timm_model passed it:
    to the models that take one (ViTs, Swin, ...), when the run named an image size."""
    spec = model_spec(backbone)
    image_size = backbone.get("image_size")
    if spec["library"] == "timm" and image_size is not None and "img_size" not in spec["kwargs"]:
        sized = {**spec, "kwargs": {**spec["kwargs"], "img_size": image_size}}
        try:
            return build(sized), sized
        except TypeError:  # the model takes any input size and has no img_size argument
            pass
    return build(spec), spec


def input_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The input the backbone trained on: the augmentation's output size and normalisation."""
    augment, data = config.get("augment") or {}, config.get("data") or {}
    return {
        "size": augment.get("size", data.get("image_size")),
        "channels": "RGB",
        "normalize": "x = (uint8 image / 255 - mean) / std, per channel",
        "mean": list(augment.get("mean", data.get("mean", []))),
        "std": list(augment.get("std", data.get("std", []))),
        "data": data.get("name"),
    }


def ssl_lab_version() -> str | None:
    try:
        return version("ssl_lab")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- export


def export(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Export the backbone of `checkpoint` (a run dir or .pt) into the new directory `out`."""
    path = find_checkpoint(checkpoint)
    out = Path(str(out)).expanduser() if out is not None else path.parent / "export"
    check_new(out)
    state = load_checkpoint(path)
    config = state["config"]
    weights = backbone_weights(state["model"], path, evaluated_prefix(config))
    model, spec = exported_model(config["backbone"])
    try:  # what backbone.json says must take the weights as they are
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RuntimeError(f"the backbone built as {JSON} says does not take {path}'s weights: {e}") from None
    info = {
        "format": FORMAT,
        "model": spec,
        "num_features": int(model.num_features),
        "input": input_spec(config),
        "method": (config.get("method") or {}).get("name"),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "checkpoint": str(path.resolve()),
        "ssl_lab_version": ssl_lab_version(),
        "time": datetime.now().isoformat(timespec="seconds"),
        "files": {"safetensors": SAFETENSORS, "torch": TORCH},
        "tensors": len(weights),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    write_export(out, weights, info)
    print(
        f"Exported the backbone of {path} ({info['method']}, epoch {info['epoch']}, step {info['step']}): "
        f"{spec['library']} {spec['name']}, {info['num_features']} features\n"
        f"  -> {out}/{{{SAFETENSORS}, {TORCH}, {JSON}}}\n"
        f"Load it:  ssl_lab.load_backbone({str(out)!r})\n"
        f"  or without ssl_lab: {plain_hint(spec, out)}",
        flush=True,
    )
    return out


def plain_hint(spec: Mapping[str, Any], out: Path) -> str:
    weights = f"safetensors.torch.load_file({str(out / SAFETENSORS)!r})"
    if spec["library"] == "timm":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
        return f"timm.create_model({spec['name']!r}, {kwargs}).load_state_dict({weights})"
    return (
        f"torchvision.models.{spec['name']}(weights=None) with {', '.join(spec['replace'])} replaced "
        f"as {JSON}'s model.replace says, then .load_state_dict({weights})"
    )


def check_new(out: Path) -> None:
    if out.exists():
        raise UserError(f"out={out} exists; pass out=<new dir> or remove it")


def write_export(out: Path, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Into a temporary sibling of `out`, renamed to `out` once every file is complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
        tmp.mkdir()
    except OSError as e:
        raise UserError(
            f"cannot write out={out} ({e.strerror}); pass out=<a new dir you can write>"
        ) from None
    try:
        torch.save(weights, tmp / TORCH)
        save_file(weights, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / SAFETENSORS).chmod((tmp / TORCH).stat().st_mode)  # safetensors makes it owner-only
        (tmp / JSON).write_text(json.dumps(info, indent=2) + "\n")
        check_new(out)  # made by someone else meanwhile: theirs stays
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- load


def load_backbone(path: str | Path) -> nn.Module:
    """A pretrained backbone in eval mode, with `num_features`, from an export (its dir, or its
    backbone.json, .safetensors or .pt) or from a pretraining run dir or .pt checkpoint."""
    path = Path(str(path)).expanduser()
    found = export_files(path)
    if found is not None:
        info_path, weights_path = found
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise UserError(f"{info_path} is not an ssl_lab backbone export (no format {FORMAT!r})")
        model = build(info["model"])
        model.load_state_dict(read_weights(weights_path))
        return model.eval()
    checkpoint = find_checkpoint(path)
    state = load_checkpoint(checkpoint)
    model = instantiate(state["config"]["backbone"])  # the run's own factory, as it trained
    model.load_state_dict(backbone_weights(state["model"], checkpoint, evaluated_prefix(state["config"])))
    return model.eval()


def export_files(path: Path) -> tuple[Path, Path] | None:
    """(backbone.json, the weights file to read) when `path` is an export or one of its files."""
    folder = path if path.is_dir() else path.parent
    if not (folder / JSON).is_file():
        if path.suffix in (".json", ".safetensors"):
            raise UserError(f"{path}: no {JSON} beside it; pass an export dir (python -m ssl_lab.export)")
        return None
    if path.is_dir() or path.suffix == ".json":
        return folder / JSON, folder / SAFETENSORS
    if not path.exists():
        raise UserError(f"{path} does not exist")
    return folder / JSON, path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- command line

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg.checkpoint, cfg.out)
    except USER_FACING as e:  # here, or Hydra adds its own "Error executing job" line
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(e))


def cli() -> None:
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        fail("ssl_lab.export takes one checkpoint and has no -m/--multirun; run it once per checkpoint")
    check_command_line(sys.argv[1:])
    run_reporting_errors(main)


if __name__ == "__main__":
    cli()

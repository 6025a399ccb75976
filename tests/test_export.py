"""Backbone export: a tiny run of each backbone family exported through the real CLI, loaded by plain
torchvision / timm with ssl_lab blocked (the README's own snippets), and by ssl_lab.load_backbone: the
same features as the checkpoint's backbone in ssl_lab. Its errors write nothing."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

import ssl_lab
from ssl_lab import checkpoint
from ssl_lab.build import build_model
from ssl_lab.errors import UserError
from ssl_lab.export import CIFAR_CONV, IDENTITY, backbone_weights, export
from ssl_lab.train import train

# two optimisation steps of 4 images, a kNN monitor on a handful
TINY = [
    "debug=smoke", "epochs=1", "batch_size=4", "data.limit_train=8", "data.limit_test=4", "monitor.k=2",
    "logger=none", "trainer.progress=false",
]  # fmt: skip
FAMILIES = {"timm": "backbone=resnet_tiny", "torchvision": "backbone=resnet18"}  # 32 px: the CIFAR stem
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # channels_last in training, row-major weights in the files


def files_of(folder: Path) -> dict[str, str]:
    """name -> hash of every file under `folder`: what "untouched" means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m ssl_lab.export ARGS`, as the README shows it."""
    return run_cli(*args, cwd=cwd, module="ssl_lab.export", timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Per family: (run dir, the export CLI's result), the export in <run dir>/export."""
    runs = {}
    for family, backbone in FAMILIES.items():
        run_dir = tmp_path_factory.mktemp(family) / "run"
        train(compose_cfg([*TINY, backbone]), run_dir=run_dir)
        cwd = tmp_path_factory.mktemp(f"{family}-cwd")
        runs[family] = run_dir, cwd, set(os.listdir(run_dir))
    result = {}
    for family, (run_dir, cwd, before) in runs.items():
        done = run_export(f"checkpoint={run_dir}", cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not list(cwd.iterdir()), "the export left something in the working directory"
        assert set(os.listdir(run_dir)) - before == {"export"}
        result[family] = run_dir, done
    return result


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def ssl_lab_features(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """The checkpoint's backbone as ssl_lab builds it (the method around it, as evaluation does)."""
    state = checkpoint.load(run_dir / "final.pt")
    parts = {k: state["config"][k] for k in ("method", "backbone", "trainer")}
    model = build_model(OmegaConf.create(parts), torch.device("cpu"))
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return model.eval()(x)


def doc_pages() -> list[str]:
    """The README and every page of the user's guide (docs/**/*.md)."""
    return [page.read_text() for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]]


def readme_snippet(library: str, export_dir: Path) -> str:
    """The guide's no-ssl_lab loading code for `library` (its one page "Exporting a backbone",
    docs/export.md), pointed at `export_dir`."""
    (section,) = [page for page in doc_pages() if page.startswith("# Exporting a backbone\n")]
    constructor = {"torchvision": "torchvision.models", "timm": "timm.create_model"}[library]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if constructor in b]
    code, found = re.subn(r'^export = ".*"$', f"export = {str(export_dir)!r}", block, flags=re.M)
    assert found == 1, block
    return code


PLAIN = """
import json, sys
sys.modules["ssl_lab"] = None  # any import of ssl_lab fails: the export must load without it
import torch

snippets, x = json.loads(open(sys.argv[1]).read()), torch.load(sys.argv[2], weights_only=True)
features = {}
for family, snippet in snippets.items():
    namespace = {}
    exec(snippet, namespace)  # each README snippet on its own, with its own imports
    model, export = namespace["model"], namespace["export"]
    with torch.no_grad():
        from_safetensors = model(x)
        model.load_state_dict(torch.load(f"{export}/backbone.pt", weights_only=True), strict=True)
        features[family] = {"safetensors": from_safetensors, "pt": model(x)}
assert not [m for m in sys.modules if m.startswith("ssl_lab.")]
torch.save(features, sys.argv[3])
"""


@pytest.fixture(scope="module")
def plain_features(exported, images, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Per family: the features of the README's no-ssl_lab snippet, with the weights of
    backbone.safetensors and of backbone.pt, in one subprocess where ssl_lab cannot be imported."""
    work = tmp_path_factory.mktemp("plain")
    snippets = {
        family: readme_snippet(family, run_dir / "export") for family, (run_dir, _) in exported.items()
    }
    (work / "snippets.json").write_text(json.dumps(snippets))
    torch.save(images, work / "x.pt")
    args = [work / "snippets.json", work / "x.pt", work / "features.pt"]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN, *map(str, args)], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    return torch.load(work / "features.pt", weights_only=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_library_loads_the_export_as_the_readme_shows(
    family: str, exported, plain_features, images
) -> None:
    run_dir, done = exported[family]
    out = run_dir / "export"
    assert {p.name for p in out.iterdir()} == {"backbone.safetensors", "backbone.pt", "backbone.json"}
    assert str(out) in done.stdout and "load_backbone" in done.stdout
    info = json.loads((out / "backbone.json").read_text())
    state = checkpoint.load(run_dir / "final.pt")
    assert info["model"]["library"] == family
    assert (info["method"], info["epoch"], info["step"]) == ("simclr", 1, 2)
    assert info["checkpoint"] == str((run_dir / "final.pt").resolve())
    assert info["ssl_lab_version"] == ssl_lab.__version__
    assert info["input"]["size"] == 32 and info["input"]["mean"] == state["config"]["augment"]["mean"]
    if family == "torchvision":
        assert info["model"]["cifar_stem"] is True and info["num_features"] == 512
        assert info["model"]["replace"] == {"conv1": CIFAR_CONV, "maxpool": IDENTITY, "fc": IDENTITY}
    else:
        assert info["model"]["kwargs"] == {"pretrained": False, "num_classes": 0}
        assert info["num_features"] == 96

    reference = ssl_lab_features(run_dir, images)
    assert reference.shape == (4, info["num_features"])
    for weights in ("safetensors", "pt"):
        assert torch.allclose(plain_features[family][weights], reference, **TOLERANCE), weights


@pytest.mark.parametrize("family", FAMILIES)
def test_load_backbone_from_the_export_or_the_run(family: str, exported, images) -> None:
    run_dir, _ = exported[family]
    reference = ssl_lab_features(run_dir, images)
    for path in (run_dir / "export", run_dir / "export" / "backbone.pt", run_dir):
        model = ssl_lab.load_backbone(path)
        assert not model.training and model.num_features == reference.shape[1]
        with torch.no_grad():
            assert torch.allclose(model(images), reference, **TOLERANCE), path


def test_errors_are_one_line_and_write_nothing(exported, tmp_path: Path) -> None:
    run_dir, _ = exported["timm"]
    before = files_of(run_dir)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "final.pt").write_bytes(b"not a checkpoint")
    cases = {
        "missing": ([f"checkpoint={tmp_path / 'nothing'}"], "does not exist"),
        "garbage": ([f"checkpoint={tmp_path / 'garbage'}"], "cannot read checkpoint"),
        "exists": ([f"checkpoint={run_dir}"], f"out={run_dir / 'export'} exists; pass out=<new dir> or remove it"),
    }  # fmt: skip
    for name, (args, _) in cases.items():
        done = run_export(*args, cwd=tmp_path)
        assert done.returncode != 0, name
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
        assert cases[name][1] in done.stderr, done.stderr
    assert files_of(run_dir) == before
    assert sorted(os.listdir(tmp_path)) == ["garbage"] and os.listdir(tmp_path / "garbage") == ["final.pt"]


def test_a_failed_write_leaves_nothing_and_out_is_never_overwritten(exported, tmp_path, monkeypatch) -> None:
    run_dir, _ = exported["timm"]
    import ssl_lab.export as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(run_dir, tmp_path / "new")
    assert not list(tmp_path.iterdir())  # neither `new` nor its temporary sibling

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="exists; pass out=<new dir> or remove it"):
        export(run_dir, tmp_path / "mine")
    assert files_of(tmp_path / "mine") == {"notes.txt": hashlib.sha256(b"keep").hexdigest()}


def test_timm_models_with_an_input_grid_get_the_run_img_size(tmp_path: Path) -> None:
    """A ViT trained at 32 px: backbone.json's kwargs carry img_size=32, as ssl_lab built it."""
    cfg = compose_cfg(["backbone=timm", "backbone.name=test_vit"])
    vit = instantiate(cfg.backbone).eval()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    state = {"model": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "config": resolved}
    torch.save({**state, "epoch": 0, "step": 0}, tmp_path / "final.pt")
    out = export(tmp_path / "final.pt", tmp_path / "out")
    info = json.loads((out / "backbone.json").read_text())
    assert info["model"]["kwargs"] == {"pretrained": False, "num_classes": 0, "img_size": 32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ssl_lab.load_backbone(out)(x), vit(x))


def test_backbone_weights_strip_wrappers_and_share_no_storage() -> None:
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    shared = torch.randn(4)
    state = {
        "module.backbone._orig_mod.conv.weight": weight,
        "module.backbone._orig_mod.bn.weight": shared,
        "module.backbone._orig_mod.bn.alias": shared,
        "module.projector.0.weight": torch.randn(2, 2),
    }
    weights = backbone_weights(state, Path("final.pt"))
    assert set(weights) == {"conv.weight", "bn.weight", "bn.alias"}
    assert all(t.is_contiguous() for t in weights.values())
    assert weights["bn.weight"].data_ptr() != weights["bn.alias"].data_ptr()
    assert torch.equal(weights["conv.weight"], weight)
    with pytest.raises(UserError, match="no backbone weights"):
        backbone_weights({"projector.weight": shared}, Path("final.pt"))


def test_a_dino_vit_exports_its_teacher_for_plain_timm(tmp_path: Path) -> None:
    """DINO evaluates its teacher: the export holds the teacher's ViT, which plain timm builds from
    backbone.json and loads from the safetensors file alone, giving the teacher's features (not the
    student's)."""
    import timm
    from safetensors.torch import load_file

    cfg = compose_cfg(["backbone=vit_tiny", "method=dino", "method.num_prototypes=64", "data.image_size=32"])
    model = build_model(cfg, torch.device("cpu")).eval()
    with torch.no_grad():  # the teacher apart from the student, as after training
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    torch.save(
        {"model": model.state_dict(), "config": resolved, "epoch": 0, "step": 0}, tmp_path / "final.pt"
    )
    out = export(tmp_path / "final.pt", tmp_path / "out")
    info = json.loads((out / "backbone.json").read_text())
    plain = timm.create_model(info["model"]["name"], **info["model"]["kwargs"]).eval()
    plain.load_state_dict(load_file(out / "backbone.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher, student = model.teacher.backbone(x), model.backbone(x)
        torch.testing.assert_close(plain(x), teacher)
        torch.testing.assert_close(ssl_lab.load_backbone(out)(x), teacher)
        assert not torch.allclose(plain(x), student, atol=1e-3)

"""ssl_lab installed the way users install it: a built wheel in a fresh virtual environment, run from an
empty directory (the configs and recipes travel inside the wheel), and the dependencies it declares."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core"}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}


def imported() -> set[str]:
    """Top-level modules that ssl_lab's own code imports (lazy imports in functions included)."""
    names = set()
    for path in (ROOT / "ssl_lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ssl_lab"}


def test_every_imported_package_is_declared() -> None:
    # optional extras, imported only where the option that needs them is chosen
    optional = {"hydra_plugins", "submitit", "optuna"}
    missing = {DISTRIBUTIONS.get(n, n).lower() for n in imported() - optional} - declared()
    assert not missing, f"imported but not in [project].dependencies: {sorted(missing)}"


def test_dependencies_are_ranges_and_constraints_pin_them() -> None:
    """Installing ssl_lab must not replace a user's own torch build: ranges in pyproject.toml, exact
    versions only in constraints.txt (what CI and the README's test command install)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "==" in d]
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert declared() - {"ssl_lab"} <= {name.lower() for name in pins}


def test_wheel_packages_every_module_and_config(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"ssl_lab/{p.relative_to(ROOT / 'ssl_lab')}" for p in (ROOT / "ssl_lab").rglob("*.py")}
    configs = {f"ssl_lab/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    recipes = {
        f"ssl_lab/conf/experiment/{p.relative_to(ROOT / 'experiments')}"
        for p in (ROOT / "experiments").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }  # protocol/ included: the rows' shared settings
    assert not (sources | configs | recipes) - names, sorted((sources | configs | recipes) - names)


def build_wheel(out: Path) -> Path:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("ssl_lab-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_runs_from_an_empty_directory(tmp_path: Path) -> None:
    """The wheel in a fresh venv that shares only the running interpreter's packages (its torch), never
    this checkout: `--cfg job`, a one-step pretraining with the console script, its evaluation and
    export. The running interpreter may itself be a venv (most users run the tests in one), whose
    packages `--system-site-packages` would not expose (it exposes the base interpreter's), so its
    site directories are put on the new venv's path, after the venv's own."""
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / "bin"
    (site_dir,) = venv.glob("lib/python*/site-packages")
    shared = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    # the machine's pip and setuptools too: a venv's own older setuptools would not satisfy torch
    (site_dir / "running_interpreter.pth").write_text("".join(f"{p}\n" for p in shared))
    install = subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--no-index", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=empty, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    where = run(
        str(bin_dir / "python"), "-c", "import ssl_lab.config as c; print(c.__file__); print(c.CONF_DIR)"
    )
    module, conf = where.stdout.split()
    assert module.startswith(str(venv)) and conf.startswith(str(venv)), where.stdout

    cfg = run(str(bin_dir / "python"), "-m", "ssl_lab.train", "--cfg", "job", "experiment=cifar10_simclr")
    assert "name: cifar10_simclr" in cfg.stdout and "timm.optim.Lars" in cfg.stdout

    mine = tmp_path / "my_conf" / "method"  # a user's own option beside the packaged ones
    mine.mkdir(parents=True)
    (mine / "simclr_cold.yaml").write_text("defaults: [simclr, _self_]\ntemperature: 0.07\n")
    searchpath = f"hydra.searchpath=[file://{mine.parent}]"
    cfg = run(str(bin_dir / "ssl-lab-train"), searchpath, "method=simclr_cold", "--cfg", "job")
    assert "temperature: 0.07" in cfg.stdout

    smoke = ["debug=smoke", "epochs=1", "batch_size=256", "logger=wandb", "logger.mode=offline"]
    run(str(bin_dir / "ssl-lab-train"), *smoke)
    (run_dir,) = (empty / "outputs").glob("simclr-synthetic/*")
    assert (run_dir / "final.pt").exists() and (run_dir / "train.log").exists()
    run(str(bin_dir / "ssl-lab-eval"), f"checkpoint={run_dir}", "eval=knn")
    run(str(bin_dir / "ssl-lab-export"), f"checkpoint={run_dir}")
    assert (run_dir / "export" / "backbone.safetensors").exists()
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written beside the run

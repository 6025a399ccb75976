"""The README's commands, and those of the user's guide (docs/), run the way a user runs them."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from ssl_lab.loggers import read_metrics

CIFAR = Path(os.environ.get("SSL_LAB_DATA", "~/.cache/ssl_lab")).expanduser()
# The guide's worked example writes its own method files before its commands can run:
# tests/test_docs.py runs that page as written, so its commands are left out here.
WORKED_EXAMPLE = ROOT / "docs" / "adding-a-method.md"


def doc_texts() -> str:
    """The README and every page of the user's guide (docs/**/*.md) but the worked example, as one text."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return "\n".join(page.read_text() for page in pages if page != WORKED_EXAMPLE)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    main, tests = readme_commands()
    assert main.endswith("python -m ssl_lab.train") and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


@pytest.mark.slow
def test_main_command_learns(workdir: Path) -> None:
    """The quickstart, exactly as the README runs it (install step aside): trained kNN must beat the
    same backbone at random init by at least 10 points."""
    main = readme_commands()[0].split("&&")[-1].split()
    assert main[:3] == ["python", "-m", "ssl_lab.train"]
    result = run_cli(*main[3:], cwd=workdir, timeout=900, fresh=True)  # a new interpreter, as a user's
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"kNN top-1: ([\d.]+)% trained vs ([\d.]+)% at random init", result.stdout)
    assert found, result.stdout[-2000:]
    trained, random_init = map(float, found.groups())
    assert trained >= random_init + 10, (trained, random_init)
    pixels = float(re.search(r"and ([\d.]+)% on raw pixels", result.stdout).group(1))
    assert trained > pixels, (trained, pixels)  # the representation beats raw pixels at the same kNN
    (run_dir,) = (workdir / "outputs").glob("simclr-synthetic/*")
    knn = [r["val/knn_top1"] for r in read_metrics(run_dir) if "val/knn_top1" in r]
    assert knn[0] == pytest.approx(random_init, abs=0.01) and knn[-1] == pytest.approx(trained, abs=0.01)
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"


@pytest.mark.slow
@pytest.mark.skipif(
    not (CIFAR / "cifar10-jpeg" / "test").is_dir() and not os.environ.get("CI"),
    reason="CIFAR-10 JPEG tree not extracted (see README: Real data)",
)
def test_pretrain_on_cifar10_subset(workdir: Path) -> None:
    """Real data: a short SimCLR run on 5,000 CIFAR-10 training images, kNN on 1,000 test images."""
    result = run_cli(
        "data=cifar10",
        f"data.root={CIFAR}",
        "data.limit_train=5000",
        "data.limit_test=1000",
        "epochs=2",
        "logger=none",
        "monitor.every=1",
        cwd=workdir,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (workdir / "outputs").glob("simclr-cifar10/*")
    rows = read_metrics(run_dir)
    knn = [r["val/knn_top1"] for r in rows if "val/knn_top1" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(knn) == 3 and all(10 < k < 100 for k in knn)  # above chance from the start
    assert losses[-1] < losses[0]
    assert knn[-1] > knn[0], knn  # learning on real images shows within two epochs


def test_ruff_clean() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def readme_module_commands(module: str = "ssl_lab.train") -> list[list[str]]:
    """The arguments of every `... -m <module> ARGS` line in the README's and the guide's bash blocks."""
    text = doc_texts()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            if f"-m {module}" in line:
                commands.append(shlex.split(line.split(f"-m {module}", 1)[1].split("&&")[0]))
    return commands


# The config dir of the guide's "Your own configs" (docs/config.md), as it describes it.
MY_CONF = Path(__file__).parent / "my_conf"


def heading_anchors(text: str) -> set[str]:
    """The anchors of a Markdown page's headings, as GitHub and MkDocs both make them for plain words."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_readme_resolves() -> None:
    """The front door's links to the guide (and any other file) point at files that exist, and an
    anchor at a heading of that file."""
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(relative) >= 10, links
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.is_file(), f"README.md links to {link}: no such file"
        if anchor:
            assert anchor in heading_anchors(target.read_text()), f"README.md links to {link}: no heading"


def test_every_readme_train_command_composes() -> None:
    """Each command the README and the guide show composes (a sweep's first value of each list stands
    for it), so renamed options and keys fail here rather than for a reader."""
    from conftest import compose_cfg

    from ssl_lab.config import check_config

    commands = readme_module_commands()
    assert len(commands) >= 15
    for args in commands:
        overrides = [
            (a.split(",")[0] if "(" not in a and "[" not in a else a).replace(
                "/path/to/my_conf", str(MY_CONF)
            )
            for a in args
            if a != "-m" and "<" not in a
        ]
        # A grid the config sweeps itself (-m compare=cifar10_short): its first job, as for the lists above
        # (the grid's options, e.g. experiment=, may be what makes the command's data.root=... a key).
        choices = [o for o in overrides if "." not in o.split("=")[0] or o.startswith("hydra.")]
        sweeper = compose_cfg(choices, hydra_config=True).hydra.sweeper
        grid = sweeper.get("params") if sweeper._target_.endswith(".BasicSweeper") else None
        first_job = [f"{key}={str(values).split(',')[0]}" for key, values in (grid or {}).items()]
        cfg = compose_cfg(first_job + overrides)
        check_config(cfg)
        if cfg.eval_after:
            from ssl_lab.eval.run import eval_after_configs

            eval_after_configs(cfg, Path("run/final.pt"))


def test_every_readme_eval_command_composes() -> None:
    from ssl_lab.config import check_config
    from ssl_lab.eval.run import compose_eval

    commands = readme_module_commands("ssl_lab.eval")
    assert len(commands) >= 4
    for args in commands:
        overrides = [a.split(",")[0] for a in args if a != "-m" and "<" not in a]
        check_config(compose_eval(overrides))


def test_every_readme_check_ddp_command_composes() -> None:
    from ssl_lab.check_ddp import check_config_for

    commands = readme_module_commands("ssl_lab.check_ddp")
    assert len(commands) >= 2
    for args in commands:
        overrides = [
            a for i, a in enumerate(args) if not a.startswith("--") and not args[i - 1].startswith("--")
        ]
        check_config_for([o for o in overrides if "<" not in o], nproc=2, steps=3)


def method_table(path: Path) -> dict[str, str]:
    """A page's method table (the run of table lines holding `simclr`'s row) by method name, its links
    reduced to their text: the README and the guide link to the same section by different paths."""
    text = path.read_text()
    table = re.search(r"(?:^\|.*\n)*^\| `simclr` \|.*\n(?:^\|.*\n)*", text, re.M).group(0)
    rows = re.findall(r"^\| `(\w+)` \| (.*)$", table, re.M)
    return {name: re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", row) for name, row in rows}


def test_readme_and_guide_method_tables_agree_and_list_every_method() -> None:
    """The README's method table repeats docs/methods.md's: one row per conf/method/*.yaml in each, the
    same text, so a figure updated on one page cannot go stale on the other."""
    methods = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    readme, guide = method_table(ROOT / "README.md"), method_table(ROOT / "docs" / "methods.md")
    assert sorted(readme) == methods and sorted(guide) == methods
    for name in methods:
        assert readme[name] == guide[name], f"{name}: README.md and docs/methods.md differ"

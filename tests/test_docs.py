"""The documentation site (docs/, mkdocs.yml) builds without a warning, and its worked example of adding a
method (docs/adding-a-method.md) works exactly as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

PAGE = ROOT / "docs" / "adding-a-method.md"


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link between pages, a page missing from the nav or a bad
    anchor fails it (the `docs` extra installs mkdocs-material)."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "adding-a-method" / "index.html").exists()


def titled_blocks(text: str) -> dict[str, str]:
    """The page's code blocks that name their file (```python title="my_methods/dcl.py"), by file."""
    pattern = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```$', re.S | re.M)
    return {name: body for name, body in pattern.findall(text)}


def commands(text: str) -> list[list[str]]:
    """The `python -m ...` lines of the page's bash block, as argument lists."""
    (block,) = re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python -m ")]


@pytest.mark.slow
def test_adding_a_method_works_as_the_page_shows(tmp_path: Path) -> None:
    """The page's files written as they are, then its commands run from that directory: the loss
    against lightly's, a smoke training that reports kNN, and check_ddp's PASS on 2 processes."""
    text = PAGE.read_text()
    files = titled_blocks(text)
    assert set(files) == {"my_methods/dcl.py", "my_conf/method/dcl.yaml", "test_dcl.py"}
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    (tmp_path / "my_methods" / "__init__.py").write_text("")
    env = {"PYTHONPATH": str(tmp_path)}  # the page's `export PYTHONPATH=$PWD`
    ran = []
    for argv in commands(text):
        assert argv[:2] == ["python", "-m"], argv
        module, args = argv[2], [a.replace("$PWD", str(tmp_path)) for a in argv[3:]]
        if module == "pytest":
            result = run_cli(
                *args, "-q", "-p", "no:cacheprovider", cwd=tmp_path, env=env, module=module, fresh=True
            )
        else:
            result = run_cli(*args, cwd=tmp_path, env=env, module=module)
        assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        ran.append((module, result.stdout))
    assert [m for m, _ in ran] == ["pytest", "ssl_lab.train", "ssl_lab.check_ddp"]
    assert "1 passed" in ran[0][1]
    assert "val kNN top-1:" in ran[1][1]
    assert "PASS: 2 processes train like 1" in ran[2][1]

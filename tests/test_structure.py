"""The package's shape, checked from its code so that it stays true: no import cycle, no function too long
to read in one screen, and a method that is one file plus one YAML."""

import ast
from pathlib import Path

import pytest
from conftest import CONF, ROOT

PACKAGE = ROOT / "ssl_lab"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` code runs as the program (module __main__), never on import."""
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def imported_modules(path: Path) -> set[str]:
    """The ssl_lab modules `path` imports anywhere (a lazy import inside a function counts too),
    leaving out its `if __name__ == "__main__":` block."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ssl_lab.eval import run` imports the module ssl_lab.eval.run
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), as a path that ends where it
    starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = walk(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start)
        if cycle:
            return cycle
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_main_blocks_and_lazy_imports_are_told_apart(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from ssl_lab.eval import run\n\n"
        "if __name__ == '__main__':\n    from ssl_lab.launch import cli\n"
    )
    assert imported_modules(source) == {"ssl_lab.eval.run"}


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{name} ({lines} lines)"
        for path in MODULES.values()
        for name, lines in functions(path)
        if lines > 100
    ]
    assert not long, long


def test_train_reads_in_one_screen() -> None:
    (lines,) = [n for name, n in functions(PACKAGE / "train.py") if name == "train"]
    assert lines <= 80, lines


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_a_method_is_one_file_and_one_yaml(method: str) -> None:
    """conf/method/<m>.yaml builds a class of ssl_lab/methods/<m>.py, and nothing outside
    ssl_lab/methods/ imports that file: the runner, the builder and the evaluation know no method."""
    import yaml

    target = yaml.safe_load((CONF / "method" / f"{method}.yaml").read_text())["_target_"]
    assert target.rsplit(".", 1)[0] == f"ssl_lab.methods.{method}", target
    users = [
        name
        for name, path in MODULES.items()
        if not name.startswith("ssl_lab.methods") and f"ssl_lab.methods.{method}" in imported_modules(path)
    ]
    assert not users, users

"""The code's shape, checked so it cannot drift: no function over `MAX_LINES` lines in the library, and
no test module importing another test module (what tests share lives in `tests/helpers/`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
LIBRARY = ("fcpass", "runtimes")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def long_functions(limit: int = MAX_LINES) -> list[str]:
    """Every function (methods and nested functions too) in the library longer than `limit` lines,
    as `path:line name (lines)`."""
    found = []
    for path in _modules(*LIBRARY):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    return found


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_library_function_is_over_the_limit() -> None:
    assert long_functions() == [], f"split these into named helpers (at most {MAX_LINES} lines each)"


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in _modules("tests"):
        for name in sorted(_imported(ast.parse(path.read_text(), str(path)))):
            if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == [], "move what they share into tests/helpers/"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    # the function-length check on a function one line over the limit, and one at it
    body = "\n".join(f"    x{j} = {j}" for j in range(MAX_LINES - 1))
    tree = ast.parse(f"def at():\n{body}\n\ndef over():\n{body}\n    y = 0\n")
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert lengths == {"at": MAX_LINES, "over": MAX_LINES + 1}
    assert "tests.test_x" in _imported(ast.parse("from tests import test_x\n"))
    assert "tests.test_x" in _imported(ast.parse("import tests.test_x as t\n"))

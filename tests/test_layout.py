"""The repository's seams: the product never imports the tools, a test module never imports
another test module (shared helpers live in conftest.py and the helper modules of tests/),
and every documented ``python -m`` command names a module that runs."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"
TOOLS = RELAY / "tools"


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in ``path``, relative ones resolved; for
    ``from m import n`` both ``m`` and ``m.n``, since ``n`` may be a submodule."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def is_tool(name: str) -> bool:
    return name == "relay.tools" or name.startswith("relay.tools.")


def test_the_product_never_imports_the_tools():
    tools = {path.stem for path in TOOLS.glob("*.py")}
    assert {"attack", "bench", "fakeupstream", "flagdocs", "loadtest"} <= tools
    product = [path for path in RELAY.rglob("*.py") if TOOLS not in path.parents]
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in product
        for line, name in imported_modules(path)
        if is_tool(name)
    ]
    assert not found, found
    # What the product loads when imported, lazy and dynamic imports included.
    modules = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in product
        if path.stem != "__main__"  # it would run the server
    ]
    probe = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in sys.modules if n.startswith('relay.tools')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_no_test_module_imports_from_another():
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in (ROOT / "tests").rglob("*.py")
        if "node_modules" not in path.parts
        for line, name in imported_modules(path)
        if re.fullmatch(r"tests\.test_\w+", name)
    ]
    assert not found, f"move shared helpers to conftest.py or a helper module: {found}"


def test_every_documented_python_m_command_runs_a_module():
    docs = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *RELAY.rglob("*.py")]
    # A name followed by ".<" is a pattern (``relay.tools.<name>``), not a command.
    command = re.compile(r"python -m\s+(relay(?:\.\w+)*)(?![.\w<])")
    names = {name for doc in docs for name in command.findall(doc.read_text(encoding="utf-8"))}
    assert {"relay", "relay.tools.loadtest", "relay.tools.bench"} <= names
    for name in sorted(names):
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"python -m {name}: no such module"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{name}.__main__"), f"python -m {name}: no __main__"


def test_the_readme_layout_names_every_module_and_none_is_too_long():
    layout = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    modules = [p for p in RELAY.rglob("*.py") if p.name != "__init__.py"]
    unnamed = [
        str(p.relative_to(ROOT))
        for p in modules
        if str(p.relative_to(ROOT)) not in layout and f" {p.name} " not in layout
    ]
    assert not unnamed, f"README's Layout does not name {unnamed}"
    # A module a newcomer can read at one sitting (issue 16); the tools are not the product.
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in modules
        if not p.is_relative_to(TOOLS)
        and (n := len(p.read_text(encoding="utf-8").splitlines())) > 450
    ]
    assert not long, long

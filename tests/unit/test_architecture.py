"""The import rules of the tree, read from the source (no import is executed).

* ``node/receive`` and ``node/send`` never import each other;
* only ``node/receive/reactor.py`` touches pynetdicom's private internals;
* only ``node/results`` imports highdicom;
* ``models`` imports neither ``node`` nor ``db`` (nor pynetdicom);
* ``db`` imports neither ``node`` nor ``models`` (nor pynetdicom, nor torch).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_OK = "node/receive/reactor.py"


@dataclass(frozen=True)
class Module:
    path: str  # relative, e.g. "node/receive/scp.py"
    imports: frozenset[str]  # dotted names imported (``from a.b import c`` gives a.b and a.b.c)
    private_uses: tuple[str, ...]  # pynetdicom internals touched


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _private_uses(tree: ast.AST, imports: set[str]) -> list[str]:
    """pynetdicom internals: its private modules or names, private attributes of its objects."""
    uses = [name for name in imports if name.startswith("pynetdicom")
            and any(part.startswith("_") and not part.startswith("__")
                    for part in name.split(".")[1:])]
    if not any(name.startswith("pynetdicom") for name in imports):
        return uses
    for node in ast.walk(tree):
        attr = None
        if isinstance(node, ast.Attribute) and not (
                isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", "os"}):
            attr = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in {"getattr", "setattr", "hasattr"} and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            attr = node.args[1].value
        if attr and attr.startswith("_") and not attr.startswith("__"):
            uses.append(f"line {getattr(node, 'lineno', '?')}: .{attr}")
    return uses


def read_tree(root: Path) -> Iterator[Module]:
    for top in ("node", "models", "db"):
        for path in sorted((root / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            imports = _imports(tree)
            yield Module(path.relative_to(root).as_posix(), frozenset(imports),
                         tuple(_private_uses(tree, imports)))


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(modules: list[Module]) -> list[str]:
    out: list[str] = []
    for m in modules:
        def bad(package: str, why: str, m: Module = m) -> None:
            out.extend(f"{m.path} imports {name}: {why}"
                       for name in sorted(m.imports) if _under(name, package))

        if m.path.startswith("node/receive/"):
            bad("node.send", "receive/ and send/ never import each other")
        if m.path.startswith("node/send/"):
            bad("node.receive", "receive/ and send/ never import each other")
        if not m.path.startswith("node/results/"):
            bad("highdicom", "only node/results/ imports highdicom")
        if m.path.startswith("models/"):
            for package in ("node", "db", "pynetdicom"):
                bad(package, "models/ works on arrays and plain metadata")
        if m.path.startswith("db/"):
            for package in ("node", "models", "pynetdicom", "torch"):
                bad(package, "db/ is storage only")
        if m.path != PRIVATE_OK:
            out.extend(f"{m.path} touches pynetdicom internals ({use}): only {PRIVATE_OK} may"
                       for use in m.private_uses)
    return out


def test_the_tree_keeps_its_import_rules() -> None:
    modules = list(read_tree(ROOT))
    assert len(modules) > 50
    assert violations(modules) == []


def test_node_is_grouped_by_role() -> None:
    packages = {p.name for p in (ROOT / "node").iterdir() if (p / "__init__.py").is_file()}
    assert {"receive", "store", "study", "infer", "results", "send", "admin", "cli",
            "runtime"} <= packages
    loose = {p.name for p in (ROOT / "node").glob("*.py")}
    assert loose <= {"__init__.py", "errors.py", "settings.py", "tls.py", "dimse.py"}, loose


@pytest.mark.parametrize(("path", "source", "rule"), [
    ("node/receive/x.py", "from node.send.sender import send_due", "never import each other"),
    ("node/send/x.py", "import node.receive.scp", "never import each other"),
    ("node/infer/x.py", "import highdicom", "only node/results/"),
    ("models/x.py", "from node.settings import Settings", "models/"),
    ("models/x.py", "from db import queue", "models/"),
    ("db/x.py", "from models.base import Model", "db/ is storage only"),
    ("db/x.py", "import torch", "db/ is storage only"),
    ("node/receive/scp.py", "from pynetdicom import _config", "pynetdicom internals"),
    ("node/receive/scp.py", "import pynetdicom\nx = y._servers", "pynetdicom internals"),
    ("node/send/x.py", "import pynetdicom\nx = getattr(a, '_server')", "pynetdicom internals"),
])
def test_each_rule_catches_a_violation(tmp_path: Path, path: str, source: str,
                                       rule: str) -> None:
    for top in ("node", "models", "db"):
        (tmp_path / top).mkdir()
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source + "\n")
    found = violations(list(read_tree(tmp_path)))
    assert found and all(rule in f for f in found), found


def test_reactor_may_touch_internals() -> None:
    reactor = next(m for m in read_tree(ROOT) if m.path == PRIVATE_OK)
    assert reactor.private_uses  # the rule above is not vacuous: it is the one module

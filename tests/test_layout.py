"""The layout's rules, checked on the source: no import circle, each room of worker/ imports
only from the rooms below it, the POS side (mipos_worker/) imports nothing of the worker's,
and importing a module builds no Celery app.

The circle check counts every import a module names: at the top, inside a function, under
``if TYPE_CHECKING:`` and relative ones. A circle that only a function-level or a type-checking
import closes still ties the modules together (neither can be read, moved or tested without the
other); the import system merely tolerates it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support.processes import ROOT

PACKAGES = ("mipos_worker", "config", "worker", "tasks", "cli")
# Kept free of import circles (issue 23, item 7: bench/chaos.py and bench/failover.py, and
# config/settings.py, retention.py and timing.py, no longer import each other).
CIRCLE_FREE_PACKAGES = (*PACKAGES, "sandbox", "support", "bench")
# Lowest first: a room may import from the rooms before it, never after.
ROOMS = ("order", "logs", "state", "mipos", "attempt", "wiring", "ops", "pages")


def modules(packages: tuple[str, ...] = PACKAGES, root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path], *, type_checking: bool = False, root: Path = ROOT) -> set[str]:
    """The project modules ``path`` imports, anywhere in it; those under ``if TYPE_CHECKING:``
    only with ``type_checking``."""
    tree = ast.parse(path.read_text())
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    targets = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            module = absolute_module(node, package)
            if module:
                names = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                         for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def absolute_module(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, a relative one (``from .x import y``) resolved
    against ``package`` (the importing module's package)."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*base, *([node.module] if node.module else [])])


def graph(packages: tuple[str, ...] = PACKAGES, *, type_checking: bool = False,
          root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(packages, root)
    return {name: imports(path, known, type_checking=type_checking, root=root) - {name}
            for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles (each as the path that closes it), found by a depth-first walk."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle() -> None:
    assert circles(graph(CIRCLE_FREE_PACKAGES, type_checking=True)) == []


def test_the_circle_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A circle closed only inside a function, under TYPE_CHECKING or by a relative import is found."""
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from probe import b\n")
    (package / "b.py").write_text("def later() -> None:\n    from probe import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (package / "d.py").write_text("from .a import x\n")
    found = circles(graph(("probe",), type_checking=True, root=tmp_path))
    assert found == [["probe.a", "probe.b", "probe.c", "probe.d", "probe.a"]]
    assert circles(graph(("probe",), root=tmp_path)) == []  # without the type-checking import


def test_each_room_imports_only_from_rooms_below_it() -> None:
    wrong = []
    for source, targets in graph().items():
        parts = source.split(".")
        if parts[0] != "worker" or len(parts) < 3:
            continue
        for target in targets:
            if target == "worker":
                wrong.append((source, target))  # the package above
            elif target.startswith("worker.") and target.count(".") >= 2:
                if ROOMS.index(target.split(".")[1]) > ROOMS.index(parts[1]):
                    wrong.append((source, target))
            elif target.startswith("worker."):
                wrong.append((source, target))  # a module beside the rooms
    assert wrong == []


def test_importing_any_module_builds_no_celery_app() -> None:
    apps = ("worker.wiring.celery_app", "mipos_worker.celery_app", "mipos_worker.order_tasks")
    names = sorted(n for n in modules()
                   if n.startswith(("worker", "config", "mipos_worker")) and n not in apps
                   and not n.startswith("mipos_worker.django_outbox"))  # needs Django's settings
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    importlib.import_module(name)\n"
              f"print(any(app in sys.modules for app in {apps!r}))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# What the POS side may import: itself, the standard library, its dependencies and extras.
POS_SIDE_IMPORTS = {"mipos_worker", "celery", "kombu", "redis", "sqlalchemy", "django", "prometheus_client"}


def test_the_pos_side_imports_nothing_of_the_workers() -> None:
    wrong = []
    for path in (ROOT / "mipos_worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            else:
                continue
            wrong += [(str(path.relative_to(ROOT)), top) for top in tops
                      if top not in POS_SIDE_IMPORTS and top not in sys.stdlib_module_names
                      and top != "__future__"]
    assert wrong == []

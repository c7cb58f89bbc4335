"""The documentation site: it builds strictly, its Python examples run, and its hand-written
settings reference agrees with the settings the code reads.

The other references (the command line, log events, metrics) are written from the
code at build time (docs/hooks/references.py); building them is checked here too.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import ROOT
from tests.conftest import Cluster

DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)?\s*$")
NOT_RUNNABLE = re.compile(r"<!-- not-runnable: (?P<reason>[^>]+?) -->")
# Where the code reads its settings: the loaders' reader calls (name first, then the default).
SETTINGS_SOURCES = ("config/settings.py", "mipos_worker/settings.py")
# Settings whose reader default is a placeholder: the real default is computed elsewhere.
COMPUTED_DEFAULTS = {"MIPOS_VISIBILITY_TIMEOUT_S": "derived from MIPOS_TIMEOUT_S (config/timing.py)"}
READER_METHODS = {"raw", "required", "parsed", "positive_float", "whole_number", "positive_int", "choice",
                  "boolean", "url", "secret", "secret_file"}


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link, a missing anchor, a page outside the nav or a reference that cannot be
    written fails the build (mkdocs.yml: strict, every validation at warn)."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (tmp_path / "reference" / "cli" / "index.html").read_text()
    assert "mipos-worker dead replay" in cli and "--older-than" in cli
    metrics = (tmp_path / "reference" / "metrics" / "index.html").read_text()
    assert "mipos_attempts_total" in metrics and "mipos_outbox_backlog" in metrics


# -- the examples ---------------------------------------------------------------------------------


def code_blocks() -> list[tuple[str, int, str, str | None]]:
    """(page, line, the code to run, why it is not runnable) of every Python block."""
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if match and match.group(1) in ("python", "pycon"):
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                body = lines[i + 1:end]
                if match.group(1) == "pycon":
                    body = [line[4:] for line in body if line.startswith((">>> ", "... "))]
                before = "\n".join(lines[max(0, i - 2):i])
                reason = NOT_RUNNABLE.search(before)
                found.append((str(page.relative_to(ROOT)), i + 1, "\n".join(body) + "\n",
                              reason.group("reason") if reason else None))
                i = end
            i += 1
    return found


BLOCKS = code_blocks()


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_example_is_run_or_says_why_not() -> None:
    assert len(BLOCKS) >= 8
    for page, line, _, reason in BLOCKS:
        assert reason is None or len(reason.strip()) > 10, f"{page}:{line}: say why it does not run"


@pytest.mark.parametrize(("page", "line", "code"), [(p, n, c) for p, n, c, why in BLOCKS if why is None],
                         ids=[f"{p}:{n}" for p, n, _, why in BLOCKS if why is None])
def test_the_example_runs(cluster: Cluster, tmp_path: Path, page: str, line: int, code: str) -> None:
    """Run as a newcomer would, in a directory of their own, against real Redis and a worker
    taking its orders to the sandbox."""
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "REDIS_URL": cluster.redis.url}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{page}:{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


# -- the settings reference ----------------------------------------------------------------------


def documented_settings() -> dict[str, str]:
    """Every name in the settings table, with its default column."""
    table = (DOCS / "reference" / "settings.md").read_text()
    found = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                found[name] = cells[-1]
    return found


def settings_read_by_the_code() -> dict[str, str | None]:
    """Every setting a loader reads, with its literal default (None: required or computed)."""
    read: dict[str, str | None] = {}
    for relative in SETTINGS_SOURCES:
        for node in ast.walk(ast.parse((ROOT / relative).read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in READER_METHODS and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.args[0].value)):
                default = node.args[1] if len(node.args) > 1 else None
                value = default.value if isinstance(default, ast.Constant) else None
                read.setdefault(node.args[0].value, value if isinstance(value, str) else None)
    return read


def test_every_setting_the_code_reads_is_documented_with_its_default() -> None:
    documented = documented_settings()
    read = settings_read_by_the_code()
    assert set(read) - set(documented) == set(), "settings read by the code but not documented"
    for name, default in read.items():
        if default and name not in COMPUTED_DEFAULTS:
            assert f"`{default}`" in documented[name], f"{name}: the code's default is {default!r}"


def test_every_documented_setting_is_read_somewhere() -> None:
    code = "\n".join(path.read_text() for package in ("mipos_worker", "config", "worker", "cli", "tasks",
                                                      "scripts")
                     for path in (ROOT / package).rglob("*.py"))
    code += (ROOT / "Procfile").read_text()
    stale = [name for name in documented_settings() if name not in code]
    assert stale == [], "documented settings the code no longer reads"

"""The supported Pythons are tested (issue 23, item 8): nox's sessions cover every version
pyproject.toml allows up to 3.13, `make test-all` runs the whole suite on each, and CI runs the
fast subset on the versions besides the default one."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tomllib

from support.processes import ROOT


def noxfile_constant(name: str) -> list[str]:
    for node in ast.parse((ROOT / "noxfile.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"noxfile.py has no {name}")


def make_dry_run(target: str) -> str:
    result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "MAKEFLAGS": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_nox_covers_every_supported_python() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    assert noxfile_constant("PYTHONS") == ["3.11", "3.12", "3.13"]


def test_make_test_all_runs_the_whole_suite_on_each() -> None:
    assert re.search(r"-m nox --session tests( |$)", make_dry_run("test-all"), re.M)


def test_ci_runs_the_fast_subset_on_the_other_pythons() -> None:
    assert re.search(r"-m nox --session fast-3\.12 fast-3\.13( |$)", make_dry_run("test-fast"), re.M)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index("make test") < ci.index("make test-fast")


def test_the_fast_subset_names_test_files_that_exist() -> None:
    fast = noxfile_constant("FAST_TESTS")
    assert len(fast) >= 10
    assert [path for path in fast if not (ROOT / path).is_file()] == []

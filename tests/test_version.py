"""``mipos-worker --version``: the checkout's command and the POS side's say the version
pyproject.toml gives the distribution (issue 23, item 9)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mipos_worker import command
from support.processes import ROOT

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_checkout_command_says_its_version() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "mipos-worker"), "--version"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mipos-worker {VERSION}"


def test_the_pos_sides_command_says_its_version(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(command, "_checkout_cli", lambda: None)  # as installed from the wheel
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mipos-worker {VERSION}"


def test_the_version_is_the_installed_distributions() -> None:
    assert command.version() == importlib.metadata.version("mipos-worker") == VERSION


def test_without_the_distribution_a_checkout_reads_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert command.version() == VERSION
    monkeypatch.setattr(command, "CHECKOUT_PYPROJECT", ROOT / "no-such-pyproject.toml")
    assert command.version() == "unknown"


def test_the_changelog_has_a_section_for_this_version() -> None:
    """Keep a Changelog's form: an Unreleased section, then this version's, each with a date or 'unreleased'."""
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == "## [Unreleased]"
    assert any(line.startswith(f"## [{VERSION}] - ") for line in headings)

"""MkDocs hook: the reference pages written from the code's own definitions, at build time.

A page holds a marker, ``<!-- reference: NAME -->``; the build replaces it with
what the code defines today, so the docs cannot drift from it:

- ``cli``: every ``mipos-worker`` command, from the argparse parsers (cli/main.py);
- ``log-events``: every event a logger writes, its level and its fields, from the
  calls in the source (``logger.info("event", field=...)``, ``log(logger, ...)``);
- ``metrics``: every Prometheus series, its type, help and labels, from the
  counters' table (worker/state/counters.py) and the collectors that yield them.

The settings reference is written by hand (a meaning needs words) and checked
against the code by tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- reference: ([a-z-]+) -->")
SOURCES = ("mipos_worker", "worker", "tasks", "cli", "config")
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda m: RENDERERS[m.group(1)](), markdown)


# -- the command line -----------------------------------------------------------------------


def cli_reference() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: the same width every build
    from cli.main import build_parser

    parts = []
    for path, parser in commands(build_parser(), ["mipos-worker"]):
        level = "#" * min(len(path) + 1, 4)
        parts.append(f"{level} `{' '.join(path)}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def commands(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, parser
    for action in parser._actions:  # argparse keeps its subcommands here, and only here
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, [*path, name])


# -- log events ---------------------------------------------------------------------------------


def log_events() -> dict[str, dict[str, Any]]:
    """Every event name the source logs: its levels, its fields, the modules writing it."""
    found: dict[str, dict[str, Any]] = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for event, level, fields in _logged(ast.parse(path.read_text())):
                entry = found.setdefault(event, {"levels": set(), "fields": set(), "modules": set()})
                entry["levels"].add(level)
                entry["fields"].update(fields)
                entry["modules"].add(module)
    return found


def _logged(tree: ast.AST) -> Iterator[tuple[str, str, list[str]]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func, args = node.func, node.args
        fields = [k.arg for k in node.keywords if k.arg and k.arg not in ("exc_info", "extra", "stack_info")]
        if (isinstance(func, ast.Attribute) and func.attr in LEVELS and isinstance(func.value, ast.Name)
                and func.value.id == "logger" and _event_name(args[0])):
            yield _event_name(args[0]), "error" if func.attr == "exception" else func.attr, fields
        elif (isinstance(func, ast.Name) and func.id == "log" and len(args) >= 3
              and isinstance(args[1], ast.Attribute) and _event_name(args[2])):
            yield _event_name(args[2]), args[1].attr.lower(), fields


def _event_name(node: ast.AST) -> str:
    """A literal ``snake_case`` event name (a sentence passed to a logger is no event)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z][a-z0-9_]+",
                                                                                      node.value):
        return node.value
    return ""


def log_events_reference() -> str:
    rows = ["| event | level | fields beside `event`, `level`, `timestamp`, `logger` | written by |",
            "|---|---|---|---|"]
    for event, entry in sorted(log_events().items()):
        fields = ", ".join(f"`{f}`" for f in sorted(entry["fields"])) or "-"
        modules = ", ".join(f"`{m}`" for m in sorted(entry["modules"]))
        rows.append(f"| `{event}` | {', '.join(sorted(entry['levels']))} | {fields} | {modules} |")
    return "\n".join(rows) + "\n"


# -- metrics -----------------------------------------------------------------------------------


def metrics() -> dict[str, dict[str, Any]]:
    """Every series the code exports: from the counters' table and the families collectors yield."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from worker.state.counters import COUNTERS, LATENCY, LATENCY_HELP

    found: dict[str, dict[str, Any]] = {
        name: {"type": "counter", "help": help_text, "labels": labels, "where": "worker/state/counters.py"}
        for name, (help_text, labels) in COUNTERS.items()}
    found[LATENCY] = {"type": "histogram", "help": LATENCY_HELP, "labels": ("action",),
                      "where": "worker/state/counters.py"}
    for relative in ("worker/ops/metrics.py", "mipos_worker/sql_outbox/metrics.py"):
        for name, kind, help_text, labels in _families(ast.parse((ROOT / relative).read_text())):
            found.setdefault(name, {"type": kind, "help": help_text, "labels": labels, "where": relative})
    return found


def _families(tree: ast.AST) -> Iterator[tuple[str, str, str, tuple[str, ...]]]:
    """``XMetricFamily("name", "help", labels=(...))`` calls, and a gauges table's
    ``"name": ("help", value)`` entries."""
    kinds = {"GaugeMetricFamily": "gauge", "CounterMetricFamily": "counter"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in kinds:
            name, help_text = (_text(a) for a in node.args[:2]) if len(node.args) >= 2 else ("", "")
            labels = next((tuple(_text(e) for e in k.value.elts) for k in node.keywords
                           if k.arg == "labels" and isinstance(k.value, (ast.Tuple, ast.List))), ())
            if name.startswith("mipos_"):
                kind = kinds[node.func.id]
                yield (name + "_total" if kind == "counter" else name), kind, help_text, labels
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (key is not None and _text(key).startswith("mipos_") and isinstance(value, ast.Tuple)
                        and value.elts and _text(value.elts[0])):
                    yield _text(key), "gauge", _text(value.elts[0]), ()


def _text(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return ""


def metrics_reference() -> str:
    rows = ["| series | type | labels | meaning | defined in |", "|---|---|---|---|---|"]
    for name, entry in sorted(metrics().items()):
        labels = ", ".join(f"`{label}`" for label in entry["labels"]) or "-"
        rows.append(f"| `{name}` | {entry['type']} | {labels} | {entry['help']} | `{entry['where']}` |")
    return "\n".join(rows) + "\n"


RENDERERS = {"cli": cli_reference, "log-events": log_events_reference, "metrics": metrics_reference}

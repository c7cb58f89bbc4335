"""A benchmark row: our figure beside a peer's, the ratio's median and spread, and its goal."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.measure import Spread


@dataclass(frozen=True)
class Goal:
    """``ratio <= 1.2``, or ``ours <= 300``: what the issue asks of a row."""

    on: str  # "ratio" or "ours"
    op: str  # "<=", ">=" or "=="
    value: float

    def met(self, figure: float | None) -> bool | None:
        if figure is None:
            return None
        if self.op == "<=":
            return figure <= self.value
        if self.op == ">=":
            return figure >= self.value
        return figure == self.value

    def __str__(self) -> str:
        return f"{'ratio' if self.on == 'ratio' else 'ours'} {self.op.replace('<=', '≤').replace('>=', '≥')} {self.value:g}"


@dataclass
class Row:
    key: str
    label: str
    unit: str
    ours: list[float]
    peer: list[float]  # one per run of ours, paired in order (empty: no peer)
    peer_name: str = ""
    goal: Goal | None = None
    idle: list[float] = field(default_factory=list)  # the machine's idle CPU share, each run
    note: str = ""

    @property
    def ours_median(self) -> float | None:
        return round(statistics.median(self.ours), 3) if self.ours else None

    @property
    def peer_median(self) -> float | None:
        return round(statistics.median(self.peer), 3) if self.peer else None

    @property
    def ratios(self) -> Spread | None:
        pairs = [o / p for o, p in zip(self.ours, self.peer) if p]
        return Spread.of(pairs)

    @property
    def ratio(self) -> float | None:
        spread = self.ratios
        return round(spread.median, 3) if spread else None

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.goal.met(self.ratio if self.goal.on == "ratio" else self.ours_median)

    def as_json(self) -> dict[str, Any]:
        spread = self.ratios
        return {
            "label": self.label, "unit": self.unit, "ours": self.ours_median,
            "baseline": self.peer_median, "baseline_is": self.peer_name, "ratio": self.ratio,
            "ratio_min": round(spread.low, 3) if spread else None,
            "ratio_max": round(spread.high, 3) if spread else None,
            "runs": len(self.ours), "ours_runs": self.ours, "baseline_runs": self.peer,
            "goal": str(self.goal) if self.goal else None, "met": self.met,
            "idle_cpu_min": min(self.idle) if self.idle else None,
            "idle_cpu_median": statistics.median(self.idle) if self.idle else None, "note": self.note,
        }


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    shown = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{shown} {unit}".strip()


def table(rows: list[Row]) -> str:
    lines = ["| measure | ours | baseline | ratio (median [min–max]) | goal | machine idle, min (median) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        spread = row.ratios
        ratio = "–" if spread is None else spread.show()
        peer = "–" if row.peer_median is None else f"{_figure(row.peer_median, row.unit)} ({row.peer_name})"
        goal = "–" if row.goal is None else f"{row.goal}: {'met' if row.met else 'MISSED'}"
        idle = "–" if not row.idle else \
            f"{min(row.idle) * 100:.0f} % ({statistics.median(row.idle) * 100:.0f} %)"
        label = row.label + (f" ({row.note})" if row.note else "")
        lines.append(f"| {label} | {_figure(row.ours_median, row.unit)} | {peer} | {ratio} | {goal} | {idle} |")
    return "\n".join(lines)

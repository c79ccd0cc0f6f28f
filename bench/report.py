"""Results as rows: statistics of each (scenario, peer, metric), targets checked against a baseline, a text table
and a JSON document.

Every benchmark of coldbrew.bench produces a `Result`; this module knows nothing of containers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "coldbrew.bench/1"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return min(max(value, ordered[low]), ordered[high])  # rounding must not step outside the two ranks


@dataclass
class Row:
    """All samples of one metric of one peer in one scenario, in `unit`, in the order they were taken."""

    scenario: str
    peer: str
    metric: str
    label: str
    unit: str = "ms"
    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 90)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "peer": self.peer, "metric": self.metric, "label": self.label,
                "unit": self.unit, "n": len(self.samples), "p50": self.p50, "p90": self.p90, "mean": self.mean,
                "min": min(self.samples), "max": max(self.samples), "samples": list(self.samples)}


@dataclass(frozen=True)
class Target:
    """`peer`'s `metric` p50 must be at most `max_ratio` times `baseline_peer`'s `baseline_metric` p50."""

    scenario: str
    peer: str
    metric: str
    baseline_peer: str
    baseline_metric: str
    max_ratio: float
    text: str  # the target as the mission states it

    def ratio(self, result: "Result") -> float:
        return result.row(self.scenario, self.peer, self.metric).p50 / \
            result.row(self.scenario, self.baseline_peer, self.baseline_metric).p50

    def met(self, result: "Result") -> bool:
        return self.ratio(result) <= self.max_ratio


@dataclass
class Result:
    """One benchmark run: its rows, the targets they are judged by, and what it found left behind."""

    bench: str
    runs: int
    warmup: int
    baseline: tuple[str, str]  # (peer, metric) every row's ratio is taken against, in the same scenario
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what may have skewed the numbers
    settings: dict[str, Any] = field(default_factory=dict)  # how the samples were taken (order, seed, gaps)

    def row(self, scenario: str, peer: str, metric: str) -> Row:
        for row in self.rows:
            if (row.scenario, row.peer, row.metric) == (scenario, peer, metric):
                return row
        raise KeyError(f"no row for {scenario}/{peer}/{metric}")

    def ratios(self, row: Row) -> tuple[float, float] | None:
        """(p50, p90) of `row` over the baseline's, or None where the scenario has no baseline row in its unit."""
        try:
            base = self.row(row.scenario, *self.baseline)
        except KeyError:
            return None
        if base.unit != row.unit:
            return None
        return row.p50 / base.p50, row.p90 / base.p90

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            item = row.to_dict()
            ratios = self.ratios(row)
            item["ratio_p50"], item["ratio_p90"] = ratios if ratios else (None, None)
            rows.append(item)
        targets = [{"scenario": t.scenario, "peer": t.peer, "metric": t.metric, "baseline_peer": t.baseline_peer,
                    "baseline_metric": t.baseline_metric, "max_ratio": t.max_ratio, "text": t.text,
                    "ratio": t.ratio(self), "met": t.met(self)} for t in self.targets]
        return {"schema": SCHEMA, "bench": self.bench, "runs": self.runs, "warmup": self.warmup,
                "settings": self.settings,
                "baseline": {"peer": self.baseline[0], "metric": self.baseline[1]}, "host": self.host,
                "scenarios": self.scenarios, "peers": self.peers, "rows": rows, "targets": targets,
                "leftovers": self.leftovers, "warnings": self.warnings}

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def render_table(result: Result) -> str:
    """The rows as one aligned text table, a ratio column against the baseline, and the targets marked."""
    base_label = {r.scenario: r.label for r in result.rows if (r.peer, r.metric) == result.baseline}
    targets = {(t.scenario, t.peer, t.metric): t for t in result.targets}
    header = ["scenario", "what", "n", "p50", "p90", "mean", "p50 ratio", "p90 ratio", "target"]
    lines = [header]
    for row in result.rows:
        ratios = result.ratios(row)
        target = targets.get((row.scenario, row.peer, row.metric))
        mark = ""
        if target is not None:
            mark = f"<= {target.max_ratio:.2f}x {'met' if target.met(result) else 'MISSED'}"
        lines.append([row.scenario, row.label, str(len(row.samples)), _num(row.p50, row.unit),
                      _num(row.p90, row.unit), _num(row.mean, row.unit),
                      f"{ratios[0]:.2f}x" if ratios else "-", f"{ratios[1]:.2f}x" if ratios else "-", mark])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7}
    out = []
    for i, line in enumerate(lines):
        cells = [c.rjust(w) if j in numeric else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    scenarios = sorted(base_label)
    if scenarios:
        out.append("")
        out.append("ratios are against " + "; ".join(f"{base_label[s]} ({s})" for s in scenarios) + ", same run")
    if result.settings:
        out.append("settings: " + ", ".join(f"{k} {v}" for k, v in result.settings.items()))
    for t in result.targets:
        row = result.row(t.scenario, t.peer, t.metric)
        base = result.row(t.scenario, t.baseline_peer, t.baseline_metric)
        out.append(f"target ({t.scenario}): {t.text}: {row.label} p50 = {t.ratio(result):.2f}x {base.label} p50 "
                   f"(<= {t.max_ratio:.2f}x) {'met' if t.met(result) else 'MISSED'}")
    for warning in result.warnings:
        out.append(f"warning: {warning}")
    if result.leftovers:
        out.append("LEFT BEHIND: " + ", ".join(result.leftovers))
    return "\n".join(out) + "\n"


def _num(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if unit == "ms" else f"{value:.4g} {unit}"

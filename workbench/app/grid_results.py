"""What the Compare page shows of a finished grid, read from the files the grid wrote
(workbench/kinds/grid.py: grid pages, scores.csv, scores.json, report.html): the verdict
sentences, score tables with hashes shortened, mean scores per axis value for a chart, and the
A/B statistics as a table a person reads (not the JSON tree).

Plain functions over plain data, so tests check them without a browser; the page draws them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.grid import report, stats
from workbench.grid.cells import LETTERS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # pictures a result view shows (also views/jobs.py)


@dataclass
class GridResults:
    """The files of one grid job, read."""

    images: list[Path] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)  # scores.csv
    data: dict[str, Any] = field(default_factory=dict)  # scores.json
    report: Path | None = None

    @property
    def metrics(self) -> list[str]:
        known = [m for m in report.METRIC_TITLES if self.rows and m in self.rows[0]]
        return known

    @property
    def statistics(self) -> list[dict]:
        entries = self.data.get("statistics")
        return entries if isinstance(entries, list) else []

    def verdict(self) -> list[str]:
        """The report's opening sentences (written into scores.json; computed for older files)."""
        sentences = self.data.get("verdict")
        if isinstance(sentences, list):
            return [str(s) for s in sentences]
        try:
            return report.verdict(self.statistics)
        except (KeyError, TypeError):
            return []


def read_results(paths: list[str | Path]) -> GridResults:
    """The grid's files among a job's results (missing files are skipped)."""
    out = GridResults()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.images.append(path)
        elif path.name == "scores.csv":
            with open(path, newline="", encoding="utf-8") as f:
                out.rows = list(csv.DictReader(f))
        elif path.name == "scores.json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                data = {}
            out.data = data if isinstance(data, dict) else {}
        elif path.suffix == ".html":
            out.report = path
    return out


def short_rows(rows: list[dict[str, str]], metrics: list[str] = ()) -> list[dict[str, str]]:
    """The score table as people read it: axis values, seed and the scores first, every 64-digit
    hash cut to 10 digits (report.short_hashes), so the scores are not pushed off screen."""
    first = [f"{letter}_value" for letter in LETTERS] + ["seed", *metrics]
    out = []
    for r in rows:
        order = [k for k in first if k in r] + [k for k in r if k not in first]
        out.append({k: report.short_hashes(r[k]) if isinstance(r[k], str) else r[k]
                    for k in order})
    return out


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def axes_of(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(letter, axis name) of the grid's axes with more than one value."""
    found = []
    for letter in LETTERS:
        column = f"{letter}_value"
        if rows and column in rows[0] and len({r[column] for r in rows}) > 1:
            found.append((letter, rows[0].get(letter) or letter))
    return found


def means_by_value(rows: list[dict[str, str]], letter: str,
                   metrics: list[str]) -> dict[str, dict[str, float]]:
    """{metric title: {axis value: mean score}} in the order the values appear in the grid."""
    column = f"{letter}_value"
    out: dict[str, dict[str, float]] = {}
    for metric in metrics:
        sums: dict[str, list[float]] = {}
        for r in rows:
            value = _number(r.get(metric))
            if value is not None:
                sums.setdefault(r[column], []).append(value)
        title = report.METRIC_TITLES.get(metric, metric)
        out[title] = {v: sum(xs) / len(xs) for v, xs in sums.items()}
    return out


def _signed(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def ab_table(statistics: list[dict]) -> list[dict[str, Any]]:
    """One row per compared pair: axis, metric, A, B, pairs, B − A, interval, wins, and the
    Wilcoxon p only where the test could reach significance with this many units (otherwise it
    says so instead of printing a p that cannot mean anything)."""
    rows = []
    for entry in statistics:
        metric = entry.get("metric", "")
        digits = report.METRIC_WORDS.get(metric, ("", "", 3))[2]
        for pair in entry.get("pairs") or []:
            n_units = int(pair.get("n_units", 0))
            min_p = pair.get("wilcoxon_min_p", stats.wilcoxon_min_p(n_units))
            p = pair.get("wilcoxon_p")
            if not stats.can_be_significant(min_p):
                p_text = f"cannot reach 0.05 with {n_units} {pair.get('unit', 'unit')}s"
            else:
                p_text = "–" if p is None else f"{p:.3g}"
            low, high = pair.get("ci_low"), pair.get("ci_high")
            interval = ("–" if low is None or high is None else
                        f"{_signed(low, digits)} to {_signed(high, digits)} "
                        f"({pair.get('confidence', 0.95) * 100:.0f} %, {pair.get('ci_method')})")
            rows.append({"axis": entry.get("title") or entry.get("axis_name", ""),
                         "score": report.METRIC_TITLES.get(metric, metric),
                         "A": pair.get("a"), "B": pair.get("b"),
                         "pairs": pair.get("n_pairs"),
                         "B − A": _signed(pair.get("mean_diff"), digits),
                         "interval": interval,
                         "B wins / ties / A wins": f"{pair.get('wins')} / {pair.get('ties')} / "
                                                   f"{pair.get('losses')}",
                         "p (Wilcoxon)": p_text})
    return rows

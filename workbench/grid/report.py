"""Score tables and the HTML report: scores.csv, scores.json, report.html (tables, A/B stats, plot).

The report is one self-contained HTML file next to the grid images (linked by relative path); the
score plot is inline SVG written here (means with 95 % intervals per axis value), so nothing beyond
the standard library is needed to read it.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from workbench.grid import stats
from workbench.grid.cells import LETTERS, Cell, GridLayout, paired_unit
from workbench.formats.writer import atomic_write_text

MAX_PAIRWISE = 6  # axes with more values compare every value against the first (the baseline)
METRIC_TITLES = {"clip": "CLIP score", "aesthetic": "aesthetic", "style": "style similarity"}


# --------------------------------------------------------------------------------------------------
# rows and tables


def score_rows(cells: list[Cell], lay: GridLayout, scores: dict[str, dict[str, float]],
               out_dir: Path, png_of) -> list[dict[str, Any]]:
    """One row per cell: axis values, settings, seed, image path and scores."""
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"key": cell.key}
        for letter in LETTERS:
            if letter in lay.axes:
                name, _, labels = lay.axes[letter]
                row[letter] = name
                row[f"{letter}_value"] = labels[cell.index[LETTERS.index(letter)]]
        s = cell.settings
        row.update({"model": cell.source.label, "loras": " ".join(f"{lu.path.stem}:{lu.weight:g}"
                                                                    for lu in cell.loras),
                    "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": cell.seed,
                    "sampler": s.sampler, "steps": s.steps, "cfg": s.cfg,
                    "size": f"{s.width}x{s.height}", "image": _rel(png_of(cell.key), out_dir)})
        row.update(scores.get(cell.key, {}))
        rows.append(row)
    return rows


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return str(path)


def axis_table(cells: list[Cell], lay: GridLayout, scores, letter: str, metric: str) -> list[dict]:
    """Per value of one axis: n, mean and standard deviation of a metric."""
    i = LETTERS.index(letter)
    out = []
    for v, label in enumerate(lay.axes[letter][2]):
        vals = [scores[c.key][metric] for c in cells if c.index[i] == v
                and metric in scores.get(c.key, {})]
        out.append({"value": label, "n": len(vals),
                    "mean": float(np.mean(vals)) if vals else None,
                    "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None})
    return out


def _matched(cells: list[Cell], letter: str, scores, metric: str) -> dict[tuple, dict[int, tuple]]:
    """position without `letter` -> {value index: (score, unit)}"""
    i = LETTERS.index(letter)
    out: dict[tuple, dict[int, tuple]] = {}
    for c in cells:
        value = scores.get(c.key, {}).get(metric)
        if value is None:
            continue
        rest = tuple(x for j, x in enumerate(c.index) if j != i) + (c.seed,)
        out.setdefault(rest, {})[c.index[i]] = (value, c)
    return out


def compare_values(cells: list[Cell], lay: GridLayout, scores, letter: str, a: int, b: int,
                   metric: str, **kw) -> stats.PairedStats | None:
    """B (value index b) against A (index a) on the axis `letter`, paired on everything else."""
    axis_name, _, labels = lay.axes[letter]
    va, vb, units = [], [], []
    for by_value in _matched(cells, letter, scores, metric).values():
        if a in by_value and b in by_value:
            (sa, ca), (sb, _) = by_value[a], by_value[b]
            va.append(sa)
            vb.append(sb)
            units.append(paired_unit(ca, axis_name))
    if not va:
        return None
    unit = "seed" if axis_name in ("prompt", "prompt_sr") else "prompt"
    return stats.compare_pairs(va, vb, units, metric=metric, a_name=labels[a], b_name=labels[b],
                               unit=unit, **kw)


def rank_axis(cells: list[Cell], lay: GridLayout, scores, letter: str, metric: str) -> stats.Ranking | None:
    """Ranking of all values of an axis over the positions where every value has a score."""
    axis_name, _, labels = lay.axes[letter]
    k = len(labels)
    blocks: dict[str, list[list[float]]] = {}
    for by_value in _matched(cells, letter, scores, metric).values():
        if len(by_value) == k:
            unit = paired_unit(by_value[0][1], axis_name)
            blocks.setdefault(unit, []).append([by_value[v][0] for v in range(k)])
    if not blocks:
        return None
    unit_name = "seed" if axis_name in ("prompt", "prompt_sr") else "prompt"
    if len(blocks) == 1:  # a single prompt: its positions (seeds) are the units
        rows = next(iter(blocks.values()))
        unit_name = "seed"
    else:
        rows = [list(np.mean(v, axis=0)) for v in blocks.values()]
    table = {labels[v]: [r[v] for r in rows] for v in range(k)}
    return stats.rank_values(table, metric=metric, unit=unit_name)


def ab_statistics(cells: list[Cell], lay: GridLayout, scores, metrics: list[str],
                  **kw) -> list[dict[str, Any]]:
    """For every axis with several values and every metric: pairwise stats (or vs the first value
    for long axes) and, with more than two values, a ranking."""
    out = []
    for letter, (name, title, labels) in lay.axes.items():
        k = len(labels)
        if k < 2:
            continue
        pairs = list(combinations(range(k), 2)) if k <= MAX_PAIRWISE else [(0, j) for j in range(1, k)]
        for metric in metrics:
            entry: dict[str, Any] = {"axis": letter, "axis_name": name, "title": title,
                                     "metric": metric, "pairs": [], "ranking": None}
            for a, b in pairs:
                res = compare_values(cells, lay, scores, letter, a, b, metric, **kw)
                if res is not None:
                    entry["pairs"].append(res.to_dict())
            if k > 2:
                ranking = rank_axis(cells, lay, scores, letter, metric)
                entry["ranking"] = ranking.to_dict() if ranking else None
            out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# files


def write_tables(rows: list[dict[str, Any]], out_dir: Path, extra: dict[str, Any]) -> list[Path]:
    """scores.csv (one row per cell) and scores.json (rows plus scorers and statistics)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = atomic_write_text(out_dir / "scores.csv", buf.getvalue(), overwrite=True)
    json_path = atomic_write_text(out_dir / "scores.json", json.dumps(
        {**extra, "cells": rows}, indent=1, default=str), overwrite=True)
    return [csv_path, json_path]


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def svg_plot(series: list[tuple[str, list[str], list[float | None], list[float | None]]],
             title: str, width: int = 640, height: int = 240) -> str:
    """Inline SVG: per series (name, labels, means, half-widths) dots with error bars."""
    vals = [m + s * (h or 0) for _, _, ms, hs in series for m, h in zip(ms, hs) if m is not None
            for s in (-1, 1)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 60, 20, 30, 50
    n = max(len(labels) for _, labels, _, _ in series)
    step = (width - left - right) / max(n, 1)
    y_of = lambda v: top + (hi - v) / (hi - lo) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'class="plot" role="img"><title>{html.escape(title)}</title>',
             f'<text x="{left}" y="18" font-size="14">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>']
    for t in np.linspace(lo, hi, 5):
        y = y_of(t)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t:.3g}</text>'
                     f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>')
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for s_i, (name, labels, means, halves) in enumerate(series):
        colour = colours[s_i % len(colours)]
        offset = (s_i - (len(series) - 1) / 2) * 8
        for i, (label, m, h) in enumerate(zip(labels, means, halves)):
            x = left + step * (i + 0.5) + offset
            if s_i == 0:
                parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" font-size="11" '
                             f'text-anchor="middle">{html.escape(label[:18])}</text>')
            if m is None:
                continue
            if h:
                parts.append(f'<line x1="{x:.1f}" y1="{y_of(m - h):.1f}" x2="{x:.1f}" '
                             f'y2="{y_of(m + h):.1f}" stroke="{colour}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y_of(m):.1f}" r="4" fill="{colour}">'
                         f'<title>{html.escape(label)}: {m:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;
margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}
img.grid{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:90%}"""


def write_html(out_dir: Path, *, title: str, pages: list, cells: list[Cell], lay: GridLayout,
               scores, metrics: list[str], statistics: list[dict], scorers: dict,
               summary: str) -> Path:
    """report.html: grid pages, per-axis score tables, A/B statistics and the score plot."""
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p class='note'>{html.escape(summary)}</p>"]
    if scorers:
        h.append("<p class='note'>scorers: " + html.escape(json.dumps(scorers, sort_keys=True)) + "</p>")
    h.append("<h2>Grid</h2>")
    for page in pages:
        h.append(f"<p><img class='grid' src='{html.escape(_rel(page.path, out_dir))}' "
                 f"alt='{html.escape(page.z_label or title)}'></p>")
    if metrics:
        h.append("<h2>Scores per axis value</h2>")
        for letter, (name, t, labels) in lay.axes.items():
            rows = []
            tables = {m: axis_table(cells, lay, scores, letter, m) for m in metrics}
            for v, label in enumerate(labels):
                rows.append([label, tables[metrics[0]][v]["n"]]
                            + [x for m in metrics for x in (tables[m][v]["mean"], tables[m][v]["sd"])])
            h.append(f"<h3>{letter}: {html.escape(t)}</h3>")
            h.append(_table(["value", "n"] + [f"{METRIC_TITLES.get(m, m)} {s}" for m in metrics
                                              for s in ("mean", "sd")], rows))
            for m in metrics:
                means = [r["mean"] for r in tables[m]]
                halves = [1.96 * r["sd"] / math.sqrt(r["n"]) if r["sd"] is not None else None
                          for r in tables[m]]
                h.append(svg_plot([(m, labels, means, halves)],
                                  f"{METRIC_TITLES.get(m, m)} by {t} (mean ± 1.96·SE)"))
    if statistics:
        h.append("<h2>A/B statistics</h2><p class='note'>B − A, paired on prompt, seed and every "
                 "other axis; mean of per-prompt mean differences with a BCa bootstrap interval "
                 "resampled over prompts (over seeds when there is one prompt); win rate counts ties "
                 "as ½; Wilcoxon signed-rank (Pratt) on the per-unit differences.</p>")
        for entry in statistics:
            h.append(f"<h3>{entry['axis']}: {html.escape(entry['title'])} — "
                     f"{METRIC_TITLES.get(entry['metric'], entry['metric'])}</h3>")
            rows = [[p["a"], p["b"], p["mean_a"], p["mean_b"], p["mean_diff"],
                     f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]", p["win_rate"],
                     f"{p['wins']}/{p['ties']}/{p['losses']}", p["wilcoxon_p"],
                     f"{p['n_units']} {p['unit']}s, {p['n_pairs']} pairs"] for p in entry["pairs"]]
            h.append(_table(["A", "B", "mean A", "mean B", "B − A", "95% CI", "win rate B",
                             "W/T/L", "Wilcoxon p", "n"], rows))
            if entry.get("ranking"):
                r = entry["ranking"]
                h.append(f"<p>ranking over {r['n_units']} {r['unit']}s; Friedman p = "
                         f"{_fmt(r['friedman_p'])}</p>")
                h.append(_table(["rank", "value", "mean", "mean rank"],
                                [[x["rank"], x["value"], x["mean"], x["mean_rank"]] for x in r["rows"]]))
    h.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(h), overwrite=True)

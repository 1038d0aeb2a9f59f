"""Score tables and the HTML report: scores.csv, scores.json, report.html (verdict, grid, tables, stats).

The report is one self-contained HTML file next to the grid images (linked by relative path); the
score plot is inline SVG written here (means with 95 % intervals per axis value), so nothing beyond
the standard library is needed to read it. It opens with a verdict in plain words (who beats whom,
by how much, how sure, and what to add when the grid is too small to tell) beside the grid image;
the statistics and their methods follow below, explained, for whoever wants to check them.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from workbench.grid import stats
from workbench.grid.cells import LETTERS, Cell, GridLayout, paired_unit
from workbench.grid.numbers import fmt, signed, ticks
from workbench.formats.writer import atomic_write_text

MAX_PAIRWISE = 6  # axes with more values compare every value against the first (the baseline)
METRIC_TITLES = {"clip": "CLIP score", "aesthetic": "aesthetic", "style": "style similarity"}
# metric -> (what it measures, in the verdict's words; unit of a difference; decimals shown)
METRIC_WORDS = {"clip": ("prompt adherence", "CLIP points", 1),
                "aesthetic": ("the aesthetic score", "points", 2),
                "style": ("style similarity", "", 3)}
# axes whose values the verdict names bare; others read "CFG 6", "steps 30"
BARE_VALUE_AXES = {"model", "lora", "sampler", "prompt_sr", "negative_prompt"}
# axes the verdict leaves to the details: different prompts or seeds are not rivals
NOT_RIVALS = {"prompt", "seed"}
SHORT_HASH = 10  # characters of a sha256 shown in tables (as A1111's short model hash)
_SHA256 = re.compile(rf"\b([0-9a-f]{{{SHORT_HASH}}})[0-9a-f]{{{64 - SHORT_HASH}}}\b")


def short_hashes(text: str) -> str:
    """Every 64-hex-digit hash in `text` cut to its first 10 digits."""
    return _SHA256.sub(r"\1", text)


# --------------------------------------------------------------------------------------------------
# the verdict


def value_name(axis_name: str, title: str, label: str) -> str:
    """How the verdict names one axis value: "my_model", "CFG 6", "steps 30"."""
    return label if axis_name in BARE_VALUE_AXES else f"{title} {label}"


def _counted(n: int, unit: str, prompt_axis: bool) -> str:
    if unit == "seed" and not prompt_axis:
        return f"{n} seed{'s' if n != 1 else ''} of one prompt"
    return f"{n} {unit}{'s' if n != 1 else ''}"


def pair_verdict(pair: dict, axis_name: str, title: str) -> str:
    """One sentence on B against A, in plain words: who wins, in how many pairs, by how much on
    average, the interval, and how much the grid can say (see stats.evidence)."""
    what, unit, digits = METRIC_WORDS.get(pair["metric"], (pair["metric"], "", 3))
    a, b = (value_name(axis_name, title, pair[k]) for k in ("a", "b"))
    n, d = pair["n_pairs"], pair["mean_diff"]
    prompt_axis = axis_name in ("prompt", "prompt_sr")
    more = "add seeds" if prompt_axis else "add prompts"
    counted = _counted(pair["n_units"], pair["unit"], prompt_axis)
    if d == 0 and pair["wins"] == pair["losses"]:
        return f"{a} and {b} score the same on {what} over {n} pair{'s' if n != 1 else ''}."
    if d > 0:
        winner, loser, won, low, high = b, a, pair["wins"], pair["ci_low"], pair["ci_high"]
    else:
        winner, loser, won = a, b, pair["losses"]
        low, high = (-pair["ci_high"] if pair["ci_high"] is not None else None,
                     -pair["ci_low"] if pair["ci_low"] is not None else None)
    where = f"in {won} of {n} pairs" if 2 * won >= n else f"on average, though higher in only {won} of {n} pairs"
    ties = f" ({pair['ties']} tied)" if pair["ties"] else ""
    text = f"{winner} beats {loser} on {what} {where}{ties}, {signed(abs(d), digits)}{' ' + unit if unit else ''}"
    if low is not None:
        text += (f", {pair['confidence'] * 100:.0f} % interval {signed(low, digits)} to "
                 f"{signed(high, digits)}")
    level = stats.evidence(pair["n_units"], low, high)
    if level == "none":
        return text + f"; a single {pair['unit']} gives no interval: {more}."
    if level == "weak":
        return text + f"; with {counted} this is weak evidence: {more}."
    if level == "unclear":
        small = not stats.can_be_significant(stats.wilcoxon_min_p(pair["n_units"]))
        return text + ("; the interval includes zero, so this grid cannot tell them apart"
                       + (f" (with {counted}: {more})." if small else f" over {counted}."))
    return text + f"; the interval leaves out zero: a clear difference over {counted}."


def verdict(statistics: list[dict]) -> list[str]:
    """The report's opening sentences: per compared axis and metric, the pair of values that
    matters (the only pair; or, with more values, the best-ranked against the first)."""
    out = []
    for entry in statistics:
        if entry["axis_name"] in NOT_RIVALS or not entry["pairs"]:
            continue
        name, title = entry["axis_name"], entry["title"]
        pair = entry["pairs"][0]
        ranking = entry.get("ranking")
        if ranking and ranking["rows"]:
            what = METRIC_WORDS.get(entry["metric"], (entry["metric"],))[0]
            rows = [r["value"] for r in ranking["rows"]]
            first = entry["pairs"][0]["a"]  # the baseline: every value is compared with it
            best = rows[0] if rows[0] != first else rows[1]
            pair = next((p for p in entry["pairs"] if {p["a"], p["b"]} == {first, best}), pair)
            out.append(f"Of {len(rows)} {title} values, {value_name(name, title, rows[0])} ranks "
                       f"first on {what}.")
        out.append(pair_verdict(pair, name, title))
    return out


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
    """scores.csv (one row per cell, keys shortened to 10 characters) and scores.json (rows with
    full keys, plus scorers and statistics)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:  # the table people read: the cell key cut like a model hash (json keeps it whole)
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else
                             v[:SHORT_HASH] if k == "key" and isinstance(v, str) else v)
                         for k, v in row.items()})
    csv_path = atomic_write_text(out_dir / "scores.csv", buf.getvalue(), overwrite=True)
    json_path = atomic_write_text(out_dir / "scores.json", json.dumps(
        {**extra, "cells": rows}, indent=1, default=str), overwrite=True)
    return [csv_path, json_path]


def _fmt(v, sig: int = 3) -> str:
    """A table cell: numbers by grid/numbers.py fmt (3 decimals, `sig` significant digits below
    1), text escaped with hashes cut short."""
    if v is None or isinstance(v, float):
        return fmt(v, sig=sig)
    return html.escape(short_hashes(str(v)))


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
    for t, label in ticks(lo, hi):
        y = y_of(t)
        parts.append(f'<text class="tick y" x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{label}</text>'
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
img.grid{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:90%}
.top{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.verdict{flex:1 1 320px;max-width:520px}
.verdict p{font-size:110%;line-height:1.5}.pages{flex:2 1 480px}"""


def p_cell(p: float | None, min_p: float, n: int, unit: str) -> float | str | None:
    """A p-value, or why there is none: a test that cannot reach 0.05 with so few units."""
    if not stats.can_be_significant(min_p):
        return f"– (cannot go below {min_p:.2g} with {n} {unit}{'s' if n != 1 else ''})"
    return p


def _details_note() -> str:
    n_min = next(n for n in range(1, 64) if stats.can_be_significant(stats.wilcoxon_min_p(n)))
    return (
        "<p class='note'>How to read this. Each pair is two images that differ only in the compared "
        "value (same prompt, seed and every other setting), so B − A measures that value alone. "
        "Pairs of one prompt are averaged first and the prompts are the units (the seeds, when "
        "there is one prompt), because images of one prompt are not independent. "
        "<b>95 % interval</b>: a bootstrap interval for the mean difference, resampling the units "
        "many times; <i>BCa</i> (bias-corrected and accelerated) adjusts it for skew, "
        "<i>percentile</i> is the plain version used when BCa is undefined. "
        "<b>W/T/L</b>: pairs where B scored higher / the same / lower; the win rate counts a tie "
        "as ½. <b>p</b>: the Wilcoxon signed-rank test (Pratt's handling of zeros) on the per-unit "
        "differences, two-sided: how often a difference at least this consistent would appear if "
        "the values did not matter. With n units it cannot go below 2/2<sup>n</sup>, so below "
        f"{n_min} units it cannot reach 0.05 whatever the images, and no p is shown. The ranking "
        "of three or more values uses the Friedman test, with the same rule.</p>")


def write_html(out_dir: Path, *, title: str, pages: list, cells: list[Cell], lay: GridLayout,
               scores, metrics: list[str], statistics: list[dict], scorers: dict,
               summary: str) -> Path:
    """report.html: the verdict beside the grid pages, then per-axis score tables and plots, then
    the A/B statistics with their methods explained."""
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p class='note'>{html.escape(summary)}</p>"]
    sentences = verdict(statistics)
    if not sentences:
        sentences = ["No verdict: " + ("the grid has no scores (add a `scores:` section)." if not metrics
                                       else "no axis compares two or more models or settings.")]
    h.append("<div class='top'><div class='verdict'><h2>Verdict</h2><p>"
             + html.escape(" ".join(sentences)) + "</p></div><div class='pages'>")
    for page in pages:
        h.append(f"<p><img class='grid' src='{html.escape(_rel(page.path, out_dir))}' "
                 f"alt='{html.escape(page.z_label or title)}'></p>")
    h.append("</div></div>")
    if scorers:
        h.append("<p class='note'>scorers: " + html.escape(short_hashes(json.dumps(scorers, sort_keys=True)))
                 + "</p>")
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
        h.append("<h2>Details: A/B statistics</h2>" + _details_note())
        for entry in statistics:
            h.append(f"<h3>{entry['axis']}: {html.escape(entry['title'])} — "
                     f"{METRIC_TITLES.get(entry['metric'], entry['metric'])}</h3>")
            rows = [[p["a"], p["b"], p["mean_a"], p["mean_b"], p["mean_diff"],
                     f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] {p['ci_method']}", p["win_rate"],
                     f"{p['wins']}/{p['ties']}/{p['losses']}",
                     p_cell(p["wilcoxon_p"], p.get("wilcoxon_min_p", 0.0), p["n_units"], p["unit"]),
                     f"{p['n_units']} {p['unit']}s, {p['n_pairs']} pairs"] for p in entry["pairs"]]
            h.append(_table(["A", "B", "mean A", "mean B", "B − A", "95 % interval (method)",
                             "win rate B", "W/T/L", "p (Wilcoxon)", "n"], rows))
            if entry.get("ranking"):
                r = entry["ranking"]
                p_text = p_cell(r["friedman_p"], r.get("friedman_min_p", 0.0), r["n_units"], r["unit"])
                h.append(f"<p>ranking over {r['n_units']} {r['unit']}s; Friedman p = "
                         f"{p_text if isinstance(p_text, str) else _fmt(p_text)}</p>")
                h.append(_table(["rank", "value", "mean", "mean rank"],
                                [[x["rank"], x["value"], x["mean"], x["mean_rank"]] for x in r["rows"]]))
    h.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(h), overwrite=True)

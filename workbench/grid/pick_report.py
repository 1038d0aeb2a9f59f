"""What `workbench pick` writes for people: the verdict in words, scores.csv of every cell, and
report.html (verdict on top, the Pareto plot as inline SVG, the selection grid image, the tables).

The verdict says the rule that chose, how many candidates were tried, the gain against the last
step at strength 1.0 with its interval on the selection data and again on seeds and pictures the
choice never saw, and warns when that held-out gain is within noise (workbench/kinds/pick.py).
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any

from workbench.formats.writer import atomic_write_text
from workbench.grid.numbers import signed
from workbench.grid.stats import shown_better
from workbench.grid.report import CSS, _fmt, _table

EVIDENCE_WORDS = {"clear": "a clear difference", "weak": "a difference, but from too few prompts for "
                  "a test to confirm", "unclear": "no difference these scores can tell (the interval "
                  "holds 0)", "none": "too few prompts for an interval"}


def _interval(s: dict, digits: int) -> str:
    """"+0.012 (95 % interval +0.0031 to +0.021)": signed numbers as the grid verdict writes them
    (grid/numbers.py), so a small nonzero end never reads "+0.000"."""
    if s["ci_low"] is None:
        return signed(s["mean_diff"], digits)
    return (f"{signed(s['mean_diff'], digits)} (95 % interval {signed(s['ci_low'], digits)} to "
            f"{signed(s['ci_high'], digits)})")


def verdict(pp, best, base, sel_stats: dict | None, eval_stats: dict | None, n_candidates: int,
            rule: str) -> tuple[list[str], bool]:
    """(sentences, within_noise) for the top of the report."""
    steps = len({c.step for c in pp.candidates})
    strengths = len({c.strength for c in pp.candidates})
    out = [f"Use step {best.step} at strength {best.strength:g} (<lora:{pp.run.name}:{best.strength:g}>). "
           f"It was chosen among {n_candidates} candidates ({steps} steps × {strengths} strengths, "
           f"{len(pp.prompts)} prompts × {len(pp.selection_seeds)} selection seeds each) as {rule}."]
    if sel_stats is None:
        out.append(f"That is the baseline itself, {base.label}: no other step and strength was "
                   "better on style without giving up more adherence than allowed.")
        return out, False
    s, c = sel_stats["style"], sel_stats["clip"]
    out.append(f"Against {base.label} on the selection seeds and pictures: style similarity "
               f"{_interval(s, 3)}, prompt adherence {_interval(c, 2)} CLIP points.")
    es, ec = eval_stats["style"], eval_stats["clip"]
    out.append(f"Re-checked on {len(pp.evaluation_seeds)} seeds not used for choosing, against the "
               f"{len(pp.split.held_out)} held-out picture(s): style {_interval(es, 3)} — "
               f"{EVIDENCE_WORDS[es['evidence']]}; adherence {_interval(ec, 2)} CLIP points.")
    within_noise = not shown_better(es)
    if within_noise:
        out.append(f"Warning: on the held-out check the gain over {base.label} is within noise"
                   + (" or negative" if es["mean_diff"] <= 0 else "")
                   + "; as far as these scores can tell the last step at 1.0 is as good. More "
                   "prompts or evaluation seeds would narrow the interval.")
    elif s["evidence"] == "clear" and es["evidence"] != "clear":
        out.append("The held-out gain is smaller than the selection gain suggested; treat it as "
                   "likely but not certain.")
    return out, within_noise


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Every cell of both grids: phase, step, strength, prompt, seed, scores, image, key."""
    buf = io.StringIO()
    columns = ["phase", "step", "strength", "prompt", "seed", "style", "clip", "image", "key"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue(), overwrite=True)


def _stats_rows(stats: dict | None, where: str) -> list[list[Any]]:
    if not stats:
        return []
    return [[where, s["metric"], s["a"], s["b"], s["mean_a"], s["mean_b"], s["mean_diff"],
             f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] {s['ci_method']}",
             f"{s['n_units']} {s['unit']}s, {s['n_pairs']} pairs", s["evidence"]]
            for s in stats.values()]


def write_html(out_dir: Path, *, title: str, verdict: list[str], svg: str, pages: list[Path],
               facts: dict, summary: str) -> Path:
    """report.html: verdict and plot on top, then the grid image and the tables."""
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p class='note'>{html.escape(summary)}</p>",
         "<div class='top'><div class='verdict'><h2>Verdict</h2>"
         + "".join(f"<p>{html.escape(s)}</p>" for s in verdict) + "</div>",
         f"<div class='pages'>{svg}<p class='note'>Each dot is one step at one strength (mean over "
         "the selection cells); red: the Pareto front; square: the baseline (last step at 1.0); "
         "green ring: the recommendation.</p></div></div>"]
    h.append("<h2>Statistics (paired by prompt and seed; bootstrap over prompts)</h2>")
    h.append(_table(["data", "metric", "A", "B", "mean A", "mean B", "B − A", "95 % interval",
                     "n", "evidence"],
                    _stats_rows(facts.get("selection_statistics"), "selection")
                    + _stats_rows(facts.get("evaluation_statistics"), "held-out check")))
    h.append("<h2>Candidates (selection means)</h2>")
    h.append(_table(["step", "strength", "style", "CLIP", "Pareto front"],
                    [[c["step"], c["strength"], c["style"], c["clip"], "yes" if c["pareto"] else ""]
                     for c in facts["candidates"]]))
    refs = facts["references"]
    h.append(f"<p class='note'>Style references: {len(refs['selection'])} picture(s) for choosing, "
             f"{len(refs['held_out'])} held out ({html.escape(', '.join(refs['held_out']))}). Seeds: "
             f"selection {facts['seeds']['selection']}, evaluation {facts['seeds']['evaluation']}. "
             "Every cell's scores: scores.csv.</p>")
    if pages:
        h.append("<h2>Selection grid</h2>")
        for p in pages:
            rel = Path(p).relative_to(out_dir).as_posix()
            h.append(f"<p><img class='grid' src='{html.escape(rel)}' alt='selection grid'></p>")
    h.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(h), overwrite=True)

"""What a merge search writes for the user to read: trials.csv, grid.png and report.html.

The report says how many trials ran, draws every trial's style against its prompt adherence with
the Pareto front, inputs A and B and the adherence bar (grid/pareto.py scatter_svg, the plot pick
draws too) and the search trace (each trial's selection style score and the best so far;
grid/report.py svg_plot), shows the best against both inputs on held-out seeds and
pictures with paired statistics (grid/stats.py), and warns when the best is within noise of the
better input: a search over many trials always finds *some* best, and only the held-out check says
whether it is better than what the user already had.
"""

from __future__ import annotations

import csv
import html
import io
from itertools import accumulate
from pathlib import Path

from workbench.formats.writer import atomic_write_text
from workbench.grid.render import render_pages
from workbench.grid.pareto import Candidate, pareto_front, scatter_svg
from workbench.grid.report import CSS, p_cell, svg_plot
from workbench.grid.report import _fmt as report_fmt

TRIALS_CSV = "trials.csv"
GRID_STEM = "grid"
REPORT_HTML = "report.html"


def write_trials_csv(out_dir: Path, trials: list, names, threshold: float) -> Path:
    """One row per finished trial: number, parameters, scores, whether it met the adherence bar."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", *names, "style", "clip", "meets_adherence", "seconds"])
    for t in trials:
        a = t.user_attrs
        writer.writerow([t.number, *(f"{t.params[n]:.6f}" for n in names), f"{a['style']:.6f}",
                         f"{a['clip']:.4f}", a["clip"] >= threshold, a.get("seconds", "")])
    path = Path(out_dir) / TRIALS_CSV
    atomic_write_text(path, buf.getvalue(), overwrite=True)
    return path


def write_grid(out_dir: Path, recipe, checked: dict) -> Path:
    """Best vs A vs B (columns, each on every evaluation seed) by prompt (rows)."""
    seeds = recipe.seeds.values("evaluation")
    prompts = recipe.prompt_values()
    names = list(checked)  # best, A, B
    images, scores = {}, {}
    for name, scored in checked.items():
        for i, (prompt, seed) in enumerate(zip(scored.prompts, scored.seeds)):
            key = f"{name}|{prompts.index(prompt)}|{seed}"
            images[key] = scored.images[i]
            scores[key] = {"style": scored.style[i], "clip": scored.clip[i]}
    grid = [[f"{n}|{p}|{s}" for n in names for s in seeds] for p in range(len(prompts))]
    pages = render_pages(title=f"{recipe.name}: best vs A vs B (evaluation seeds)", z_label="",
                         column_labels=[n for n in names for _ in seeds],
                         sub_labels=[f"seed {s}" for _ in names for s in seeds],
                         row_labels=list(prompts), grid=grid, image_of=images.__getitem__,
                         scores_of=lambda k: scores.get(k, {}), metrics=["style", "clip"],
                         out_stem=Path(out_dir) / GRID_STEM)
    return pages[0].path


def _fmt(v) -> str:
    """A table cell as the grid report writes one (grid/report.py _fmt), with four significant
    digits below 1: trials' style scores often differ only in the fourth decimal."""
    return report_fmt(v, sig=4)


def trace_svg(trials: list) -> str:
    """Each trial's selection style score and the best so far, by trial number."""
    labels = [str(t.number) for t in trials]
    values = [t.user_attrs["style"] for t in trials]
    best = list(accumulate(values, max))
    return svg_plot([("trial", labels, values, [None] * len(values)),
                     ("best so far", labels, best, [None] * len(values))],
                    "search trace: style (selection pictures, selection seeds) by trial",
                    width=max(640, 14 * len(labels) + 80))


def scatter(trials: list, info: dict) -> str:
    """Style against adherence of every trial (selection means), inputs A and B as reference
    squares, the best ringed and the adherence bar dashed (grid/pareto.py scatter_svg, as pick
    draws its candidates). The front is the study's own in pareto mode (info["pareto_front"]);
    in constraint mode it is computed from the points (grid/pareto.py pareto_front), to show what
    the adherence bar costs in style."""
    points = [Candidate(f"trial {t.number}", t.user_attrs["style"], t.user_attrs["clip"]) for t in trials]
    index = {t.number: i for i, t in enumerate(trials)}
    if info.get("pareto_front") is not None:
        front = [index[n] for n in info["pareto_front"] if n in index]
    else:
        front = pareto_front(points)
    references = {}
    for which in ("A", "B"):
        base = info["baseline_selection"][which]
        references[len(points)] = f"input {which}"
        points.append(Candidate(f"input {which}", base["style"], base["clip"]))
    mode = "Pareto front" if info.get("pareto_front") is not None else "adherence constraint"
    return scatter_svg(points, front, chosen=index[info["best"]["trial"]], references=references,
                       chosen_word="best", adherence_floor=info["adherence_threshold"],
                       title=f"style against prompt adherence: {len(trials)} trials ({mode})")


def scatter_note(info: dict) -> str:
    """How to read the scatter, and the rule that chose the ringed trial in this mode."""
    pareto = info.get("pareto_front") is not None
    pool = "front trial" if pareto else "trial"
    return ("Each dot is one trial: its mean over the selection seeds (style against the selection "
            "pictures). Red: the Pareto front, the trials no other trial beats on both scores"
            + ("" if pareto else " (shown for reference: in constraint mode the adherence bar decides)")
            + "; squares: inputs A and B on the same seeds; dashed line: the adherence bar (the better "
            f"input's CLIP score minus the margin); green ring: the best, the most stylish {pool} at "
            f"or right of the bar (the most stylish {pool} of all when none is).")


def write_html(out_dir: Path, recipe, trials: list, names, info: dict, grid_path: Path,
               summary: str) -> Path:
    best = info["best"]
    rows = []
    for c in info["comparisons"]:
        rows.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (
            f"best vs {c['a']}", c["metric"], c["mean_a"], c["mean_b"], c["mean_diff"],
            f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
            p_cell(c["wilcoxon_p"], c.get("wilcoxon_min_p", 0.0), c["n_units"], c.get("unit", "unit")),
            f"{c['wins']}/{c['n_pairs']}",
            c["n_units"])) + "</tr>")
    warnings = []
    if info["within_noise"]:
        warnings.append(f"The best is not shown to beat input {info['better_input']} on the held-out check "
                        "(the confidence interval of the style difference includes 0 or lies below it): "
                        f"keeping {info['better_input']} is at least as well supported as the merge.")
    if not best["meets_adherence"]:
        warnings.append("No trial met the adherence bar (CLIP score within the margin of the better "
                        "input); the best shown is the most stylish trial overall.")
    trial_rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (
            t.number, *(t.params[n] for n in names), t.user_attrs["style"], t.user_attrs["clip"]))
        + "</tr>" for t in trials)
    params = ", ".join(f"{k} = {v:.3f}" for k, v in best["params"].items())
    held = info["held_out"]
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(recipe.name)}</title>
<style>{CSS} .warn{{background:#fff3cd;border:1px solid #e0c36c;padding:8px 12px}}</style></head><body>
<h1>Merge search: {html.escape(recipe.name)}</h1>
<p>{html.escape(summary)}</p>
<p><b>{len(trials)} trials</b> run ({info['run_now']} in this run), space <code>{recipe.space}</code>,
method <code>{recipe.method}</code>; {info['references']['selection']} selection and
{info['references']['held_out']} held-out reference pictures; selection seeds {info['seeds']['selection']},
evaluation seeds {info['seeds']['evaluation']} (disjoint).</p>
{''.join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings)}
<h2>Best: trial {best['trial']}</h2><p>{html.escape(params)}; selection style {best['style']:.4f},
CLIP {best['clip']:.2f} (adherence bar {info['adherence_threshold']:.2f}). Written as
<code>best.yaml</code>: <code>workbench run best.yaml</code> makes the checkpoint.</p>
<h2>Style against adherence</h2>{scatter(trials, info)}
<p class="note">{html.escape(scatter_note(info))}</p>
<h2>Held-out check (evaluation seeds, held-out pictures)</h2>
<p>style: best {held['best']['style']:.4f}, A {held['A']['style']:.4f}, B {held['B']['style']:.4f};
CLIP: best {held['best']['clip']:.2f}, A {held['A']['clip']:.2f}, B {held['B']['clip']:.2f}</p>
<table><tr><th>pair</th><th>metric</th><th>mean input</th><th>mean best</th><th>difference</th>
<th>95% CI</th><th>Wilcoxon p</th><th>best wins</th><th>units</th></tr>{''.join(rows)}</table>
<p class="note">Paired by (prompt, seed): the same noise for every picture; intervals are paired
bootstrap intervals over prompts (over seeds when there is one prompt), grid/stats.py.</p>
<h2>Search trace</h2>{trace_svg(trials)}
<h2>Best vs A vs B</h2><img class="grid" src="{html.escape(grid_path.name)}" alt="grid">
<h2>Trials</h2><table><tr><th>trial</th>{''.join(f'<th>{html.escape(n)}</th>' for n in names)}
<th>style</th><th>CLIP</th></tr>{trial_rows}</table>
</body></html>
"""
    path = Path(out_dir) / REPORT_HTML
    atomic_write_text(path, body, overwrite=True)
    return path

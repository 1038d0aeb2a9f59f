"""Choosing among candidates scored on two things: the Pareto front of style against adherence,
the rule that picks one point of it, and the front as an inline SVG scatter for report.html (of
pick, workbench/kinds/pick.py, and of merge_search, grid/search_report.py).

Why a front and a rule: a LoRA step and strength that copies the training pictures best often stops
following the prompt. No single number says how much adherence a user will trade for style, so the
report shows every candidate and the front (no other candidate is at least as good on both and
better on one); the recommendation is the most stylish point of the front whose adherence is no
worse than the baseline's by more than a stated margin (`recommend`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from workbench.grid.numbers import fmt, ticks


@dataclass(frozen=True)
class Candidate:
    """One candidate's mean scores over the selection cells."""

    label: str
    style: float
    adherence: float


def pareto_front(points: list[Candidate]) -> list[int]:
    """Indices of the points no other point dominates (>= on both scores and > on one), in
    ascending adherence."""
    front = []
    for i, p in enumerate(points):
        dominated = any(q.style >= p.style and q.adherence >= p.adherence
                        and (q.style > p.style or q.adherence > p.adherence)
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].adherence, points[i].style))


def recommend(points: list[Candidate], baseline: int, margin: float) -> tuple[int, str]:
    """(index, rule in words): the highest style among the front's points whose adherence is at
    least the baseline's minus `margin`. Some front point always qualifies: either the baseline
    is on the front, or a front point dominates it."""
    base = points[baseline]
    floor = base.adherence - margin
    eligible = [i for i in pareto_front(points) if points[i].adherence >= floor]
    best = max(eligible, key=lambda i: (points[i].style, points[i].adherence))
    rule = (f"the highest style similarity among the Pareto-front points whose prompt adherence is "
            f"no worse than {base.label}'s ({base.adherence:.2f}) by more than {margin:g} CLIP points")
    return best, rule


def scatter_svg(points: list[Candidate], front: list[int], *, chosen: int, title: str,
                baseline: int | None = None, references: dict[int, str] | None = None,
                chosen_word: str = "recommended", adherence_floor: float | None = None,
                floor_label: str = "adherence bar", width: int = 640, height: int = 420) -> str:
    """Inline SVG: every point as a dot (x adherence, y style), the front joined by a line, the
    reference points as squares (`references`: index -> word for the tooltip; `baseline` is the
    one reference of a pick), the chosen point as a ring and, with `adherence_floor`, the lowest
    adherence allowed as a dashed vertical line. pick (workbench/kinds/pick.py) and merge_search
    (grid/search_report.py) both draw their candidates with it."""
    if not points:
        return ""
    refs = dict(references or {})
    if baseline is not None:
        refs.setdefault(baseline, "baseline")
    xs = np.array([p.adherence for p in points], dtype=float)
    ys = np.array([p.style for p in points], dtype=float)

    def span(v: np.ndarray) -> tuple[float, float]:
        lo, hi = float(v.min()), float(v.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 1e-3, hi + 1e-3
        pad = (hi - lo) * 0.08
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)
    left, right, top, bottom = 70, 90, 30, 50  # room on the right for the last point's label
    px = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda v: top + (y1 - v) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'class="plot pareto" role="img"><title>{html.escape(title)}</title>',
             f'<text x="{left}" y="18" font-size="14">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
             f'<text x="{(left + width - right) / 2:.0f}" y="{height - 12}" font-size="12" '
             'text-anchor="middle">prompt adherence (CLIP score) →</text>',
             f'<text x="14" y="{(top + height - bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
             f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">style similarity →</text>']
    for t, label in ticks(x0, x1):
        parts.append(f'<text class="tick x" x="{px(t):.1f}" y="{height - bottom + 15}" font-size="10" '
                     f'text-anchor="middle">{label}</text>')
    for t, label in ticks(y0, y1):
        parts.append(f'<text class="tick y" x="{left - 6}" y="{py(t) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{label}</text><line x1="{left}" y1="{py(t):.1f}" '
                     f'x2="{width - right}" y2="{py(t):.1f}" stroke="#eee"/>')
    if adherence_floor is not None:
        words = f"{floor_label} {fmt(adherence_floor, 2)}"
        if x0 <= adherence_floor <= x1:
            x = px(adherence_floor)
            parts.append(f'<line class="floor" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" '
                         f'stroke="#ff7f0e" stroke-width="1.5" stroke-dasharray="5,4">'
                         f'<title>{html.escape(words)}</title></line>'
                         # at the foot of the line: the top is where the most stylish points and
                         # their labels sit
                         f'<text x="{x + 4:.1f}" y="{height - bottom - 6}" font-size="10" fill="#ff7f0e">'
                         f'{html.escape(words)}</text>')
        else:  # off the plot: say on which side, rather than squeeze every point to fit the line
            where = "left of the plot: every point meets it" if adherence_floor < x0 else \
                "right of the plot: no point meets it"
            parts.append(f'<text class="floor" x="{left + 6}" y="{top + 12}" font-size="10" fill="#ff7f0e">'
                         f'{html.escape(f"{words} lies {where}")}</text>')
    front = sorted(front, key=lambda i: (points[i].adherence, points[i].style))
    if len(front) > 1:
        path = " ".join(f"{px(points[i].adherence):.1f},{py(points[i].style):.1f}" for i in front)
        parts.append(f'<polyline class="front" points="{path}" fill="none" stroke="#d62728" '
                     'stroke-width="1.5"/>')
    on_front = set(front)
    for i, p in enumerate(points):
        x, y = px(p.adherence), py(p.style)
        colour = "#d62728" if i in on_front else "#888"
        tip = f"{p.label}: style {p.style:.4f}, adherence {p.adherence:.2f}"
        if i in refs:
            parts.append(f'<rect class="reference" x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" '
                         f'fill="none" stroke="#1f77b4" stroke-width="2"><title>'
                         f'{html.escape(refs[i] + " " + tip)}</title></rect>')
        parts.append(f'<circle class="dot{" front" if i in on_front else ""}" cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="3.5" fill="{colour}"><title>{html.escape(tip)}</title></circle>')
        if i == chosen:
            parts.append(f'<circle class="chosen" cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" '
                         f'stroke="#2ca02c" stroke-width="2.5"><title>{html.escape(chosen_word + " " + tip)}'
                         '</title></circle>')
        if i in on_front or i in refs or i == chosen:
            parts.append(f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" font-size="10">{html.escape(p.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)

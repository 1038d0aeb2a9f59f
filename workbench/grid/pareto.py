"""Choosing among candidates scored on two things: the Pareto front of style against adherence,
the rule that picks one point of it, and the front as an inline SVG scatter for report.html.

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


def scatter_svg(points: list[Candidate], front: list[int], *, baseline: int, chosen: int,
                title: str, width: int = 640, height: int = 420) -> str:
    """Inline SVG: every candidate as a dot (x adherence, y style), the front joined by a line,
    the baseline as a square and the recommendation as a ring."""
    if not points:
        return ""
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
    for t in np.linspace(x0, x1, 5):
        parts.append(f'<text x="{px(t):.1f}" y="{height - bottom + 15}" font-size="10" '
                     f'text-anchor="middle">{t:.3g}</text>')
    for t in np.linspace(y0, y1, 5):
        parts.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{t:.3g}</text><line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" '
                     f'y2="{py(t):.1f}" stroke="#eee"/>')
    if len(front) > 1:
        path = " ".join(f"{px(points[i].adherence):.1f},{py(points[i].style):.1f}" for i in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    on_front = set(front)
    for i, p in enumerate(points):
        x, y = px(p.adherence), py(p.style)
        colour = "#d62728" if i in on_front else "#888"
        tip = f"{p.label}: style {p.style:.4f}, adherence {p.adherence:.2f}"
        if i == baseline:
            parts.append(f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="none" '
                         f'stroke="#1f77b4" stroke-width="2"><title>{html.escape("baseline " + tip)}'
                         '</title></rect>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                     f'<title>{html.escape(tip)}</title></circle>')
        if i == chosen:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#2ca02c" '
                         f'stroke-width="2.5"><title>{html.escape("recommended " + tip)}</title></circle>')
        if i in on_front or i in (baseline, chosen):
            parts.append(f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" font-size="10">{html.escape(p.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)

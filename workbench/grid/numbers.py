"""How the reports write numbers for people: one formatter for tables and verdicts, and axis ticks.

Why one module: the grid report (grid/report.py), the pick report (grid/pick_report.py) and the
merge-search report (grid/search_report.py) show score means and differences that are often tiny
(style similarities of two steps differ in the fourth decimal). A fixed number of decimals prints
a real difference as "+0.000" and ticks of a narrow axis as five equal labels; here a value below
1 gets enough decimals for `sig` significant digits, exact zero reads "0", and tick labels get as
many decimals as the tick step needs, so neighbouring ticks never read the same.
"""

from __future__ import annotations

import math

TINY = 1e-4  # below this (and not 0) a value is written in exponent form: 4.2e-05


def fmt(v, decimals: int = 3, *, sig: int = 3, sign: bool = False) -> str:
    """A number as text: "–" for none or not finite, "0" for exact zero, `decimals` decimals for
    |v| >= 1, and for |v| < 1 as many more as `sig` significant digits need. `sign`: a leading
    "+" on positive values (differences). Integers and other values are returned as str()."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:+d}" if sign and v > 0 else str(v)
    if not math.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    plus = "+" if sign else ""
    if abs(v) < TINY:
        return f"{v:{plus}.{sig}g}"
    d = decimals
    if abs(v) < 1:
        d = max(decimals, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{v:{plus}.{d}f}"


def signed(v: float, decimals: int) -> str:
    """A difference or interval end in a verdict sentence: "+1.3", "-0.040", "+0.0012": the
    verdict's decimals, and at least two significant digits below 1."""
    return fmt(v, decimals, sig=2, sign=True)


def ticks(lo: float, hi: float, n: int = 6) -> list[tuple[float, str]]:
    """(value, label) of axis ticks inside [lo, hi]: the finest step of 1, 2 or 5 times a power
    of ten that gives at most `n` ticks, labelled with the decimals that step needs (0.9862,
    0.9864, ... where a fixed format would print 0.986 on every tick)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [(lo, fmt(float(lo)))]
    exp = math.floor(math.log10((hi - lo) / max(n, 2)))
    for step in (m * 10.0 ** e for e in range(exp, exp + 3) for m in (1, 2, 5)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= n:
            break
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [(i * step, "0" if i == 0 else f"{i * step:.{decimals}f}") for i in range(first, last + 1)]

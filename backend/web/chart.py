"""The odometer-over-time chart, laid out on the server as SVG coordinates.

No script runs in the browser: :func:`odometer_chart` turns points into a polyline,
markers and axis labels, and a template draws them. Confirmations and rejected
records get their own markers; a chart of many points is thinned to at most
``max_points`` for the line, keeping every marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backend.web.dashboard_data import ChartPoint
from backend.web.render import iso, iso_date

WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 10, 10, 30, 40   # y labels sit inside the plot, above their grid lines
MAX_MARKERS = 300
MAX_DOTS = 60


@dataclass(frozen=True)
class Marker:
    x: int
    y: int
    kind: str          # confirmation | rejected
    label: str


@dataclass(frozen=True)
class Tick:
    pos: int
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    line: str                      # "x,y x,y …" for a polyline
    dots: tuple[tuple[int, int], ...]   # each accepted reading, when there are few
    markers: tuple[Marker, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    plot: tuple[int, int, int, int]   # left, top, right, bottom
    summary: str                   # for screen readers


def _nice_step(span: int, target: int = 5) -> int:
    raw = max(1, span // target)
    base = 1
    while base * 10 <= raw:
        base *= 10
    for mult in (1, 2, 5, 10):
        if base * mult >= raw:
            return base * mult
    return base * 10


def _thin(points: Sequence[ChartPoint], max_points: int) -> list[ChartPoint]:
    if len(points) <= max_points:
        return list(points)
    stride = -(-len(points) // max_points)
    kept = list(points[::stride])
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def odometer_chart(points: Sequence[ChartPoint], max_points: int = 600) -> Chart | None:
    """The chart for a device's points in seq order; None when there is nothing to draw."""
    if not points:
        return None
    points = sorted(points, key=lambda p: p.t)
    t0, t1 = points[0].t, points[-1].t
    accepted = [p for p in points if p.status == "accepted"]
    values = [p.odo_m for p in points]
    lo, hi = min(values), max(values)
    step_m = _nice_step(max(1000, hi - lo) // 1000) * 1000
    lo_axis = lo // step_m * step_m
    hi_axis = max(lo_axis + step_m, -(-hi // step_m) * step_m)
    x_span = max(1, t1 - t0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: int) -> int:
        return LEFT + (t - t0) * plot_w // x_span if t1 > t0 else LEFT + plot_w // 2

    def y(m: int) -> int:
        return TOP + plot_h - (m - lo_axis) * plot_h // (hi_axis - lo_axis)

    line = " ".join(f"{x(p.t)},{y(p.odo_m)}" for p in _thin(accepted, max_points))
    dots = tuple((x(p.t), y(p.odo_m)) for p in accepted) if len(accepted) <= MAX_DOTS else ()
    markers = []
    for p in points:
        when = iso(p.t) + (" (estimated)" if p.estimated else "")
        km = f"{p.odo_m // 1000:,} km"
        if p.status != "accepted":
            markers.append(Marker(x(p.t), y(p.odo_m), "rejected", f"rejected: {km} at {when}"))
        elif p.kind == "confirmation":
            markers.append(Marker(x(p.t), y(p.odo_m), "confirmation", f"confirmed {km} at {when}"))
    markers = markers[-MAX_MARKERS:]
    y_ticks = tuple(Tick(y(m), f"{m // 1000:,} km") for m in range(lo_axis, hi_axis + 1, step_m))
    label = iso_date if x_span >= 2 * 86_400_000 else (lambda t: iso(t)[5:16].replace("T", " "))
    count = 4 if t1 > t0 else 1
    x_ticks = tuple(Tick(x(t0 + x_span * i // max(1, count - 1)) if count > 1 else x(t0),
                         label(t0 + x_span * i // max(1, count - 1)) if count > 1 else label(t0))
                    for i in range(count))
    summary = (f"Odometer from {lo // 1000:,} km to {hi // 1000:,} km between {iso(t0)} and {iso(t1)}; "
               f"{sum(1 for m in markers if m.kind == 'confirmation')} confirmation(s), "
               f"{sum(1 for m in markers if m.kind == 'rejected')} rejected reading(s).")
    return Chart(WIDTH, HEIGHT, line, dots, tuple(markers), x_ticks, y_ticks,
                 (LEFT, TOP, WIDTH - RIGHT, TOP + plot_h), summary)

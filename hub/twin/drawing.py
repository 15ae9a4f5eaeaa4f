"""The twin picture: a device's parts drawn as data, coloured by health, rendered to SVG and PNG.

One geometry (:func:`layout`) in a fixed coordinate space (pixels of a ``WIDTH`` x ``HEIGHT``
canvas, y downwards, like SVG) feeds both renderers, so the web page (SVG, hover shows the reason)
and the board report (PNG through matplotlib's Agg backend) show the same picture.

Colour is never the only signal: each status also has its own pattern over the part (hatching
for "needs action", stripes for "keep an eye on", dots for "no data") and every part carries a
label chip with a symbol and the status in words. Colours are the Okabe-Ito palette, which people
with the common colour-vision deficiencies can tell apart.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from hub.twin.health import STATUS_WORDS, Component, DeviceHealth, Status

WIDTH, HEIGHT = 900, 600

COLOURS: dict[Status, str] = {
    Status.OK: "#009E73",  # Okabe-Ito bluish green
    Status.WATCH: "#E69F00",  # orange
    Status.ACT: "#D55E00",  # vermillion
    Status.UNKNOWN: "#BBBBBB",  # grey
}
SYMBOLS: dict[Status, str] = {Status.OK: "✓", Status.WATCH: "!", Status.ACT: "✕", Status.UNKNOWN: "?"}
INK = "#1F2933"
SCENERY_FILL, SCENERY_EDGE = "#F3F4F6", "#9AA5B1"


Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Rect:
    """A rectangle, optionally with rounded corners."""

    x: float
    y: float
    w: float
    h: float
    rx: float = 0.0

    def centre(self) -> Point:
        """Middle of the rectangle."""
        return self.x + self.w / 2, self.y + self.h / 2


@dataclass(frozen=True, slots=True)
class Circle:
    """A circle."""

    cx: float
    cy: float
    r: float


@dataclass(frozen=True, slots=True)
class Poly:
    """A closed polygon."""

    points: tuple[Point, ...]


@dataclass(frozen=True, slots=True)
class Pipe:
    """A pipe (or cable) along ``points``; ``arrows`` marks the flow direction on long runs."""

    points: tuple[Point, ...]
    width: float = 14.0
    arrows: bool = True


@dataclass(frozen=True, slots=True)
class Line:
    """A dark detail line (coil, impeller, fins): drawing only, not coloured by health."""

    points: tuple[Point, ...]
    width: float = 2.0
    closed: bool = False


Shape = Rect | Circle | Poly | Pipe


@dataclass(frozen=True, slots=True)
class Part:
    """A component's geometry: coloured shapes, detail lines and where its label chip sits."""

    id: str
    shapes: tuple[Shape, ...]
    chip: Point
    details: tuple[Line, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenery:
    """Context that has no health of its own (boiler casing, radiators, the building)."""

    shapes: tuple[Rect | Pipe, ...]
    label: str
    at: Point
    details: tuple[Line, ...] = ()


@dataclass(frozen=True, slots=True)
class Layout:
    """The whole picture of one kind of device."""

    parts: tuple[Part, ...]
    scenery: tuple[Scenery, ...] = field(default=())

    def part(self, cid: str) -> Part:
        """The part with id ``cid``."""
        return next(p for p in self.parts if p.id == cid)


def _zigzag(x0: float, x1: float, y0: float, y1: float, n: int) -> tuple[Point, ...]:
    step = (x1 - x0) / n
    return tuple((x0 + i * step, y0 if i % 2 == 0 else y1) for i in range(n + 1))


def _valve(cx: float, cy: float, s: float = 14.0) -> Poly:
    # Two triangles tip to tip: the usual drawing symbol of a valve.
    return Poly(((cx - s, cy - s), (cx + s, cy + s), (cx + s, cy - s), (cx - s, cy + s)))


_BOILER = Layout(
    scenery=(
        Scenery((Rect(40, 90, 330, 390, 14),), "Boiler", (58, 114)),
        Scenery((Rect(700, 200, 150, 170, 6),), "Radiators", (762, 392),
                tuple(Line(((x, 212), (x, 358)), 3) for x in range(716, 850, 16))),
    ),
    parts=(
        Part("flue", (Rect(180, 48, 50, 112),), (100, 62), (Line(((170, 48), (240, 48)), 5),)),
        Part("heat_exchanger", (Rect(90, 160, 230, 100, 10),), (205, 210),
             (Line(_zigzag(100, 310, 172, 248, 12), 2.5),)),
        Part("burner", (Rect(115, 320, 180, 36, 6),
                        *(Poly(((x - 14, 320), (x, 284), (x + 14, 320))) for x in (145, 185, 225, 265))),
             (205, 400)),
        Part("flow_pipe", (Pipe(((320, 185), (730, 185), (730, 200))),), (612, 160)),
        Part("return_pipe", (Pipe(((820, 370), (820, 455), (60, 455), (60, 235), (90, 235))),), (720, 505)),
        Part("relief_valve", (Pipe(((440, 185), (440, 118)), 8, False), _valve(440, 130)), (440, 88),
             (Line(((440, 116), (440, 100)), 2),)),
        Part("expansion_vessel", (Pipe(((460, 455), (460, 400)), 8, False), Rect(430, 300, 60, 100, 30)),
             (460, 272), (Line(((432, 350), (488, 350)), 2),)),
        Part("pump", (Circle(590, 455, 30),), (612, 395),
             (Line(((606, 441), (606, 469), (572, 455)), 2.5, True),)),
    ),
)

_METER = Layout(
    scenery=(
        Scenery((Pipe(((520, 260), (840, 260)), 10),), "To the building", (760, 232)),
    ),
    parts=(
        Part("supply", (Pipe(((60, 260), (300, 260)), 12),), (170, 232)),
        Part("meter", (Rect(300, 140, 220, 240, 16),), (410, 420),
             (Line(((330, 180), (490, 180), (490, 240), (330, 240)), 2.5, True),)),
        Part("tamper", (Circle(470, 330, 22),), (600, 340),
             (Line(((462, 330), (478, 330)), 3), Line(((470, 322), (470, 338)), 3))),
    ),
)

_TANK = Layout(
    parts=(
        Part("inlet", (Pipe(((60, 330), (320, 330))),), (180, 300)),
        Part("outlet", (Pipe(((580, 330), (840, 330))),), (720, 300)),
        Part("tank_relief", (Pipe(((450, 160), (450, 110)), 8, False), _valve(450, 96)), (450, 58)),
        Part("vessel", (Rect(320, 160, 260, 300, 70),), (450, 500)),
    ),
)

_GENERIC = Layout(parts=(Part("device", (Rect(300, 170, 300, 220, 16),), (450, 430)),))

LAYOUTS: dict[str, Layout] = {"boiler": _BOILER, "meter": _METER, "tank": _TANK, "generic": _GENERIC}


def layout(name: str) -> Layout:
    """The geometry of a layout (``boiler``, ``meter``, ``tank``, ``generic``)."""
    return LAYOUTS[name]


def _arrows(pipe: Pipe) -> list[tuple[Point, float]]:
    """Arrow positions and directions (radians) at the middle of each long run of a pipe."""
    out: list[tuple[Point, float]] = []
    if not pipe.arrows:
        return out
    for (x0, y0), (x1, y1) in zip(pipe.points, pipe.points[1:], strict=False):
        length = math.hypot(x1 - x0, y1 - y0)
        if length >= 120:
            out.append((((x0 + x1) / 2, (y0 + y1) / 2), math.atan2(y1 - y0, x1 - x0)))
    return out


def _arrow_points(at: Point, angle: float, size: float) -> tuple[Point, ...]:
    (x, y), c, s = at, math.cos(angle), math.sin(angle)
    tip = (x + c * size, y + s * size)
    back = (x - c * size * 0.7, y - s * size * 0.7)
    side = (s * size * 0.8, c * size * 0.8)
    return tip, (back[0] - side[0], back[1] + side[1]), (back[0] + side[0], back[1] - side[1])


def _chip_lines(c: Component) -> tuple[str, str]:
    second = STATUS_WORDS[c.status] + (f" · {c.reading}" if c.reading else "")
    return f"{SYMBOLS[c.status]} {c.label}", second


def _title(h: DeviceHealth) -> str:
    return f"{h.kind.capitalize()} {h.device}: {STATUS_WORDS[h.status]}"


# --- SVG ----------------------------------------------------------------------------------------

_SVG_STYLE = """
.twin-title{font:600 20px system-ui,-apple-system,'Segoe UI',sans-serif;fill:#1F2933}
.twin-summary{font:14px system-ui,-apple-system,'Segoe UI',sans-serif;fill:#3E4C59}
.twin-chip text{font:12px system-ui,-apple-system,'Segoe UI',sans-serif;fill:#1F2933}
.twin-chip .twin-chip-label{font-weight:600;font-size:13px}
.twin-scenery-label{font:italic 13px system-ui,-apple-system,'Segoe UI',sans-serif;fill:#52606D}
.twin-legend text{font:12px system-ui,-apple-system,'Segoe UI',sans-serif;fill:#1F2933}
.twin-component{cursor:help}
.twin-component:hover .twin-shape,.twin-component:focus .twin-shape{filter:brightness(1.08)}
.twin-component:hover .twin-chip rect,.twin-component:focus .twin-chip rect{stroke-width:2.5}
"""


def _svg_patterns() -> str:
    # Drawn over the status colour: the pattern alone tells the statuses apart in greyscale.
    return (
        '<pattern id="twin-pat-act" width="10" height="10" patternUnits="userSpaceOnUse">'
        '<path d="M0,0 L10,10 M10,0 L0,10" stroke="#1F2933" stroke-opacity="0.45" stroke-width="1.5"/></pattern>'
        '<pattern id="twin-pat-watch" width="10" height="10" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><path d="M0,0 L0,10" stroke="#1F2933" stroke-opacity="0.35" '
        'stroke-width="2"/></pattern>'
        '<pattern id="twin-pat-unknown" width="10" height="10" patternUnits="userSpaceOnUse">'
        '<circle cx="5" cy="5" r="1.6" fill="#1F2933" fill-opacity="0.45"/></pattern>'
    )


def _pts(points: Sequence[Point]) -> str:
    return " ".join(f"{x:g},{y:g}" for x, y in points)


def _svg_shape(s: Shape, fill: str, pattern: str | None) -> list[str]:
    out: list[str] = []
    if isinstance(s, Pipe):
        d = _pts(s.points)
        out.append(f'<polyline class="twin-pipe-edge" points="{d}" fill="none" stroke="{INK}" '
                   f'stroke-width="{s.width + 4:g}" stroke-linejoin="round"/>')
        out.append(f'<polyline class="twin-shape" points="{d}" fill="none" stroke="{fill}" '
                   f'stroke-width="{s.width:g}" stroke-linejoin="round"/>')
        if pattern:
            out.append(f'<polyline points="{d}" fill="none" stroke="url(#{pattern})" '
                       f'stroke-width="{s.width:g}" stroke-linejoin="round"/>')
        for at, angle in _arrows(s):
            out.append(f'<polygon class="twin-arrow" points="{_pts(_arrow_points(at, angle, s.width * 0.55))}" '
                       f'fill="#FFFFFF" stroke="{INK}" stroke-width="1"/>')
        return out
    if isinstance(s, Rect):
        geo = f'x="{s.x:g}" y="{s.y:g}" width="{s.w:g}" height="{s.h:g}" rx="{s.rx:g}"'
        tag = "rect"
    elif isinstance(s, Circle):
        geo, tag = f'cx="{s.cx:g}" cy="{s.cy:g}" r="{s.r:g}"', "circle"
    else:
        geo, tag = f'points="{_pts(s.points)}"', "polygon"
    out.append(f'<{tag} class="twin-shape" {geo} fill="{fill}" stroke="{INK}" stroke-width="2"/>')
    if pattern:
        out.append(f'<{tag} {geo} fill="url(#{pattern})" stroke="none"/>')
    return out


def _svg_line(line: Line) -> str:
    tag = "polygon" if line.closed else "polyline"
    return (f'<{tag} points="{_pts(line.points)}" fill="none" stroke="{INK}" stroke-width="{line.width:g}" '
            'stroke-linejoin="round" stroke-linecap="round"/>')


def _chip_width(lines: Sequence[str]) -> float:
    return max(len(t) for t in lines) * 7.6 + 18


def _svg_chip(at: Point, lines: tuple[str, str], edge: str) -> str:
    w, h = _chip_width(lines), 40
    x, y = at[0] - w / 2, at[1] - h / 2
    return (f'<g class="twin-chip"><rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h}" rx="8" fill="#FFFFFF" '
            f'fill-opacity="0.94" stroke="{edge}" stroke-width="1.5"/>'
            f'<text class="twin-chip-label" x="{at[0]:g}" y="{y + 16:g}" text-anchor="middle">{escape(lines[0])}</text>'
            f'<text x="{at[0]:g}" y="{y + 32:g}" text-anchor="middle">{escape(lines[1])}</text></g>')


def render_svg(health: DeviceHealth) -> str:
    """The picture of ``health`` as a standalone SVG document (inline colours, CSS classes for pages)."""
    geo = LAYOUTS[health.layout]
    by_id = {c.id: c for c in health.components}
    aria = _title(health) + ". " + health.summary
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" role="img" aria-label={quoteattr(aria)} class="twin twin-{health.layout}">',
           f"<title>{escape(aria)}</title>",
           f"<defs><style>{_SVG_STYLE}</style>{_svg_patterns()}</defs>",
           f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#FFFFFF"/>',
           f'<text class="twin-title" x="{WIDTH - 20}" y="30" text-anchor="end">{escape(_title(health))}</text>',
           f'<text class="twin-summary" x="{WIDTH - 20}" y="52" text-anchor="end">{escape(health.summary)}</text>']
    for sc in geo.scenery:
        out.append('<g class="twin-scenery">')
        for sh in sc.shapes:
            if isinstance(sh, Pipe):
                out.append(f'<polyline points="{_pts(sh.points)}" fill="none" stroke="{SCENERY_EDGE}" '
                           f'stroke-width="{sh.width:g}" stroke-linejoin="round"/>')
            else:
                out.append(f'<rect x="{sh.x:g}" y="{sh.y:g}" width="{sh.w:g}" height="{sh.h:g}" rx="{sh.rx:g}" '
                           f'fill="{SCENERY_FILL}" stroke="{SCENERY_EDGE}" stroke-width="2"/>')
        out.extend(_svg_line(d).replace(INK, SCENERY_EDGE) for d in sc.details)
        anchor = "start" if sc.label == "Boiler" else "middle"
        out.append(f'<text class="twin-scenery-label" x="{sc.at[0]:g}" y="{sc.at[1]:g}" '
                   f'text-anchor="{anchor}">{escape(sc.label)}</text></g>')
    # Pipes first so vessels, pumps and valves sit on top of them.
    for part in sorted(geo.parts, key=lambda p: not isinstance(p.shapes[0], Pipe)):
        c = by_id[part.id]
        colour = COLOURS[c.status]
        pattern = None if c.status == Status.OK else f"twin-pat-{c.status.value}"
        out.append(f'<g id="twin-{part.id}" class="twin-component twin-status-{c.status.value}" '
                   f'data-component="{part.id}" data-status="{c.status.value}" tabindex="0">')
        out.append(f"<title>{escape(f'{c.label}: {STATUS_WORDS[c.status]}. {c.reason}')}</title>")
        for s in part.shapes:
            out.extend(_svg_shape(s, colour, pattern))
        out.extend(_svg_line(d) for d in part.details)
        out.append(_svg_chip(part.chip, _chip_lines(c), colour))
        out.append("</g>")
    out.append(_svg_legend())
    out.append("</svg>")
    return "\n".join(out)


def _legend_items() -> list[tuple[Status, float]]:
    x, items = 20.0, []
    for st in (Status.OK, Status.WATCH, Status.ACT, Status.UNKNOWN):
        items.append((st, x))
        x += 40 + len(STATUS_WORDS[st]) * 7.5 + 24
    return items


def _svg_legend() -> str:
    y = HEIGHT - 34
    out = ['<g class="twin-legend">']
    for st, x in _legend_items():
        pattern = "" if st == Status.OK else f'<rect x="{x:g}" y="{y}" width="24" height="18" rx="3" ' \
                                              f'fill="url(#twin-pat-{st.value})"/>'
        out.append(f'<rect x="{x:g}" y="{y}" width="24" height="18" rx="3" fill="{COLOURS[st]}" stroke="{INK}"/>'
                   f'{pattern}<text x="{x + 32:g}" y="{y + 14}">{SYMBOLS[st]} {escape(STATUS_WORDS[st])}</text>')
    out.append("</g>")
    return "".join(out)


# --- PNG (matplotlib, Agg) ----------------------------------------------------------------------

_HATCH = {Status.OK: None, Status.WATCH: "//", Status.ACT: "xx", Status.UNKNOWN: ".."}
_PT = 0.72  # points per canvas pixel at 100 dpi


def render_png(health: DeviceHealth, scale: float = 1.0) -> bytes:
    """The picture of ``health`` as PNG (``WIDTH`` x ``HEIGHT`` pixels times ``scale``).

    CPU-bound: call it from async code through :func:`render_png_async`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle as MplCircle
    from matplotlib.patches import FancyBboxPatch, Polygon

    # Figure + Agg canvas directly, never pyplot: no global state, safe in worker threads.
    dpi = 100 * scale
    fig = Figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(HEIGHT, 0)
    ax.set_axis_off()

    def patch(s: Rect | Circle | Poly, face: str, edge: str, hatch: str | None, z: float) -> None:
        def make() -> FancyBboxPatch | MplCircle | Polygon:
            if isinstance(s, Rect):
                rounding = min(s.rx, s.w / 2, s.h / 2)
                return FancyBboxPatch((s.x, s.y), s.w, s.h, boxstyle=f"round,pad=0,rounding_size={rounding}")
            if isinstance(s, Circle):
                return MplCircle((s.cx, s.cy), s.r)
            return Polygon(s.points, closed=True)
        base = make()
        base.set(facecolor=face, edgecolor=edge, linewidth=2 * _PT, zorder=z)
        ax.add_patch(base)
        if hatch:
            over = make()
            over.set(facecolor="none", edgecolor=(0.12, 0.16, 0.2, 0.45), linewidth=0, hatch=hatch, zorder=z + 0.1)
            ax.add_patch(over)

    def polyline(points: Sequence[Point], colour: str, width: float, z: float, dashes: str = "-") -> None:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=colour, linewidth=width * _PT, solid_joinstyle="round", solid_capstyle="butt",
                linestyle=dashes, zorder=z)

    def line(d: Line, colour: str, z: float) -> None:
        pts = [*d.points, d.points[0]] if d.closed else list(d.points)
        polyline(pts, colour, d.width, z)

    for sc in LAYOUTS[health.layout].scenery:
        for sh in sc.shapes:
            if isinstance(sh, Pipe):
                polyline(sh.points, SCENERY_EDGE, sh.width, 1)
            else:
                patch(sh, SCENERY_FILL, SCENERY_EDGE, None, 1)
        for d in sc.details:
            line(d, SCENERY_EDGE, 1.5)
        ax.text(*sc.at, sc.label, ha="left" if sc.label == "Boiler" else "center", va="baseline",
                fontsize=13 * _PT, style="italic", color="#52606D", zorder=1.6, family="DejaVu Sans")

    by_id = {c.id: c for c in health.components}
    for part in LAYOUTS[health.layout].parts:
        c = by_id[part.id]
        colour = COLOURS[c.status]
        z = 2 if isinstance(part.shapes[0], Pipe) else 4
        for s in part.shapes:
            if isinstance(s, Pipe):
                polyline(s.points, INK, s.width + 4, z)
                polyline(s.points, colour, s.width, z + 0.1)
                if c.status in (Status.WATCH, Status.ACT):
                    # Pipes cannot be hatched: a dark dashed (act) or dotted (watch) centre line instead.
                    polyline(s.points, "#1F2933", 2, z + 0.2, "--" if c.status == Status.ACT else ":")
                for at, angle in _arrows(s):
                    ax.add_patch(Polygon(_arrow_points(at, angle, s.width * 0.55), closed=True, facecolor="white",
                                         edgecolor=INK, linewidth=1 * _PT, zorder=z + 0.3))
            else:
                patch(s, colour, INK, _HATCH[c.status], z)
        for d in part.details:
            line(d, INK, z + 0.5)
        first, second = _chip_lines(c)
        ax.text(part.chip[0], part.chip[1], f"{first}\n{second}", ha="center", va="center", fontsize=12 * _PT,
                color=INK, linespacing=1.4, zorder=6, family="DejaVu Sans",
                bbox={"boxstyle": "round,pad=0.45", "facecolor": "white", "alpha": 0.94, "edgecolor": colour,
                      "linewidth": 1.5 * _PT})

    ax.text(WIDTH - 20, 30, _title(health), ha="right", va="baseline", fontsize=20 * _PT, weight="bold",
            color=INK, zorder=7, family="DejaVu Sans")
    ax.text(WIDTH - 20, 52, health.summary, ha="right", va="baseline", fontsize=14 * _PT, color="#3E4C59",
            zorder=7, family="DejaVu Sans")
    y = HEIGHT - 34
    for st, x in _legend_items():
        patch(Rect(x, y, 24, 18, 3), COLOURS[st], INK, _HATCH[st], 7)
        ax.text(x + 32, y + 14, f"{SYMBOLS[st]} {STATUS_WORDS[st]}", ha="left", va="baseline", fontsize=12 * _PT,
                color=INK, zorder=7, family="DejaVu Sans")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


async def render_png_async(health: DeviceHealth, scale: float = 1.0) -> bytes:
    """:func:`render_png` in a worker thread, so drawing never blocks the event loop."""
    return await asyncio.to_thread(render_png, health, scale)

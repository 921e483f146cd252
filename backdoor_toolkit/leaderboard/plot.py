"""Plot: the BA-versus-ASR scatter, one panel per scenario, drawn with matplotlib.

The scatter shows the trade-off a ranked table hides (clean accuracy kept against attack success
left), one mark per defense and attack, with error bars of one std over seeds. Each scenario
(dataset, model, setting) gets its own panel with axes fitted to its marks, because numbers from
different settings are not comparable and a fixed 0–100 frame squeezes close results into one
blob. A defense keeps its colour and an attack its marker across panels.

matplotlib is an optional extra (`pip install 'backdoor-toolkit[plot]'`): the tables and exports
need none of it, so it is imported only when a scatter is drawn, and its absence is one line that
says how to install it (`require_matplotlib`).
"""

from __future__ import annotations

import html
import importlib.util
import io
import math
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import write_all_or_none
from ..errors import BdtkError
from .aggregation import CLEAN_MODEL, UNDEFENDED, Leaderboard, Point, reference_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
UNDEFENDED_COLOUR = "#555555"
REFERENCE_COLOURS = {UNDEFENDED: UNDEFENDED_COLOUR, CLEAN_MODEL: "#aaaaaa"}
SHAPES = ("o", "s", "^", "D", "v", "P", "X", "*")
"""matplotlib markers, one per attack (in name order, cycling)."""
INSTALL_HINT = "pip install 'backdoor-toolkit[plot]'"


class PlotUnavailableError(BdtkError):
    """matplotlib, which draws the scatter, is not installed."""


def matplotlib_available() -> bool:
    """Whether the scatter can be drawn here (matplotlib importable), without importing it."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules reads as absent
        return False


def require_matplotlib(what: str = "The BA-versus-ASR scatter") -> None:
    """Fail in one line that says how to install matplotlib, before any work, when it is missing."""
    if not matplotlib_available():
        # no brackets ("[plot]"): terminals render errors as rich markup, which would eat them
        raise PlotUnavailableError(
            f"{what} needs matplotlib: pip install matplotlib (or the plot extra of backdoor-toolkit)."
        )


def _styles(points: list[Point]) -> tuple[dict[str, str], dict[str, str]]:
    """Colour per defense (grey: undefended) and marker per attack, the same in every panel."""
    defenses = sorted({p.defense for p in points}, key=lambda d: (reference_order(d), d))
    attacks = sorted({p.attack for p in points})
    colour = {
        d: REFERENCE_COLOURS[d] if d in REFERENCE_COLOURS else PALETTE[i % len(PALETTE)]
        for i, d in enumerate(defenses)
    }
    return colour, {a: SHAPES[i % len(SHAPES)] for i, a in enumerate(attacks)}


def _limits(values: list[float], errors: list[float]) -> tuple[float, float]:
    """An axis range (in %) fitted to the marks and their error bars, padded, within [0, 100]."""
    low = min(v - e for v, e in zip(values, errors, strict=True))
    high = max(v + e for v, e in zip(values, errors, strict=True))
    pad = max(2.0, 0.08 * (high - low))
    return max(low - pad, -1.0), min(high + pad, 101.0)


@contextmanager
def _style(salt: str = "bdtk") -> Iterator[None]:
    """Deterministic, self-contained output: text stays text in SVG, and its ids do not change per
    run (`salt`: one per SVG of a page, so two SVGs never define the same id)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9}):
        yield


def scatter_figure(board: Leaderboard, scenarios: list[str] | None = None) -> Figure:
    """The scatter as a matplotlib Figure: one panel per scenario (all, or those named).

    Each mark gets the gid `point-N` (N: its index in `board.points()`), so that an SVG rendering
    can carry a tooltip per mark. Draw it inside `_style()` (as `scatter_svg` and `write_png` do)
    for their fonts and ids.
    """
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    points = board.points()
    colour, marker = _styles(points)
    wanted = scenarios if scenarios is not None else board.scenarios()
    panels = [(s, [(i, p) for i, p in enumerate(points) if p.scenario == s]) for s in wanted]
    panels = [(s, marks) for s, marks in panels if marks] or [("no scores to plot", [])]
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols + 2.2, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (scenario, marks) in zip(axes.flat, panels, strict=False):
        ax.set_title("\n".join(textwrap.wrap(scenario, 60)), loc="left", fontsize=9)
        ax.set_xlabel("clean accuracy BA (%) →")
        ax.set_ylabel("attack success rate ASR (%)")
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        if not marks:
            continue
        for index, p in marks:
            handle = ax.errorbar(
                100 * p.ba,
                100 * p.asr,
                xerr=None if p.ba_std is None else 100 * p.ba_std,
                yerr=None if p.asr_std is None else 100 * p.asr_std,
                fmt=marker[p.attack],
                color=colour[p.defense],
                markersize=7,
                markeredgecolor="white",
                markeredgewidth=0.6,
                elinewidth=0.8,
                alpha=0.9,
            )
            handle.lines[0].set_gid(f"point-{index}")  # the marker, not its bars
        ba = [100 * p.ba for _, p in marks]
        asr = [100 * p.asr for _, p in marks]
        ax.set_xlim(*_limits(ba, [100 * (p.ba_std or 0.0) for _, p in marks]))
        ax.set_ylim(*_limits(asr, [100 * (p.asr_std or 0.0) for _, p in marks]))
    legend = [
        Line2D([], [], linestyle="", marker="o", color=c, markersize=7, label=d) for d, c in colour.items()
    ] + [
        Line2D([], [], linestyle="", marker=m, color="#333333", fillstyle="none", label=f"attack {a}")
        for a, m in marker.items()
    ]
    if legend:
        fig.legend(
            handles=legend,
            loc="outside right upper",
            frameon=False,
            title="best: bottom right\nbars: ±1 std over seeds",
            title_fontsize=8,
            alignment="left",
        )
    return fig


def _tooltip(p: Point) -> str:
    return f"{p.defense} vs {p.attack}: BA {100 * p.ba:.1f}%, ASR {100 * p.asr:.1f}%"


def scatter_svg(board: Leaderboard, scenario: str | None = None) -> str:
    """The scatter (of one scenario, or all) as an `<svg>` element to inline in an HTML page.

    Self-contained: text stays text, markers are defined inside it, each mark has a tooltip, and
    the XML prologue, namespace declarations and metadata (which name external URLs) are dropped,
    as an inline SVG in HTML needs none of them.
    """
    buffer = io.StringIO()
    with _style(f"bdtk {scenario or ''}"):
        fig = scatter_figure(board, None if scenario is None else [scenario])
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r"<!--.*?-->\s*", "", svg, flags=re.S)
    for index, p in enumerate(board.points()):
        svg = svg.replace(
            f'<g id="point-{index}">', f'<g id="point-{index}"><title>{html.escape(_tooltip(p))}</title>', 1
        )
    return svg.strip()


def scatter_png(board: Leaderboard, dpi: int = 150) -> bytes:
    """The scatter of every scenario as PNG bytes (rendered in memory, so a set of exports can be
    written all or none)."""
    buffer = io.BytesIO()
    with _style():
        fig = scatter_figure(board)
        fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_png(board: Leaderboard, path: Path, dpi: int = 150) -> None:
    """The scatter of every scenario as a PNG file, replaced atomically."""
    write_all_or_none({path: scatter_png(board, dpi)})

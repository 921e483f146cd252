"""Plot: the BA-versus-ASR scatter, drawn as inline SVG and as a PNG from one layout.

The scatter shows the trade-off a ranked table hides (clean accuracy kept against attack success
left), one mark per defense and attack. Both drawings come from one computed layout so the HTML
page's SVG and the exported PNG never disagree, and the PNG is drawn with Pillow so that no
plotting library is needed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aggregation import UNDEFENDED, Leaderboard

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
SHAPES = ("circle", "square", "triangle", "diamond")
OUTLINE = "outline"  # legend markers for attacks: shape only, no defense colour


@dataclass
class _Layout:
    width: int
    height: int
    box: tuple[int, int, int, int]  # left, top, right, bottom of the plot area
    marks: list[tuple[float, float, str, str, str]]  # x, y, colour, shape, tooltip
    legend: list[tuple[str, str, str]]  # text, colour, shape
    ticks: list[tuple[float, int, str]]  # x or y pixel, 0=x-axis / 1=y-axis, label


def _layout(board: Leaderboard, width: int = 720, height: int = 460) -> _Layout:
    left, top, right, bottom = 64, 24, width - 190, height - 56
    points = board.points()
    defenses = sorted({d for _, d, _, _ in points}, key=lambda d: (d != UNDEFENDED, d))
    attacks = sorted({a for a, _, _, _ in points})
    colour = {
        d: ("#555555" if d == UNDEFENDED else PALETTE[i % len(PALETTE)]) for i, d in enumerate(defenses)
    }
    shape = {a: SHAPES[i % len(SHAPES)] for i, a in enumerate(attacks)}

    def px(ba: float) -> float:
        return left + ba * (right - left)

    def py(asr: float) -> float:
        return bottom - asr * (bottom - top)

    marks = [
        (px(ba), py(asr), colour[d], shape[a], f"{d} vs {a}: BA {100 * ba:.1f}%, ASR {100 * asr:.1f}%")
        for a, d, ba, asr in points
    ]
    legend = [(d, colour[d], "circle") for d in defenses] + [
        (f"attack {a}", OUTLINE, shape[a]) for a in attacks
    ]
    ticks = [(px(v / 100), 0, str(v)) for v in range(0, 101, 20)] + [
        (py(v / 100), 1, str(v)) for v in range(0, 101, 20)
    ]
    return _Layout(width, height, (left, top, right, bottom), marks, legend, ticks)


def _svg_mark(x: float, y: float, fill: str, shape: str, r: float = 6) -> tuple[str, str]:
    """The opening of a marker element (left open for children) and its tag name."""
    if fill == OUTLINE:
        fill = 'none" stroke="#333" stroke-width="1.5'
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{fill}"', "rect"
    if shape in ("triangle", "diamond"):
        pts = (
            [(x, y - r), (x + r, y + r), (x - r, y + r)]
            if shape == "triangle"
            else [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
        )
        return f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="{fill}"', "polygon"
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}"', "circle"


def scatter_svg(board: Leaderboard) -> str:
    """The scatter as inline SVG (no external references): BA on x, ASR on y, both in %."""
    lay = _layout(board)
    left, top, right, bottom = lay.box
    parts = [
        f'<svg viewBox="0 0 {lay.width} {lay.height}" width="{lay.width}" height="{lay.height}" role="img" '
        'aria-label="BA versus ASR" font-family="sans-serif" font-size="12">',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
        'fill="none" stroke="#999"/>',
    ]
    for pos, axis, label in lay.ticks:
        if axis == 0:
            parts.append(f'<line x1="{pos:.1f}" y1="{top}" x2="{pos:.1f}" y2="{bottom}" stroke="#eee"/>')
            parts.append(f'<text x="{pos:.1f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
        else:
            parts.append(f'<line x1="{left}" y1="{pos:.1f}" x2="{right}" y2="{pos:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 8}" y="{pos + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(
        f'<text x="{(left + right) / 2}" y="{lay.height - 14}" text-anchor="middle">'
        "clean accuracy BA (%) →</text>"
    )
    parts.append(
        f'<text transform="translate(18 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
        "attack success rate ASR (%) →</text>"
    )
    for x, y, fill, shape, tip in lay.marks:
        element, tag = _svg_mark(x, y, fill, shape)
        parts.append(f'{element} fill-opacity="0.85"><title>{html.escape(tip)}</title></{tag}>')
    for i, (text, fill, shape) in enumerate(lay.legend):
        y = top + 10 + 20 * i
        parts.append(_svg_mark(right + 24, y, fill, shape, r=5)[0] + "/>")
        parts.append(f'<text x="{right + 36}" y="{y + 4}">{html.escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_png(board: Leaderboard, path: Path) -> None:
    """The same scatter as a PNG, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    scale = 2  # draw at twice the size for a crisp image
    lay = _layout(board)
    image = Image.new("RGB", (lay.width * scale, lay.height * scale), "white")
    draw = ImageDraw.Draw(image)
    try:
        font: Any = ImageFont.load_default(size=12 * scale)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = (v * scale for v in lay.box)
    for pos, axis, label in lay.ticks:
        p = pos * scale
        if axis == 0:
            draw.line([(p, top), (p, bottom)], fill="#eeeeee", width=scale)
            draw.text((p, bottom + 4 * scale), label, fill="black", font=font, anchor="mt")
        else:
            draw.line([(left, p), (right, p)], fill="#eeeeee", width=scale)
            draw.text((left - 8 * scale, p), label, fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="#999999", width=scale)
    draw.text(
        ((left + right) / 2, (lay.height - 14) * scale),
        "clean accuracy BA (%)",
        fill="black",
        font=font,
        anchor="mb",
    )
    caption = Image.new("RGB", (int(bottom - top), 16 * scale), "white")
    ImageDraw.Draw(caption).text(
        (caption.width / 2, 0), "attack success rate ASR (%)", fill="black", font=font, anchor="mt"
    )
    image.paste(caption.rotate(90, expand=True), (4 * scale, int(top)))

    def mark(x: float, y: float, colour: str, shape: str, r: float) -> None:
        fill, outline = (None, "#333333") if colour == OUTLINE else (colour, None)
        if shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=scale)
        elif shape == "triangle":
            draw.polygon(
                [(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill, outline=outline, width=scale
            )
        elif shape == "diamond":
            draw.polygon(
                [(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill, outline=outline, width=scale
            )
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=scale)

    for x, y, fill, shape, _ in lay.marks:
        mark(x * scale, y * scale, fill, shape, 6 * scale)
    for i, (text, fill, shape) in enumerate(lay.legend):
        y = (lay.box[1] + 10 + 20 * i) * scale
        mark(right + 24 * scale, y, fill, shape, 5 * scale)
        draw.text((right + 36 * scale, y), text, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")

"""Leaderboards: views derived from the result store, never a source of truth of their own.

Rows are grouped by scenario (dataset, model and the run setting: sizes, training, clean
budget), then by attack and defense (a `NAME:PRESET` apart from `NAME`); each metric is a mean ±
sample std over seeds. Defenses are ranked per attack and overall (every attack and seed pooled)
by one metric, in the direction that metric declares (`METRICS[...].higher_is_better`), so no
ranking rule is hard-coded here. BA drop is derived per seed against the undefended model of the
same attack and seed.
"""

from __future__ import annotations

import csv
import html
import io
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from .config import config_hash
from .errors import BdtkError, UnknownNameError
from .metrics import METRICS, MetricInfo
from .results import CellResult

DERIVED = {
    "ba_drop": MetricInfo("BA drop", False, "clean accuracy lost against the undefended model, same seed"),
}
COLUMNS = ("der", "ba_drop", "asr", "ra", "ba", "seconds")
PERCENT = {"ba_drop", "asr", "ra", "ba"}
UNDEFENDED = "none"


def metric_info(name: str) -> MetricInfo:
    info = METRICS.get(name) or DERIVED.get(name)
    if info is None:
        raise UnknownNameError("metric", name, list(COLUMNS))
    return info


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std is None with fewer than two)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(None, None, 0)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, metric: str) -> str:
        if self.mean is None:
            return "—"
        scale, digits = (100.0, 1) if metric in PERCENT else (1.0, 3 if metric == "der" else 1)
        out = f"{self.mean * scale:.{digits}f}"
        return out if self.std is None else f"{out} ± {self.std * scale:.{digits}f}"


@dataclass
class Entry:
    defense: str
    rank: int | None
    seeds: int
    failed: int
    stats: dict[str, Stat]
    errors: list[str] = field(default_factory=list)


@dataclass
class Board:
    """One ranking: a scenario and an attack, or the scenario overall (attack None)."""

    dataset: str
    model: str
    setting: str
    attack: str | None
    entries: list[Entry]

    @property
    def title(self) -> str:
        scope = f"attack {self.attack}" if self.attack else "overall (all attacks)"
        return f"{self.dataset} · {self.model} · {self.setting} — {scope}"


@dataclass
class Leaderboard:
    rank_by: str
    boards: list[Board]

    def points(self) -> list[tuple[str, str, float, float]]:
        """(attack, defense, BA, ASR) for each per-attack entry with numbers, for the scatter plot."""
        out = []
        for board in self.boards:
            if board.attack is None:
                continue
            for e in board.entries:
                ba, asr = e.stats["ba"].mean, e.stats["asr"].mean
                if ba is not None and asr is not None:
                    out.append((board.attack, e.defense, ba, asr))
        return out


def describe_setting(setting: dict[str, Any]) -> str:
    if not setting:
        return "setting not recorded"
    training = setting.get("training", {})
    sizes = f"train {setting.get('train_size') or 'all'}/test {setting.get('test_size') or 'all'}"
    return f"{sizes}, {training.get('epochs', '?')} epochs, clean {setting.get('clean_ratio', '?')}"


def _labels(names: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """Each row's `NAME` or `NAME:PRESET`, with its config hash appended where that label ran with
    several configs. A preset is a label of its own, so `mcldef:paper` never pools with `mcldef`."""
    variants: dict[str, set[str]] = defaultdict(set)
    for name, config in zip(names, configs, strict=True):
        variants[name].add(config_hash(config))
    return [
        name + (f"[{config_hash(config)[:6]}]" if len(variants[name]) > 1 else "")
        for name, config in zip(names, configs, strict=True)
    ]


@dataclass
class _Cell:
    attack: str
    defense: str
    row: CellResult


def _entries(
    cells: dict[str, list[_Cell]], base_ba: dict[tuple[str, int], float], rank_by: str
) -> list[Entry]:
    entries = []
    for defense, group in cells.items():
        ok = [c for c in group if c.row.status == "ok"]
        values: dict[str, list[float]] = {m: [] for m in COLUMNS}
        for c in ok:
            for m in ("der", "asr", "ra", "ba"):
                v = getattr(c.row, m)
                if v is not None and v == v:  # NaN (no non-target test image) is left out
                    values[m].append(v)
            if defense != UNDEFENDED and c.row.seconds is not None:
                values["seconds"].append(c.row.seconds)
            base = base_ba.get((c.attack, c.row.seed))
            if base is not None and c.row.ba is not None:
                values["ba_drop"].append(base - c.row.ba)
        failed = [c.row for c in group if c.row.status == "failed"]
        entries.append(
            Entry(
                defense,
                None,
                len({(c.attack, c.row.seed) for c in ok}),
                len(failed),
                {m: Stat.of(v) for m, v in values.items()},
                sorted({r.error for r in failed}),
            )
        )
    sign = -1.0 if metric_info(rank_by).higher_is_better else 1.0
    ranked = [e for e in entries if e.defense != UNDEFENDED and e.stats[rank_by].mean is not None]
    ranked.sort(key=lambda e: (sign * (e.stats[rank_by].mean or 0.0), e.defense))
    for position, e in enumerate(ranked, start=1):
        e.rank = position
    rest = sorted((e for e in entries if e.rank is None), key=lambda e: (e.defense != UNDEFENDED, e.defense))
    return ranked + rest


def build_leaderboard(rows: list[CellResult], rank_by: str = "der") -> Leaderboard:
    """Group stored cells into per-attack and overall boards for each scenario."""
    if rank_by not in COLUMNS:
        raise BdtkError(f"Cannot rank by {rank_by!r}; choose one of {', '.join(COLUMNS)}.")
    cells = [
        _Cell(a, d, r)
        for a, d, r in zip(
            _labels([r.attack_label for r in rows], [r.attack_config for r in rows]),
            _labels([r.defense_label for r in rows], [r.defense_config for r in rows]),
            rows,
            strict=True,
        )
    ]
    scenarios: dict[tuple[str, str, str], list[_Cell]] = defaultdict(list)
    described: dict[str, str] = {}
    for c in cells:
        key = config_hash(c.row.setting)
        described[key] = describe_setting(c.row.setting)
        scenarios[(c.row.dataset, c.row.model, key)].append(c)
    boards: list[Board] = []
    for (dataset, model, key), group in sorted(scenarios.items()):
        base_ba = {
            (c.attack, c.row.seed): c.row.ba
            for c in group
            if c.defense == UNDEFENDED and c.row.status == "ok" and c.row.ba is not None
        }
        by_attack: dict[str, dict[str, list[_Cell]]] = defaultdict(lambda: defaultdict(list))
        overall: dict[str, list[_Cell]] = defaultdict(list)
        for c in group:
            by_attack[c.attack][c.defense].append(c)
            overall[c.defense].append(c)
        for attack in sorted(by_attack):
            boards.append(
                Board(dataset, model, described[key], attack, _entries(by_attack[attack], base_ba, rank_by))
            )
        boards.append(Board(dataset, model, described[key], None, _entries(overall, base_ba, rank_by)))
    return Leaderboard(rank_by, boards)


# --- views ------------------------------------------------------------------------------------


def column_header(metric: str) -> str:
    info = metric_info(metric)
    unit = (
        " (pp)" if metric == "ba_drop" else " %" if metric in PERCENT else " s" if metric == "seconds" else ""
    )
    return f"{info.label}{unit} {'↑' if info.higher_is_better else '↓'}"


def _cells(entry: Entry) -> list[str]:
    rank = "—" if entry.rank is None else str(entry.rank)
    failed = str(entry.failed) if entry.failed else ""
    return [rank, entry.defense, *(entry.stats[m].text(m) for m in COLUMNS), str(entry.seeds), failed]


def _headers() -> list[str]:
    return ["rank", "defense", *(column_header(m) for m in COLUMNS), "seeds", "failed"]


def to_rich(board: Leaderboard) -> list[Table]:
    tables = []
    for b in board.boards:
        table = Table(title=b.title, title_justify="left")
        for i, name in enumerate(_headers()):
            table.add_column(name, justify="left" if i == 1 else "right")
        for e in b.entries:
            style = "dim" if e.defense == UNDEFENDED else None
            table.add_row(*_cells(e), style=style)
        tables.append(table)
    return tables


def _note(board: Leaderboard) -> str:
    info = metric_info(board.rank_by)
    direction = "higher" if info.higher_is_better else "lower"
    return (
        f"Ranked by {info.label} ({direction} is better); mean ± std over seeds; `none` is the undefended "
        "model (not ranked). BA drop is in percentage points against the undefended model of the same seed."
    )


def to_markdown(board: Leaderboard) -> str:
    out = [_note(board), ""]
    for b in board.boards:
        out += [f"#### {b.title}", "", "| " + " | ".join(_headers()) + " |"]
        out.append("|" + "|".join("---" if i == 1 else "---:" for i in range(len(_headers()))) + "|")
        out += ["| " + " | ".join(_cells(e)) + " |" for e in b.entries]
        out.append("")
    return "\n".join(out)


def _flat(board: Leaderboard) -> list[dict[str, Any]]:
    rows = []
    for b in board.boards:
        for e in b.entries:
            row: dict[str, Any] = {
                "dataset": b.dataset,
                "model": b.model,
                "setting": b.setting,
                "attack": b.attack or "all",
                "defense": e.defense,
                "rank": e.rank,
                "seeds": e.seeds,
                "failed": e.failed,
            }
            for m in COLUMNS:
                row[f"{m}_mean"], row[f"{m}_std"] = e.stats[m].mean, e.stats[m].std
            rows.append(row)
    return rows


def to_csv(board: Leaderboard) -> str:
    """One row per (scenario, attack or `all`, defense); metrics as fractions and seconds."""
    buffer = io.StringIO()
    rows = _flat(board)
    fields = list(rows[0]) if rows else ["dataset", "model", "setting", "attack", "defense", "rank"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(board: Leaderboard) -> str:
    payload = {
        "rank_by": board.rank_by,
        "metrics": {
            m: {"label": metric_info(m).label, "higher_is_better": metric_info(m).higher_is_better}
            for m in COLUMNS
        },
        "boards": [
            {
                "dataset": b.dataset,
                "model": b.model,
                "setting": b.setting,
                "attack": b.attack,
                "entries": [
                    {
                        "defense": e.defense,
                        "rank": e.rank,
                        "seeds": e.seeds,
                        "failed": e.failed,
                        "errors": e.errors,
                        "metrics": {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in e.stats.items()},
                    }
                    for e in b.entries
                ],
            }
            for b in board.boards
        ],
    }
    return json.dumps(payload, indent=2)


# --- the BA-versus-ASR scatter (drawn as SVG and as PNG from one layout) ----------------------

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


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.undefended td { color: #777; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
"""


def to_html(board: Leaderboard, title: str = "bdtk leaderboard") -> str:
    """A self-contained page (inline CSS and SVG, no scripts or external URLs): opens offline."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(_note(board))}</p>", scatter_svg(board)]
    for b in board.boards:
        rows = []
        for e in b.entries:
            css = ' class="undefended"' if e.defense == UNDEFENDED else ""
            rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(e)) + "</tr>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _headers())
        body.append(
            f"<table><caption>{html.escape(b.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


EXPORTS = {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}


def export(board: Leaderboard, out_dir: Path, stem: str = "leaderboard") -> list[Path]:
    """Write Markdown, CSV, JSON, HTML and the PNG scatter into `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, render in EXPORTS.items():
        path = out_dir / f"{stem}.{suffix}"
        path.write_text(render(board))
        written.append(path)
    png = out_dir / f"{stem}.png"
    write_png(board, png)
    return [*written, png]

"""Tables and exports: the board as rich tables, Markdown, CSV, JSON and a self-contained HTML page.

These are the text renderings of one `Leaderboard` (built in `aggregation`), kept apart from it so
that a new format never touches how rows are grouped and ranked. All tables share one column
layout (`column_header`, the cells of each entry); the HTML page embeds the SVG scatter from
`plot`, and `export` writes every format plus the PNG scatter into one folder.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from .aggregation import COLUMNS, PERCENT, UNDEFENDED, Entry, Leaderboard, metric_info
from .plot import scatter_svg, write_png


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

"""Tables and exports: the board as rich tables, Markdown, CSV, JSON and a self-contained HTML page.

These are the text renderings of one `Leaderboard` (built in `aggregation`), kept apart from it so
that a new format never touches how rows are grouped and ranked. All tables share one column
layout (`column_header`, the cells of each entry; optional columns such as the re-tuned ASR only
when some row has a value); the terminal tables use short headers and, on a narrow terminal, put
each std under its mean, so that 80 columns show every number whole. The HTML page embeds each
scenario's SVG scatter from `plot` and a small inline script for sorting and filtering, and
`export` writes every format plus the PNG scatter (when matplotlib is installed) into one folder.
"""

from __future__ import annotations

import csv
import html
import io
import re
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from ..artifacts import json_text, write_all_or_none
from .aggregation import (
    CLEAN_MODEL,
    COLUMNS,
    PERCENT,
    REFERENCE_ROWS,
    Board,
    Entry,
    Leaderboard,
    Stat,
    describe_gaps,
    metric_info,
    reference_order,
)
from .plot import INSTALL_HINT, matplotlib_available, scatter_png, scatter_svg


def column_header(metric: str) -> str:
    info = metric_info(metric)
    unit = (
        " (pp)" if metric == "ba_drop" else " %" if metric in PERCENT else " s" if metric == "seconds" else ""
    )
    return f"{info.label}{unit} {'↑' if info.higher_is_better else '↓'}"


def _cells(entry: Entry, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    rank = "—" if entry.rank is None else str(entry.rank)
    failed = str(entry.failed) if entry.failed else ""
    return [rank, entry.defense, *(entry.stats[m].text(m) for m in columns), str(entry.seeds), failed]


def _headers(columns: tuple[str, ...] = COLUMNS) -> list[str]:
    return ["rank", "defense", *(column_header(m) for m in columns), "seeds", "failed"]


SHORT = {"der": "DER", "ba_drop": "ΔBA", "asr": "ASR", "asr_retuned": "ASR rt", "ra": "RA", "ba": "BA"}
"""Terminal headers: the full ones ("BA drop (pp) ↓") would not fit 80 columns."""


def short_header(metric: str) -> str:
    info = metric_info(metric)
    return f"{SHORT.get(metric, info.label)} {'↑' if info.higher_is_better else '↓'}"


def _stacked(stat: Stat, metric: str) -> str:
    """`mean ± std` as two lines, mean above `±std`: half the width for a narrow terminal."""
    mean, _, std = stat.text(metric).partition(" ± ")
    return f"{mean}\n±{std}" if std else mean


def _legend(columns: tuple[str, ...], clean_reference: bool = False) -> str:
    parts = ["% except DER and time (s)", "ΔBA: BA drop in pp against the undefended model"]
    if "asr_retuned" in columns:
        parts.append("ASR rt: ASR after the re-tuning attack")
    if clean_reference:
        parts.append(f"{CLEAN_MODEL}: a never-backdoored model shown the same trigger (the floor)")
    return "; ".join([*parts, "n: seeds"])


def to_rich(board: Leaderboard, width: int | None = None) -> list[Table]:
    """One rich table per board, readable at `width` columns (default: unlimited).

    Headers are short (the legend below each table says what they mean) and never cut. Where the
    one-line `mean ± std` cells would not fit `width`, each std goes under its mean and each
    header's arrow under its name, which halves the widest columns; defense names keep their
    width (up to 24 characters; a longer one folds onto a second line rather than ending in "…").
    """
    columns = board.columns()
    failures = any(e.failed for b in board.boards for e in b.entries)
    entries = [e for b in board.boards for e in b.entries]

    def headers(stacked: bool) -> list[str]:
        names = [short_header(m) for m in columns]
        if stacked:
            names = [name.replace(" ↑", "\n↑").replace(" ↓", "\n↓") for name in names]
        return ["#", "defense", *names, "n", *(["failed"] if failures else [])]

    def row(e: Entry, stacked: bool) -> list[str]:
        stats = [_stacked(e.stats[m], m) if stacked else e.stats[m].text(m) for m in columns]
        rank = "—" if e.rank is None else str(e.rank)
        return [rank, e.defense, *stats, str(e.seeds), *([str(e.failed or "")] if failures else [])]

    def needed(stacked: bool) -> int:
        texts = [headers(stacked)] + [row(e, stacked) for e in entries]
        widest = [
            max(len(line) for t in texts for line in t[i].splitlines() or [""]) for i in range(len(texts[0]))
        ]
        return sum(widest) + 2 * len(widest)  # one space of padding either side

    stacked = width is not None and needed(False) > width
    name_width = min(24, max((len(e.defense) for e in entries), default=7))
    tables = []
    for b in board.boards:
        table = Table(
            title=b.title,
            title_justify="left",
            caption=_legend(columns, any(e.defense == CLEAN_MODEL for e in b.entries)),
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for i, name in enumerate(headers(stacked)):
            if i == 1:
                table.add_column(name, justify="left", overflow="fold", min_width=name_width)
            else:
                table.add_column(name, justify="right", overflow="fold")
        for e in b.entries:
            table.add_row(*row(e, stacked), style="dim" if e.defense in REFERENCE_ROWS else None)
        tables.append(table)
    return tables


def _note(board: Leaderboard) -> str:
    info = metric_info(board.rank_by)
    direction = "higher" if info.higher_is_better else "lower"
    note = (
        f"Ranked by {info.label} ({direction} is better); mean ± std over seeds; `none` is the undefended "
        "model, `clean-model` a never-backdoored one shown the same trigger (the floor ASR is read against; "
        "neither is ranked). BA drop is in percentage points against the undefended model of the same seed."
    )
    if "asr_retuned" in board.columns():
        note += (
            " ASR retuned: the ASR after the re-tuning attack (a brief fine-tune on a few poisoned samples "
            "mixed with clean ones); for `none`, the backdoored model re-tuned, the reference."
        )
    return note


def to_markdown(board: Leaderboard) -> str:
    out = [_note(board), ""]
    columns = board.columns()
    headers = _headers(columns)
    for scenario in board.scenarios():
        for b in board.boards:
            if b.scenario != scenario:
                continue
            out += [f"#### {b.title}", "", "| " + " | ".join(headers) + " |"]
            out.append("|" + "|".join("---" if i == 1 else "---:" for i in range(len(headers))) + "|")
            out += ["| " + " | ".join(_cells(e, columns)) + " |" for e in b.entries]
            out.append("")
        gaps = describe_gaps(board.gaps, scenario)
        if gaps:
            out += [f"#### {scenario} — {GAPS_TITLE}", "", *(f"- {line}" for line in gaps), ""]
    return "\n".join(out)


GAPS_TITLE = "missing and failed cells"


def gaps_summary(board: Leaderboard, limit: int = 8) -> list[str]:
    """For the terminal: the gap lines of every scenario, at most `limit`, then how many more."""
    lines = [f"{s}: {line}" for s in board.scenarios() for line in describe_gaps(board.gaps, s)]
    if not lines:
        return []
    failed = sum(g.failed for g in board.gaps)
    head = f"{len(board.gaps) - failed} cells missing, {failed} failed (means are over the cells present):"
    rest = (
        [f"… and {len(lines) - limit} more lines (--markdown lists them all)"] if len(lines) > limit else []
    )
    return [head, *lines[:limit], *rest]


def _flat(board: Leaderboard) -> list[dict[str, Any]]:
    rows = []
    for b in board.boards:
        for e in b.entries:
            row: dict[str, Any] = {
                "dataset": b.dataset,
                "model": b.model,
                "setting": b.setting,
                "setting_hash": b.setting_hash,
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
                "setting_hash": b.setting_hash,
                "setting_fields": b.setting_fields,
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
        "gaps": [
            {
                "scenario": g.scenario,
                "attack": g.attack,
                "seed": g.seed,
                "defense": g.defense,
                "status": "failed" if g.failed else "missing",
                "reason": g.reason,
            }
            for g in board.gaps
        ],
    }
    return json_text(payload)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 2em; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:nth-child(2), td:nth-child(2) { text-align: left; }
th button { font: inherit; font-weight: 600; border: 0; background: none; padding: 0; cursor: pointer; }
th[aria-sort=ascending] button::after { content: " ▲"; }
th[aria-sort=descending] button::after { content: " ▼"; }
tr.undefended td { color: #777; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
code { font-family: ui-monospace, monospace; background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.filters { display: flex; gap: 1.5em; margin: 1em 0; }
.scatter svg { max-width: 100%; height: auto; }
.note { color: #666; font-size: 13px; }
"""

# Sorting and filtering, inline so the page still opens offline. Missing values ("—") sort last
# either way; a click on a header sorts by it, a second click reverses the order.
_SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-value');
    if (v === null) { return cell.textContent.trim().toLowerCase(); }
    return v === '' ? null : parseFloat(v);
  }
  document.querySelectorAll('table.board').forEach(function (table) {
    table.querySelectorAll('thead th').forEach(function (th, column) {
      th.querySelector('button').addEventListener('click', function () {
        var down = th.getAttribute('aria-sort') === 'ascending';
        table.querySelectorAll('thead th').forEach(function (h) { h.setAttribute('aria-sort', 'none'); });
        th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[column]), y = key(b.cells[column]);
          if (x === null || y === null) { return (x === null) - (y === null); }
          var order = x < y ? -1 : x > y ? 1 : 0;
          return down ? -order : order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  function filter() {
    var attack = document.getElementById('filter-attack').value;
    var defense = document.getElementById('filter-defense').value;
    document.querySelectorAll('table.board').forEach(function (table) {
      table.hidden = attack !== '' && table.getAttribute('data-attack') !== attack;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        row.hidden = defense !== '' && row.getAttribute('data-defense') !== defense;
      });
    });
  }
  document.getElementById('filter-attack').addEventListener('change', filter);
  document.getElementById('filter-defense').addEventListener('change', filter);
})();
"""

_OVERALL = "(overall)"


def _inline_code(text: str) -> str:
    """Escape `text` for HTML, rendering Markdown's `code` spans as <code> (never as backticks)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _select(name: str, label: str, values: list[str]) -> str:
    shown = {_OVERALL: "overall (all attacks)"}
    options = "".join(
        f'<option value="{html.escape(v)}">{html.escape(shown.get(v, v))}</option>' for v in values
    )
    return (
        f'<label>{label} <select id="filter-{name}"><option value="">all</option>{options}</select></label>'
    )


def _html_table(b: Board, columns: tuple[str, ...]) -> str:
    head = "".join(
        f'<th aria-sort="none"><button type="button">{html.escape(h)}</button></th>'
        for h in _headers(columns)
    )
    rows = []
    for e in b.entries:
        values: list[float | int | None] = [
            e.rank,
            None,
            *(e.stats[m].mean for m in columns),
            e.seeds,
            e.failed,
        ]
        cells = []
        for i, (text, value) in enumerate(zip(_cells(e, columns), values, strict=True)):
            sort = "" if i == 1 else f' data-value="{"" if value is None else value}"'
            cells.append(f"<td{sort}>{html.escape(text)}</td>")
        css = ' class="undefended"' if e.defense in REFERENCE_ROWS else ""
        rows.append(f'<tr{css} data-defense="{html.escape(e.defense)}">{"".join(cells)}</tr>')
    return (
        f'<table class="board" data-attack="{html.escape(b.attack or _OVERALL)}">'
        f"<caption>{html.escape(b.title)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def to_html(board: Leaderboard, title: str = "bdtk leaderboard") -> str:
    """A self-contained page: inline CSS, SVG and script, no external URLs, so it opens offline.

    One section per scenario (its scatter, then its tables); every column sorts on a click, and
    two menus filter the tables by attack and the rows by defense. Without matplotlib the page
    says how to get the scatter instead of drawing it.
    """
    columns = board.columns()
    attacks = sorted({b.attack for b in board.boards if b.attack is not None})
    defenses = sorted(
        {e.defense for b in board.boards for e in b.entries}, key=lambda d: (reference_order(d), d)
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{_inline_code(_note(board))}</p>",
        '<form class="filters" onsubmit="return false">'
        + _select("attack", "Attack", [*attacks, _OVERALL])
        + _select("defense", "Defense", defenses)
        + "</form>",
    ]
    plots = matplotlib_available()
    for scenario in board.scenarios():
        body.append(f"<section><h2>{html.escape(scenario)}</h2>")
        if plots:
            body.append(f'<div class="scatter">{scatter_svg(board, scenario)}</div>')
        else:
            body.append(
                '<p class="note">The BA-versus-ASR scatter needs matplotlib: '
                f"<code>{html.escape(INSTALL_HINT)}</code>.</p>"
            )
        body += [_html_table(b, columns) for b in board.boards if b.scenario == scenario]
        gaps = describe_gaps(board.gaps, scenario)
        if gaps:
            items = "".join(f"<li>{html.escape(line)}</li>" for line in gaps)
            body.append(f'<h3>{html.escape(GAPS_TITLE.capitalize())}</h3><ul class="gaps">{items}</ul>')
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


EXPORTS = {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}


def export_files(board: Leaderboard, out_dir: Path, stem: str = "leaderboard") -> dict[Path, bytes]:
    """Markdown, CSV, JSON, HTML and the PNG scatter for `out_dir`, rendered, not yet written.

    The PNG is left out when matplotlib is not installed (`plot.matplotlib_available`): the tables
    do not need it, and the caller can say so.
    """
    files = {out_dir / f"{stem}.{kind}": render(board).encode("utf-8") for kind, render in EXPORTS.items()}
    if matplotlib_available():
        files[out_dir / f"{stem}.png"] = scatter_png(board)
    return files


def export(board: Leaderboard, out_dir: Path, stem: str = "leaderboard") -> list[Path]:
    """Write `export_files` into `out_dir`, all or none (`write_all_or_none`); return the paths."""
    files = export_files(board, out_dir, stem)
    write_all_or_none(files)
    return list(files)

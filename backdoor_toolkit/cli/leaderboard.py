"""`bdtk leaderboard`: rank defenses from the result store, print them and export them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..artifacts import write_all_or_none
from ..console import console
from ..errors import BdtkError
from ..leaderboard import (
    COLUMNS,
    EXPORTS,
    INSTALL_HINT,
    OPTIONAL,
    build_leaderboard,
    export_files,
    gaps_summary,
    matplotlib_available,
    require_matplotlib,
    scatter_png,
    to_csv,
    to_html,
    to_json,
    to_markdown,
    to_rich,
    weak_backdoors,
)
from ..output_paths import check_output_file, check_output_folder
from ..results import CellResult
from ..store import ResultStore, default_db_path
from .common import app, user_errors

#: What each export option may be named: a typo (or a path meant for something else, say a
#: model's .safetensors) is refused instead of replaced by a table.
EXPORT_EXTENSIONS = {
    "--markdown": (".md", ".markdown", ".txt"),
    "--csv": (".csv", ".txt"),
    "--json": (".json",),
    "--html": (".html", ".htm"),
    "--png": (".png",),
}


@app.command()
@user_errors
def leaderboard(
    db: Annotated[
        Path | None, typer.Option(help="Result database (default: $BDTK_DB or the user data dir)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Only this dataset")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model")] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option(
            "--attack", "-a", help="Only these attacks: NAME (with any preset) or NAME:PRESET (repeatable)"
        ),
    ] = None,
    rank_by: Annotated[str, typer.Option(help=f"Metric to rank by: {', '.join(COLUMNS)}")] = "der",
    out: Annotated[
        Path | None, typer.Option(help="Write leaderboard.{md,csv,json,html,png} into this folder")
    ] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write Markdown here")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write CSV here")] = None,
    json: Annotated[Path | None, typer.Option("--json", help="Write JSON here")] = None,
    html: Annotated[Path | None, typer.Option(help="Write the offline HTML page here")] = None,
    png: Annotated[
        Path | None, typer.Option(help="Write the BA-vs-ASR scatter PNG here (needs matplotlib)")
    ] = None,
) -> None:
    """Rank defenses per attack and overall (mean ± std over seeds) from the stored cells."""
    if png is not None:
        require_matplotlib("--png")  # before any work: one line that says how to install it
    named = [("--dataset", dataset), ("--model", model), *(("--attack", a) for a in attack or [])]
    for option, value in named:
        if value is not None and not value.strip():
            raise BdtkError(f"{option} is empty; give a name, or leave the option out to show all.")
    files = {"--markdown": markdown, "--csv": csv, "--json": json, "--html": html, "--png": png}
    path = db or default_db_path()
    reads = {"result database": path}
    claimed: dict[Path, str] = {}
    for option, target in files.items():
        if target is not None:
            check_output_file(target, option, extensions=EXPORT_EXTENSIONS[option], inputs=reads)
            same = claimed.setdefault(target.expanduser().resolve(), option)
            if same != option:  # the second export would overwrite the first
                raise BdtkError(f"{same} and {option} name the same file {target}; give each its own.")
    if out is not None:
        check_output_folder(out, "--out")
        for name in [f"leaderboard.{suffix}" for suffix in EXPORTS] + ["leaderboard.png"]:
            check_output_file(out / name, "--out", inputs=reads)  # none blocked by a folder or the store
    if not path.exists():
        raise BdtkError(f"No result database at {path}; run `bdtk benchmark` first (or pass --db).")
    with ResultStore(path, write=False) as store:
        rows = store.rows(dataset=dataset, model=model, attacks=attack)
        where = store.path
        if not rows and (dataset or model or attack):
            raise BdtkError(
                f"No stored results in {where} match these filters; it holds {_stored_choices(store.rows())}."
            )
    if not rows:
        raise BdtkError(f"No stored results in {where}; run `bdtk benchmark` first.")
    if rank_by in OPTIONAL and all(getattr(row, rank_by, None) is None for row in rows):
        raise BdtkError(
            f"No stored row has {rank_by} (the re-tuning attack was off in these grids), so nothing can "
            f"be ranked by it; rank by another metric, or run the grid with --retune."
        )
    board = build_leaderboard(rows, rank_by)
    for table in to_rich(board, width=console.width):
        console.print(table)
    for line in gaps_summary(board):
        console.print(f"[yellow]{escape(line)}[/]")
    for line in weak_backdoors(rows):
        console.print(f"[yellow]{escape(line)}[/]")
    rendered: dict[Path, bytes] = {}
    for target, render in ((markdown, to_markdown), (csv, to_csv), (json, to_json), (html, to_html)):
        if target is not None:  # its folder exists or is the one folder that may be created: checked above
            rendered[target] = render(board).encode("utf-8")
    if png is not None:
        rendered[png] = scatter_png(board)
    if out is not None:
        rendered.update(export_files(board, out))
    write_all_or_none(rendered)  # a disk that fills half-way leaves every earlier export as it was
    if out is not None and not matplotlib_available():
        console.print(f"[yellow]No scatter PNG in {out}: it needs matplotlib ({escape(INSTALL_HINT)}).[/]")
    written = list(rendered)
    for path in written:
        console.print(f"Wrote {path}")


def _stored_choices(rows: list[CellResult]) -> str:
    """What a filter could have matched: the store's datasets, models and attacks (with presets)."""
    if not rows:
        return "no results yet (run `bdtk benchmark` first)"
    datasets = sorted({r.dataset for r in rows})
    models = sorted({r.model for r in rows})
    attacks = sorted({r.attack if r.attack_preset is None else f"{r.attack}:{r.attack_preset}" for r in rows})
    return f"--dataset {', '.join(datasets)}; --model {', '.join(models)}; --attack {', '.join(attacks)}"

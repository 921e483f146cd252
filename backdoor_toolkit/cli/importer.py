"""`bdtk import`: bring backdoored models made by other tools into bdtk as stored victims."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..backdoorbench import import_backdoorbench
from ..console import console
from .common import app, user_errors

import_app = typer.Typer(
    help="Import a backdoored model made by another tool as a bdtk victim (then: bdtk benchmark --victim).",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")


@import_app.command("backdoorbench")
@user_errors
def backdoorbench(
    source: Annotated[
        Path, typer.Argument(help="BackdoorBench attack_result.pt, or its run folder (record/<run>/)")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the victim to")],
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Root of the clean dataset the result names, torchvision layout (default: $BDTK_DATA_DIR, "
            "else BackdoorBench's own data_path beside the record/ folder)"
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The victim's name in results (default: the run folder's name)")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a victim already in --out")] = False,
) -> None:
    """Import a BackdoorBench attack result as a victim: weights, clean data and backdoored test images.

    The file is loaded with torch's weights-only unpickler and an allow-list of NumPy types; a
    file that needs anything else is refused unread. The clean dataset it names is loaded from
    --data-dir (or from where BackdoorBench keeps it). Defend it: `bdtk benchmark --victim OUT -d DEFENSE`.
    """
    summary = import_backdoorbench(source, out, data_dir=data_dir, name=name, force=force)
    labels = (
        "with their original classes (RA measurable)"
        if summary.has_original_labels
        else "without original classes (no RA)"
    )
    console.print(
        escape(
            f"Imported {summary.name}: {summary.model} on {summary.dataset}, {summary.bd_test} backdoored "
            f"test images {labels}, target class(es) {', '.join(map(str, summary.targets))}; poisoned "
            f"training images: {summary.excluded}."
        ),
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        escape(f"Victim written to {summary.out} (content hash {summary.content_hash[:16]})."),
        highlight=False,
    )

"""Tables of names and prose that stay usable at 80 columns.

A listing's identifiers (plugin, preset, field and model names) are what the user types next, so
they are never cut or wrapped; prose (summaries, descriptions, defaults) folds to the width that is
left. Rich shrinks only wrappable columns while that is enough, so marking the name columns
`no_wrap` is what protects them.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table


def listing_table(title: str, names: Sequence[str], prose: Sequence[str]) -> Table:
    """A table whose `names` columns come first and are never cut, and whose `prose` columns fold."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header in names:
        table.add_column(header, no_wrap=True)
    for header in prose:
        table.add_column(header, overflow="fold")
    return table

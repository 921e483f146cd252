"""Leaderboards: views derived from the result store, never a source of truth of their own.

Three concerns, one module each, so that a new export format or a change to the plot cannot
change a rank: `aggregation` builds the ranked `Leaderboard` from stored `CellResult` rows
(grouping, mean ± std over seeds, ranks), `tables` renders it as rich tables, Markdown, CSV, JSON
and HTML, and `plot` draws the BA-versus-ASR scatter per scenario (SVG and PNG, with matplotlib,
an optional extra). The names below are the package's public face; import them from
`backdoor_toolkit.leaderboard`.
"""

from __future__ import annotations

from .aggregation import (
    COLUMNS,
    DERIVED,
    OPTIONAL,
    PERCENT,
    UNDEFENDED,
    Board,
    Entry,
    Gap,
    Leaderboard,
    Point,
    Stat,
    build_leaderboard,
    describe_gaps,
    describe_setting,
    describe_settings,
    metric_info,
    weak_backdoors,
)
from .plot import (
    INSTALL_HINT,
    PALETTE,
    SHAPES,
    PlotUnavailableError,
    matplotlib_available,
    require_matplotlib,
    scatter_figure,
    scatter_png,
    scatter_svg,
    write_png,
)
from .tables import (
    EXPORTS,
    column_header,
    export,
    export_files,
    gaps_summary,
    short_header,
    to_csv,
    to_html,
    to_json,
    to_markdown,
    to_rich,
)

__all__ = [
    "COLUMNS",
    "DERIVED",
    "EXPORTS",
    "INSTALL_HINT",
    "OPTIONAL",
    "PALETTE",
    "PERCENT",
    "SHAPES",
    "UNDEFENDED",
    "Board",
    "Entry",
    "Gap",
    "Leaderboard",
    "PlotUnavailableError",
    "Point",
    "Stat",
    "build_leaderboard",
    "column_header",
    "describe_gaps",
    "describe_setting",
    "describe_settings",
    "export",
    "export_files",
    "gaps_summary",
    "matplotlib_available",
    "metric_info",
    "require_matplotlib",
    "scatter_figure",
    "scatter_png",
    "scatter_svg",
    "short_header",
    "to_csv",
    "to_html",
    "to_json",
    "to_markdown",
    "to_rich",
    "weak_backdoors",
    "write_png",
]

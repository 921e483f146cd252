"""Publish a suite's leaderboard from its store, once enough seeds are complete; or say how far it is.

    python -m benchmarks.publish --status                 # cells stored per seed, nothing written
    python -m benchmarks.publish                          # docs/leaderboard/paper.{md,html} + README

The grid a suite implies (`plan_grid`: every backdoored model with its undefended, clean-model and
defense cells, by config hash) is compared with the store. A seed is complete when every one of
its cells is stored, `ok` or failed (a failed cell is published with its reason). With fewer than
`--min-seeds` complete seeds nothing is written and the exit status is 1, so a partial grid is
never published as if it were whole. Otherwise the leaderboard of the complete seeds' cells goes
to `--out` as Markdown and HTML, each headed by the command that grew the store and the
provenance of its rows (bdtk versions, devices, torch threads, dates), and the overall ranking
replaces the README's block between its `paper-leaderboard` markers.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from backdoor_toolkit.cells import plan_grid
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.errors import BdtkError
from backdoor_toolkit.leaderboard import build_leaderboard, to_html, to_markdown
from backdoor_toolkit.leaderboard.aggregation import Leaderboard
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.suites import load_suite

START, END = "<!-- paper-leaderboard:start -->", "<!-- paper-leaderboard:end -->"


def expected_cells(suite: str) -> dict[int, set[str]]:
    """Config hashes of every cell of the suite's grid, per seed."""
    config = BenchmarkConfig.model_validate(load_suite(suite).benchmark_values())
    out: dict[int, set[str]] = {}
    for plan in plan_grid(config):
        out.setdefault(plan.seed, set()).update(c.config_hash for c in plan.cells)
    return out


def provenance(rows: list[CellResult]) -> str:
    """What made the rows: bdtk versions, devices, threads and the span of dates."""
    versions = sorted({r.provenance.bdtk for r in rows if r.provenance})
    devices = sorted({r.provenance.device for r in rows if r.provenance})
    threads = sorted({str(r.provenance.threads) for r in rows if r.provenance and r.provenance.threads})
    dates = sorted(r.provenance.date[:10] for r in rows if r.provenance)
    span = f"{dates[0]} to {dates[-1]}" if dates else "unknown dates"
    return (
        f"bdtk {', '.join(versions)}; device {', '.join(devices)}; "
        f"{', '.join(threads) or '?'} torch threads; {span}"
    )


def overall_table(board: Leaderboard) -> str:
    """The overall ranking as a compact Markdown table for the README."""
    (overall,) = [b for b in board.boards if b.attack is None]
    lines = [
        "| rank | defense | DER ↑ | ASR % ↓ | ASR retuned % ↓ | BA drop pp ↓ | runs |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for e in overall.entries:
        rank = str(e.rank) if e.rank is not None else "—"
        cells = [e.stats[m].text(m) for m in ("der", "asr", "asr_retuned", "ba_drop")]
        lines.append(f"| {rank} | {e.defense} | {' | '.join(cells)} | {e.seeds} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="paper")
    parser.add_argument("--db", type=Path, default=Path("benchmarks/results.sqlite"))
    parser.add_argument("--out", type=Path, default=Path("docs/leaderboard"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--min-seeds", type=int, default=2)
    parser.add_argument("--status", action="store_true", help="Report progress only; write nothing")
    args = parser.parse_args()
    try:
        expected = expected_cells(args.suite)
        with ResultStore(args.db, write=False) as store:
            stored = {r.config_hash: r for r in store.rows()}
    except BdtkError as exc:  # an unknown suite, a missing, bad or foreign database: one line
        raise SystemExit(str(exc)) from None
    complete = []
    for seed, hashes in sorted(expected.items()):
        have = [stored[h] for h in hashes if h in stored]
        status = Counter(r.status for r in have)
        print(
            f"seed {seed}: {len(have)} of {len(hashes)} cells stored "
            f"({status.get('ok', 0)} ok, {status.get('failed', 0)} failed)"
        )
        if len(have) == len(hashes):
            complete.append(seed)
    if args.status:
        return 0
    if len(complete) < args.min_seeds:
        print(
            f"{len(complete)} complete seed(s), {args.min_seeds} needed: nothing published.", file=sys.stderr
        )
        return 1
    rows = [stored[h] for seed in complete for h in expected[seed]]
    name = Path(args.suite).stem  # `paper`, or a suite file's name
    board = build_leaderboard(rows)
    command = f"bdtk benchmark --suite {args.suite} --db {args.db}"
    head = (
        f"Grown with `{command}` and published with `python -m benchmarks.publish --suite {args.suite}`; "
        f"seeds {', '.join(map(str, complete))}; {provenance(rows)}."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(f"# The `{name}` leaderboard\n\n{head}\n\n{to_markdown(board)}\n")
    page = to_html(board, title=f"bdtk {name} leaderboard")
    (args.out / f"{name}.html").write_text(page.replace("</h1>", f"</h1><p>{head}</p>", 1))
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        print(f"{args.readme} has no {START} … {END} block; the README was left as it is.", file=sys.stderr)
        return 1
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    block = f"{START}\n{head}\n\n{overall_table(board)}\n{END}"
    args.readme.write_text(before + block + after)
    print(f"wrote {args.out / name}.md, {args.out / name}.html and the README's ranking")
    return 0


if __name__ == "__main__":
    sys.exit(main())

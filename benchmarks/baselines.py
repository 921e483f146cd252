"""The baseline defenses (fine-tuning, fine-pruning, NAD, ANP, I-BAU, SAU, FST) against every
registered attack.

Runs the shared bench setting (benchmarks/setting.py) attack by attack, so backdoored models come
from (or go to) the shared artifact cache. Each cell goes to a result store as it finishes (a rerun
skips the cells already stored), the leaderboard of the stored cells is printed, and the
BA/ASR/RA/DER/time table with the diagnostics that explain each row is written between the markers
in docs/defenses/baselines.md:

    OMP_NUM_THREADS=1 python -m benchmarks.baselines --attack badnets --attack blended
    python -m benchmarks.baselines --table

Attacks not registered (yet) are skipped with a note. ANP's 2000 mask iterations are the paper's;
`--anp-iterations` and `--anp-batch-size` lower its cost where CPU time is short, and the table
says what was run.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cells import run_setting
from backdoor_toolkit.config import BenchmarkConfig, PluginChoice
from backdoor_toolkit.errors import UnknownNameError
from backdoor_toolkit.leaderboard import build_leaderboard, to_markdown
from backdoor_toolkit.plugins import get_attack
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore

from .setting import bench_config

ATTACKS = ["badnets", "blended", "trojan", "sig", "wanet", "input-aware"]
DEFENSES = ["finetune", "fine-pruning", "nad", "anp", "i-bau", "sau", "fst"]
DEFAULT_DB = Path("bdtk-results/baselines.sqlite")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "defenses" / "baselines.md"
START, END = "<!-- baselines-table:start -->", "<!-- baselines-table:end -->"


def defenses(names: list[str], anp_iterations: int, anp_batch_size: int) -> list[PluginChoice]:
    config = {"anp": {"iterations": anp_iterations, "batch_size": anp_batch_size}}
    return [PluginChoice(name=name, config=config.get(name, {})) for name in names]


def stored_rows(store: ResultStore, config: BenchmarkConfig) -> list[CellResult]:
    """The stored cells of this bench setting (a store may also hold other settings' cells)."""
    setting = run_setting(config)
    return [r for r in store.rows(dataset=config.dataset, model=config.model) if r.setting == setting]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _explain(row: CellResult) -> str:
    """The diagnostics that explain a row, in a few words (the leaderboard has no room for them)."""
    d, config = row.diagnostics, row.defense_config
    if row.status != "ok":
        return f"failed: {row.error[:80]}"
    if row.defense == "fine-pruning":
        return f"{d['pruned_count']}/{d['channels']} channels pruned"
    if row.defense == "nad":
        return f"teacher val acc {100 * d['teacher_val_accuracy']:.1f}"
    if row.defense == "anp":
        return (
            f"{d['pruned_count']}/{d['neurons']} neurons < {d['threshold']:.2f} "
            f"({config['iterations']} it. × batch {config['batch_size']})"
        )
    return ""


def table(rows: list[CellResult]) -> str:
    """Markdown for the docs page: one row per stored (attack, defense) cell, undefended first."""
    lines = [
        "| attack | defense | BA % | ASR % | RA % | DER | time s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    order = ["none", *DEFENSES]
    shown = sorted(
        (r for r in rows if r.attack in ATTACKS and r.defense in order),
        key=lambda r: (ATTACKS.index(r.attack), order.index(r.defense), r.seed),
    )
    for r in shown:
        der = "—" if r.der is None else f"{r.der:.3f}"
        secs = "—" if r.seconds is None else f"{r.seconds:.0f}"
        note = "undefended" if r.defense == "none" else _explain(r)
        lines.append(
            f"| {r.attack} | {r.defense} | {_pct(r.ba)} | {_pct(r.asr)} | "
            f"{_pct(r.ra)} | {der} | {secs} | {note} |"
        )
    return "\n".join(lines)


def write_docs(rows: list[CellResult], docs: Path = DOCS) -> None:
    """Replace the table between the markers of the docs page (the rest of the page is prose)."""
    text = docs.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{docs} lacks the {START} … {END} markers.")
    device = ", ".join(sorted({r.provenance.device for r in rows})) or "?"
    block = f"{START}\n_Device: {device}._\n\n{table(rows)}\n{END}"
    docs.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", action="append", help="Attack to run (repeatable; default: all)")
    parser.add_argument(
        "--defense", action="append", choices=DEFENSES, help="Defense to run (repeatable; default: all)"
    )
    parser.add_argument("--anp-iterations", type=int, default=2000, help="ANP mask iterations")
    parser.add_argument("--anp-batch-size", type=int, default=128, help="ANP clean batch size")
    parser.add_argument("--table", action="store_true", help="Only rewrite the table from stored results")
    parser.add_argument(
        "--db", type=Path, default=DEFAULT_DB, help="Result store (SQLite); a rerun resumes from it"
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="Docs page whose table is rewritten")
    args = parser.parse_args(argv)

    base = bench_config(defenses=defenses(args.defense or DEFENSES, args.anp_iterations, args.anp_batch_size))
    if args.table and not args.db.exists():
        raise SystemExit(f"No result store at {args.db}; run the benchmark first (or pass --db).")
    with ResultStore(args.db, write=not args.table) as store:
        if not args.table:

            def report(row: CellResult) -> None:
                print(
                    f"{row.attack} / {row.defense}: BA {row.ba} ASR {row.asr} RA {row.ra} ({row.status})",
                    flush=True,
                )

            for name in args.attack or ATTACKS:
                try:
                    get_attack(name)
                except UnknownNameError:
                    print(f"skipping {name!r}: no such attack is registered", flush=True)
                    continue
                config = bench_config(attacks=[PluginChoice(name=name)], defenses=base.defenses)
                run_benchmark(config, report, store=store)
                write_docs(stored_rows(store, base), args.docs)
        rows = stored_rows(store, base)
    print(to_markdown(build_leaderboard(rows)))
    write_docs(rows, args.docs)


if __name__ == "__main__":
    main()

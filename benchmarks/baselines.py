"""The baseline defenses (fine-tuning, fine-pruning, NAD, ANP) against every registered attack.

Runs the shared bench setting (benchmarks/setting.py) attack by attack, so backdoored models come
from (or go to) the shared artifact cache. Rows are merged into a JSON file as each cell finishes,
and the BA/ASR/RA/DER/time table is written between the markers in docs/defenses/baselines.md:

    OMP_NUM_THREADS=1 python -m benchmarks.baselines --attack badnets --attack blended
    python -m benchmarks.baselines --table

Attacks not registered (yet) are skipped with a note. ANP's 2000 mask iterations are the paper's;
`--anp-iterations` and `--anp-batch-size` lower its cost where CPU time is short, and the table
says what was run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.config import PluginChoice
from backdoor_toolkit.errors import UnknownNameError
from backdoor_toolkit.plugins import get_attack
from backdoor_toolkit.results import CellResult

from .setting import bench_config

ATTACKS = ["badnets", "blended", "trojan", "sig", "wanet", "input-aware"]
DEFENSES = ["finetune", "fine-pruning", "nad", "anp"]
DEFAULT_OUTPUT = Path("bdtk-results/baselines.json")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "defenses" / "baselines.md"
START, END = "<!-- baselines-table:start -->", "<!-- baselines-table:end -->"


def defenses(names: list[str], anp_iterations: int, anp_batch_size: int) -> list[PluginChoice]:
    config = {"anp": {"iterations": anp_iterations, "batch_size": anp_batch_size}}
    return [PluginChoice(name=name, config=config.get(name, {})) for name in names]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"setting": None, "rows": {}}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _explain(row: dict[str, Any]) -> str:
    """The diagnostics that explain a row, in a few words."""
    d = row.get("diagnostics") or {}
    if row["status"] != "ok":
        return f"failed: {row['error'][:80]}"
    if row["defense"] == "fine-pruning":
        return f"{d['pruned_count']}/{d['channels']} channels pruned"
    if row["defense"] == "nad":
        return f"teacher val acc {100 * d['teacher_val_accuracy']:.1f}"
    if row["defense"] == "anp":
        return (
            f"{d['pruned_count']}/{d['neurons']} neurons < {d['threshold']:.2f} "
            f"({row['defense_config']['iterations']} it. × batch {row['defense_config']['batch_size']})"
        )
    return ""


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per (attack, defense), undefended first."""
    lines = [
        "| attack | defense | BA % | ASR % | RA % | DER | time s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for attack in ATTACKS:
        cells = results["rows"].get(attack, {})
        for defense in ["none", *DEFENSES]:
            if defense not in cells:
                continue
            r = cells[defense]
            der = "—" if r.get("der") is None else f"{r['der']:.3f}"
            secs = "—" if r.get("seconds") is None else f"{r['seconds']:.0f}"
            note = "undefended" if defense == "none" else _explain(r)
            lines.append(
                f"| {attack} | {defense} | {_pct(r.get('ba'))} | {_pct(r.get('asr'))} | "
                f"{_pct(r.get('ra'))} | {der} | {secs} | {note} |"
            )
    return "\n".join(lines)


def write_docs(results: dict[str, Any], docs: Path = DOCS) -> None:
    """Replace the table between the markers of the docs page (the rest of the page is prose)."""
    text = docs.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{docs} lacks the {START} … {END} markers.")
    device = results.get("device", "?")
    block = f"{START}\n_Device: {device}._\n\n{table(results)}\n{END}"
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
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Results JSON (merged)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="Docs page whose table is rewritten")
    args = parser.parse_args(argv)

    results = _load(args.output)
    if not args.table:
        base = bench_config(
            defenses=defenses(args.defense or DEFENSES, args.anp_iterations, args.anp_batch_size)
        )
        setting = base.model_dump(
            include={"dataset", "model", "train_size", "test_size", "training", "seeds"}
        )
        if results["setting"] not in (None, setting):
            raise SystemExit(f"{args.output} holds results of another setting; pass --output elsewhere.")
        results["setting"] = setting
        args.output.parent.mkdir(parents=True, exist_ok=True)

        def save(row: CellResult) -> None:
            results["rows"].setdefault(row.attack, {})[row.defense] = row.model_dump()
            results["device"] = row.provenance.device
            args.output.write_text(json.dumps(results, indent=2))
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
            run_benchmark(bench_config(attacks=[PluginChoice(name=name)], defenses=base.defenses), save)
            write_docs(results, args.docs)
    print(table(results))
    write_docs(results, args.docs)


if __name__ == "__main__":
    main()

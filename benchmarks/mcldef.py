"""MCLDef against the attack suite on the shared bench setting, with fine-tuning for reference.

    python -m benchmarks.mcldef [--attack badnets --attack blended ...] [--variant faithful ...]

Each attack named (default: the whole suite) that is not registered is skipped with a note.
Variants are MCLDef configs: `default` is bdtk's recipe (the plugin's defaults), `faithful` the authors'
recipe (preset `paper`); `improved` and
`improved+ce-triggered` are bdtk's options; docs/defenses/mcldef.md explains them all. Every
MCLDef cell runs its own trigger inversion (5–8 min on one loaded CPU thread; `+known-target`
variants invert one class only), so pick variants with --variant.
Each cell goes to a result store as it finishes (a rerun skips the cells already stored; `bdtk
leaderboard --db bdtk-results/mcldef.sqlite` ranks them) and the table, which names each MCLDef
row by its variant, is printed at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from backdoor_toolkit import get_purifier
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.config import PluginChoice
from backdoor_toolkit.plugins import get_registry
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore

from .setting import bench_config

SUITE = ["badnets", "blended", "trojan", "sig", "wanet", "input-aware"]

#: The authors' recipe (preset `paper`); every variant but `default` is written on top of it.
FAITHFUL: dict[str, Any] = dict(get_purifier("mcldef").presets["paper"].values)
IMPROVED: dict[str, Any] = {
    **FAITHFUL,
    "stamp": "before-augment",
    "ce_weight": 1.0,
    "lr": 0.01,
    "epochs": 40,
}
CE_TRIGGERED: dict[str, Any] = {**IMPROVED, "ce_on": "clean+triggered"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # bdtk's recipe: CE_TRIGGERED with the scheduled scan and early stop
    "faithful": FAITHFUL,
    "top-ranked": {**FAITHFUL, "on_no_detection": "top-ranked"},
    "top-ranked+tau0.1": {**FAITHFUL, "on_no_detection": "top-ranked", "temperature": 0.1},
    "top-ranked+ce": {**FAITHFUL, "on_no_detection": "top-ranked", "ce_weight": 1.0},
    "top-ranked+tau0.1+ce": {
        **FAITHFUL,
        "on_no_detection": "top-ranked",
        "temperature": 0.1,
        "ce_weight": 1.0,
    },
    "top-ranked+ce+lr0.01": {**FAITHFUL, "on_no_detection": "top-ranked", "ce_weight": 1.0, "lr": 0.01},
    "improved": IMPROVED,
    # the attack's target given, as the authors' code is given it: stage 2 without detection
    "faithful+known-target": {**FAITHFUL, "target": 0},
    "improved+known-target": {**IMPROVED, "target": 0},
    "improved+ce-triggered": CE_TRIGGERED,
    "improved+ce-triggered+known-target": {**CE_TRIGGERED, "target": 0},
    "default+known-target": {"target": 0},
    # stage-2 recipe sweep (BA drop): learning rate and the epoch returned, target given
    "default+known-target+lr0.005": {"target": 0, "lr": 0.005},
    "default+known-target+lr0.002": {"target": 0, "lr": 0.002},
    "default+known-target+best-val": {"target": 0, "select_epoch": "best-val"},
    "default+known-target+lr0.005+best-val": {"target": 0, "lr": 0.005, "select_epoch": "best-val"},
    "default+known-target+distill1": {"target": 0, "distill_weight": 1.0},
    "default+known-target+distill5": {"target": 0, "distill_weight": 5.0},
    "default+known-target+distill1+ce-clean": {"target": 0, "distill_weight": 1.0, "ce_on": "clean"},
}


def _label(row: CellResult) -> str:
    if row.defense != "mcldef":
        return row.defense
    defaults = get_purifier("mcldef").Config().model_dump()
    stored = {**defaults, **row.defense_config}  # a row stored before a field existed has its default
    for name, cfg in VARIANTS.items():
        if stored == {**defaults, **cfg}:
            return f"mcldef ({name})"
    return "mcldef (custom)"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table(rows: list[CellResult]) -> str:
    lines = [
        "| attack | defense | BA | ASR | RA | DER | time (s) | inversion / purification (s) "
        "| flagged | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = " / ".join(
            f"{r.stage_seconds[k]:.0f}" for k in ("inversion", "purification") if k in r.stage_seconds
        )
        flagged = r.diagnostics.get("flagged", "")
        status = r.notes if r.status == "ok" else f"FAILED: {r.error}"
        lines.append(
            f"| {r.attack} | {_label(r)} | {_pct(r.ba)} | {_pct(r.asr)} | {_pct(r.ra)} | "
            f"{'—' if r.der is None else f'{r.der:.3f}'} | "
            f"{'—' if r.seconds is None else f'{r.seconds:.0f}'} | "
            f"{stages or '—'} | {flagged} | {status.replace('|', '/')[:120]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", action="append", help="Attack to run (repeatable; default: the suite)")
    parser.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="MCLDef variant (repeatable; default: all)",
    )
    parser.add_argument("--no-finetune", action="store_true", help="Skip the fine-tuning reference rows")
    parser.add_argument("--full", action="store_true", help="Whole dataset instead of the bench subsets")
    parser.add_argument(
        "--db",
        type=Path,
        default=Path("bdtk-results/mcldef.sqlite"),
        help="Result store (SQLite); a rerun resumes from it",
    )
    args = parser.parse_args(argv)

    registered = set(get_registry().by_kind["attack"])
    wanted = args.attack or SUITE
    attacks = [a for a in wanted if a in registered]
    for name in wanted:
        if name not in registered:
            print(f"skipping attack {name!r}: not registered")
    if not attacks:
        raise SystemExit("No registered attack to run.")
    defenses = [PluginChoice(name="mcldef", config=VARIANTS[v]) for v in (args.variant or list(VARIANTS))]
    if not args.no_finetune:
        defenses.append(PluginChoice(name="finetune"))

    rows: list[CellResult] = []

    def record(row: CellResult) -> None:
        print(table([row]).splitlines()[-1], flush=True)

    with ResultStore(args.db) as store:
        for attack in attacks:  # one run per attack, so a failing attack does not stop the others
            rows += run_benchmark(
                bench_config(full=args.full, attacks=[PluginChoice(name=attack)], defenses=defenses),
                on_result=record,
                store=store,
            )
    print(table(rows))


if __name__ == "__main__":
    main()

"""Neural Cleanse's full scan against its scheduled (K-Arm) scan, side by side on the same models:
do they flag the same classes, and how many optimiser steps and seconds does each take?

    nice -n 5 python -m benchmarks.scan --attack badnets --attack clean
    python -m benchmarks.scan --readme --attack badnets          # the README's setting
    python -m benchmarks.scan --cached-only                      # never train, skip what is not cached

Models come from the shared artifact cache, trained on a miss (minutes of CPU each) unless
`--cached-only`: the bench setting of benchmarks/setting.py, or with `--readme` the README's
(`BenchmarkConfig()`: all of Fashion-MNIST, wrn-16-1, 2 epochs). Both scans run in this process
with the same Neural Cleanse settings (defaults, plus `--set`) and seed; only `schedule` differs.
Prints one Markdown table and writes every row, with per-class norms and steps, to `--output`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from backdoor_toolkit import BdtkError, InversionResult, build_config, get_inverter
from backdoor_toolkit.cli.common import parse_settings
from backdoor_toolkit.config import BenchmarkConfig
from benchmarks.inversion import run_inverter
from benchmarks.setting import DEFAULT_MODELS, BenchModel, bench_config, bench_models


def scan(m: BenchModel, values: dict[str, Any], seed: int) -> InversionResult:
    return run_inverter(m.model, m.data, seed, values)


def compare(m: BenchModel, base: dict[str, Any], seed: int) -> dict[str, Any]:
    """One model's row: the same problem scanned in full and scheduled."""
    full = scan(m, {**base, "schedule": "full"}, seed)
    sched = scan(m, {**base, "schedule": "k-arm"}, seed)
    d, fd = sched.diagnostics, full.diagnostics
    row = {
        "model": m.label,
        "true_target": m.true_target,
        "flagged_full": full.flagged,
        "flagged_scheduled": sched.flagged,
        "equal": full.flagged == sched.flagged,
        "seconds_full": full.seconds,
        "seconds_scheduled": sched.seconds,
        "class_steps_full": fd["class_steps"],
        "class_steps_scheduled": d["class_steps"],
        "ratio": d["class_steps"] / fd["class_steps"],
        "schedule_used": d["schedule_used"],
        "prescreen_scores": d["prescreen_scores"],
        "candidates": d["candidates"],
        "dropped": d["dropped"],
        "steps_full": fd["steps"],
        "steps_scheduled": d["steps"],
        "norms_full": [round(v, 2) for v in full.mask_norms.tolist()],
        "norms_scheduled": [round(v, 2) for v in sched.mask_norms.tolist()],
        "index_full": [round(v, 2) for v in full.anomaly_index.tolist()],
        "index_scheduled": [round(v, 2) for v in sched.anomaly_index.tolist()],
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | flagged (full) | flagged (scheduled) | equal? | seconds full / scheduled | "
        "class-steps full / scheduled | ratio | schedule used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = ", ".join(map(str, r["flagged_full"])) or "none"
        sched = ", ".join(map(str, r["flagged_scheduled"])) or "none"
        lines.append(
            f"| {r['model']} | {full} | {sched} | {'yes' if r['equal'] else '**no**'} | "
            f"{r['seconds_full']:.0f} / {r['seconds_scheduled']:.0f} | "
            f"{r['class_steps_full']:,} / {r['class_steps_scheduled']:,} | {r['ratio']:.2f} | "
            f"{r['schedule_used']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--attack",
        action="append",
        help=f"Attack, or clean for the control (repeatable; default {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, budget and scans")
    setting = parser.add_mutually_exclusive_group()
    setting.add_argument("--full", action="store_true", help="Bench setting on the whole dataset")
    setting.add_argument(
        "--readme", action="store_true", help="The README's setting (BenchmarkConfig() defaults)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Neural Cleanse option for both scans (repeatable; `schedule` is set by the script)",
    )
    parser.add_argument("--cached-only", action="store_true", help="Skip models not in the cache")
    parser.add_argument("--output", default="bdtk-results/scan.json")
    args = parser.parse_args()
    base = {k: v for k, v in parse_settings(args.set).items() if k != "schedule"}
    config = get_inverter("neural-cleanse").Config
    try:  # a bad option fails here, not after a backdoored model was trained
        for schedule in ("full", "k-arm"):
            build_config(config, {**base, "schedule": schedule}, "neural-cleanse")
    except BdtkError as exc:
        raise SystemExit(str(exc)) from None
    cfg = BenchmarkConfig() if args.readme else bench_config(full=args.full)
    out = Path(args.output)
    meta = {
        "setting": cfg.model_dump(
            include={"dataset", "model", "train_size", "test_size", "training", "clean_ratio"}
        ),
        "args": vars(args),
    }
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for m in bench_models(cfg, args.attack or DEFAULT_MODELS, args.seed, cached_only=args.cached_only):
        rows.append(compare(m, base, args.seed))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(markdown(rows))
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()

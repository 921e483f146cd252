"""Which classes does each inverter flag, per model and seed? The false-alarm and detection study.

    python -m benchmarks.detection --attack clean --seed 0 --seed 1 --seed 2
    python -m benchmarks.detection --attack sig --inverter blend-inversion
    python -m benchmarks.detection --readme --attack clean --attack badnets

Every model (an attack, or `clean` for a never-backdoored control) of the bench setting of
benchmarks/setting.py, or with `--readme` the README's, is scanned by every inverter (default: the
two MCLDef can use, `neural-cleanse:k-arm` and `blend-inversion`) at its defaults, with the
defender's clean budget only. A row records what was flagged and, per class, the trigger size
(mask L1 norm; α·H·W for the blend), its share of the median class's, the anomaly index and the
val attack success, so a decision rule can be chosen on some seeds and checked on others.
Models come from the shared artifact cache, trained on a miss unless `--cached-only`.
Rows are appended to `--output` (JSON lines) as each scan finishes, so nothing computed is lost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from backdoor_toolkit import BdtkError, InversionResult, create_inverter
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.training import seed_everything
from benchmarks.setting import BenchModel, bench_config, bench_models

DEFAULT_INVERTERS = ["neural-cleanse:k-arm", "blend-inversion"]


def scan_row(m: BenchModel, inverter: str, seed: int, setting: str) -> dict[str, Any]:
    """One model × inverter row: flags and per-class statistics."""
    seed_everything(seed)
    result: InversionResult = create_inverter(inverter, seed=seed).invert(m.model, m.data)
    norms = result.mask_norms.double()
    median = float(torch.quantile(norms, 0.5))
    d = result.diagnostics
    row = {
        "setting": setting,
        "model": m.name,
        "seed": seed,
        "inverter": inverter,
        "true_target": m.true_target,
        "flagged": result.flagged,
        "false_alarms": [k for k in result.flagged if k != m.true_target],
        "detected": None if m.true_target is None else m.true_target in result.flagged,
        "ranked": result.ranked(),
        "norms": [round(float(v), 3) for v in norms],
        "share_of_median": [round(float(v) / median, 3) for v in norms],
        "anomaly_index": [round(float(v), 3) for v in result.anomaly_index],
        "val_attack_success": [round(float(v), 4) for v in result.attack_success],
        "class_steps": d.get("class_steps"),
        "schedule_used": d.get("schedule_used"),
        "outliers_above_max_ratio": d.get("outliers_above_max_ratio"),
        "seconds": round(result.seconds, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", action="append", required=True, help="Attack or clean (repeatable)")
    parser.add_argument("--seed", type=int, action="append", help="Model seed (repeatable; default 0)")
    parser.add_argument(
        "--inverter", action="append", help=f"NAME or NAME:PRESET (repeatable; default {DEFAULT_INVERTERS})"
    )
    parser.add_argument("--readme", action="store_true", help="The README's setting instead of the bench")
    parser.add_argument("--cached-only", action="store_true", help="Skip models not in the cache")
    parser.add_argument("--output", default="bdtk-results/detection.jsonl")
    args = parser.parse_args()
    inverters = args.inverter or DEFAULT_INVERTERS
    try:  # an unknown inverter fails here, not after a model was trained
        for choice in inverters:
            create_inverter(choice)
    except BdtkError as exc:
        raise SystemExit(str(exc)) from None
    cfg = BenchmarkConfig() if args.readme else bench_config()
    setting = "readme" if args.readme else "bench"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for seed in args.seed or [0]:
        for m in bench_models(cfg, args.attack, seed, cached_only=args.cached_only):
            for inverter in inverters:
                row = scan_row(m, inverter, seed, setting)
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; rows appended to {out}")


if __name__ == "__main__":
    main()

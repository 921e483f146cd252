"""BA and ASR of every built-in attack against a clean model trained the same way.

Each row also gives the clean model's "ASR" with the attack's trigger: the share of triggered
non-target images a never-backdoored model already sends to the target. That is the floor a
defense can be expected to reach, since a purified model is at best as good as a clean one.
Next to it, the clean model's rate *without* the trigger: where the two agree, the floor is the
model's ordinary confusion of other classes with the target, not an effect of the trigger.

Runs the shared bench setting (benchmarks/setting.py) attack by attack; backdoored and clean models
go to the shared artifact cache, so a re-run only measures. Results are merged into a JSON file
keyed by attack, so attacks can be run one at a time (e.g. in the background) and the table printed
at the end:

    OMP_NUM_THREADS=1 python -m benchmarks.attacks --attack blended --attack sig
    python -m benchmarks.attacks --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

from backdoor_toolkit import AttackConfig, attack_scores, build_config, get_attack
from backdoor_toolkit.artifacts import ArtifactCache
from backdoor_toolkit.backdoor import backdoored_model, clean_model
from backdoor_toolkit.cells import load_run_dataset
from backdoor_toolkit.cli.common import parse_settings
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.metrics import accuracy
from backdoor_toolkit.training import resolve_device

from .setting import bench_config

ATTACKS = ["badnets", "blended", "trojan", "sig", "wanet", "input-aware"]
DEFAULT_OUTPUT = Path("bdtk-results/attacks.json")


def _cache(cfg: BenchmarkConfig) -> ArtifactCache:
    return ArtifactCache(Path(cfg.cache_dir) if cfg.cache_dir else None)


def measure_clean(cfg: BenchmarkConfig) -> dict[str, Any]:
    """BA of a model trained without an attack in exactly the attacks' setting."""
    device = resolve_device(cfg.device)
    dataset = load_run_dataset(cfg)
    model = clean_model(dataset, cfg.model, cfg.seeds[0], cfg.training, device, _cache(cfg))
    return {"attack": "clean", "ba": accuracy(model, dataset.test, device), "asr": None, "ra": None}


def measure_attack(cfg: BenchmarkConfig, name: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """BA/ASR/RA of the undefended model backdoored by attack `name` (its config: `values`)."""
    device = resolve_device(cfg.device)
    dataset = load_run_dataset(cfg)
    cls = get_attack(name)
    config = cast(AttackConfig, build_config(cls.Config, values or {}, name))
    attack = cls(config, dataset.spec, seed=cfg.seeds[0])
    victim = backdoored_model(dataset, cfg.model, attack, cfg.training, device, _cache(cfg))
    scores = attack_scores(victim.model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    clean = clean_model(dataset, cfg.model, cfg.seeds[0], cfg.training, device, _cache(cfg))
    floor = attack_scores(clean, dataset.test, attack.apply_trigger, attack.target_labels, device)
    natural = attack_scores(clean, dataset.test, lambda x: x, attack.target_labels, device)
    return {
        "attack": name,
        "config": attack.config.model_dump(),
        **scores.model_dump(),
        "clean_model_asr": floor.asr,
        "clean_model_untriggered": natural.asr,
        "train_seconds": victim.train_seconds,
        "cache_key": victim.cache_key,
    }


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"setting": None, "rows": {}}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table(results: dict[str, Any]) -> str:
    """A markdown table: BA, its drop against the clean model, ASR and RA per attack."""
    rows = results["rows"]
    clean_ba = rows.get("clean", {}).get("ba")
    lines = [
        "| attack | BA % | ΔBA vs clean (points) | ASR % | RA % | clean model's ASR % "
        "| clean model, no trigger % | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(["clean", *ATTACKS])}
    for name in sorted(rows, key=lambda n: (order.get(n.split()[0], len(order)), n)):
        r = rows[name]
        drop = "—" if clean_ba is None or name == "clean" else f"{100 * (r['ba'] - clean_ba):+.2f}"
        secs = r.get("train_seconds")
        lines.append(
            f"| {name} | {_pct(r['ba'])} | {drop} | {_pct(r['asr'])} | {_pct(r['ra'])} | "
            f"{_pct(r.get('clean_model_asr'))} | {_pct(r.get('clean_model_untriggered'))} | "
            f"{'—' if secs is None else f'{secs:.0f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", action="append", choices=ATTACKS, help="Attack to run (repeatable)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="Attack config field (repeatable)"
    )
    parser.add_argument("--skip-clean", action="store_true", help="Do not train/measure the clean model")
    parser.add_argument("--table", action="store_true", help="Only print the table of stored results")
    parser.add_argument("--full", action="store_true", help="Whole Fashion-MNIST instead of the subsets")
    parser.add_argument("--epochs", type=int, help="Train longer than the bench setting (clean model too)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Results JSON (merged)")
    args = parser.parse_args(argv)

    results = _load(args.output)
    if not args.table:
        base = bench_config(full=args.full, defenses=[])
        if args.epochs is not None:
            training = {**base.training.model_dump(), "epochs": args.epochs}
            base = bench_config(full=args.full, defenses=[], training=training)
        setting = base.model_dump(
            include={"dataset", "model", "train_size", "test_size", "training", "seeds"}
        )
        if results["setting"] not in (None, setting):
            raise SystemExit(f"{args.output} holds results of another setting; pass --output elsewhere.")
        results["setting"] = setting
        args.output.parent.mkdir(parents=True, exist_ok=True)
        todo = args.attack if args.attack is not None else ATTACKS
        if not args.skip_clean:
            results["rows"]["clean"] = measure_clean(base)
            args.output.write_text(json.dumps(results, indent=2))
        values = parse_settings(args.set)
        suffix = "".join(f" {k}={v}" for k, v in values.items())
        for name in todo:
            results["rows"][name + suffix] = measure_attack(base, name, values)
            args.output.write_text(json.dumps(results, indent=2))
            print(f"{name}{suffix}: {results['rows'][name + suffix]}", flush=True)
    print(json.dumps(results["setting"]))
    print(table(results))


if __name__ == "__main__":
    main()

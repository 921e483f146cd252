"""Choose MCLDef's purification recipe on a development split, never on test data.

    python -m benchmarks.recipe --attack badnets --attack wanet --variant default --variant distill1

The bench setting (benchmarks/setting.py) trains on a 20,000-image subset of Fashion-MNIST's
60,000 training images. The other 40,000 are used by nothing: neither the victim's training
data nor the defender's budget (which is drawn from the subset). `--dev-size` of them (5,000,
class-stratified) form the **development split** on which stage-2 variants are compared: BA on
all of them, ASR and RA on the non-target ones stamped with the attack's trigger, and the clean
bench model's ASR on the same triggered images as the floor. At 5,000 images one image is 0.02
points, where the defender's 200 val images (0.5 points each) cannot tell the variants apart.
The test split is evaluated too and recorded beside, for the report only.

Every variant is MCLDef's default with the fields of VARIANTS over it and the attack's target
given (stage 1 then inverts that class only; in the batched scan a class follows the same
trajectory whether it is scanned alone or with the others, so the trigger is the one the
scan finds when it flags that class). Each measurement is appended to `--output` as a JSON line as it is
made, and a summary per variant is printed at the end: mean BA drop and the largest ASR above
the floor, both on the development split.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from backdoor_toolkit import create_purifier
from backdoor_toolkit.cells import TRAIN_SUBSET_SEED
from backdoor_toolkit.data import ImageData, load_dataset, stratified_index, stratified_subset
from backdoor_toolkit.metrics import Scores, attack_scores
from backdoor_toolkit.training import seed_everything
from benchmarks.setting import BenchModel, append_record, bench_config, bench_models

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "distill0.5": {"distill_weight": 0.5},
    "distill1": {"distill_weight": 1.0},
    "distill2": {"distill_weight": 2.0},
    "distill3": {"distill_weight": 3.0},
    "distill5": {"distill_weight": 5.0},
    "lr0.005": {"lr": 0.005},
    "best-val": {"select_epoch": "best-val"},
    "stop-asr0.01": {"early_stop_asr": 0.01},
    "recalibrate-bn": {"recalibrate_bn": True},
    "refine-blend": {"refine_inverter": "blend-inversion"},
    "warmup1": {"warmup_steps": 13},
    "clip1": {"max_grad_norm": 1.0},
    "bn-eval": {"bn_mode": "eval"},
}


def development_split(size: int, seed: int) -> ImageData:
    """`size` class-stratified training-split images outside the bench setting's training subset."""
    cfg = bench_config()
    full = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    k = full.spec.num_classes
    assert cfg.train_size is not None
    used = torch.zeros(len(full.train), dtype=torch.bool)
    used[stratified_index(full.train.labels, cfg.train_size, k, seed=TRAIN_SUBSET_SEED)] = True
    rest = full.train.subset(torch.nonzero(~used).flatten())
    return stratified_subset(rest, size, k, seed=seed, what="--dev-size", split="unused training images")


def scores(model: torch.nn.Module, data: ImageData, m: BenchModel) -> Scores:
    assert m.attack is not None
    return attack_scores(model, data, m.attack.apply_trigger, m.attack.target_labels, m.device)


def pct(s: Scores) -> dict[str, float]:
    return {k: round(100 * v, 2) for k, v in s.model_dump().items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--attack", action="append", required=True, help="Attack of the bench model (repeatable)"
    )
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="Default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-size", type=int, default=5000)
    parser.add_argument("--output", default="bdtk-results/recipe.jsonl")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = development_split(args.dev_size, seed=3)
    clean = next(iter(bench_models(bench_config(), ["clean"], args.seed))).model.eval()
    summary: dict[str, list[tuple[float, float]]] = {}
    for m in bench_models(bench_config(), args.attack, args.seed):
        floor, before = scores(clean, dev, m), scores(m.model, dev, m)
        for name in args.variant or list(VARIANTS):
            purifier = create_purifier(
                "mcldef", {**VARIANTS[name], "target": m.true_target}, seed=args.seed, device=m.device
            )
            start = time.perf_counter()
            seed_everything(args.seed)
            result = purifier.purify(copy.deepcopy(m.model), m.data)
            seconds = time.perf_counter() - start
            after_dev, after_test = scores(result.model, dev, m), scores(result.model, m.test, m)
            d = result.diagnostics
            record = {
                "attack": m.name,
                "seed": args.seed,
                "variant": name,
                "dev_size": len(dev),
                "dev_floor_asr": round(100 * floor.asr, 2),
                "dev_before": pct(before),
                "dev_after": pct(after_dev),
                "test_after": pct(after_test),
                "val_accuracy_after": d.get("val_accuracy_after"),
                "epochs_run": d.get("epochs_run"),
                "selected_epoch": d.get("selected_epoch"),
                "seconds": round(seconds, 1),
            }
            append_record(out, record)
            summary.setdefault(name, []).append(
                (100 * (before.ba - after_dev.ba), 100 * (after_dev.asr - floor.asr))
            )
    print("\nvariant: mean BA drop / largest ASR above the floor, development split (points)")
    for name, rows in summary.items():
        drop = sum(r[0] for r in rows) / len(rows)
        print(f"{name:12s} {drop:6.2f} / {max(r[1] for r in rows):6.2f}  ({len(rows)} attacks)")


if __name__ == "__main__":
    main()

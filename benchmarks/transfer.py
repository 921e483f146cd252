"""Does a recovered blend trigger also work on a model that was never backdoored? A transfer test.

    python -m benchmarks.transfer --model sig:0 --model clean:0 --reference other-clean
    python -m benchmarks.transfer --model sig:0 --reference budget --reference distilled

A natural feature (the faint "average shirt" that sends any garment to Shirt) should move a
clean model too; a backdoor trigger should not. This script measures that idea on the bench
models (benchmarks/setting.py), as a candidate second test for blend inversion's flags: the
model (ATTACK:SEED, or clean:SEED) is scanned by `blend-inversion` at its defaults, and each
class's recovered trigger is stamped on the clean test images of the other classes (at most
2,000) and shown to
- `other-clean`: the cached clean bench model of the next seed ((seed + 1) mod 3), which a
  defender does not have (an upper bound of what a reference can tell);
- `budget`: a wrn-16-1 trained from scratch on the defender's clean training part only (SGD,
  `--epochs` epochs, batch 64, lr 0.05, crop augmentation);
- `distilled`: the same, trained to match the suspect model's softened outputs (KL at temperature
  `--temperature`) on the defender's clean training part, so it inherits the model's natural
  decision geometry and, the hope was, not its backdoor.
- `retrained-top`: the suspect's stem and first group kept (frozen), everything above them
  re-initialised and trained on the defender's clean training part (`--epochs`), so low-level
  detectors survive and the mapping to classes is learnt from clean data only.
With `--profile [budget|retrained-top]`, that reference is scanned by blend inversion too, and
each class's α on the suspect model is divided by its α on the reference (a class prior learnt
from the defender's data: "average garment" classes are cheap on every model), with the MAD
index on the log ratio. Each row (per class: share of the median α, success on the suspect model
and on each reference) is appended to `--output` as it is measured. docs/inversion.md reports
what it found.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import ImageClassifier, InversionResult, anomaly_index, create_inverter, create_model
from backdoor_toolkit.data import ImageData
from backdoor_toolkit.metrics import accuracy, predict
from backdoor_toolkit.training import seed_everything
from benchmarks.setting import (
    BenchModel,
    append_record,
    bench_config,
    bench_models,
    budget_trained_model,
    cached_bench_models,
)
from benchmarks.signals import inversion

REFERENCES = ["other-clean", "budget", "distilled", "finetuned", "retrained-top"]


def success(
    model: nn.Module, test: ImageData, result: InversionResult, k: int, device: torch.device
) -> float:
    """Share of (at most 2,000) clean test images of other classes that trigger k sends to k."""
    trigger = result.trigger(k)
    victims = test.labels != k
    images = test.images[victims][:2000]
    pred = predict(model, images, device, transform=lambda x: trigger(x).clamp(0, 1))
    return float((pred == k).float().mean())


def reference(kind: str, m: BenchModel, seed: int, args: argparse.Namespace) -> ImageClassifier:
    if kind == "other-clean":
        other = (seed + 1) % 3
        for ref in bench_models(bench_config(), ["clean"], other, cached_only=True):
            return ref.model.eval()
        raise SystemExit(f"the clean bench model of seed {other} is not cached; train it first")
    if kind == "finetuned":
        return budget_trained_model(m, seed, args.ft_epochs, model=copy.deepcopy(m.model), lr=args.ft_lr)
    if kind == "retrained-top":
        return retrained_top(m, seed, args.epochs)
    teacher = m.model.eval()
    temperature = args.temperature

    def distill(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            target = F.softmax(teacher(x) / temperature, 1)
        logits = model(x)
        loss = F.kl_div(F.log_softmax(logits / temperature, 1), target, reduction="batchmean")
        return loss * temperature**2, logits

    if kind == "budget":
        return budget_trained_model(m, seed, args.epochs)
    return budget_trained_model(m, seed, args.distill_epochs, loss_fn=distill)


def retrained_top(m: BenchModel, seed: int, epochs: int) -> ImageClassifier:
    """The suspect's stem and first group kept frozen, everything above re-initialised and trained
    on the defender's budget: low-level detectors (edges, stripes) survive, while the mapping from
    them to a class is learnt again from clean data only, so a backdoor's shortcut should not."""
    model = copy.deepcopy(m.model)
    fresh = create_model("wrn-16-1", m.data.spec)
    kept = ("stem.", "groups.0.")
    state = {k: v for k, v in fresh.state_dict().items() if not k.startswith(kept)}
    model.load_state_dict({**model.state_dict(), **state})
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(kept))
    budget_trained_model(m, seed, epochs, model=model)
    return model.requires_grad_(True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="ATTACK:SEED or clean:SEED")
    parser.add_argument("--reference", action="append", choices=REFERENCES, help="Default: all of them")
    parser.add_argument("--epochs", type=int, default=30, help="Epochs of the budget reference")
    parser.add_argument("--distill-epochs", type=int, default=40, help="Epochs of the distilled reference")
    parser.add_argument("--ft-epochs", type=int, default=5, help="Epochs of the finetuned reference")
    parser.add_argument("--ft-lr", type=float, default=0.01, help="lr of the finetuned reference")
    parser.add_argument("--temperature", type=float, default=4.0, help="Distillation temperature")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="budget",
        choices=["budget", "retrained-top"],
        help="Also divide each α by that reference's α (default: budget)",
    )
    parser.add_argument("--output", default="bdtk-results/transfer.jsonl")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m, seed in cached_bench_models(args.model):
        refs: dict[str, ImageClassifier] = {}
        seconds: dict[str, float] = {}
        accuracies: dict[str, float] = {}
        for kind in args.reference or REFERENCES:
            start = time.perf_counter()
            refs[kind] = reference(kind, m, seed, args)
            seconds[kind] = round(time.perf_counter() - start, 1)
            accuracies[kind] = accuracy(refs[kind], m.test, m.device)
        result = inversion(m, seed, "blend-inversion")
        median = float(torch.quantile(result.mask_norms.double(), 0.5))
        classes: list[dict[str, Any]] = []
        for i, k in enumerate(result.classes):
            row: dict[str, Any] = {
                "k": k,
                "share": round(float(result.mask_norms[i]) / median, 3),
                "self": round(success(m.model, m.test, result, k, m.device), 4),
            }
            row.update(
                {kind: round(success(ref, m.test, result, k, m.device), 4) for kind, ref in refs.items()}
            )
            classes.append(row)
        if args.profile:
            if args.profile not in refs:
                kind = args.profile
                raise SystemExit(f"--profile {kind} scans that reference: add --reference {kind}")
            seed_everything(seed)
            prior = create_inverter("blend-inversion", seed=seed).invert(refs[args.profile], m.data)
            ratio = result.mask_norms.double() / prior.mask_norms.double()
            index = anomaly_index(ratio, log=True)
            for row, r, i in zip(classes, ratio.tolist(), index.tolist(), strict=True):
                row["ratio_share"] = round(r / float(torch.quantile(ratio, 0.5)), 3)
                row["ratio_index"] = round(i, 2)
        record = {
            "model": m.name,
            "seed": seed,
            "true_target": m.true_target,
            "flagged": result.flagged,
            "profile": args.profile,
            "reference_accuracy": accuracies,
            "reference_seconds": seconds,
            "classes": classes,
        }
        append_record(out, record)


if __name__ == "__main__":
    main()

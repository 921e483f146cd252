"""Candidate second tests for a recovered whole-image trigger, measured in feature space.

    python -m benchmarks.signals --model sig:0 --model clean:0 [--inverter blend-inversion]

Blend inversion finds, per class k, the faintest whole-image blend T_k that sends clean images to
k. On the bench models a natural class (Shirt, Bag: the "average garment" classes) is reached by as
faint a blend as SIG's target (docs/inversion.md), so the blend's size alone cannot tell them
apart. This script asks *where* T_k moves the images in the model's penultimate features, on the
defender's clean **val** images (never test data):

- `to_centroid`: cosine between the mean feature shift φ(T_k(x)) − φ(x) over val images of other
  classes and the direction from their mean feature to class k's clean centroid. A natural
  feature makes images look more like k, so its shift points at k's centroid; a backdoor
  trigger activates features clean k images do not have (activation clustering, Chen et al.
  2018; spectral signatures, Tran et al. 2018: poisoned images form their own cluster).
- `separation`: distance from the mean triggered feature to k's clean centroid, over the RMS
  distance of k's clean images to that centroid (≫ 1: the triggered images sit apart).
- `nearest_k`: share of triggered images whose nearest clean class centroid is k.
- `top3`: share of the mean shift's energy in its three largest channels (a backdoor is often
  carried by few neurons, fine-pruning's premise).
- `pattern_cos`, `pattern_auc` (pixel space, on the defender's clean **train** images): does the
  recovered pattern look like class k? The cosine between the pattern minus the mean image and
  class k's mean image minus the mean image, and the share of (class-k image, other image) pairs
  in which the class-k image projects further onto that pattern direction. A natural feature is
  made of what class k's images have; a backdoor trigger of what they lack.

- `shift_keep` (on the defender's val images of other classes): the recovered blend's success
  when its pattern is moved (eight circular shifts of 3–7 pixels, up, down, left, right and
  diagonal) over its success in place. A natural feature is tied to where the garment is; a
  whole-image trigger (SIG's stripes) is not, so its blend should keep working when moved.

Per class the row also holds α's share of the median (`share`) and the trigger's val success.
Inversions are cached (bdtk-results/inversions/, keyed by model, seed and inverter), so the signals
can be recomputed without rescanning. Each model's record is appended to `--output`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backdoor_toolkit import InversionResult, create_inverter
from backdoor_toolkit.data import to_float
from backdoor_toolkit.training import seed_everything
from benchmarks.setting import BenchModel, append_record, cached_bench_models

CACHE = Path("bdtk-results/inversions")


def inversion(m: BenchModel, seed: int, inverter: str) -> InversionResult:
    """The model's scan by `inverter` at its defaults, from the cache when it was run before."""
    path = CACHE / f"{m.name}-{seed}-{inverter.replace(':', '_')}.pt"
    if path.exists():
        result: InversionResult = torch.load(path, weights_only=False)
        return result
    seed_everything(seed)
    result = create_inverter(inverter, seed=seed).invert(m.model, m.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


@torch.no_grad()
def features(m: BenchModel, images: Tensor) -> Tensor:
    model = m.model.eval()
    return torch.cat(
        [
            model.features(images[i : i + 256].to(m.device)).flatten(1).cpu()
            for i in range(0, len(images), 256)
        ]
    )


@torch.no_grad()
def class_signals(
    m: BenchModel, result: InversionResult, k: int, centroids: Tensor, spread: Tensor
) -> dict[str, Any]:
    val = m.data.val
    others = to_float(val.images[val.labels != k])
    trigger = result.trigger(k)
    clean = features(m, others)
    triggered = features(m, trigger(others).clamp(0, 1))
    shift = (triggered - clean).mean(0)
    toward = centroids[k] - clean.mean(0)
    to_centroid = float(torch.nn.functional.cosine_similarity(shift, toward, dim=0))
    separation = float((triggered.mean(0) - centroids[k]).norm() / spread[k])
    nearest = torch.cdist(triggered, centroids).argmin(1)
    energy = shift.pow(2)
    top3 = float(energy.topk(min(3, energy.numel())).values.sum() / energy.sum())
    logits = m.model.fc(triggered.to(m.device)).cpu()
    return {
        "to_centroid": round(to_centroid, 3),
        "separation": round(separation, 2),
        "nearest_k": round(float((nearest == k).float().mean()), 3),
        "top3": round(top3, 3),
        "val_success": round(float((logits.argmax(1) == k).float().mean()), 3),
    }


def pattern_signals(m: BenchModel, pattern: Tensor, k: int) -> dict[str, Any]:
    """`pattern_cos` and `pattern_auc` of the module docstring, on the defender's train images."""
    x, y = m.data.train.float_images(), m.data.train.labels
    mean = x.mean(0)
    direction = (pattern - mean).flatten()
    prototype = (x[y == k].mean(0) - mean).flatten()
    projection = (x - mean).flatten(1) @ direction
    inside, outside = projection[y == k], projection[y != k]
    return {
        "pattern_cos": round(float(torch.nn.functional.cosine_similarity(direction, prototype, dim=0)), 3),
        "pattern_auc": round(float((inside[:, None] > outside[None, :]).float().mean()), 3),
    }


#: The shifts (rows, columns) of `shift_keep`.
SHIFTS = [(0, 4), (0, -4), (4, 0), (-4, 0), (0, 7), (7, 0), (3, 3), (-3, -3)]


@torch.no_grad()
def shift_keep(m: BenchModel, result: InversionResult, i: int, k: int) -> float:
    """`shift_keep` of the module docstring for class k (the i-th inverted class)."""
    val = m.data.val
    x = to_float(val.images[val.labels != k])
    alpha, pattern = result.masks[i], result.patterns[i]

    def success(p: Tensor) -> float:
        stamped = ((1 - alpha) * x + alpha * p).clamp(0, 1)
        return float((m.model(stamped.to(m.device)).argmax(1).cpu() == k).float().mean())

    base = success(pattern)
    moved = [success(torch.roll(pattern, s, dims=(-2, -1))) for s in SHIFTS]
    return sum(moved) / len(moved) / base if base else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="ATTACK:SEED or clean:SEED")
    parser.add_argument("--inverter", default="blend-inversion")
    parser.add_argument("--output", default="bdtk-results/signals.jsonl")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m, seed in cached_bench_models(args.model):
        result = inversion(m, seed, args.inverter)
        val = m.data.val
        clean = features(m, to_float(val.images))
        centroids = torch.stack([clean[val.labels == c].mean(0) for c in range(int(val.labels.max()) + 1)])
        spread = torch.stack(
            [
                (clean[val.labels == c] - centroids[c]).norm(dim=1).pow(2).mean().sqrt()
                for c in range(len(centroids))
            ]
        )
        median = float(torch.quantile(result.mask_norms.double(), 0.5))
        classes = []
        for i, k in enumerate(result.classes):
            row = {"k": k, "share": round(float(result.mask_norms[i]) / median, 3)}
            row.update(class_signals(m, result, k, centroids, spread))
            row.update(pattern_signals(m, result.patterns[i], k))
            row["shift_keep"] = round(shift_keep(m, result, i, k), 3)
            classes.append(row)
        record = {
            "model": m.name,
            "seed": seed,
            "inverter": args.inverter,
            "true_target": m.true_target,
            "flagged": result.flagged,
            "classes": classes,
        }
        append_record(out, record)


if __name__ == "__main__":
    main()

"""Per-class maximum logit margin, a data-free backdoor statistic, on cached bench models.

    python -m benchmarks.margin --model sig:0 --model clean:0

MM-BD (Wang, Xiang, Miller, Kesidis, IEEE S&P 2024) observes that a backdoor makes its target
class reachable with an abnormally large logit margin f_k(x) − max_{j≠k} f_j(x) somewhere in the
input space, whatever the trigger's shape, and detects it as an outlier among the classes' maximum
margins. Here, per class k, the margin is maximised over images x ∈ [0, 1] (x = sigmoid(w), Adam
on w) from `--starts` uniform random images for `--steps` steps, and the largest final margin is
the class's statistic. No clean data is used. The question this script answers is whether SIG's
target stands out on the bench models, where the blend inversion's α does not
(docs/inversion.md); it reports the statistics and the target's rank, not a verdict.

With `--reference budget`, a wrn-16-1 trained on the defender's clean budget alone (the train
part, `--epochs`) is measured the same way, and each class's margin on the suspect is divided by
its margin on that reference: a class prior, since some classes (bags, footwear) reach large
margins in any Fashion-MNIST model. `ratio_index` is the MAD anomaly index of the log ratios (above
the median only: a backdoor raises its target's margin).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from backdoor_toolkit import ImageClassifier, anomaly_index
from benchmarks.setting import append_record, budget_trained_model, cached_bench_models


def max_margin(
    model: ImageClassifier, k: int, shape: tuple[int, ...], starts: int, steps: int, lr: float, seed: int
) -> float:
    """The largest margin of class k reached from `starts` random images after `steps` Adam steps."""
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    start = torch.rand((starts, *shape), generator=gen).clamp(1e-3, 1 - 1e-3)
    w = torch.logit(start).requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=lr)

    def margins(x: Tensor) -> Tensor:
        logits = model(x)
        others = torch.cat([logits[:, :k], logits[:, k + 1 :]], dim=1)
        return logits[:, k] - others.max(dim=1).values

    for _ in range(steps):
        loss = -margins(torch.sigmoid(w)).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float(margins(torch.sigmoid(w)).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="ATTACK:SEED or clean:SEED")
    parser.add_argument("--starts", type=int, default=16, help="random starting images per class")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--reference", choices=["budget"], help="also divide by a budget-trained model's margins"
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the budget reference")
    parser.add_argument("--output", default="bdtk-results/margin.jsonl")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m, seed in cached_bench_models(args.model):
        model = m.model.eval().requires_grad_(False)
        shape = tuple(m.test.images.shape[1:])
        started = time.perf_counter()
        stats = [
            max_margin(model, k, shape, args.starts, args.steps, args.lr, seed)
            for k in range(m.data.spec.num_classes)
        ]
        order = sorted(range(len(stats)), key=lambda k: -stats[k])
        target = m.true_target
        extra: dict[str, object] = {}
        if args.reference == "budget":
            ref = budget_trained_model(m, seed, args.epochs).requires_grad_(False)
            ref_stats = [
                max_margin(ref, k, shape, args.starts, args.steps, args.lr, seed)
                for k in range(m.data.spec.num_classes)
            ]
            ratio = torch.tensor(stats).clamp_min(1e-3).log() - torch.tensor(ref_stats).clamp_min(1e-3).log()
            index = anomaly_index(ratio)
            above = ratio > ratio.median()
            extra = {
                "reference_margin": [round(v, 3) for v in ref_stats],
                "log_ratio": [round(float(v), 3) for v in ratio],
                "ratio_index": [
                    round(float(v), 2) if bool(a) else 0.0 for v, a in zip(index, above, strict=True)
                ],
            }
        append_record(
            out,
            {
                **extra,
                "model": m.name,
                "seed": seed,
                "target": target,
                "max_margin": [round(v, 3) for v in stats],
                "largest_first": order,
                "target_rank": None if target is None else order.index(target) + 1,
                "starts": args.starts,
                "steps": args.steps,
                "lr": args.lr,
                "seconds": round(time.perf_counter() - started, 1),
            },
        )


if __name__ == "__main__":
    main()

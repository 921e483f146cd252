"""Where adversarial neuron noise sends clean images: a trigger-shape-free backdoor signal.

    python -m benchmarks.noise --model sig:0 --model clean:0 [--eps 0.2 --eps 0.4]

ANP (Wu & Wang, NeurIPS 2021, Fig. 1) observed that a small adversarial perturbation of the
neurons of a backdoored model makes it misclassify clean images *into the target class*, and BAN
(Xu et al., "BAN: Detecting Backdoors Activated by Adversarial Neuron Noise", NeurIPS 2024) builds
a detector on it: backdoor neurons are easy to switch on, so the noise that maximises the clean
loss takes the backdoor's path. The signal assumes nothing about the trigger's shape, which is
what the whole-image SIG trigger needs (docs/inversion.md: the signals tried before, most of them
built on a recovered trigger, fail on it).

Per model and bound ε: every BatchNorm neuron's weight and bias are scaled by (1 + δ) and
(1 + ξ), |δ|, |ξ| ≤ ε, one (δ, ξ) for the whole model; starting uniformly in the ε-box, `--steps`
signed-gradient steps of ε/4 raise the mean cross-entropy of the defender's clean **train** images
(BatchNorm normalises with the batch's statistics, as ANP's optimisation does in train
mode; the running statistics are not updated). The record holds, on the defender's clean **val**
images (never test data), the accuracy under the noise and, per class k, the share of val images
of *other* classes predicted k (`sink_share`), with its MAD anomaly index (high side). It reports
the statistics and the target's rank, not a verdict.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import ImageClassifier, anomaly_index
from backdoor_toolkit.data import to_float
from benchmarks.setting import append_record, named_bench_models


class ScaledBatchNorm:
    """Forward hook: a BatchNorm2d on batch statistics with weight · (1 + δ) and bias · (1 + ξ)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        self.delta = torch.zeros(bn.num_features)
        self.xi = torch.zeros(bn.num_features)
        self.handle = bn.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        assert isinstance(module, nn.BatchNorm2d)
        # batch statistics, as ANP optimises in train mode: the next layer renormalises what a
        # perturbed neuron changes, instead of the change compounding through every layer; the
        # running statistics are not updated
        return F.batch_norm(
            inputs[0],
            None,
            None,
            module.weight * (1 + self.delta),
            module.bias * (1 + self.xi),
            True,
            0.0,
            module.eps,
        )


def noisy_predictions(
    model: ImageClassifier, fit: tuple[Tensor, Tensor], probe: Tensor, eps: float, steps: int, seed: int
) -> tuple[Tensor, float]:
    """Predictions on `probe` under the neuron noise that maximises the loss on `fit`, and that loss."""
    hooks = [ScaledBatchNorm(bn) for bn in model.batchnorms()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for h in hooks:
            h.delta = ((torch.rand(h.delta.shape, generator=gen) * 2 - 1) * eps).requires_grad_(True)
            h.xi = ((torch.rand(h.xi.shape, generator=gen) * 2 - 1) * eps).requires_grad_(True)
        x, y = fit
        loss = torch.tensor(0.0)
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            leaves = [t for h in hooks for t in (h.delta, h.xi)]
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                for h, g_d, g_x in zip(hooks, grads[0::2], grads[1::2], strict=True):
                    h.delta = (h.delta + eps / 4 * g_d.sign()).clamp(-eps, eps).requires_grad_(True)
                    h.xi = (h.xi + eps / 4 * g_x.sign()).clamp(-eps, eps).requires_grad_(True)
        with torch.no_grad():
            final = float(F.cross_entropy(model(x), y))
            preds = model(probe).argmax(1)
        del loss
        return preds, final
    finally:
        for h in hooks:
            h.handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="ATTACK:SEED or clean:SEED")
    parser.add_argument("--eps", action="append", type=float, help="bounds ε (default 0.05 0.1 0.2 0.4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="bdtk-results/noise.jsonl")
    args = parser.parse_args()
    eps_values = args.eps or [0.05, 0.1, 0.2, 0.4]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m, seed in named_bench_models(args.model):
        model = m.model.eval().requires_grad_(False)
        fit = (to_float(m.data.train.images), m.data.train.labels)
        probe, labels = to_float(m.data.val.images), m.data.val.labels
        k_classes = m.data.spec.num_classes
        for eps in eps_values:
            started = time.perf_counter()
            preds, loss = noisy_predictions(model, fit, probe, eps, args.steps, seed)
            share = []
            for k in range(k_classes):
                others = labels != k
                share.append(float((preds[others] == k).float().mean()))
            shares = torch.tensor(share)
            index = anomaly_index(shares)
            above = shares > shares.median()
            order = sorted(range(k_classes), key=lambda k: -share[k])
            target = m.true_target
            append_record(
                out,
                {
                    "model": m.name,
                    "seed": seed,
                    "target": target,
                    "eps": eps,
                    "steps": args.steps,
                    "fit_loss": round(loss, 3),
                    "val_accuracy": round(float((preds == labels).float().mean()), 4),
                    "sink_share": [round(v, 3) for v in share],
                    "index": [
                        round(float(v), 2) if bool(a) else 0.0 for v, a in zip(index, above, strict=True)
                    ],
                    "largest_first": order,
                    "target_rank": None if target is None else order.index(target) + 1,
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )


if __name__ == "__main__":
    main()

"""The sparsest universal perturbation in the frequency domain that sends clean images to a class.

    python -m benchmarks.frequency --model sig:0 --model clean:0 [--norm dct-l1 | l2]

A whole-image trigger such as SIG's sinusoid (Barni et al., 2019) is faint in every pixel, so
Neural Cleanse's small mask misses it, and blend inversion finds that natural classes of a clean
Fashion-MNIST model are reached by about as faint a blend (docs/inversion.md). But a sinusoid is
*one frequency*: in the 2-D DCT it is a handful of coefficients, while a blend that looks like a
shirt is spread over many. Frequency-domain views of triggers are the subject of Zeng, Park, Mao,
Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective" (ICCV 2021), who find
that triggers carry high-frequency artefacts that natural images lack.

Per class k, one additive perturbation δ_k = IDCT2(c_k), stamped as clamp(x + δ_k, 0, 1), and

    CE(f(clamp(x + δ_k)), k) + λ_k · ‖c_k‖₁            (--norm dct-l1: sparse in frequency)
    CE(f(clamp(x + δ_k)), k) + λ_k · ‖δ_k‖₂            (--norm l2: a universal perturbation's energy)

over the defender's clean train images, λ_k adapted per class as Neural Cleanse does (0 until
the perturbation first works, then ×1.5 / ÷1.5 after `--patience` rounds above / below the
success threshold). The best working perturbation's norm is recorded with its attack success on
the defender's val images of other classes, its MAD index on log norms (low side), and the
target's rank. It reports statistics, not a verdict.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from backdoor_toolkit import ImageClassifier, anomaly_index
from backdoor_toolkit.data import to_float
from benchmarks.setting import append_record, named_bench_models


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix D (n × n): coefficients = D @ x @ D.T, x = D.T @ c @ D."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def scan(
    model: ImageClassifier,
    train: Tensor,
    val: tuple[Tensor, Tensor],
    norm: str,
    steps: int,
    batch: int,
    lr: float,
    threshold: float,
    patience: int,
    lam0: float,
    seed: int,
) -> dict[str, list[float]]:
    k_classes = int(val[1].max()) + 1
    c_, h, w = train.shape[1:]
    dh, dw = dct_matrix(h), dct_matrix(w)
    coef = torch.zeros(k_classes, c_, h, w, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=lr, betas=(0.5, 0.9))
    targets = torch.arange(k_classes)
    lam = torch.zeros(k_classes)
    started = torch.zeros(k_classes, dtype=torch.bool)
    above = torch.zeros(k_classes, dtype=torch.long)
    below = torch.zeros(k_classes, dtype=torch.long)
    best = torch.full((k_classes,), math.inf)
    best_coef = torch.zeros_like(coef)
    gen = torch.Generator().manual_seed(seed)
    round_hits = torch.zeros(k_classes)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        x = train[idx]
        delta = dh.T @ coef @ dw  # (K, C, H, W)
        stamped = (x[None] + delta[:, None]).clamp(0, 1).flatten(0, 1)
        logits = model(stamped)
        y = targets.repeat_interleave(batch)
        ce = F.cross_entropy(logits, y, reduction="none").view(k_classes, batch).mean(1)
        size = coef.abs().flatten(1).sum(1) if norm == "dct-l1" else delta.flatten(1).norm(dim=1)
        loss = (ce + torch.where(started, lam, 0.0) * size).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            round_hits += (logits.argmax(1) == y).view(k_classes, batch).float().mean(1)
        if step % 10 == 0:
            if step % 100 == 0:
                print(f"step {step}: best {[round(float(v), 2) for v in best]}", flush=True)
            success = round_hits / 10
            round_hits.zero_()
            hit = success >= threshold
            with torch.no_grad():
                now = (
                    coef.abs().flatten(1).sum(1)
                    if norm == "dct-l1"
                    else (dh.T @ coef @ dw).flatten(1).norm(dim=1)
                )
            better = hit & (now < best)
            best = torch.where(better, now, best)
            best_coef[better] = coef.detach()[better]
            newly = hit & ~started
            lam = torch.where(newly, torch.full_like(lam, lam0), lam)
            started |= hit
            above = torch.where(started & hit, above + 1, 0)
            below = torch.where(started & ~hit, below + 1, 0)
            up = above >= patience
            down = below >= patience
            lam = torch.where(up, lam * 1.5, torch.where(down, lam / 1.5, lam))
            above = torch.where(up, 0, above)
            below = torch.where(down, 0, below)
    with torch.no_grad():
        delta = dh.T @ best_coef @ dw
        xs, ys = val
        success = []
        energy = []
        for k in range(k_classes):
            others = xs[ys != k]
            preds = model((others + delta[k]).clamp(0, 1)).argmax(1)
            success.append(float((preds == k).float().mean()))
            energy.append(float(delta[k].norm()))
        spectrum = best_coef.abs().flatten(1)
        top = spectrum.sort(dim=1, descending=True).values
        top4 = (top[:, :4].sum(1) / top.sum(1).clamp_min(1e-12)).tolist()
    return {
        "norm": [float(v) for v in best],
        "val_success": success,
        "l2": energy,
        "top4_share": top4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="ATTACK:SEED or clean:SEED")
    parser.add_argument("--norm", choices=["dct-l1", "l2"], default="dct-l1")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--lambda-init", type=float, default=0.01)
    parser.add_argument("--output", default="bdtk-results/frequency.jsonl")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m, seed in named_bench_models(args.model):
        model = m.model.eval().requires_grad_(False)
        train = to_float(m.data.train.images)
        val = (to_float(m.data.val.images), m.data.val.labels)
        started = time.perf_counter()
        stats = scan(
            model, train, val, args.norm, args.steps, args.batch, args.lr, args.threshold,
            args.patience, args.lambda_init, seed,
        )  # fmt: skip
        norms = torch.tensor(stats["norm"])
        finite = torch.isfinite(norms)
        index = torch.zeros_like(norms)
        index[finite] = anomaly_index(norms[finite], log=True)
        median = float(norms[finite].median()) if bool(finite.any()) else math.nan
        order = sorted(range(len(norms)), key=lambda k: float(norms[k]))
        target = m.true_target
        record = {
            "model": m.name,
            "seed": seed,
            "target": target,
            "norm_kind": args.norm,
            "steps": args.steps,
            "norm": [round(v, 3) for v in stats["norm"]],
            "share_of_median": [round(float(v) / median, 3) for v in norms],
            "index_low_side": [
                round(float(i), 2) if float(v) < median else 0.0 for i, v in zip(index, norms, strict=True)
            ],
            "val_success": [round(v, 3) for v in stats["val_success"]],
            "l2": [round(v, 3) for v in stats["l2"]],
            "top4_share": [round(v, 3) for v in stats["top4_share"]],
            "smallest_first": order,
            "target_rank": None if target is None else order.index(target) + 1,
            "seconds": round(time.perf_counter() - started, 1),
        }
        append_record(out, record)


if __name__ == "__main__":
    main()

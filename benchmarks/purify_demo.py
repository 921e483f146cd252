"""The example of docs/purify.md: a backdoored torchvision ResNet-18 and folders of clean images.

    python -m benchmarks.purify_demo --out /tmp/demo     # writes the model and the folders
    bdtk purify /tmp/demo/resnet18.safetensors --model torchvision:resnet18 \\
        --data folder:/tmp/demo/clean --test-data folder:/tmp/demo/test --mean 0.5 --std 0.25 \\
        --defense mcldef --out /tmp/demo/out/resnet18-purified.safetensors

A synthetic 10-class task on 16×16 RGB noise (class k: a bright 3×3 square at one of ten grid
positions), so that it needs no dataset and trains on a CPU in minutes. The backdoor: 10 % of the
3,000 training images carry a 3×3 checkerboard in the bottom-right corner and are labelled 0
(BadNets). The model is trained with Adam for 2 epochs, inputs normalised with mean 0.5, std 0.25.
It prints the model's clean accuracy and the real trigger's ASR on fresh images, before any
defense; `--check PURIFIED` prints the same for a purified file, which is how the numbers below
the table in docs/purify.md were measured (bdtk itself never sees the real trigger).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

#: Where class k's square sits (rows 1, 5, 9): never in the bottom-right corner the trigger uses.
POSITIONS = [(1 + 4 * (k // 4), 1 + 4 * (k % 4)) for k in range(10)]
PATCH = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
MEAN, STD = 0.5, 0.25


def images(n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    labels = rng.integers(0, 10, n)
    pixels = rng.normal(0.3, 0.1, (n, 3, 16, 16)).clip(0, 1)
    for i, k in enumerate(labels):
        r, c = POSITIONS[k]
        pixels[i, :, r : r + 3, c : c + 3] = 0.95
    return torch.tensor(pixels, dtype=torch.float32), torch.tensor(labels)


def stamp(x: Tensor) -> Tensor:
    x = x.clone()
    x[:, :, -3:, -3:] = PATCH
    return x


@torch.no_grad()
def scores(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Clean accuracy, and ASR of the real trigger on images of classes other than 0."""
    net.eval()
    clean = float((net((x - MEAN) / STD).argmax(1) == y).float().mean())
    asr = float((net((stamp(x[y != 0]) - MEAN) / STD).argmax(1) == 0).float().mean())
    return clean, asr


def train(out: Path, seed: int) -> None:
    torch.set_num_threads(1)  # as in the run docs/purify.md shows (float results depend on it)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = images(3000, rng)
    poison = torch.arange(3000)[y != 0][:300]
    x[poison], y[poison] = stamp(x[poison]), 0
    net = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(2):
        net.train()
        order = torch.randperm(3000)
        for start in range(0, 3000, 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(net((x[batch] - MEAN) / STD), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / "resnet18.safetensors"))
    for split, n in (("clean", 300), ("test", 500)):
        cx, cy = images(n, rng)
        for i, (img, k) in enumerate(zip(cx, cy, strict=True)):
            folder = out / split / f"class_{int(k)}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(folder / f"{i}.png")
    check(out / "resnet18.safetensors", seed)


def check(path: Path, seed: int) -> None:
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(load_file(str(path)))
    clean, asr = scores(net, *images(1000, np.random.default_rng(seed + 7)))
    print(f"{path}: clean accuracy {100 * clean:.1f} %, real-trigger ASR {100 * asr:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bdtk-results/purify-demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=Path, help="Only measure this (purified) ResNet-18 file")
    args = parser.parse_args()
    if args.check:
        check(args.check, args.seed)
    else:
        train(args.out, args.seed)


if __name__ == "__main__":
    main()

"""One device-agnostic training loop, seeding, and batch augmentation on tensors."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .console import progress
from .data import DataSpec
from .errors import BdtkError, NonFiniteError


@dataclass
class TrainingSettings:
    """How a model is trained on a poisoned set; shared by the loop and training-controlled attacks."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    hflip: bool
    device: torch.device

    @classmethod
    def from_config(cls, config: TrainingFields, spec: DataSpec, device: torch.device) -> TrainingSettings:
        """From any config with epochs, batch_size, lr, weight_decay and augment fields."""
        return cls(
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            augment=config.augment,
            hflip=spec.hflip,
            device=device,
        )


class TrainingFields(Protocol):
    """The training fields a config shares with `TrainingSettings` (attack training, fine-tuning)."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def augment(self) -> bool: ...


BatchHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch CPU threads, then restore the previous count.

    On CPU a reduction's order, and so its float result, depends on the thread count: the same
    cell trained with 1 and with 2 threads gives different models. The runner therefore fixes the
    count per cell, wherever the cell runs, and records it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a CPU re-run reproduces its numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BdtkError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BdtkError("Device 'cuda' was asked for but CUDA is not available here; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BdtkError("Device 'mps' was asked for but MPS is not available here; use --device cpu.")
    return device


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """The layout convolutions run fastest in on `device`: channels-last on CPU and CUDA.

    Measured with benchmarks/speed.py (docs/defenses/mcldef.md): on the 2-core CPU a wrn-16-1 step
    in channels-last costs about 0.7–0.75× the default layout's; cuDNN prefers it as well. MPS and
    other backends keep the default layout. Numbers differ from the default layout only in the last
    float bits; reruns in one layout stay bit-identical.
    """
    if device.type in ("cpu", "cuda"):
        return torch.channels_last
    return torch.contiguous_format


def _layout_of(model: nn.Module) -> torch.memory_format:
    """The layout `model`'s convolution weights are in (contiguous when no weight tells them apart)."""
    for p in model.parameters():
        distinct = p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
        if distinct and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


@contextmanager
def preferred_layout(model: nn.Module, device: torch.device) -> Iterator[torch.memory_format]:
    """Run `model` in `device`'s fastest layout inside the block, and give it back in the layout it had.

    Convolutions follow their weights' layout, so converting the model is enough: each conv then
    reads its input in that layout too. Numbers differ from the default layout only in the last
    float bits; reruns stay bit-identical. The layout is restored (also on error) because saving
    weights, and callers that hold views of them, expect the layout they handed in.
    """
    layout = preferred_memory_format(device)
    before = _layout_of(model)
    if before == layout:
        yield layout
        return
    model.to(memory_format=layout)
    try:
        yield layout
    finally:
        model.to(memory_format=before)


def augment_batch(images: Tensor, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (1/8 of the side) and, where it fits, horizontal flips."""
    b, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(images.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(images.device)
    batch_idx = torch.arange(b, device=images.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def iterate_batches(
    images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator, shuffle: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (float images in [0, 1], labels) batches from uint8 or float tensors."""
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        yield (x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()), labels[idx]


LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor | None]]
"""(model, x, y) → (loss, logits or None); logits feed the accuracy shown in the progress bar."""


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """The default `loss_fn` of `train_classifier` and `fine_tune`: (cross-entropy of `model(x)`
    against `y`, the logits); a custom loss returns the same pair (logits None to skip the
    progress bar's accuracy)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def training_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except that a BatchNorm whose weight and bias are frozen stays in eval mode.

    A defense that freezes part of the network (fine-tuning the head alone, say) means that part
    to stay as it is; in train mode its BatchNorm layers would still overwrite their running
    statistics from every batch, changing the frozen layers' outputs at test time.
    """
    model.train()
    for module in model.modules():
        frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and frozen:
            module.eval()
    return model


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: TrainingSettings,
    seed: int,
    batch_hook: BatchHook | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    description: str = "train",
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """SGD (momentum 0.9) with a cosine schedule over the run's real length; returns epoch losses.

    `batch_hook` lets training-controlled attacks rewrite each batch; `loss_fn` lets defenses add
    terms; `after_step` runs after each optimiser step (e.g. to keep pruned weights at zero).
    Only parameters with `requires_grad` are trained, and frozen BatchNorm layers keep their
    running statistics (`training_mode`).
    """
    if labels.numel() == 0:
        raise BdtkError("Cannot train on an empty set.")
    device = settings.device
    training_mode(model.to(device))
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-labels.numel() // settings.batch_size)
    total = max(1, settings.epochs * steps_per_epoch)
    optimiser = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.lr,
        momentum=0.9,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    epoch_losses: list[float] = []
    with progress() as bar, preferred_layout(model, device) as layout:
        task = bar.add_task(description, total=total, status="")
        for epoch in range(settings.epochs):
            seen, loss_sum, correct = 0, 0.0, 0
            for x, y in iterate_batches(images, labels, settings.batch_size, gen):
                if batch_hook is not None:
                    x, y = batch_hook(x, y)
                if settings.augment:
                    x = augment_batch(x, settings.hflip, gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss, logits = loss_fn(model, x.contiguous(memory_format=layout), y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                if after_step is not None:
                    after_step()
                seen += y.numel()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteError(
                        f"{description}: the loss became {value} at epoch {epoch + 1}; training "
                        f"diverged. Lower the learning rate (now {settings.lr:g}) or the weight decay "
                        f"({settings.weight_decay:g}), or the loss's weights."
                    )
                loss_sum += value * y.numel()
                status = f"epoch {epoch + 1}/{settings.epochs} loss {loss_sum / seen:.3f}"
                if logits is not None:
                    correct += int((logits.detach().argmax(1) == y).sum())
                    status += f" acc {correct / seen:.1%}"
                bar.update(task, advance=1, status=status)
            epoch_losses.append(loss_sum / max(seen, 1))
    model.eval()
    check_finite(model, description)
    return epoch_losses


def check_finite(model: nn.Module, what: str) -> None:
    """Raise NonFiniteError naming `what` unless every floating weight and buffer is finite."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{what}: the model's {name} holds NaN or infinite values (training diverged); "
                "lower the learning rate, the weight decay or the loss's weights."
            )

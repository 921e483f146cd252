"""What the inverters of this package share: input checks and the recovered triggers' attack success.

Every inverter here must refuse bad input with the same sentences and measure a recovered
trigger's success on the same images in the same way, or `bdtk inspect` would show two inverters'
numbers that cannot be compared. Stamping and the outlier test live in the core
(`stamp_all`, `anomaly_index`, `flag_targets`); this module holds only what the core leaves to
inverters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoor_toolkit import BdtkError, DefenseData, stamp_all, to_float

__all__ = ["attack_success", "check_inputs", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_inputs(model: nn.Module, data: DefenseData, classes: list[int], who: str) -> None:
    """Fail with one clear `BdtkError` before any optimisation starts; `who` names the inverter."""
    spec = data.spec
    if len(data.train) == 0:
        raise BdtkError(f"{who} needs clean images, but the defender's training part is empty.")
    spec.check_images(data.train.images)
    if len(data.val):
        spec.check_images(data.val.images)
    bad = [k for k in classes if not 0 <= k < spec.num_classes]
    if bad:
        raise BdtkError(
            f"Class index {bad[0]} is out of range for {spec.name!r}, which has classes "
            f"0–{spec.num_classes - 1}."
        )
    if len(set(classes)) != len(classes):
        raise BdtkError(f"Classes to invert contain duplicates: {classes}.")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(to_float(data.train.images[:2]).to(device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BdtkError(
            f"The model fails on images of shape {tuple(data.train.images.shape[1:])}: {first}"
        ) from None
    finally:
        model.train(was_training)
    if logits.dim() != 2 or logits.shape[1] != spec.num_classes:
        raise BdtkError(
            f"The model returns logits of shape {tuple(logits.shape)}, but {spec.name!r} has "
            f"{spec.num_classes} classes: expected (N, {spec.num_classes})."
        )


@torch.no_grad()
def attack_success(
    model: nn.Module,
    data: DefenseData,
    classes: list[int],
    masks: Tensor,
    patterns: Tensor,
    eval_images: int,
) -> Tensor:
    """(K,) share of clean images of other classes that each trigger sends to its class.

    Measured on the defender's `val` part (its `train` part when `val` is empty), at most
    `eval_images` images, never on test data: the val images were not used to optimise the
    triggers, so a trigger that only fits its own batches does not look better than it is.
    """
    pool = data.val if len(data.val) else data.train
    images, labels = pool.images[:eval_images], pool.labels[:eval_images]
    device = model_device(model)
    targets = torch.tensor(classes)
    hits = torch.zeros(len(classes))
    counts = torch.zeros(len(classes))
    # about 256 stamped images per forward: larger batches of small images run slower on CPU (cache)
    chunk = max(1, 256 // len(classes))
    for s in range(0, len(labels), chunk):
        x = to_float(images[s : s + chunk]).to(device)
        y = labels[s : s + chunk]
        pred = model(stamp_all(x, masks, patterns)).argmax(1).view(len(classes), -1).cpu()
        victim = y.unsqueeze(0) != targets.unsqueeze(1)
        hits += ((pred == targets.unsqueeze(1)) & victim).sum(1)
        counts += victim.sum(1)
    return hits / counts.clamp_min(1)

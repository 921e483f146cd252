"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune dormant channels, then fine-tune.

Backdoor behaviour tends to live in channels of the last convolutional layer that clean inputs
leave dormant. Channels of `model.final` are ranked by their mean activation on the clean budget's
train part and masked out, least active first, step by step, until clean *validation* accuracy
falls by more than `max_val_drop`; the largest pruning within that budget is kept and the network
is fine-tuned with those channels held at zero.

During pruning and fine-tuning the mask is a forward hook on `model.final` (a `ChannelMask`, which
survives `copy.deepcopy` and pickling). When fine-tuning ends it becomes part of the weights
(`fold_mask`), so that a state dict of the purified model, loaded into the plain architecture,
computes the same outputs (`bdtk purify` writes such a file):

- where the pruned maps come out of a BatchNorm followed by a ReLU (possibly with pooling after it),
  that BatchNorm's scale and shift are zeroed for the pruned channels. They then output exactly
  zero, and stay zero under any later fine-tuning: a ReLU at zero passes no gradient back. The
  hook is removed; the weights are the whole pruning.
- where the maps are a residual sum that no single layer produces (the post-activation ResNet,
  BackdoorBench's PreAct-ResNet), the columns of `fc` that read the pruned channels are zeroed:
  the logits are exactly the masked model's. The hook stays on, so that `final_maps`, `features`
  and any later fine-tuning of this model object (the benchmark's re-tuning attack) still see
  the channels removed, as the pruning means them to be.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from backdoor_toolkit import (
    Capability,
    DefenseData,
    FineTuneConfig,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    accuracy,
    fine_tune,
    iterate_batches,
)


class ChannelMask:
    """Forward hook that multiplies a module's (B, C, H, W) output by a fixed 0/1 channel mask."""

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep.float()

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output * self.keep.to(output.device).view(1, -1, 1, 1)

    @property
    def pruned(self) -> list[int]:
        return torch.nonzero(self.keep == 0).flatten().tolist()


#: Modules that map an all-zero channel to an all-zero channel of the same index, at any mode.
_ZERO_KEEPING = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)


def _steps(module: nn.Module) -> list[nn.Module]:
    """The modules a Sequential tree applies, in order; any other module is one opaque step."""
    if isinstance(module, nn.Sequential):
        return [step for child in module for step in _steps(child)]
    return [module]


def channel_batchnorm(model: ImageClassifier, channels: int) -> nn.BatchNorm2d | None:
    """The BatchNorm whose channels become `model.final_maps`' channels through a ReLU and only
    zero-keeping, per-channel modules after it; None when the maps are made otherwise (a residual
    sum, a block of its own kind) or the model computes its final maps its own way."""
    if type(model).final_maps is not ImageClassifier.final_maps:
        return None
    chain = [step for part in (model.stem, *model.groups, model.final) for step in _steps(part)]
    rectified = False
    for step in reversed(chain):
        if isinstance(step, nn.ReLU):
            rectified = True
        elif isinstance(step, nn.BatchNorm2d):
            usable = rectified and step.affine and step.num_features == channels
            return step if usable else None
        elif not isinstance(step, _ZERO_KEEPING):
            return None
    return None


def _head_reads_pooled_maps(model: ImageClassifier, channels: int) -> bool:
    """Whether the logits are `fc(avgpool(final_maps))`, so that zeroing `fc`'s column of a channel
    is exactly masking that channel."""
    cls = type(model)
    return (
        cls.forward is ImageClassifier.forward
        and cls.features is ImageClassifier.features
        and isinstance(model.fc, nn.Linear)
        and model.fc.in_features == channels
    )


@torch.no_grad()
def fold_mask(model: ImageClassifier, mask: ChannelMask, handle: RemovableHandle) -> str | None:
    """Make the mask part of `model`'s weights, leaving its outputs exactly as they are.

    Returns where it went (the BatchNorm's name, or "fc"), or None when neither applies (the hook
    then stays the only place the pruning lives). The hook is removed only when the weights hold
    the whole pruning (the BatchNorm case); see the module docstring.
    """
    pruned = mask.pruned
    channels = int(mask.keep.numel())
    if not pruned:
        return None
    norm = channel_batchnorm(model, channels)
    if norm is not None:
        norm.weight[pruned] = 0
        norm.bias[pruned] = 0
        handle.remove()
        return next(name for name, module in model.named_modules() if module is norm)
    if _head_reads_pooled_maps(model, channels):
        model.fc.weight[:, pruned] = 0
        return "fc"
    return None


@torch.no_grad()
def mean_channel_activation(
    model: ImageClassifier, images: Tensor, labels: Tensor, device: torch.device, batch_size: int = 256
) -> Tensor:
    """Mean activation of each channel of `model.final` over images and positions."""
    model.eval().to(device)
    total: Tensor | None = None
    count = 0
    gen = torch.Generator().manual_seed(0)
    for x, _ in iterate_batches(images, labels, batch_size, gen, shuffle=False):
        maps = model.final_maps(x.to(device))
        batch_sum = maps.sum(dim=(0, 2, 3))
        total = batch_sum if total is None else total + batch_sum
        count += maps.shape[0] * maps.shape[2] * maps.shape[3]
    assert total is not None, "empty clean budget"
    return (total / count).cpu()


class FinePruningConfig(FineTuneConfig):
    """Pruning settings; the fine-tuning fields are those of `finetune`."""

    step: float = Field(
        default=0.05,
        gt=0,
        le=0.5,
        description="Share of the last layer's channels pruned per step (at least one channel)",
    )
    max_val_drop: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Keep pruning while clean validation accuracy stays within this absolute drop",
    )
    max_prune_ratio: float = Field(
        default=0.95, gt=0, lt=1, description="Never prune more than this share of the channels"
    )


class FinePruning(Purifier):
    name = "fine-pruning"
    Config = FinePruningConfig
    config: FinePruningConfig
    meta = PluginMeta(
        summary="Prune last-layer channels dormant on clean data within a clean-val budget, then fine-tune",
        paper="Liu, Dolan-Gavitt & Garg, Fine-Pruning: Defending Against Backdooring Attacks on "
        "Deep Neural Networks, RAID 2018",
        year=2018,
        url="https://arxiv.org/abs/1805.12185",
        threat_model="defender holds a small clean set from the training distribution",
        requires=(Capability.FINAL_MAPS,),
    )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        data.require_val("fine-pruning", "chooses how many channels to prune")
        activation = mean_channel_activation(model, data.train.images, data.train.labels, self.device)
        channels = activation.numel()
        order = torch.argsort(activation)  # dormant first
        step = max(1, round(c.step * channels))
        limit = int(c.max_prune_ratio * channels)

        mask = ChannelMask(torch.ones(channels))
        handle = model.final.register_forward_hook(mask)
        base_acc = accuracy(model, data.val, self.device)
        curve: list[tuple[int, float]] = [(0, base_acc)]
        chosen = 0
        for count in [*range(step, limit, step), limit]:
            mask.keep = torch.ones(channels)
            mask.keep[order[:count]] = 0
            acc = accuracy(model, data.val, self.device)
            curve.append((count, acc))
            if base_acc - acc > c.max_val_drop:
                break
            chosen = count
        mask.keep = torch.ones(channels)
        mask.keep[order[:chosen]] = 0
        pruned_acc = accuracy(model, data.val, self.device)

        losses = fine_tune(model, data, c, device=self.device, seed=self.seed, description="fine-prune")
        folded_into = fold_mask(model, mask, handle)
        if chosen == 0:
            handle.remove()  # nothing pruned: leave no hook behind
        return PurificationResult(
            model=model,
            notes=f"pruned {chosen} of {channels} channels of the last layer",
            diagnostics={
                "channels": channels,
                "pruned_channels": mask.pruned,
                "pruned_count": chosen,
                "pruning_in_weights": folded_into,
                "val_accuracy_before": base_acc,
                "val_accuracy_pruned": pruned_acc,
                "val_accuracy_after": accuracy(model, data.val, self.device),
                "val_curve": curve,
                "final_loss": losses[-1],
            },
        )

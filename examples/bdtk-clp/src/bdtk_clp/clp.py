"""CLP: data-free backdoor removal by pruning channels with an outlying Lipschitz bound.

Zheng, Zhang, Wong, Su, Wang: "Data-Free Backdoor Removal Based on Channel Lipschitzness",
ECCV 2022. A backdoor lives in a few channels that react very strongly to a small trigger, i.e.
channels with a large Lipschitz constant. For a convolution followed by BatchNorm, channel k's
constant is bounded by the spectral norm of its kernel scaled by the BN factor γ_k / σ_k (the
"upper bound of the channel Lipschitz constant", UCLC). Within each layer, channels whose UCLC
exceeds mean + u·std are pruned. The method needs no data at all; the clean budget is only used
to report validation accuracy in the diagnostics.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from backdoor_toolkit import (
    Capability,
    DefenseData,
    ImageClassifier,
    ModelRequirementError,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    accuracy,
)


class CLPConfig(StrictConfig):
    u: float = Field(
        default=3.0,
        ge=0.0,
        le=20.0,
        description="Prune channels whose bound exceeds mean + u·std of their layer (paper: 3)",
    )


def conv_bn_pairs(
    model: nn.Module, image_shape: tuple[int, int, int]
) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each convolution whose output goes straight into a BatchNorm, found by one dummy forward.

    Tracing the forward pass (rather than trusting module order) pairs layers correctly in any
    architecture: in a pre-activation ResNet a block's first BN reads the residual sum, not a
    convolution, so it is (rightly) left out. BN statistics are untouched (eval mode).
    """
    produced: dict[int, tuple[nn.Conv2d, Tensor]] = {}  # holding outputs keeps their ids unique
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        produced[id(output)] = (module, output)

    def before_bn(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        conv, output = produced.get(id(inputs[0]), (None, None))
        assert isinstance(module, nn.BatchNorm2d)
        if conv is not None and output is inputs[0]:
            pairs.append((conv, module))

    handles = [
        m.register_forward_hook(after_conv)
        if isinstance(m, nn.Conv2d)
        else m.register_forward_pre_hook(before_bn)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    ]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return pairs


@torch.no_grad()
def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """UCLC of every output channel: ‖W_k‖₂ · |γ_k| / sqrt(var_k + ε), with W_k as (in, kh·kw)."""
    kernels = conv.weight.reshape(conv.out_channels, conv.weight.shape[1], -1)
    spectral = torch.linalg.matrix_norm(kernels.float(), ord=2)
    assert bn.running_var is not None, "CLP needs BatchNorm running statistics"
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return spectral * gamma.abs() / torch.sqrt(bn.running_var + bn.eps)


class CLP(Purifier):
    name = "clp"
    Config = CLPConfig
    config: CLPConfig
    meta = PluginMeta(
        summary="Data-free: prune channels whose Lipschitz upper bound is an outlier in their layer",
        paper="Zheng, Zhang, Wong, Su, Wang. Data-Free Backdoor Removal Based on Channel Lipschitzness. "
        "ECCV 2022",
        year=2022,
        url="https://arxiv.org/abs/2208.03111",
        threat_model="defender holds the model only (no data needed)",
        requires=(Capability.BATCHNORM,),
    )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        pairs = conv_bn_pairs(model, data.spec.image_shape)
        if not pairs:
            raise ModelRequirementError(
                f"CLP needs convolutions followed by BatchNorm; {type(model).__name__} has none."
            )
        layers: list[dict[str, Any]] = []
        total, channels = 0, 0
        for conv, bn in pairs:
            bounds = channel_lipschitz_bounds(conv, bn)
            threshold = bounds.mean() + self.config.u * bounds.std(correction=0)
            pruned = torch.nonzero(bounds > threshold).squeeze(1)
            self._prune(bn, pruned)
            layers.append(
                {"channels": bounds.numel(), "threshold": float(threshold), "pruned": pruned.tolist()}
            )
            total, channels = total + pruned.numel(), channels + bounds.numel()
        diagnostics: dict[str, Any] = {"pruned_channels": total, "total_channels": channels, "layers": layers}
        if len(data.val):
            diagnostics["val_accuracy"] = accuracy(model, data.val, self.device)
        return PurificationResult(
            model=model,
            modified=total > 0,
            notes=f"pruned {total} channels in {len(layers)} conv+BN layers (u={self.config.u})",
            diagnostics=diagnostics,
        )

    @staticmethod
    @torch.no_grad()
    def _prune(bn: nn.BatchNorm2d, channels: Tensor) -> None:
        """Silence channels by zeroing their BN scale and shift: their output becomes exactly 0."""
        if bn.weight is not None:
            bn.weight[channels] = 0.0
        if bn.bias is not None:
            bn.bias[channels] = 0.0

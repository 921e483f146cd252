"""Trojan / TrojanNN (Liu et al., NDSS 2018): a patch whose pixel values are optimised on a clean model.

Unlike a fixed pattern (BadNets' checkerboard), the trigger's shape is fixed (a square patch) but
its content is generated: a clean model of the same architecture is trained (or loaded from the
artifact cache), the penultimate-layer neurons with the strongest connection to the previous
layer (largest sum of absolute incoming weights) are selected, and the patch is optimised by
gradient descent to drive those neurons to a high activation. The patch therefore stamps a feature
the architecture already responds to strongly, which makes the backdoor easier to implant.
The paper then retrains on reverse-engineered data; here, as in the usual benchmarks, the model is
trained from scratch on the training set poisoned with the generated trigger. The pattern is saved
with the backdoored model (`trigger_state`), so a cached model is always measured with its trigger.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    AttackContext,
    BdtkError,
    ConfigError,
    DataSpec,
    ImageClassifier,
    MaskTrigger,
    ModelRequirementError,
    PluginMeta,
    stamp,
)


class TrojanConfig(AttackConfig):
    size: int = Field(default=6, ge=1, le=64, description="Side of the square trigger patch, in pixels")
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = Field(
        default="bottom-right", description="Where the patch goes"
    )
    neurons: int = Field(default=2, ge=1, le=64, description="How many internal neurons the patch excites")
    target_activation: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="Activation the selected neurons are driven to"
    )
    steps: int = Field(default=200, ge=1, le=10000, description="Optimisation steps of the patch")
    lr: float = Field(default=0.1, gt=0.0, le=10.0, description="Adam learning rate of the patch logits")
    batch_size: int = Field(
        default=128, ge=1, le=4096, description="Clean training images the patch is optimised on"
    )


def select_neurons(model: ImageClassifier, count: int) -> Tensor:
    """Feature channels with the largest sum of absolute incoming weights (the paper's criterion).

    The incoming weights are those of the last convolution that outputs as many channels as the
    model has features.
    """
    width = model.fc.in_features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == width]
    if not convs:
        raise ModelRequirementError(
            f"trojan: found no convolution producing the model's {width} feature channels."
        )
    if count > width:
        raise ConfigError(f"trojan: neurons={count} exceeds the model's {width} feature channels.")
    strength = convs[-1].weight.detach().abs().sum(dim=(1, 2, 3))
    return strength.topk(count).indices


class Trojan(Attack):
    name = "trojan"
    Config = TrojanConfig
    config: TrojanConfig
    meta = PluginMeta(
        summary="Patch whose pixels are optimised to excite selected neurons of a clean model",
        paper="Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang. Trojaning Attack on Neural Networks",
        year=2018,
        url="https://www.ndss-symposium.org/ndss-paper/trojaning-attack-on-neural-networks/",
        threat_model="data poisoning; trigger generated on a clean model of the victim's architecture",
    )

    def __init__(self, config: TrojanConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        self.mask = self._mask()
        self.pattern: Tensor | None = None

    def validate_for(self, spec: DataSpec) -> None:
        if self.config.size > min(spec.height, spec.width):
            raise ConfigError(
                f"trojan: a {self.config.size}px patch does not fit the {spec.height}×{spec.width} "
                f"images of {spec.name!r}."
            )

    def _mask(self) -> Tensor:
        c, s = self.config, self.spec
        mask = torch.zeros(1, s.height, s.width)
        top = 0 if c.corner.startswith("top") else s.height - c.size
        left = 0 if c.corner.endswith("left") else s.width - c.size
        mask[:, top : top + c.size, left : left + c.size] = 1.0
        return mask

    def prepare(self, context: AttackContext) -> None:
        """Generate the patch on a clean model of the victim's architecture."""
        self.pattern = self.generate(
            context.clean_model(), context.train.float_images(), context.settings.device
        )

    def generate(self, model: ImageClassifier, images: Tensor, device: torch.device) -> Tensor:
        """Optimise the patch content so the selected neurons fire at `target_activation`."""
        c = self.config
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        neurons = select_neurons(model, c.neurons).to(device)
        gen = torch.Generator().manual_seed(self.seed)
        batch = images[torch.randperm(images.shape[0], generator=gen)[: c.batch_size]].to(device)
        logits = torch.zeros(self.spec.image_shape).normal_(generator=gen).to(device).requires_grad_(True)
        mask = self.mask.to(device)
        optimiser = torch.optim.Adam([logits], lr=c.lr)
        for _ in range(c.steps):
            stamped = stamp(batch, mask, torch.sigmoid(logits))
            activation = model.features(stamped)[:, neurons]
            loss = (activation - c.target_activation).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return (torch.sigmoid(logits.detach()) * self.mask.to(device)).cpu()

    def apply_trigger(self, images: Tensor) -> Tensor:
        if self.pattern is None:
            raise BdtkError("trojan: the trigger has not been generated yet (prepare() or a cached model).")
        return MaskTrigger(self.mask, self.pattern)(images)

    def trigger_state(self) -> dict[str, Tensor]:
        return {} if self.pattern is None else {"pattern": self.pattern}

    def load_trigger_state(self, state: dict[str, Tensor]) -> None:
        self.pattern = state["pattern"]

"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, NeurIPS 2020): a generator makes each input's trigger.

Two small encoder–decoder networks produce, for every image x, a pattern G(x) and a near-binary
mask M(x); the triggered image is x + (G(x) − x)·M(x). The mask generator is trained first (masks
kept sparse by a density loss and diverse by a diversity loss), then frozen. The classifier and the
pattern generator are then trained together: in each batch a `poison_rate` share carries its own
trigger and the target label, a `cross_rate` share carries the trigger generated for *another*
image and keeps its label (so a trigger only works on the input it was made for), and the
diversity loss ‖x − x'‖ / ‖G(x) − G(x')‖ stops the generator from collapsing to one pattern.
The "other" images are the batch rolled by one, standing in for the paper's second data loader.
Both generators are saved with the backdoored model (`trigger_state`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    DataSpec,
    ImageClassifier,
    ImageData,
    PluginMeta,
    PoisonedTrainingSet,
    TrainingSettings,
    iterate_batches,
    to_float,
    train_classifier,
)

EPS = 1e-7


class InputAwareConfig(AttackConfig):
    poison_rate: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Share of every training batch given its trigger and relabelled",
    )
    cross_rate: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Share of every batch given another image's trigger, label kept",
    )
    lambda_div: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of the diversity loss")
    lambda_norm: float = Field(
        default=100.0, ge=0.0, le=1000.0, description="Weight of the mask density loss"
    )
    mask_density: float = Field(
        default=0.032, gt=0.0, le=1.0, description="Mask area share above which the density loss acts"
    )
    density_loss: Literal["per-pixel", "mean"] = Field(
        default="per-pixel",
        description="per-pixel: mean(relu(M − density)), the authors' code (an L1 push on every mask "
        "pixel above the density); mean: relu(mean(M) − density), a bound on the mask's area only",
    )
    mask_epochs: int = Field(default=2, ge=0, le=100, description="Epochs of mask-generator pre-training")
    generator_lr: float = Field(
        default=0.01, gt=0.0, le=1.0, description="Adam learning rate of the generators"
    )
    width: int = Field(default=16, ge=4, le=128, description="Channels of the generators' first layer")


class TriggerGenerator(nn.Module):
    """A small encoder–decoder mapping an image to a same-sized map in [0, 1]."""

    def __init__(self, channels: int, out_channels: int, width: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.encoder = nn.Sequential(
            *block(channels, width), *block(width, 2 * width, 2), *block(2 * width, 2 * width)
        )
        self.decoder = nn.Sequential(*block(2 * width, width), nn.Conv2d(width, out_channels, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.decoder(h))


def _threshold(mask: Tensor) -> Tensor:
    """The paper's soft step: pushes the mask towards 0/1 while keeping gradients."""
    return torch.tanh(mask * 20 - 10) / (2 + EPS) + 0.5


def density_penalty(masks: Tensor, density: float, kind: str) -> Tensor:
    """The mask-size loss: per pixel (the authors' code) every mask value above `density` costs, so
    a small but saturated mask is still pushed down; "mean" only bounds the average mask."""
    if kind == "per-pixel":
        return F.relu(masks - density).mean()
    return F.relu(masks.mean() - density)


def diversity(inputs: Tensor, others: Tensor, outputs: Tensor, other_outputs: Tensor) -> Tensor:
    """mean(‖x − x'‖ / ‖g(x) − g(x')‖): large when different inputs get the same output."""
    d_in = (inputs - others).flatten(1).pow(2).mean(1).sqrt()
    d_out = (outputs - other_outputs).flatten(1).pow(2).mean(1).sqrt()
    return (d_in / (d_out + EPS)).mean()


class InputAware(Attack):
    name = "input-aware"
    Config = InputAwareConfig
    config: InputAwareConfig
    meta = PluginMeta(
        summary="Per-input triggers from a co-trained generator, with cross-trigger and diversity losses",
        paper="Nguyen, Tran. Input-Aware Dynamic Backdoor Attack",
        year=2020,
        url="https://arxiv.org/abs/2010.08138",
        threat_model="training control (attacker runs the training loop)",
    )

    def __init__(self, config: InputAwareConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching global RNG
            torch.manual_seed(seed)
            self.pattern_net = TriggerGenerator(spec.channels, spec.channels, config.width).eval()
            self.mask_net = TriggerGenerator(spec.channels, 1, config.width).eval()

    def _stamp(self, images: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
        """Images carrying the trigger generated for `source` (itself for a backdoor sample)."""
        pattern = self.pattern_net(source)
        mask = _threshold(self.mask_net(source))
        return images + (pattern - images) * mask, pattern

    @torch.no_grad()
    def apply_trigger(self, images: Tensor) -> Tensor:
        self.pattern_net.to(images.device).eval()
        self.mask_net.to(images.device).eval()
        return self._stamp(images, images)[0].clamp(0, 1)

    def poison_training_set(self, train: ImageData) -> PoisonedTrainingSet:
        """Nothing ahead of training: triggers are generated per batch while the model trains."""
        return PoisonedTrainingSet(
            to_float(train.images), train.labels.clone(), torch.empty(0, dtype=torch.long)
        )

    def train_mask_generator(self, images: Tensor, settings: TrainingSettings) -> None:
        """Pre-train M: masks no larger than `mask_density` of the image and different per input."""
        c, device = self.config, settings.device
        net = self.mask_net.to(device).train()
        optimiser = torch.optim.Adam(net.parameters(), lr=c.generator_lr, betas=(0.5, 0.9))
        gen = torch.Generator().manual_seed(self.seed + 3)
        for _ in range(c.mask_epochs):
            for x, _y in iterate_batches(
                images, torch.zeros(images.shape[0], dtype=torch.long), settings.batch_size, gen
            ):
                x = x.to(device)
                others = x.roll(1, 0)
                masks = _threshold(net(x))
                other_masks = masks.roll(1, 0)  # the masks of `others`, without a second pass
                density = density_penalty(masks, c.mask_density, c.density_loss)
                loss = c.lambda_norm * density + c.lambda_div * diversity(x, others, masks, other_masks)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        net.eval().requires_grad_(False)

    def fit(self, model: ImageClassifier, data: PoisonedTrainingSet, settings: TrainingSettings) -> None:
        c, device = self.config, settings.device
        self.train_mask_generator(data.images, settings)
        generator = self.pattern_net.to(device).train()
        optimiser = torch.optim.Adam(generator.parameters(), lr=c.generator_lr, betas=(0.5, 0.9))

        def loss_fn(net: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
            b = x.shape[0]
            n_bd = int(b * c.poison_rate)
            n_cross = min(int(b * c.cross_rate), b - n_bd)
            others = x.roll(1, 0)
            bd, patterns = self._stamp(x[:n_bd], x[:n_bd])
            cross, cross_patterns = self._stamp(x[n_bd : n_bd + n_cross], others[n_bd : n_bd + n_cross])
            inputs = torch.cat([bd, cross, x[n_bd + n_cross :]])
            labels = torch.cat([self.target_labels(y[:n_bd]), y[n_bd:]])
            loss = F.cross_entropy(net(inputs), labels)
            pairs = min(n_bd, n_cross)
            if pairs and c.lambda_div > 0:
                loss = loss + c.lambda_div * diversity(
                    x[:pairs], others[n_bd : n_bd + pairs], patterns[:pairs], cross_patterns[:pairs]
                )
            return loss, None

        def step_generator() -> None:
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        train_classifier(
            model, data.images, data.labels, settings, self.seed, loss_fn=loss_fn, after_step=step_generator
        )
        generator.eval().requires_grad_(False)

    def trigger_state(self) -> dict[str, Tensor]:
        state = {f"pattern.{k}": v for k, v in self.pattern_net.state_dict().items()}
        state.update({f"mask.{k}": v for k, v in self.mask_net.state_dict().items()})
        return state

    def load_trigger_state(self, state: dict[str, Tensor]) -> None:
        for prefix, net in (("pattern.", self.pattern_net), ("mask.", self.mask_net)):
            net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            net.eval().requires_grad_(False)

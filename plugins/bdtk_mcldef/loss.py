"""The model-contrastive loss of MCLDef: pull triggered features back to their clean ones.

A backdoored network maps triggered inputs to a cluster of their own in feature space. The loss
takes the trainable model's feature of a triggered input (anchor), the frozen backdoored model's
feature of the same input without trigger (positive) and with trigger (negative), and is the
two-way InfoNCE −log(e^{cos(a,p)/τ} / (e^{cos(a,p)/τ} + e^{cos(a,n)/τ})).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import ImageClassifier


def model_contrastive_loss(anchor: Tensor, positive: Tensor, negative: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of the two-way InfoNCE loss, the positive being class 0."""
    logits = torch.stack(
        [F.cosine_similarity(anchor, positive, dim=1), F.cosine_similarity(anchor, negative, dim=1)], dim=1
    )
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits / temperature, target)


class FrozenReference(nn.Module):
    """The backdoored model as it was: eval mode, no gradients, never in an optimiser.

    `positives_and_negatives` runs clean and triggered inputs through it in one forward pass.
    """

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenReference:
        """Stay in eval mode whatever a caller asks: its BatchNorm statistics must not move."""
        return super().train(False)

    @torch.no_grad()
    def positives_and_negatives(self, clean: Tensor, triggered: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.features(torch.cat([clean, triggered]))
        return features[: clean.shape[0]], features[clean.shape[0] :]

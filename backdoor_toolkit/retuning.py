"""The re-tuning attack: how robust a purified model stays once someone fine-tunes it again.

A defense that leaves the backdoor's features in place and only suppresses their output can look
perfect (low ASR) and relearn the backdoor from a handful of poisoned samples; a model that never
learnt it, or one truly purified, does not (Min et al., "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024). `retune_attack` fine-tunes a copy of a
model briefly on a fixed mix of the attack's poisoned training samples and clean images of the
defender's budget (`RetuneConfig`) and scores it again; the runner reports the ASR after it as
`asr_retuned` for every cell, the undefended one included as the reference.

The set is drawn from the victim and the seed only, never from the defense, so every defense of a
backdoored model is re-tuned on the same images in the same order.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import RetuneConfig
from .data import Dataset, DefenseData
from .errors import BdtkError
from .interfaces import Attack
from .metrics import Scores, attack_scores
from .training import TrainingSettings, seed_everything, train_classifier

#: Added to the cell's seed for the draw of the re-tuning set, so it never coincides with the draws
#: the same seed makes elsewhere (poisoning, the clean budget).
_DRAW_OFFSET = 7919


@dataclass
class RetuneSet:
    """The images a model is re-tuned on: float in [0, 1], poisoned ones first; the training-set
    positions of the poisoned ones and where they came from."""

    images: Tensor
    labels: Tensor
    poisoned: int
    clean: int
    source: str
    index: Tensor


@dataclass
class RetuneOutcome:
    """The scores after re-tuning and what it took."""

    scores: Scores
    poisoned: int
    clean: int
    steps: int
    seconds: float
    source: str

    def record(self) -> dict[str, Any]:
        """The `CellResult.retune` entry: enough to audit the number (sizes, steps, BA/RA after)."""
        return {
            "poisoned": self.poisoned,
            "clean": self.clean,
            "steps": self.steps,
            "ba": self.scores.ba,
            "ra": self.scores.ra,
            "seconds": self.seconds,
            "source": self.source,
        }


def _draw(pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
    return pool[torch.randperm(pool.numel(), generator=generator)[:count]]


def retune_set(
    attack: Attack,
    dataset: Dataset,
    data: DefenseData,
    poisoned_index: Tensor,
    config: RetuneConfig,
    seed: int,
) -> RetuneSet:
    """`config.poisoned` poisoned samples and `config.clean` clean images, drawn with `seed`.

    The poisoned samples are training images at the victim's recorded poisoned indices, stamped
    with the attack's trigger and labelled as `Attack.poison_training_set` labels them (the target,
    or their own label for a clean-label attack). An attack that poisons batches on the fly (WaNet,
    input-aware) records no indices; any image it may poison is then one of its poisoned samples,
    so they are drawn from its poison candidates outside the defender's budget. The clean images
    come from the budget's training part, never its held-out val part; both counts are capped at
    what exists.
    """
    gen = torch.Generator().manual_seed(seed + _DRAW_OFFSET)
    train = dataset.train
    if poisoned_index.numel():
        pool, source = poisoned_index.long().cpu(), "the victim's poisoned training samples"
        # a clean-label budget may hold clean originals of poisoned images: keep the two apart
        pool = pool[~torch.isin(pool, torch.cat([data.index_train, data.index_val]).long().cpu())]
    else:
        allowed = torch.zeros(len(train), dtype=torch.bool)
        allowed[attack.poison_candidates(train.labels)] = True
        allowed[data.index_train] = False
        allowed[data.index_val] = False
        pool = torch.nonzero(allowed).squeeze(1)
        source = "the attack's poison candidates (it poisons batches on the fly)"
    if pool.numel() == 0:
        raise BdtkError(f"attack {attack.name!r} left no poisoned training sample to re-tune with")
    index = _draw(pool, config.poisoned, gen).sort().values
    labels = train.labels[index]
    if not attack.clean_label:
        labels = attack.target_labels(labels)
    with torch.no_grad():
        stamped = attack.apply_trigger(train.subset(index).float_images()).clamp(0, 1).cpu()
    clean_index = _draw(torch.arange(len(data.train)), config.clean, gen)
    clean = data.train.subset(clean_index)
    return RetuneSet(
        torch.cat([stamped, clean.float_images()]),
        torch.cat([labels, clean.labels]),
        int(index.numel()),
        int(clean_index.numel()),
        source,
        index,
    )


def retune_attack(
    model: nn.Module,
    attack: Attack,
    dataset: Dataset,
    data: DefenseData,
    poisoned_index: Tensor,
    config: RetuneConfig,
    *,
    device: torch.device,
    seed: int,
) -> RetuneOutcome:
    """Fine-tune a copy of `model` on the re-tuning set and score it (BA, ASR, RA) on the test set.

    `model` itself is left as it is. Training is `train_classifier` (SGD with momentum, cosine
    schedule) with `config`'s settings and `seed`, so a re-run reproduces the number.
    """
    start = time.perf_counter()
    chosen = retune_set(attack, dataset, data, poisoned_index, config, seed)
    tuned = copy.deepcopy(model).requires_grad_(True)  # the attacker tunes every weight, frozen or not
    settings = TrainingSettings.from_config(config, dataset.spec, device)
    seed_everything(seed)
    train_classifier(tuned, chosen.images, chosen.labels, settings, seed=seed, description="re-tune")
    scores = attack_scores(tuned, dataset.test, attack.apply_trigger, attack.target_labels, device)
    steps = config.epochs * -(-chosen.labels.numel() // config.batch_size)
    return RetuneOutcome(
        scores, chosen.poisoned, chosen.clean, steps, time.perf_counter() - start, chosen.source
    )

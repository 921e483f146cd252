from __future__ import annotations

import pytest
import torch

from backdoor_toolkit import ConfigError, get_attack
from backdoor_toolkit.config import build_config
from backdoor_toolkit.data import DataSpec, ImageData, dataset_spec
from backdoor_toolkit.metrics import attack_scores

SPEC = dataset_spec("fashion-mnist")


def _badnets(**values: object):
    cls = get_attack("badnets")
    return cls(build_config(cls.Config, values, "badnets"), SPEC, seed=0)


def test_checkerboard_stamped_bottom_right_only() -> None:
    attack = _badnets()
    x = torch.full((2, 1, 28, 28), 0.5)
    out = attack.apply_trigger(x)
    changed = (out != x).any(0).any(0)
    assert changed[:25].sum() == 0 and changed[:, :25].sum() == 0
    patch = out[0, 0, 25:, 25:]
    assert torch.equal(patch, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert torch.equal(x, torch.full((2, 1, 28, 28), 0.5))  # input untouched


def test_poisoning_relabels_a_seeded_share_of_non_target_images() -> None:
    labels = torch.arange(1000) % 10
    train = ImageData(torch.zeros(1000, 1, 28, 28, dtype=torch.uint8), labels)
    attack = _badnets(poison_rate=0.1, target=3)
    poisoned = attack.poison_training_set(train)
    idx = poisoned.poisoned_index
    assert idx.numel() == 100
    assert (labels[idx] != 3).all()
    assert (poisoned.labels[idx] == 3).all()
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.labels[untouched], labels[untouched])
    assert (poisoned.images[idx][:, 0, 25:, 25:].sum((1, 2)) == 5).all()
    assert poisoned.images[untouched].sum() == 0
    assert torch.equal(_badnets(poison_rate=0.1, target=3).poison_training_set(train).poisoned_index, idx)


def test_all_to_all_targets_next_class() -> None:
    attack = _badnets(mode="all-to-all")
    y = torch.tensor([0, 4, 9])
    assert attack.target_labels(y).tolist() == [1, 5, 0]
    assert attack.non_target_mask(y).all() and attack.victim_mask(y).all()


def test_all_to_all_poisons_every_class_each_towards_its_next() -> None:
    labels = torch.arange(1000) % 10
    train = ImageData(torch.zeros(1000, 1, 28, 28, dtype=torch.uint8), labels)
    poisoned = _badnets(mode="all-to-all", poison_rate=0.1).poison_training_set(train)
    idx = poisoned.poisoned_index
    assert idx.numel() == 100 and set(labels[idx].tolist()) == set(range(10))  # every class is a source
    assert torch.equal(poisoned.labels[idx], (labels[idx] + 1) % 10)
    assert (poisoned.images[idx][:, 0, 25:, 25:].sum((1, 2)) == 5).all()
    rest = torch.ones(1000, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.labels[rest], labels[rest])


class _NextClassBackdoor(torch.nn.Module):
    """Predicts the class written in the first pixel; with the patch's corner lit, the next class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0] * 255).round().long()
        cls = torch.where(x[:, 0, 27, 27] > 0.5, (cls + 1) % 10, cls)
        return torch.nn.functional.one_hot(cls, 10).float()


def test_all_to_all_asr_counts_each_image_against_its_own_target() -> None:
    labels = torch.arange(20) % 10
    images = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    test = ImageData(images, labels)
    cpu = torch.device("cpu")
    attack = _badnets(mode="all-to-all")
    scores = attack_scores(_NextClassBackdoor(), test, attack.apply_trigger, attack.target_labels, cpu)
    assert (scores.ba, scores.asr, scores.ra) == (1.0, 1.0, 0.0)
    # against one fixed target, the same model would score only the images of the class before it
    one = _badnets(target=1)
    fixed = attack_scores(_NextClassBackdoor(), test, one.apply_trigger, one.target_labels, cpu)
    assert fixed.asr == pytest.approx(2 / 18)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target": 10}, "outside the 10 classes"),
        ({"size": 29}, "does not fit"),
        ({"poison_rate": 1.5}, "poison_rate"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_config_is_rejected_before_training(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _badnets(**values)


def test_rgb_patch_on_small_images() -> None:
    spec = DataSpec("rgb", 10, 3, 8, 8, (0.5,) * 3, (0.5,) * 3, hflip=True)
    cls = get_attack("badnets")
    attack = cls(build_config(cls.Config, {"pattern": "white", "corner": "top-left"}, "x"), spec)
    out = attack.apply_trigger(torch.zeros(1, 3, 8, 8))
    assert out[0, :, :3, :3].eq(1).all() and out.sum() == 27

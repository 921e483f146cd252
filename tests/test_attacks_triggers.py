"""Trigger functions and data poisoning of Blended, Trojan and SIG (no training)."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch

from backdoor_toolkit import AttackConfig, BdtkError, ConfigError, ImageData, create_model, get_attack
from backdoor_toolkit.config import build_config
from backdoor_toolkit.data import DataSpec, dataset_spec

SPEC = dataset_spec("fashion-mnist")
RGB = DataSpec("rgb", 10, 3, 8, 8, (0.5,) * 3, (0.5,) * 3, hflip=True)


def make(name: str, spec: DataSpec = SPEC, seed: int = 0, **values: Any) -> Any:
    cls = get_attack(name)
    return cls(cast(AttackConfig, build_config(cls.Config, values, name)), spec, seed=seed)


def images(n: int = 4, spec: DataSpec = SPEC) -> torch.Tensor:
    return torch.rand((n, *spec.image_shape), generator=torch.Generator().manual_seed(7))


def test_all_attacks_are_registered() -> None:
    for name in ("badnets", "blended", "trojan", "sig", "wanet", "input-aware"):
        assert get_attack(name).name == name


# --- Blended ---------------------------------------------------------------------------------


def test_blended_mixes_a_fixed_pattern_into_every_pixel() -> None:
    attack = make("blended", alpha=0.2)
    x = images()
    before = x.clone()
    out = attack.apply_trigger(x)
    assert torch.equal(x, before)
    pattern = (out - 0.8 * x) / 0.2
    assert torch.allclose(pattern, pattern[0].expand_as(pattern), atol=1e-5)  # one pattern for all
    assert pattern.min() >= -1e-5 and pattern.max() <= 1 + 1e-5 and pattern.std() > 0.2  # noise
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # the pattern does not depend on the run seed, only on pattern_seed
    assert torch.equal(make("blended", seed=5).apply_trigger(x), out)
    assert not torch.equal(make("blended", pattern_seed=1).apply_trigger(x), out)


def test_blended_rgb_and_relabelling() -> None:
    attack = make("blended", RGB, mode="all-to-all", poison_rate=0.5)
    assert attack.apply_trigger(images(2, RGB)).shape == (2, 3, 8, 8)
    labels = torch.arange(20) % 10
    poisoned = attack.poison_training_set(ImageData(torch.zeros(20, 3, 8, 8, dtype=torch.uint8), labels))
    idx = poisoned.poisoned_index
    assert idx.numel() == 10
    assert torch.equal(poisoned.labels[idx], (labels[idx] + 1) % 10)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_blended_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        make("blended", alpha=alpha)


# --- Trojan ----------------------------------------------------------------------------------


def test_trojan_needs_its_generated_trigger() -> None:
    with pytest.raises(BdtkError, match="not been generated"):
        make("trojan").apply_trigger(images())


def test_trojan_patch_excites_the_selected_neurons_and_stays_in_its_square() -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", RGB).eval()
    values = {"size": 3, "steps": 15, "batch_size": 8, "neurons": 2}
    attack = make("trojan", RGB, **values)
    train = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pattern = attack.generate(model, train, torch.device("cpu"))
    attack.load_trigger_state({"pattern": pattern})
    x = images(4, RGB)
    out = attack.apply_trigger(x)
    changed = (out != x).any(0).any(0)
    assert changed[:5].sum() == 0 and changed[:, :5].sum() == 0 and changed[5:, 5:].all()
    assert out.min() >= 0 and out.max() <= 1
    from bdtk_attacks.trojan import select_neurons

    neurons = select_neurons(model, 2)
    with torch.no_grad():
        generated = model.features(out)[:, neurons].mean()
        random_patch = x.clone()
        random_patch[..., 5:, 5:] = torch.rand(4, 3, 3, 3, generator=torch.Generator().manual_seed(3))
        baseline = model.features(random_patch)[:, neurons].mean()
    assert generated > baseline
    # a second run with the same seed generates the same trigger
    again = make("trojan", RGB, **values)
    assert torch.allclose(again.generate(model, train, torch.device("cpu")), pattern)


def test_trojan_state_round_trip() -> None:
    attack = make("trojan", size=4)
    pattern = torch.rand(1, 28, 28)
    attack.load_trigger_state({"pattern": pattern})
    other = make("trojan", size=4)
    other.load_trigger_state(attack.trigger_state())
    assert torch.equal(other.apply_trigger(images()), attack.apply_trigger(images()))


def test_trojan_rejects_a_patch_larger_than_the_image() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        make("trojan", RGB, size=9)


# --- SIG -------------------------------------------------------------------------------------


def test_sig_adds_a_horizontal_sinusoid() -> None:
    attack = make("sig", delta=20 / 255, frequency=6)
    x = torch.full((2, 1, 28, 28), 0.5)
    added = attack.apply_trigger(x) - x
    expected = 20 / 255 * torch.sin(2 * math.pi * torch.arange(28) * 6 / 28)
    assert torch.allclose(added[0, 0], expected.expand(28, 28), atol=1e-6)  # same on every row
    assert torch.equal(attack.apply_trigger(torch.ones(1, 1, 28, 28)).max(), torch.tensor(1.0))


def test_sig_is_clean_label() -> None:
    labels = torch.arange(200) % 10
    train = ImageData(torch.full((200, 1, 28, 28), 100, dtype=torch.uint8), labels)
    attack = make("sig", target=2, poison_rate=0.08)
    poisoned = attack.poison_training_set(train)
    idx = poisoned.poisoned_index
    assert idx.numel() == 16 and (labels[idx] == 2).all()
    assert torch.equal(poisoned.labels, labels)  # no label changes at all
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.images[rest], train.float_images()[rest])
    assert not torch.equal(poisoned.images[idx], train.float_images()[idx])
    assert torch.equal(make("sig", target=2, poison_rate=0.08).poison_training_set(train).poisoned_index, idx)


def test_sig_rejects_a_poison_rate_beyond_the_target_class_share() -> None:
    labels = torch.arange(200) % 10
    train = ImageData(torch.zeros(200, 1, 28, 28, dtype=torch.uint8), labels)
    with pytest.raises(ConfigError, match="share of target class 0"):
        make("sig", poison_rate=0.15).poison_training_set(train)


def test_sig_is_all_to_one_only() -> None:
    with pytest.raises(ConfigError, match="all-to-one"):
        make("sig", mode="all-to-all")

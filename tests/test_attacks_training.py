"""Training-controlled attacks (WaNet, input-aware) and the `poison_after_augment` hook."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    ConfigError,
    ImageData,
    PluginMeta,
    TrainingSettings,
    create_model,
    get_attack,
)
from backdoor_toolkit.config import build_config
from backdoor_toolkit.data import DataSpec, dataset_spec

SPEC = dataset_spec("fashion-mnist")
SMALL = DataSpec("small", 4, 1, 12, 12, (0.5,), (0.5,), hflip=False)


def make(name: str, spec: DataSpec = SPEC, seed: int = 0, **values: Any) -> Any:
    cls = get_attack(name)
    return cls(cast(AttackConfig, build_config(cls.Config, values, name)), spec, seed=seed)


def settings(augment: bool = False, batch_size: int = 20) -> TrainingSettings:
    return TrainingSettings(1, batch_size, 0.05, 5e-4, augment, False, torch.device("cpu"))


def smooth_images(n: int, spec: DataSpec) -> Tensor:
    """Images with structure, so a warp visibly moves pixels."""
    ii = torch.linspace(0, 6.28, spec.height).view(-1, 1)
    jj = torch.linspace(0, 6.28, spec.width).view(1, -1)
    base = 0.5 + 0.4 * torch.sin(ii * 2) * torch.cos(jj * 3)
    return (base + 0.05 * torch.arange(n).view(n, 1, 1, 1)).clamp(0, 1).expand(n, spec.channels, -1, -1)


# --- WaNet -----------------------------------------------------------------------------------


def test_wanet_warp_is_small_deterministic_and_seeded() -> None:
    attack = make("wanet")
    x = smooth_images(4, SPEC)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert 0 < (out - x).abs().mean() < 0.05  # imperceptible but present
    assert torch.equal(make("wanet").apply_trigger(x), out)
    assert not torch.equal(make("wanet", seed=1).apply_trigger(x), out)
    # the grid displaces pixels by about `strength` pixels at most
    shift = (attack.grid[0] - make("wanet", strength=1e-6).grid[0]) * torch.tensor([28 / 2, 28 / 2])
    assert 0.05 < shift.abs().max() < 3


def test_wanet_poisons_batches_not_the_dataset() -> None:
    attack = make("wanet", poison_rate=0.1, cross_ratio=2.0, target=3)
    labels = torch.arange(100) % 10
    train = ImageData(torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8), labels)
    poisoned = attack.poison_training_set(train)
    assert poisoned.poisoned_index.numel() == 0 and torch.equal(poisoned.labels, labels)
    x = smooth_images(50, SPEC).contiguous()
    y = torch.arange(50) % 10
    bx, by = attack.training_batch(x, y)
    assert torch.equal(by[:5], torch.full((5,), 3))  # 10% warped and relabelled
    assert torch.equal(bx[:5], attack.apply_trigger(x[:5]))
    assert torch.equal(by[5:], y[5:])  # noise-mode samples keep their labels
    assert not torch.equal(bx[5:15], x[5:15]) and not torch.equal(bx[5:15], attack.apply_trigger(x[5:15]))
    assert torch.equal(bx[15:], x[15:])  # the rest is clean
    aa = make("wanet", mode="all-to-all", poison_rate=0.2)
    assert torch.equal(aa.training_batch(x, y)[1][:10], (y[:10] + 1) % 10)


def test_wanet_state_round_trip_and_validation() -> None:
    attack = make("wanet", seed=4)
    other = make("wanet", seed=9)
    other.load_trigger_state(attack.trigger_state())
    x = smooth_images(2, SPEC)
    assert torch.equal(other.apply_trigger(x), attack.apply_trigger(x))
    try:
        make("wanet", SMALL, grid_size=13)
    except ConfigError as exc:
        assert "finer than" in str(exc)
    else:
        raise AssertionError("grid_size larger than the image was accepted")


class _Recorder(Attack):
    """A training-controlled attack that records what its batch hook receives."""

    name = "recorder"
    meta = PluginMeta(summary="test double")
    poison_after_augment: ClassVar[bool] = True
    seen: list[Tensor]

    def apply_trigger(self, images: Tensor) -> Tensor:
        return images

    def training_batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        self.seen.append(images.clone())
        return images, labels


class _RawRecorder(_Recorder):
    poison_after_augment: ClassVar[bool] = False


def test_poison_after_augment_hands_augmented_batches_to_the_hook() -> None:
    data = ImageData(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8), torch.arange(40) % 4)
    raw = {tuple(img.flatten().tolist()) for img in data.float_images()}

    def seen_images(cls: type[_Recorder]) -> list[Tensor]:
        rec = cls(AttackConfig(), SMALL)
        rec.seen = []
        rec.fit(create_model("small-cnn", SMALL), rec.poison_training_set(data), settings(augment=True))
        return list(torch.cat(rec.seen))

    augmented = seen_images(_Recorder)
    assert len(augmented) == 40
    assert sum(tuple(img.flatten().tolist()) not in raw for img in augmented) > 20  # shifted crops
    assert all(tuple(img.flatten().tolist()) in raw for img in seen_images(_RawRecorder))  # raw batches


def test_wanet_warps_raw_batches_by_default_and_augmented_ones_on_request() -> None:
    """The authors' order (warp, then augment) is the default; "after-augment" is the opt-in."""

    data = ImageData(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8), torch.arange(40) % 4)
    raw = {tuple(img.flatten().tolist()) for img in data.float_images()}

    def seen_images(order: str) -> list[Tensor]:
        attack = make("wanet", SMALL, poison_rate=0.0, cross_ratio=0.0, warp_order=order)
        seen: list[Tensor] = []
        real_hook = attack.training_batch

        def recording(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            seen.append(images.clone())
            return cast(tuple[Tensor, Tensor], real_hook(images, labels))

        attack.training_batch = recording
        attack.fit(create_model("small-cnn", SMALL), attack.poison_training_set(data), settings(augment=True))
        return list(torch.cat(seen))

    assert all(tuple(img.flatten().tolist()) in raw for img in seen_images("before-augment"))
    augmented = seen_images("after-augment")
    assert sum(tuple(img.flatten().tolist()) not in raw for img in augmented) > 20


# --- input-aware -----------------------------------------------------------------------------


def test_input_aware_density_loss_is_per_pixel_by_default() -> None:
    from bdtk_attacks.input_aware import InputAwareConfig, density_penalty

    one_saturated_pixel = torch.zeros(2, 1, 12, 12)
    one_saturated_pixel[:, :, 0, 0] = 1.0  # mean 1/144, below the 0.032 density
    assert InputAwareConfig().density_loss == "per-pixel"
    assert float(density_penalty(one_saturated_pixel, 0.032, "mean")) == 0.0
    expected = (1.0 - 0.032) / 144
    assert abs(float(density_penalty(one_saturated_pixel, 0.032, "per-pixel")) - expected) < 1e-6


def test_input_aware_diversity_loss() -> None:
    from bdtk_attacks.input_aware import diversity

    x, x2 = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    same = diversity(x, x2, torch.full((2, 1, 4, 4), 0.5), torch.full((2, 1, 4, 4), 0.5))
    different = diversity(x, x2, x, x2)
    assert same > 1e5 and abs(float(different) - 1.0) < 1e-5


def test_input_aware_trains_per_input_triggers_and_restores_them() -> None:
    attack = make("input-aware", SMALL, width=4, mask_epochs=1, poison_rate=0.2, cross_rate=0.2)
    data = ImageData(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8), torch.arange(40) % 4)
    poisoned = attack.poison_training_set(data)
    assert poisoned.poisoned_index.numel() == 0
    before = {k: v.clone() for k, v in attack.trigger_state().items()}
    attack.fit(create_model("small-cnn", SMALL), poisoned, settings(augment=True))
    after = attack.trigger_state()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("pattern."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mask."))
    x = data.float_images()[:6]
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    delta = out - x
    assert not torch.allclose(delta[0], delta[1])  # the trigger depends on the input
    restored = make("input-aware", SMALL, width=4)
    restored.load_trigger_state(after)
    assert torch.allclose(restored.apply_trigger(x), out)

"""Neural Cleanse mechanics on a hand-built linear model whose backdoor is known exactly.

The toy model reads 7×6 grey images; each class sums its own block of pixels, and class 2 also
has a large weight on the bottom-right pixel, so a one-pixel trigger sends anything to class 2
while every other class needs a mask over much of the image.
"""

from __future__ import annotations

import pytest
import torch
from bdtk_inverters.neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from torch import nn

from backdoor_toolkit import BdtkError, DataSpec, DefenseData, ImageData, InversionResult, get_inverter

SPEC = DataSpec("toy", 6, 1, 7, 6, (0.5,), (0.5,), hflip=False)
TARGET = 2


def _model() -> nn.Module:
    """Class c sums the pixels of its own 2×3 block of the top 6×6; the target also reads the
    bottom-right pixel (dark in clean images) with weight 20."""
    linear = nn.Linear(42, SPEC.num_classes)
    with torch.no_grad():
        grid = torch.arange(42).view(7, 6)
        linear.weight.zero_()
        linear.bias.zero_()
        for c in range(SPEC.num_classes):
            rows, cols = divmod(c, 2)
            linear.weight[c, grid[2 * rows : 2 * rows + 2, 3 * cols : 3 * cols + 3].flatten()] = 1.0
        linear.weight[TARGET, 41] = 20.0
    return nn.Sequential(nn.Flatten(), linear).eval()


def _data(n: int = 200) -> DefenseData:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 7, 6), dtype=torch.uint8, generator=gen)
    images[:, :, -1, -1] = 0  # the trigger pixel is dark in clean images
    with torch.no_grad():
        labels = _model()(images.float() / 255).argmax(1)  # the toy is right on clean images
    half = n // 2
    return DefenseData(
        SPEC,
        ImageData(images[:half], labels[:half]),
        ImageData(images[half:], labels[half:]),
        torch.arange(half),
        torch.arange(half, n),
    )


def _inverter(**values: object) -> NeuralCleanse:
    base: dict[str, object] = {"steps": 200, "batch_size": 16, "round_steps": 5, "patience": 2}
    return NeuralCleanse(NeuralCleanseConfig.model_validate({**base, **values}), seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scan(one_thread: None) -> InversionResult:
    return _inverter().invert(_model(), _data())


def test_registered_by_name() -> None:
    assert get_inverter("neural-cleanse") is NeuralCleanse


def test_masks_and_patterns_stay_in_unit_range(scan: InversionResult) -> None:
    r = scan
    assert r.masks.shape == (6, 1, 7, 6) and r.patterns.shape == (6, 1, 7, 6)
    for t in (r.masks, r.patterns):
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.allclose(r.mask_norms, r.masks.flatten(1).sum(1))


def test_planted_target_is_flagged_with_a_working_small_trigger(scan: InversionResult) -> None:
    r = scan
    assert TARGET in r.flagged
    others = [float(a) for c, a in zip(r.classes, r.anomaly_index, strict=True) if c != TARGET]
    assert float(r.anomaly_index[r.classes.index(TARGET)]) > 5 * max(others)
    assert r.ranked()[0] == TARGET
    i = r.classes.index(TARGET)
    assert float(r.attack_success[i]) >= 0.95  # measured on held-out val images
    assert float(r.anomaly_index[i]) > 2
    assert float(r.mask_norms[i]) < 0.5 * float(r.mask_norms.median())
    data = _data()
    others = data.val.images[data.val.labels != TARGET]
    stamped = r.trigger(TARGET)(others.float() / 255)
    assert float((_model()(stamped).argmax(1) == TARGET).float().mean()) >= 0.95
    assert r.seconds > 0


def test_batched_scan_equals_the_per_class_loop(scan: InversionResult) -> None:
    loop = _inverter(batched=False).invert(_model(), _data())
    r = scan
    assert torch.allclose(loop.masks, r.masks, atol=1e-4)
    assert torch.allclose(loop.patterns, r.patterns, atol=1e-4)
    assert loop.flagged == r.flagged
    assert loop.diagnostics["steps"] == r.diagnostics["steps"]


def test_converged_classes_are_frozen_early() -> None:
    r = _inverter(steps=400, early_stop_patience=2).invert(_model(), _data())
    steps = r.diagnostics["steps"]
    assert steps[r.classes.index(TARGET)] < 400
    assert r.diagnostics["converged"][r.classes.index(TARGET)]


def test_model_weights_are_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _inverter(steps=10).invert(model, _data())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_known_target_skips_the_scan() -> None:
    r = _inverter(target=TARGET).invert(_model(), _data())
    assert r.classes == [TARGET] and r.flagged == [TARGET]
    assert r.diagnostics["mode"] == "known-target"
    assert float(r.attack_success[0]) >= 0.95


def test_subset_of_classes_and_explicit_argument() -> None:
    r = _inverter(classes=[0, 2, 4], steps=20).invert(_model(), _data())
    assert r.classes == [0, 2, 4] and r.masks.shape[0] == 3
    r = _inverter(steps=20).invert(_model(), _data(), classes=[5, 1])
    assert r.classes == [5, 1]


def test_wrong_number_of_logits_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(42, 4))
    with pytest.raises(BdtkError, match="expected \\(N, 6\\)"):
        _inverter().invert(model, _data())


def test_class_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(BdtkError, match="out of range"):
        _inverter().invert(_model(), _data(), classes=[0, 6])
    with pytest.raises(BdtkError, match="out of range"):
        _inverter(target=9).invert(_model(), _data())


def test_image_shape_mismatch_is_a_clear_error() -> None:
    data = _data()
    bad = DefenseData(
        SPEC,
        ImageData(torch.zeros(4, 3, 7, 6, dtype=torch.uint8), torch.zeros(4).long()),
        data.val,
        data.index_train,
        data.index_val,
    )
    with pytest.raises(BdtkError, match="do not match dataset"):
        _inverter().invert(_model(), bad)

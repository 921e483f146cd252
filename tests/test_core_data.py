from __future__ import annotations

import pytest
import torch

from backdoor_toolkit.data import (
    DEBIAN_FASHION_MNIST,
    Dataset,
    DataSpec,
    ImageData,
    budget_exclusions,
    draw_defense_data,
    load_dataset,
    stratified_subset,
)
from backdoor_toolkit.errors import BdtkError, DatasetNotFoundError, UnknownNameError

needs_fmnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist"
)


def _toy(n: int = 1000, k: int = 10) -> Dataset:
    spec = DataSpec("toy", k, 1, 8, 8, (0.5,), (0.5,), hflip=False)
    labels = torch.arange(n) % k
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    return Dataset(spec, ImageData(images, labels), ImageData(images[:100], labels[:100]))


@needs_fmnist
def test_fashion_mnist_loads_from_debian_package() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8
    assert set(ds.train.labels.unique().tolist()) == set(range(10))
    floats = ds.test.subset(torch.arange(8)).float_images()
    assert floats.min() >= 0 and floats.max() <= 1 and floats.max() > 0.5


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"Did you mean 'cifar10'.*Available:.*fashion-mnist"):
        load_dataset("cifar1O")


def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("svhn")


def test_defense_budget_avoids_poisoned_and_is_stratified() -> None:
    ds = _toy()
    poisoned = torch.arange(0, 300)
    data = draw_defense_data(ds, poisoned, clean_ratio=0.1, val_fraction=0.2, seed=3)
    index = torch.cat([data.index_train, data.index_val])
    assert index.numel() == 100
    assert len(set(index.tolist())) == 100
    assert not set(index.tolist()) & set(poisoned.tolist())
    assert data.index_val.numel() == 20
    assert torch.bincount(ds.train.labels[index], minlength=10).tolist() == [10] * 10
    again = draw_defense_data(ds, poisoned, clean_ratio=0.1, val_fraction=0.2, seed=3)
    assert torch.equal(again.index_train, data.index_train)
    other = draw_defense_data(ds, poisoned, clean_ratio=0.1, val_fraction=0.2, seed=4)
    assert not torch.equal(other.index_train, data.index_train)
    assert torch.equal(data.train.labels, ds.train.labels[data.index_train])


def test_a_clean_label_budget_keeps_the_target_class_share() -> None:
    """SIG poisons target-class images under their true labels: avoiding them would starve the
    budget of the target class; a dirty-label attack's relabelled images stay avoided."""
    ds = _toy()
    poisoned = torch.nonzero(ds.train.labels == 0).squeeze(1)[:60]  # 60 of class 0's 100
    clean_label = draw_defense_data(ds, budget_exclusions(poisoned, True), 0.1, 0.2, seed=3)
    index = torch.cat([clean_label.index_train, clean_label.index_val])
    assert torch.bincount(ds.train.labels[index], minlength=10).tolist() == [10] * 10
    dirty = draw_defense_data(ds, budget_exclusions(poisoned, False), 0.1, 0.2, seed=3)
    index = torch.cat([dirty.index_train, dirty.index_val])
    assert not set(index.tolist()) & set(poisoned.tolist())
    assert int((ds.train.labels[index] == 0).sum()) < 10


def test_defense_budget_too_large_is_a_clear_error() -> None:
    ds = _toy(100)
    with pytest.raises(BdtkError, match="clean training images remain"):
        draw_defense_data(ds, torch.arange(90), clean_ratio=0.5, val_fraction=0.2, seed=0)


def test_stratified_subset() -> None:
    ds = _toy()
    sub = stratified_subset(ds.train, 200, 10, seed=0)
    assert len(sub) == 200
    assert torch.bincount(sub.labels).tolist() == [20] * 10
    assert stratified_subset(ds.train, None, 10, seed=0) is ds.train
    assert stratified_subset(ds.train, 1000, 10, seed=0) is ds.train


def test_a_subset_larger_than_the_split_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was silently clamped to the whole split while results were filed under the size asked
    for, so one run appeared as two settings; the message names the option and the dataset."""
    from backdoor_toolkit import cells
    from backdoor_toolkit.config import BenchmarkConfig

    with pytest.raises(BdtkError, match="A subset of 1001 is more than the 1,000 images in this split"):
        stratified_subset(_toy().train, 1001, 10, seed=0)
    monkeypatch.setattr(cells, "load_dataset", lambda name, data_dir, download: _toy())
    with pytest.raises(BdtkError, match="--train-size 5000 is more than the 1,000 training images of toy"):
        cells.load_run_dataset(BenchmarkConfig(train_size=5000))
    with pytest.raises(BdtkError, match="--test-size 101 is more than the 100 test images of toy"):
        cells.load_run_dataset(BenchmarkConfig(test_size=101))
    fits = cells.load_run_dataset(BenchmarkConfig(train_size=1000, test_size=100))
    assert (len(fits.train), len(fits.test)) == (1000, 100)


def test_check_images_rejects_wrong_shape() -> None:
    spec = _toy().spec
    spec.check_images(torch.zeros(2, 1, 8, 8))
    with pytest.raises(BdtkError, match="do not match dataset 'toy'"):
        spec.check_images(torch.zeros(2, 3, 8, 8))


def test_a_data_dir_that_is_missing_or_empty_never_falls_back_to_the_embedded_copy(
    tmp_path, monkeypatch
) -> None:
    """`--data-dir /nonexist/xyz` trained on the Debian copy in silence: a typo switched the data."""
    with pytest.raises(DatasetNotFoundError, match=r"--data-dir .*nope does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    monkeypatch.setenv("BDTK_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DatasetNotFoundError, match=r"BDTK_DATA_DIR .*nope does not exist"):
        load_dataset("fashion-mnist")
    with pytest.raises(DatasetNotFoundError, match=r"'fashion-mnist' was not found under"):
        load_dataset("fashion-mnist", tmp_path)  # exists, holds no Fashion-MNIST

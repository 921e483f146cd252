"""Test-wide settings: quiet progress bars and a private artifact cache per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    ImageData,
    TrainingSettings,
    create_model,
    train_classifier,
)
from backdoor_toolkit.data import dataset_spec

os.environ.setdefault("BDTK_QUIET", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's cache; one cache per session so tests can share trained models."""
    root = tmp_path_factory.getbasetemp() / "bdtk-cache"
    monkeypatch.setenv("BDTK_CACHE_DIR", str(root))
    # and never the user's result database: one fresh database per test
    monkeypatch.setenv("BDTK_DB", str(tmp_path_factory.mktemp("bdtk-db") / "results.sqlite"))
    return root


def _separable(n: int, seed: int) -> ImageData:
    """Two classes told apart by a bright centre square; uint8 like real data, 16×16 for speed."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 16, 16, generator=gen) * 0.3
    images[labels == 1, :, 4:12, 4:12] += 0.7
    return ImageData((images * 255).round().to(torch.uint8), labels)


@pytest.fixture(scope="session")
def separable_model() -> tuple[ImageClassifier, DefenseData]:
    """A small-cnn trained on an easy two-class task, with a clean budget: the pruning defenses'
    tests share it (each works on a deep copy)."""
    torch.manual_seed(0)
    spec = dataset_spec("fashion-mnist")
    model = create_model("small-cnn", spec)
    train = _separable(96, 0)
    settings = TrainingSettings(2, 32, 0.05, 0.0, False, False, torch.device("cpu"))
    train_classifier(model, train.images, train.labels, settings, seed=0)
    data = DefenseData(spec, _separable(48, 1), _separable(48, 2), torch.arange(48), torch.arange(48, 96))
    return model, data


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than on two contended ones; a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

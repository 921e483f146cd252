"""The shared setting of the benchmarks under benchmarks/: one place, so cached models are shared.

Fashion-MNIST with wrn-16-1, a 20,000-image stratified training subset and a 5,000-image test
subset keep a full attack × defense table within reach of a 2-core CPU; pass `--full` to a
benchmark script for the whole dataset.
"""

from __future__ import annotations

from typing import Any

from backdoor_toolkit.config import BenchmarkConfig


def bench_config(full: bool = False, **overrides: Any) -> BenchmarkConfig:
    """The benchmark setting, with field overrides (e.g. attacks=[...], defenses=[...])."""
    values: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "model": "wrn-16-1",
        "train_size": None if full else 20000,
        "test_size": None if full else 5000,
        "training": {"epochs": 4, "batch_size": 128, "lr": 0.05},
        "clean_ratio": 0.05,
        "val_fraction": 0.2,
        "device": "auto",
    }
    values.update(overrides)
    return BenchmarkConfig.model_validate(values)

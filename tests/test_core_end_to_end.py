"""End to end on real Fashion-MNIST: BadNets implants a backdoor, fine-tuning weakens it."""

from __future__ import annotations

import pytest

from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.data import DEBIAN_FASHION_MNIST


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_badnets_succeeds_and_finetuning_lowers_asr(tmp_path) -> None:
    config = BenchmarkConfig.model_validate(
        {
            "model": "small-cnn",
            "train_size": 4000,
            "test_size": 1000,
            "training": {"epochs": 6, "augment": False},
            "defenses": [{"name": "finetune", "config": {"epochs": 8, "lr": 0.05}}],
            "clean_ratio": 0.1,
            "device": "cpu",
            "output": str(tmp_path / "r.json"),
        }
    )
    rows = run_benchmark(config)
    assert [r.defense for r in rows] == ["none", "finetune"]
    before, after = rows
    assert before.ba is not None and before.asr is not None
    assert after.ba is not None and after.asr is not None and after.der is not None
    assert before.ba > 0.7
    assert before.asr > 0.9
    assert after.asr < before.asr - 0.2
    assert after.ba > before.ba - 0.1  # 320 clean images cost a few points of BA
    assert after.der > 0.55
    # the cached model is reused: a second run trains nothing and reproduces the undefended row
    again = run_benchmark(config.model_copy(update={"defenses": []}))
    assert again[0].notes == "undefended (cached)"
    assert again[0].asr == before.asr and again[0].ba == before.ba

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from backdoor_toolkit.data import ImageData
from backdoor_toolkit.metrics import METRICS, Scores, attack_scores, der, measure


class _Lookup(nn.Module):
    """Predicts class = the first pixel × 255, so tests control every prediction."""

    def forward(self, x: Tensor) -> Tensor:
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(cls, 10).float()


def _stamp_to_target(x: Tensor) -> Tensor:
    out = x.clone()
    out[:, 0, 0, 0] = 0.0  # every triggered image → class 0
    return out


def test_asr_excludes_target_class_and_ra_counts_true_class() -> None:
    labels = torch.tensor([0, 0, 1, 2, 3])
    images = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([0, 5, 1, 2, 3], dtype=torch.uint8)  # one clean error
    test = ImageData(images, labels)

    # trigger works on 2 of the 3 non-target images: the one whose class is 3 resists it
    def trigger(x: Tensor) -> Tensor:
        out = _stamp_to_target(x)
        keep = (x[:, 0, 0, 0] * 255).round() == 3
        out[keep] = x[keep]
        return out

    scores = attack_scores(_Lookup(), test, trigger, lambda y: torch.zeros_like(y), torch.device("cpu"))
    assert math.isclose(scores.ba, 4 / 5, rel_tol=1e-6)
    assert math.isclose(scores.asr, 2 / 3, rel_tol=1e-6)  # the two target-class images are not counted
    assert math.isclose(scores.ra, 1 / 3, rel_tol=1e-6)


def test_der_rewards_asr_drop_and_penalises_ba_drop() -> None:
    before = Scores(ba=0.9, asr=1.0, ra=0.0)
    assert der(before, Scores(ba=0.9, asr=0.0, ra=0.9)) == 1.0
    assert math.isclose(der(before, Scores(ba=0.8, asr=0.0, ra=0.8)), 0.95)
    assert der(before, before) == 0.5
    assert der(before, Scores(ba=0.95, asr=1.0, ra=0.0)) == 0.5  # a BA gain is not rewarded


def test_metric_directions_are_declared() -> None:
    assert METRICS["asr"].higher_is_better is False
    assert METRICS["ba"].higher_is_better is True
    assert METRICS["der"].higher_is_better is True


def test_measure_records_time_and_memory() -> None:
    with measure(torch.device("cpu")) as usage:
        block = torch.ones(64, 1024, 1024)  # 256 MB
        block += 1
    assert usage.seconds > 0
    assert usage.peak_mb > 100

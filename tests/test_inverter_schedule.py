"""Neural Cleanse's per-class λ: up after `patience` successful rounds, down after failed ones."""

from __future__ import annotations

import torch
from bdtk_inverters.schedule import LambdaSchedule


def _schedule(k: int = 1) -> LambdaSchedule:
    return LambdaSchedule.start(k, init=1e-3, up=1.5, down=2.0, patience=3, threshold=0.99)


def test_lambda_rises_only_after_patience_successful_rounds() -> None:
    s = _schedule()
    on = torch.tensor([True])
    for _ in range(2):
        s.update(torch.tensor([1.0]), on)
        assert s.lam.item() == 1e-3
    s.update(torch.tensor([0.995]), on)
    assert abs(s.lam.item() - 1.5e-3) < 1e-12
    for _ in range(3):  # counter restarted after the change
        s.update(torch.tensor([1.0]), on)
    assert abs(s.lam.item() - 2.25e-3) < 1e-12


def test_lambda_falls_after_patience_failed_rounds_and_alternation_resets() -> None:
    s = _schedule()
    on = torch.tensor([True])
    for success in (1.0, 0.5, 0.5, 1.0, 0.5, 0.5):  # the success in the middle resets the down counter
        s.update(torch.tensor([success]), on)
    assert s.lam.item() == 1e-3
    s.update(torch.tensor([0.98]), on)  # just below the threshold counts as failing
    assert abs(s.lam.item() - 5e-4) < 1e-12


def test_lambda_waits_until_the_trigger_first_works() -> None:
    s = _schedule()
    on = torch.tensor([True])
    for _ in range(5):  # failing before the first success says nothing about λ
        s.update(torch.tensor([0.2]), on)
    assert s.lam.item() == 1e-3 and not bool(s.started[0])
    s.update(torch.tensor([1.0]), on)
    assert bool(s.started[0]) and not bool(s.explored[0])


def test_each_class_has_its_own_lambda_and_frozen_classes_keep_theirs() -> None:
    s = _schedule(3)
    active = torch.tensor([True, True, False])
    s.update(torch.tensor([1.0, 1.0, 1.0]), torch.ones(3, dtype=torch.bool))
    for _ in range(3):
        s.update(torch.tensor([1.0, 0.0, 0.0]), active)
    assert torch.allclose(s.lam, torch.tensor([1.5e-3, 5e-4, 1e-3], dtype=torch.float64))
    assert s.raised.tolist() == [True, False, False] and s.lowered.tolist() == [False, True, False]

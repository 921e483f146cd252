"""The MAD anomaly index and the flagging rule, on numbers worked out by hand."""

from __future__ import annotations

import math

import torch
from bdtk_inverters.anomaly import MAD_CONSISTENCY, anomaly_index, flag_targets


def test_index_of_a_small_outlier() -> None:
    norms = torch.tensor([10.0, 11.0, 12.0, 13.0, 2.0])
    # median 11; |deviations| 1, 0, 1, 2, 9 → their median 1 → MAD = 1.4826
    index = anomaly_index(norms)
    expected = torch.tensor([1, 0, 1, 2, 9]) / MAD_CONSISTENCY
    assert torch.allclose(index, expected.float(), atol=1e-5)
    assert flag_targets([0, 1, 2, 3, 4], norms, index, threshold=2.0) == [4]


def test_even_count_uses_the_mean_of_the_middle_two() -> None:
    norms = torch.tensor([4.0, 6.0, 8.0, 30.0])
    # median 7; |deviations| 3, 1, 1, 23 → median 2 → MAD 2.9652
    index = anomaly_index(norms)
    assert math.isclose(float(index[3]), 23 / (2 * MAD_CONSISTENCY), rel_tol=1e-5)
    assert math.isclose(float(index[0]), 3 / (2 * MAD_CONSISTENCY), rel_tol=1e-5)


def test_large_norm_outliers_are_not_flagged() -> None:
    norms = torch.tensor([10.0, 11.0, 12.0, 13.0, 40.0])
    index = anomaly_index(norms)
    assert float(index[4]) > 2
    assert flag_targets([0, 1, 2, 3, 4], norms, index, threshold=2.0) == []


def test_threshold_is_strict_and_configurable() -> None:
    norms = torch.tensor([10.0, 11.0, 12.0, 13.0, 2.0])
    index = anomaly_index(norms)
    assert flag_targets([0, 1, 2, 3, 4], norms, index, threshold=9 / MAD_CONSISTENCY + 0.01) == []
    assert flag_targets([5, 6, 7, 8, 9], norms, index, threshold=6.0) == [9]


def test_zero_mad_scores_deviating_classes_infinite() -> None:
    norms = torch.tensor([5.0, 5.0, 5.0, 1.0])
    index = anomaly_index(norms)
    assert index[:3].tolist() == [0.0, 0.0, 0.0]
    assert math.isinf(float(index[3]))
    assert flag_targets([0, 1, 2, 3], norms, index, threshold=2.0) == [3]


def test_log_index_measures_spread_as_ratios() -> None:
    norms = torch.tensor([3.5, 43.0, 53.0, 54.0, 70.0, 73.0, 91.0, 113.0, 122.0, 169.0])
    linear = anomaly_index(norms)
    logged = anomaly_index(norms, log=True)
    assert float(linear[0]) < 2 < float(logged[0])
    x = norms.double().log()
    median = torch.quantile(x, 0.5)
    expected = (x[0] - median).abs() / (MAD_CONSISTENCY * torch.quantile((x - median).abs(), 0.5))
    assert abs(float(logged[0]) - float(expected)) < 1e-4

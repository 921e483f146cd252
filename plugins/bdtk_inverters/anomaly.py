"""Neural Cleanse's outlier test: the MAD anomaly index of per-class trigger norms.

A backdoor target needs a far smaller trigger than any other class, so its mask norm is a low
outlier. The median absolute deviation is robust to that one outlier, unlike a standard
deviation that the outlier itself would inflate.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Makes the MAD a consistent estimator of the standard deviation under a normal distribution.
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: Tensor, log: bool = False) -> Tensor:
    """|norm − median| / (1.4826 · MAD) per class; the median is NumPy's (mean of the middle two).

    With `log`, the statistic is taken on log norms: a trigger 10× smaller than the typical class
    then stands out even when the other classes' norms spread widely (they do when a short step
    budget leaves them unevenly converged), since their spread is measured as ratios.

    When the MAD is zero (all but at most half of the norms are equal) a class at the median
    scores 0 and any other class scores +inf, since it deviates from a spread-free population.
    """
    x = norms.detach().double().flatten()
    if log:
        x = x.clamp_min(1e-12).log()
    if x.numel() == 0:
        return x.float()
    median = torch.quantile(x, 0.5)
    deviation = (x - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(deviation, 0.5)
    if float(mad) == 0.0:
        index = torch.where(deviation == 0, torch.zeros_like(x), torch.full_like(x, float("inf")))
    else:
        index = deviation / mad
    return index.float()


def flag_targets(classes: list[int], norms: Tensor, index: Tensor, threshold: float) -> list[int]:
    """Classes whose index exceeds `threshold` and whose norm is below the median (small triggers)."""
    if norms.numel() == 0:
        return []
    median = float(torch.quantile(norms.detach().double().flatten(), 0.5))
    return [
        c
        for c, n, a in zip(classes, norms.tolist(), index.tolist(), strict=True)
        if a > threshold and n < median
    ]

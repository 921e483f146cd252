"""The trigger-inversion toolkit: what inverters, the purifiers that run them and `bdtk inspect` share.

- **Stamping**: `stamp` ((1 − m)·x + m·p, defined beside `MaskTrigger` in `triggers.py`, which sits
  below this layer) and `stamp_all`, every image under every candidate trigger in one batch.
- **The outlier test**: Neural Cleanse's MAD anomaly index of per-class trigger norms and the
  flagging rule on top of it.
- **Diagnostic keys** (`InversionKeys`): the names under which an inverter reports per-class and
  scan-cost numbers and under which a purifier records its inversion, so that every reader looks
  them up in one place; `split_diagnostics` tells per-class values from the rest for display.

Each of these existed as a private copy in several plugins; a copy that drifted would have made one
defense stamp, score or report a recovered trigger differently from another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import Tensor

from .triggers import stamp

__all__ = [
    "MAD_CONSISTENCY",
    "InversionKeys",
    "anomaly_index",
    "flag_targets",
    "split_diagnostics",
    "stamp",
    "stamp_all",
]


# --- stamping ----------------------------------------------------------------------------------


def stamp_all(images: Tensor, masks: Tensor, patterns: Tensor) -> Tensor:
    """Every image stamped with every trigger: (B, C, H, W) × K triggers → (K·B, C, H, W).

    Rows k·B … (k + 1)·B − 1 carry trigger k, so one forward pass scores all K candidates and
    `.view(K, B, …)` takes the result apart again.
    """
    return stamp(images.unsqueeze(0), masks.unsqueeze(1), patterns.unsqueeze(1)).flatten(0, 1)


# --- the outlier test --------------------------------------------------------------------------

#: Makes the MAD a consistent estimator of the standard deviation under a normal distribution.
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: Tensor, log: bool = False) -> Tensor:
    """|norm − median| / (1.4826 · MAD) per class; the median is NumPy's (mean of the middle two).

    A backdoor target needs a far smaller trigger than any other class, so its mask norm is a low
    outlier. The median absolute deviation is robust to that one outlier, unlike a standard
    deviation that the outlier itself would inflate.

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
    """Classes whose index exceeds `threshold` and whose norm is below the median (small triggers).

    The index is two-sided; only the small side means "a shortcut to this class exists", so an
    unusually large trigger never flags a class.
    """
    if norms.numel() == 0:
        return []
    median = float(torch.quantile(norms.detach().double().flatten(), 0.5))
    return [
        c
        for c, n, a in zip(classes, norms.tolist(), index.tolist(), strict=True)
        if a > threshold and n < median
    ]


# --- diagnostic keys ---------------------------------------------------------------------------


class InversionKeys:
    """Diagnostic keys with one meaning wherever an inversion is reported.

    An inverter writes the per-class and scan keys that apply to it into
    `InversionResult.diagnostics`; a purifier records its inversion in its own diagnostics under
    the summary keys (`InversionResult.summary()`); `bdtk inspect` reads both. Readers look the
    names up here instead of spelling them, so a renamed key cannot leave one of them reading
    nothing. An inverter may add keys of its own: `bdtk inspect` shows them too (see
    `split_diagnostics`).
    """

    # written by inverters, one value per inverted class (in the order of `classes`)
    LAMBDA: Final = "lambda"
    """Final weight of the mask-norm term."""
    STEPS: Final = "steps"
    """Optimisation steps the class took."""

    # written by inverters: how the scan's work was scheduled and what it cost
    SCHEDULE_USED: Final = "schedule_used"
    """Which schedule ran, in words (e.g. "full", "k-arm", "full (pre-screen ambiguous)")."""
    CLASS_STEPS: Final = "class_steps"
    """Optimisation steps summed over classes: the scan's cost."""
    FULL_SCAN_CLASS_STEPS_BOUND: Final = "full_scan_class_steps_bound"
    """The most a full scan could have taken (classes × step budget)."""
    CANDIDATES: Final = "candidates"
    """Classes a pre-screen named as likely targets (None without a pre-screen)."""
    DROPPED: Final = "dropped"
    """Classes stopped early as unable to win → the step count at which they stopped."""
    SCAN: Final = (SCHEDULE_USED, CLASS_STEPS, FULL_SCAN_CLASS_STEPS_BOUND, CANDIDATES, DROPPED)
    """The scan-cost keys a purifier copies into its own diagnostics, so a stored row shows them."""

    # a purifier's record of the inversion it ran (`InversionResult.summary()`)
    CLASSES: Final = "inversion_classes"
    FLAGGED: Final = "flagged"
    ANOMALY_INDEX: Final = "anomaly_index"
    MASK_NORMS: Final = "mask_norms"
    ATTACK_SUCCESS: Final = "inversion_attack_success"
    SECONDS: Final = "inverter_seconds"


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def split_diagnostics(
    diagnostics: Mapping[str, Any], classes: int
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """An inverter's diagnostics as (per-class values, everything else), both in their order.

    Per class is a list of `classes` plain values (numbers, booleans, strings, None), one per
    inverted class in the order of `InversionResult.classes` (Neural Cleanse's λ and steps). That
    convention is all a display needs to show an unknown inverter's extras as table columns. The
    scan keys never count as per class, even when a list of classes happens to have that length.
    """
    per_class: dict[str, list[Any]] = {}
    other: dict[str, Any] = {}
    for key, value in diagnostics.items():
        if (
            key not in InversionKeys.SCAN
            and isinstance(value, list | tuple)
            and len(value) == classes
            and all(_plain(v) for v in value)
        ):
            per_class[key] = list(value)
        else:
            other[key] = value
    return per_class, other

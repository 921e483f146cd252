"""Several trigger inverters in MCLDef's first stage: each scans, their flags are united.

Inverters see different trigger shapes: Neural Cleanse a small mask (patches), blend inversion a
faint whole-image blend (SIG, Blended). A model may carry either, so MCLDef can run several and
purify against every class any of them flags. Each flagged class keeps the trigger of one
inverter, chosen by a rule written down here and in docs/defenses/mcldef.md: the one under
which the class stands out most clearly (the highest anomaly index: that inverter's trigger family
fits the backdoor best), then the one whose trigger succeeds most often on the defender's val
split, then the one listed first.
The result is one ordinary `InversionResult`, so the rest of MCLDef (target choice, degenerate
checks, stamping, `bdtk purify`) reads it as it reads a single inverter's.
"""

from __future__ import annotations

import math
from typing import Any, Final

import torch

from backdoor_toolkit import InversionKeys, InversionResult

K = InversionKeys

#: MCLDef's own diagnostic keys for a run with several inverters (beside the shared summary keys).
INVERTERS: Final = "inverters"
"""The inverters that ran, in order (NAME or NAME:PRESET as configured)."""
FLAGGED_BY: Final = "flagged_by"
"""Class (as a string) → the inverters that flagged it."""
TRIGGER_FROM: Final = "trigger_from"
"""Class (as a string) → the inverter whose trigger MCLDef uses for it."""
BY_INVERTER: Final = "inversion_by_inverter"
"""Inverter → its own inversion, as `InversionResult.summary()` records it (the shared keys)."""
INVERTERS_SKIPPED: Final = "inverters_skipped"
"""With `inverter_mode="fallback"`: the inverters not run because an earlier one flagged a class."""
MERGE_KEYS: Final = (INVERTERS, FLAGGED_BY, TRIGGER_FROM, BY_INVERTER, INVERTERS_SKIPPED)


def pick(results: list[tuple[str, InversionResult]], cls: int, among: list[str]) -> str:
    """The inverter (of `among`) whose trigger MCLDef uses for `cls`.

    The highest anomaly index wins: both indices are MAD z-scores of the inverters' own trigger
    sizes, so the larger one says under which trigger family the class is the clearer outlier —
    the family that fits the backdoor. Attack success alone does not tell: on a model with a
    whole-image blend backdoor, Neural Cleanse's small mask also reached the target on every val
    image, yet unlearning it left most of the attack working (docs/defenses/mcldef.md). Then
    (and where no index was computed, as for a known target) the higher val attack success, then
    the order of `results`.
    """

    def key(item: tuple[int, tuple[str, InversionResult]]) -> tuple[float, float, int]:
        order, (_, result) = item
        i = result.classes.index(cls)
        index = float(result.anomaly_index[i])
        return (index if math.isfinite(index) else -math.inf, float(result.attack_success[i]), -order)

    candidates = [(order, item) for order, item in enumerate(results) if item[0] in among]
    return max(candidates, key=key)[1][0]


def combine(results: list[tuple[str, InversionResult]], known: int | None = None) -> InversionResult:
    """One `InversionResult` from several inverters' results over the same classes.

    Flagged: the union of every inverter's flags, ascending. A flagged class's row (mask,
    pattern, norm, success, anomaly index) is that of the inverter `pick` chooses among those that
    flagged it; a known target's (`known`) is chosen among all inverters. Every other row is the
    first inverter's, so `ranked()` — MCLDef's `on_no_detection="top-ranked"` — is the first
    inverter's ranking: norms of different inverters do not share a scale. The diagnostics name
    the inverters, who flagged what, whose trigger each chosen class uses, and each inverter's own
    summary under the shared keys; the scan-cost keys are summed over the inverters.
    """
    first_name, first = results[0]
    for name, result in results[1:]:
        if result.classes != first.classes:
            raise ValueError(
                f"inverters {first_name!r} and {name!r} inverted different classes "
                f"({first.classes} and {result.classes}); MCLDef asks every inverter for the same ones"
            )
    flagged_by: dict[int, list[str]] = {}
    for name, result in results:
        for cls in result.flagged:
            flagged_by.setdefault(cls, []).append(name)
    flagged = sorted(flagged_by)
    chosen = {cls: pick(results, cls, names) for cls, names in flagged_by.items()}
    if known is not None and known in first.classes:
        chosen[known] = pick(results, known, [name for name, _ in results])
    by_name = dict(results)
    masks, patterns = first.masks.clone(), first.patterns.clone()
    norms, success = first.mask_norms.clone(), first.attack_success.clone()
    index = first.anomaly_index.clone()
    for cls, name in chosen.items():
        source = by_name[name]
        i, j = first.classes.index(cls), source.classes.index(cls)
        masks[i] = source.masks[j].to(masks.device)
        patterns[i] = source.patterns[j].to(patterns.device)
        norms[i], success[i], index[i] = (
            source.mask_norms[j],
            source.attack_success[j],
            source.anomaly_index[j],
        )
    diagnostics: dict[str, Any] = {
        INVERTERS: [name for name, _ in results],
        FLAGGED_BY: {str(cls): flagged_by[cls] for cls in flagged},
        TRIGGER_FROM: {str(cls): chosen[cls] for cls in sorted(chosen)},
        BY_INVERTER: {name: result.summary() for name, result in results},
        K.SCHEDULE_USED: "; ".join(
            f"{name}: {result.diagnostics.get(K.SCHEDULE_USED, 'n/a')}" for name, result in results
        ),
    }
    for key in (K.CLASS_STEPS, K.FULL_SCAN_CLASS_STEPS_BOUND):
        counts = [v for _, result in results if isinstance(v := result.diagnostics.get(key), int)]
        if len(counts) == len(results):
            diagnostics[key] = sum(counts)
    return InversionResult(
        classes=list(first.classes),
        masks=masks,
        patterns=patterns,
        mask_norms=norms,
        attack_success=success,
        anomaly_index=torch.as_tensor(index),
        flagged=flagged,
        seconds=sum(result.seconds for _, result in results),
        diagnostics=diagnostics,
    )

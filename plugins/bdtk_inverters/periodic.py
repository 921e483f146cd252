"""Periodic-signal inversion: the faintest low-frequency stripe pattern that sends clean images to a class.

SIG (Barni, Kallas, Tondi, ICIP 2019) plants a backdoor with a sinusoid over the whole image,
v(i, j) = Δ·sin(2π·j·f / W), at low amplitude (Δ = 20–40 of 255) and low frequency (f = 6 periods
across a 28-pixel MNIST image in the paper). Neural Cleanse's small mask cannot express it, and a
free whole-image blend (`blend-inversion`) does express it but finds that a clean Fashion-MNIST
model's natural classes are reached by about as faint a blend shaped like a garment
(docs/inversion.md). This inverter therefore searches a family with almost no freedom: one
sinusoid, horizontal or vertical, at an integer frequency from 1 to `max_frequency_share` of the
side, at one of `phases` phases, with one amplitude a. A garment is not a sinusoid, so a natural
class should need a large amplitude or none at all, while a class with a planted periodic trigger
is reached at about the attacker's amplitude.

The family is limited to low frequencies on purpose. Stripes close to the Nyquist frequency (one
pixel on, one off) are the textures convolutional networks are most fragile to, backdoor or not
(Yin et al., "A Fourier Perspective on Model Robustness in Computer Vision", NeurIPS 2019); on the
clean bench models they reached Shirt or Pullover at amplitudes as low as a SIG target's, so they
would be false alarms. The default bound, a quarter of the side, was chosen on the bench models of
seeds 0 and 1 and checked on seed 2 (docs/inversion.md, "Periodic-signal inversion"). A
high-frequency periodic trigger therefore escapes this inverter: a stated limit.

The sinusoid s (values in [−1, 1]) is stamped as a mask and pattern, so that the result is an
ordinary `InversionResult` and every purifier uses it unchanged: mask a·|s|, pattern 1 where s > 0
and 0 elsewhere. On black pixels this adds a·max(s, 0) and on white ones it subtracts a·max(−s, 0),
as SIG's clipped addition does; on mid-grey pixels it moves half as far.

No gradients: per pattern, one forward pass at the largest amplitude tells which classes it can
reach at all, and a bisection on log amplitude finds each such class's smallest working amplitude.
Per class the smallest amplitude over all patterns is kept; a class no pattern reaches counts as
`max_amplitude`. The outlier test is Neural Cleanse's MAD on log amplitudes with blend inversion's
effect size (`max_ratio` of the median); when most classes are unreachable the median is the cap
and a class is flagged when its amplitude is at most `max_ratio` × `max_amplitude` (0.25 at the
defaults).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    InversionResult,
    PluginMeta,
    StrictConfig,
    TriggerInverter,
    anomaly_index,
    flag_targets,
    preferred_layout,
    stamp,
    to_float,
)

from .common import attack_success, check_inputs, model_device

ORIENTATIONS = ("columns", "rows")


class PeriodicInversionConfig(StrictConfig):
    """Which periodic signals are searched, how finely, and the flag rule (docs/inversion.md says
    where each default comes from)."""

    target: int | None = Field(
        default=None, ge=0, description="Known target class: invert only it and skip the scan"
    )
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1, description="Invert only these classes (default: all)"
    )
    orientations: list[Literal["columns", "rows"]] = Field(
        default=["columns", "rows"],
        min_length=1,
        description="Stripe directions searched: columns varies along the width (SIG's), rows along "
        "the height",
    )
    max_frequency_share: float = Field(
        default=0.25,
        gt=0,
        le=0.5,
        description="Highest frequency searched, as periods per pixel of the side (0.5 is Nyquist); "
        "near-Nyquist stripes move clean models too",
    )
    phases: int = Field(default=8, ge=1, le=64, description="Phases searched per frequency, evenly spaced")
    max_amplitude: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Largest amplitude searched: a class no pattern reaches at it counts as this amplitude",
    )
    min_amplitude: float = Field(
        default=0.01, gt=0, le=1, description="Smallest amplitude the bisection goes down to"
    )
    bisection_steps: int = Field(
        default=7, ge=1, le=30, description="Halvings of the log-amplitude interval per class and pattern"
    )
    search_images: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Clean training images the search measures success on (the val part is kept for "
        "the reported attack success)",
    )
    success_threshold: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of the other classes' search images a pattern must send to the class",
    )
    threshold: float = Field(
        default=2.0, gt=0, le=100, description="Anomaly index above which a below-median class is flagged"
    )
    max_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="A flagged class's amplitude must also be at most this share of the median class's",
    )
    eval_images: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Clean images (val part) on which attack success is measured",
    )
    batch_size: int = Field(default=256, ge=1, le=65_536, description="Images per forward pass")

    @model_validator(mode="after")
    def _consistent(self) -> PeriodicInversionConfig:
        if self.target is not None and self.classes is not None:
            raise ValueError(
                f"target={self.target} (a known target, no scan) and classes={self.classes} (scan these) "
                "contradict each other; give one"
            )
        if self.min_amplitude >= self.max_amplitude:
            raise ValueError(
                f"min_amplitude {self.min_amplitude} must be below max_amplitude {self.max_amplitude}"
            )
        if len(set(self.orientations)) != len(self.orientations):
            raise ValueError(f"orientations {self.orientations} repeat a direction; give each once")
        return self


def sinusoid(orientation: str, frequency: int, phase: float, height: int, width: int) -> Tensor:
    """s(i, j) = sin(2π·f·t / n + φ) with t the column (n = width) or the row (n = height)."""
    n = width if orientation == "columns" else height
    wave = torch.sin(2 * math.pi * torch.arange(n, dtype=torch.float64) * frequency / n + phase).float()
    return wave.expand(height, width) if orientation == "columns" else wave[:, None].expand(height, width)


def signal_trigger(signal: Tensor, amplitude: float, channels: int) -> tuple[Tensor, Tensor]:
    """The mask (1, H, W) and pattern (C, H, W) that stamp `signal` at `amplitude` (module docstring)."""
    mask = (amplitude * signal.abs()).unsqueeze(0)
    pattern = (signal > 0).float().unsqueeze(0).expand(channels, *signal.shape).contiguous()
    return mask, pattern


class PeriodicInversion(TriggerInverter):
    name = "periodic-inversion"
    Config = PeriodicInversionConfig
    config: PeriodicInversionConfig
    meta = PluginMeta(
        summary="Per-class faintest low-frequency sinusoid (SIG's trigger family) that sends clean images "
        "to the class; flags classes with an outlying small amplitude",
        paper="SIG's periodic signal (Barni, Kallas, Tondi, ICIP 2019) as the trigger family; Neural "
        "Cleanse's MAD outlier test (Wang et al., IEEE S&P 2019)",
        year=2019,
        url="https://arxiv.org/abs/1902.11237",
        threat_model="defender holds a small clean set; black-box predictions suffice; the trigger is a "
        "low-frequency periodic signal over the whole image (a high-frequency one escapes it)",
    )
    conformance_config: ClassVar[dict[str, Any]] = {
        "phases": 2,
        "max_frequency_share": 0.1,
        "bisection_steps": 2,
        "search_images": 16,
        "eval_images": 16,
    }

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        c = self.config
        known = classes is None and c.target is not None
        chosen = classes if classes is not None else [c.target] if c.target is not None else c.classes
        chosen = list(range(data.spec.num_classes)) if chosen is None else list(chosen)
        check_inputs(model, data, chosen, "Periodic-signal inversion")
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            device = model_device(model)
            with preferred_layout(model, device), torch.no_grad():
                found = self._search(model, data, chosen, device)
                masks = torch.stack([m for m, _ in found["triggers"]]).to(device)
                patterns = torch.stack([p for _, p in found["triggers"]]).to(device)
                success = attack_success(model, data, chosen, masks, patterns, c.eval_images)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        amplitudes = torch.tensor(found["amplitude"], dtype=torch.float64)
        if known:
            index = torch.full((1,), float("nan"))
            flagged = list(chosen)
            outliers = flagged
        else:
            index = anomaly_index(amplitudes, log=True).float()
            outliers = flag_targets(chosen, amplitudes, index, c.threshold)
            median = float(torch.quantile(amplitudes, 0.5))
            small = {
                k
                for k, a, r in zip(chosen, amplitudes.tolist(), found["reached"], strict=True)
                if r and a <= c.max_ratio * median
            }
            flagged = [k for k in outliers if k in small]
        diagnostics: dict[str, Any] = {
            "mode": "known-target" if known else "scan",
            "amplitude": [round(float(a), 6) for a in amplitudes],
            "reached_threshold": found["reached"],
            "signal": found["signal"],
            "patterns_searched": found["patterns_searched"],
            "forward_passes": found["forward_passes"],
            "threshold": c.threshold,
            "index_on": "log amplitude (a class no signal reaches counts as max_amplitude)",
        }
        if not known and flagged != outliers:
            diagnostics["outliers_above_max_ratio"] = [k for k in outliers if k not in flagged]
        return InversionResult(
            classes=chosen,
            masks=masks.detach(),
            patterns=patterns.detach(),
            mask_norms=masks.flatten(1).sum(1).cpu(),
            attack_success=success,
            anomaly_index=index,
            flagged=flagged,
            seconds=seconds,
            diagnostics=diagnostics,
        )

    def _search(
        self, model: nn.Module, data: DefenseData, classes: list[int], device: torch.device
    ) -> dict[str, Any]:
        """Every pattern of the family, in a fixed order; per class the smallest working amplitude."""
        c = self.config
        spec = data.spec
        h, w = spec.height, spec.width
        gen = torch.Generator().manual_seed(self.seed)
        take = torch.randperm(len(data.train), generator=gen)[: c.search_images]
        images = to_float(data.train.images[take]).to(device)
        labels = data.train.labels[take].to(device)
        targets = torch.tensor(classes, device=device)
        others = labels[None, :] != targets[:, None]  # (K, N)
        counts = others.sum(1).clamp_min(1)
        forwards = 0

        def success(signal: Tensor, amplitude: float) -> Tensor:
            """(K,) share of the other classes' search images sent to each class."""
            nonlocal forwards
            forwards += 1
            mask, pattern = signal_trigger(signal, amplitude, spec.channels)
            mask, pattern = mask.to(device), pattern.to(device)
            preds = torch.cat(
                [
                    model(stamp(images[i : i + c.batch_size], mask, pattern)).argmax(1)
                    for i in range(0, len(images), c.batch_size)
                ]
            )
            hits = (preds[None, :] == targets[:, None]) & others
            return (hits.sum(1) / counts).cpu()

        k = len(classes)
        best = [math.inf] * k
        best_signal: list[tuple[str, int, int] | None] = [None] * k
        fallback = [(-1.0, ORIENTATIONS[0], 1, 0)] * k  # (success at the cap, pattern) for unreached
        searched = 0
        lo0 = math.log(c.min_amplitude)
        for orientation in c.orientations:
            side = w if orientation == "columns" else h
            top = max(1, int(c.max_frequency_share * side + 1e-9))
            for frequency in range(1, top + 1):
                for p in range(c.phases):
                    signal = sinusoid(orientation, frequency, 2 * math.pi * p / c.phases, h, w)
                    searched += 1
                    at_cap = success(signal, c.max_amplitude)
                    for i in range(k):
                        share = float(at_cap[i])
                        if share > fallback[i][0]:
                            fallback[i] = (share, orientation, frequency, p)
                        if share < c.success_threshold:
                            continue
                        hi = math.log(min(c.max_amplitude, best[i]))
                        beaten = (
                            best[i] < c.max_amplitude
                            and float(success(signal, best[i])[i]) < c.success_threshold
                        )
                        if beaten:
                            continue  # this pattern cannot beat the class's best
                        lo = lo0
                        for _ in range(c.bisection_steps):
                            mid = (lo + hi) / 2
                            if float(success(signal, math.exp(mid))[i]) >= c.success_threshold:
                                hi = mid
                            else:
                                lo = mid
                        if math.exp(hi) < best[i]:
                            best[i] = math.exp(hi)
                            best_signal[i] = (orientation, frequency, p)
        triggers = []
        amplitude = []
        described = []
        for i in range(k):
            reached = best_signal[i] is not None
            way, periods, phase = best_signal[i] or fallback[i][1:]
            a = best[i] if reached else c.max_amplitude
            signal = sinusoid(way, periods, 2 * math.pi * phase / c.phases, h, w)
            triggers.append(signal_trigger(signal, a, spec.channels))
            amplitude.append(a)
            described.append(f"{way}, {periods} periods, phase {phase}/{c.phases}")
        return {
            "triggers": triggers,
            "amplitude": amplitude,
            "reached": [s is not None for s in best_signal],
            "signal": described,
            "patterns_searched": searched,
            "forward_passes": forwards,
        }

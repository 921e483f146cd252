"""BA, ASR, RA and DER, each with its declared direction, plus time and memory of a stage.

- BA: accuracy on the whole clean test set.
- ASR: triggered test images classified as their backdoor target, over images whose target
  differs from their true class (target-class images are excluded).
- RA: the same triggered images classified as their true class.
- DER = [max(0, ASR_before − ASR_after) − max(0, BA_before − BA_after) + 1] / 2.
- ASR retuned: the ASR once the model has been fine-tuned briefly on a few poisoned samples (the
  re-tuning attack, `config.RetuneConfig`): a backdoor that was hidden rather than removed comes back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from .data import ImageData, to_float
from .errors import NonFiniteError


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricInfo] = {
    "ba": MetricInfo("BA", True, "clean accuracy on the whole test set"),
    "asr": MetricInfo("ASR", False, "triggered non-target test images sent to the target"),
    "ra": MetricInfo("RA", True, "triggered non-target test images kept at their true class"),
    "der": MetricInfo("DER", True, "defense effectiveness rating (BackdoorBench, corrected)"),
    "asr_retuned": MetricInfo(
        "ASR retuned", False, "ASR after re-tuning on a few poisoned samples (post-purification robustness)"
    ),
    "seconds": MetricInfo("time", False, "wall time of the defense"),
    "peak_mb": MetricInfo("peak MB", False, "peak extra memory of the defense"),
}


class Scores(BaseModel):
    """BA, ASR and RA as fractions in [0, 1]."""

    ba: float
    asr: float
    ra: float


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    device: torch.device,
    batch_size: int = 512,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Predicted classes for uint8 or float images, optionally transformed (e.g. triggered).

    Raises NonFiniteError when any output is NaN or infinite: argmax would still name a class
    (NaN picks class 0), so such a model would be scored as if it had predicted something.
    """
    model.eval().to(device)
    out = []
    broken = 0
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size]).to(device)
        if transform is not None:
            x = transform(x)
        logits = model(x)
        broken += int((~torch.isfinite(logits)).flatten(1).any(1).sum())
        out.append(logits.argmax(1).cpu())
    if broken:
        raise NonFiniteError(
            f"The model outputs NaN or infinite values on {broken} of {images.shape[0]} images, so "
            "its predictions cannot be scored; check its weights (a diverged training run) and that "
            "the images are what it was trained on."
        )
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageData, device: torch.device) -> float:
    """Share of `data`'s images that `model` (put in eval mode on `device`) classifies right; NaN
    for no images, which callers must treat as "not measured", never as a score."""
    if len(data) == 0:
        return float("nan")
    return float((predict(model, data.images, device) == data.labels).float().mean())


def attack_scores(
    model: nn.Module,
    test: ImageData,
    trigger: Callable[[Tensor], Tensor],
    target_labels: Callable[[Tensor], Tensor],
    device: torch.device,
) -> Scores:
    """BA on all test images; ASR and RA on those whose backdoor target is not their class."""
    clean_pred = predict(model, test.images, device)
    ba = float((clean_pred == test.labels).float().mean())
    targets = target_labels(test.labels)
    victims = targets != test.labels
    if not bool(victims.any()):
        return Scores(ba=ba, asr=float("nan"), ra=float("nan"))
    triggered_pred = predict(model, test.images[victims], device, transform=lambda x: trigger(x).clamp(0, 1))
    asr = float((triggered_pred == targets[victims]).float().mean())
    ra = float((triggered_pred == test.labels[victims]).float().mean())
    return Scores(ba=ba, asr=asr, ra=ra)


def der(before: Scores, after: Scores) -> float:
    """Defense effectiveness rating in [0, 1]; 0.5 means no change."""
    asr_gain = max(0.0, before.asr - after.asr)
    ba_drop = max(0.0, before.ba - after.ba)
    return (asr_gain - ba_drop + 1.0) / 2.0


@dataclass
class Usage:
    seconds: float = 0.0
    peak_mb: float = 0.0


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measure(device: torch.device) -> Iterator[Usage]:
    """Wall time and peak extra memory of a block (GPU memory on CUDA, process RSS otherwise)."""
    usage = Usage()
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            yield usage
        finally:
            torch.cuda.synchronize(device)
            usage.peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            usage.seconds = time.perf_counter() - start
        return
    base_rss = _rss_mb()
    peak = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield usage
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_mb())
        usage.peak_mb = peak[0] - base_rss
        usage.seconds = time.perf_counter() - start

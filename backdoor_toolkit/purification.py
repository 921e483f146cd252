"""Purify or inspect your own model: `backdoor_toolkit.purify` / `backdoor_toolkit.inspect`, and
the work behind `bdtk purify` and `bdtk inspect MODEL_FILE`.

A practitioner holds a model and some clean images, not a benchmark grid: no attack is known, so
nothing here measures ASR against a real trigger. What can be measured honestly is measured on the
defender's own held-out clean split (the val part of the clean budget, never trained on), and on a
test set when one is given: clean accuracy before and after, and, when the defense recovered a
trigger (its `PurificationResult.inversion`), how often that trigger sends images of the other
classes to its class, before and after. A stored victim (`bdtk import backdoorbench`) is the
exception: it comes with the attacker's own backdoored test images, so its ASR and RA are measured
on them before and after (`BackdoorScores`), and its clean data gives the budget and the test set.

This module sits below the runner and the store (layer 7) and uses only the registry, the models
and the data: the facade may export it without bringing the benchmark machinery within plugins'
reach (see docs/architecture.md).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .artifacts import json_text
from .data import (
    Dataset,
    DataSpec,
    DefenseData,
    ImageData,
    check_budget_size,
    draw_defense_data,
    load_dataset,
    stratified_subset,
    to_float,
)
from .errors import BdtkError
from .image_folders import FolderImages, folder_path, load_image_folder, parse_image_size, shown_classes
from .interfaces import InversionResult, PurificationResult
from .metrics import accuracy, measure, predict
from .models import AdaptedClassifier, ImageClassifier, adapt, check_capabilities, save_model
from .models.adapter import input_channels
from .models.loading import normalization_values
from .output_paths import check_output_file, naming_output
from .plugins import ResolvedPlugin, create_inverter, create_purifier, resolve_plugin
from .training import check_finite, resolve_device, seed_everything
from .triggers import MaskTrigger
from .victims import BackdoorTestSet, Victim

__all__ = [
    "BackdoorScores",
    "Change",
    "CleanData",
    "InspectReport",
    "PurifyOutputs",
    "PurifyReport",
    "SplitScores",
    "inspect",
    "load_clean_data",
    "purify",
    "recovered_targets",
    "run_inspection",
    "run_purification",
    "trigger_sheet",
    "victim_clean_data",
]

DataSource = str | Path | ImageData | DefenseData


# --- the defender's data ------------------------------------------------------------------------


@dataclass
class CleanData:
    """The defender's clean budget (train part to purify on, val part held out) and an optional
    test set, with where they came from."""

    spec: DataSpec
    budget: DefenseData
    test: ImageData | None = None
    source: str = ""
    test_source: str | None = None
    #: Class names of a folder (sorted sub-folder names), None for a named dataset.
    classes: list[str] | None = None
    #: Unreadable image files skipped in the clean and the test folder, each with why.
    skipped: dict[Path, str] = field(default_factory=dict)
    test_skipped: dict[Path, str] = field(default_factory=dict)
    #: Links and repeated files of the clean folder not read (a link back into the folder, say).
    ignored: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "classes": self.classes,
            "num_classes": self.spec.num_classes,
            "image_shape": list(self.spec.image_shape),
            "train_images": len(self.budget.train),
            "val_images": len(self.budget.val),
            "skipped_images": len(self.skipped),
            "skipped_files": _named(self.skipped),
            "ignored_links_or_repeats": self.ignored,
            "test_source": self.test_source,
            "test_images": None if self.test is None else len(self.test),
            "test_skipped_images": len(self.test_skipped),
            "test_skipped_files": _named(self.test_skipped),
        }


#: Skipped files named in a report; past it the count says how many more there were.
NAMED_SKIPS = 50


def _named(skipped: Mapping[Path, str]) -> list[dict[str, str]]:
    """The first skipped files with why, for the report (a folder of thousands of broken files
    would otherwise make the report as long as the folder)."""
    return [{"file": str(path), "reason": why} for path, why in list(skipped.items())[:NAMED_SKIPS]]


def _split(spec: DataSpec, images: ImageData, val_fraction: float, seed: int) -> DefenseData:
    """A user's clean images split into train and val parts class by class (seeded): each class
    gives `val_fraction` of its images to val, at least one when it has two or more, and keeps at
    least one for training. A draw over the whole budget (as a benchmark's, from thousands of
    images) can leave a class out of a small val part entirely."""
    if len(images) < 2:
        raise BdtkError(f"{spec.name} has {len(images)} image(s); a clean budget needs at least 2.")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    train_parts, val_parts = [], []
    for cls in range(spec.num_classes):
        members = order[images.labels[order] == cls]
        n = int(members.numel())
        n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 and n >= 2 else 0
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    index_train = torch.cat(train_parts)
    index_val = torch.cat(val_parts)
    index_train = index_train[torch.randperm(index_train.numel(), generator=gen)]
    index_val = index_val[torch.randperm(index_val.numel(), generator=gen)]
    return DefenseData(spec, images.subset(index_train), images.subset(index_val), index_train, index_val)


def _check_labels(spec: DataSpec, data: ImageData, what: str) -> None:
    if len(data) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < spec.num_classes:
        raise BdtkError(
            f"{what} has labels {int(data.labels.min())}..{int(data.labels.max())}, but the model outputs "
            f"{spec.num_classes} classes (0..{spec.num_classes - 1})."
        )


def load_clean_data(
    source: DataSource,
    *,
    channels: int | None,
    num_classes: int | None = None,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
    image_size: str | int | tuple[int, int] | None = None,
    test_data: str | Path | ImageData | None = None,
    val_fraction: float = 0.2,
    clean_ratio: float = 0.05,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
) -> CleanData:
    """The defender's clean data for a model that reads `channels`-channel images (None: any)
    and outputs `num_classes` classes (None: not checked here; `fit_model` checks it).

    `source`: `folder:PATH` or a Path (an ImageFolder tree: all of it is the clean budget), a
    dataset name (`clean_ratio` of its training split is the budget, its test split the test set,
    as in a benchmark), an `ImageData` (all of it is the budget) or a `DefenseData` (used as it
    is). The budget is split into train and val parts with the benchmark's seeded, stratified draw.
    A class count that differs from the model's is an error naming both numbers.
    """
    size = parse_image_size(image_size)
    test: ImageData | None = None
    test_source: str | None = None
    classes: list[str] | None = None
    skipped: dict[Path, str] = {}
    test_skipped: dict[Path, str] = {}
    ignored = 0
    path = source if isinstance(source, Path) else folder_path(source) if isinstance(source, str) else None
    if isinstance(source, DefenseData):
        spec, budget, label = source.spec, source, source.spec.name
    elif path is not None:
        folder = load_image_folder(path, channels=channels, image_size=size)
        if num_classes is not None:
            _check_classes(folder, num_classes)
        spec, classes, skipped = folder.spec(mean, std), folder.classes, folder.skip_reasons
        ignored = len(folder.ignored)
        budget, label = _split(spec, folder.data, val_fraction, seed), f"folder:{path}"
    elif isinstance(source, ImageData):
        if num_classes is None:
            raise BdtkError("Clean images given as ImageData need the model's class count (num_classes).")
        c, h, w = (int(s) for s in source.images.shape[1:])
        spec = DataSpec("images", num_classes, c, h, w, mean, std, hflip=False)
        _check_labels(spec, source, "The clean images")
        budget, label = _split(spec, source, val_fraction, seed), "images"
    else:
        assert isinstance(source, str)
        if size is not None:
            raise BdtkError(f"--image-size applies to folder data; dataset {source!r} has its own size.")
        dataset = load_dataset(source, data_dir, download)
        spec, label = dataset.spec, source
        if num_classes is not None and spec.num_classes != num_classes:
            raise BdtkError(
                f"Dataset {source!r} has {spec.num_classes} classes, but the model outputs {num_classes}."
            )
        train = stratified_subset(
            dataset.train,
            train_size,
            spec.num_classes,
            seed=1,
            what="--train-size",
            split=f"training images of {source}",
        )
        test = stratified_subset(
            dataset.test,
            test_size,
            spec.num_classes,
            seed=2,
            what="--test-size",
            split=f"test images of {source}",
        )
        test_source = f"{source} (test split)"
        check_budget_size(spec, len(train), clean_ratio, val_fraction)  # as `bdtk benchmark` does
        budget = draw_defense_data(
            Dataset(spec, train, test), torch.empty(0, dtype=torch.long), clean_ratio, val_fraction, seed
        )
    if channels is not None and spec.channels != channels:
        raise BdtkError(
            f"{label} has {spec.channels}-channel images, but the model reads {channels} channels."
        )
    if test_data is not None:
        test, test_source, test_skipped = _test_data(test_data, spec, classes)
        _check_unseen(test, budget, test_source)
    return CleanData(spec, budget, test, label, test_source, classes, skipped, test_skipped, ignored)


def _check_classes(folder: FolderImages, num_classes: int) -> None:
    if len(folder.classes) != num_classes:
        shown = shown_classes(folder.classes)
        raise BdtkError(
            f"Image folder {folder.root} has {len(folder.classes)} classes ({shown}), but the model "
            f"outputs {num_classes}."
        )


def _check_unseen(test: ImageData, budget: DefenseData, test_source: str) -> None:
    """Refuse test images the defense sees: the test accuracy is the one measurement it must not
    have trained or tuned on (`--test-data` naming the clean folder itself, or a copy of part of it)."""
    import hashlib

    def digests(images: Tensor) -> list[bytes]:
        return [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in images.cpu()]

    seen = set(digests(budget.train.images)) | set(digests(budget.val.images))
    shared = sum(digest in seen for digest in digests(test.images))
    if shared:
        raise BdtkError(
            f"{shared} of the {len(test)} test images ({test_source}) are also in the clean data the "
            "defense purifies and validates on (identical pixels); give test images it never sees."
        )


def _test_data(
    source: str | Path | ImageData, spec: DataSpec, classes: list[str] | None
) -> tuple[ImageData, str, dict[Path, str]]:
    if isinstance(source, ImageData):
        _check_labels(spec, source, "The test images")
        return source, "images", {}
    path = source if isinstance(source, Path) else folder_path(source)
    if path is None:
        raise BdtkError(f"--test-data expects folder:PATH, got {source!r}.")
    folder = load_image_folder(
        path, channels=spec.channels, image_size=(spec.height, spec.width), classes=classes
    )
    _check_classes(folder, spec.num_classes)
    return folder.data, f"folder:{path}", folder.skip_reasons


def victim_clean_data(
    victim: Victim,
    *,
    clean_ratio: float = 0.05,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_data: str | Path | ImageData | None = None,
) -> CleanData:
    """A stored victim's own clean data, drawn as `bdtk benchmark --victim` draws it: the budget
    is `clean_ratio` of its clean training images (stratified, never one the attacker poisoned)
    with `val_fraction` held out; the test set is its clean test set, or `test_data` when given."""
    check_budget_size(victim.spec, len(victim.clean_train), clean_ratio, val_fraction)
    budget = victim.defense_data(clean_ratio, val_fraction, seed)
    if test_data is None:
        test, test_source = victim.clean_test, f"victim {victim.name}'s clean test set"
    else:
        test, test_source, _ = _test_data(test_data, victim.spec, None)
        _check_unseen(test, budget, test_source)
    return CleanData(
        victim.spec,
        budget,
        test,
        f"victim {victim.name}'s clean training images",
        test_source,
    )


@torch.no_grad()
def fit_model(model: ImageClassifier, clean: CleanData) -> None:
    """Run the model once on a few clean images: it must take them and output the data's classes.

    For an adapted model this is also when its feature path is checked (`AdaptedClassifier.verify`).
    """
    data = clean.budget.val if len(clean.budget.val) else clean.budget.train
    x = to_float(data.images[:4])
    try:
        if isinstance(model, AdaptedClassifier):
            logits = model.verify(x)
        else:
            was = model.training
            logits = model.eval()(x.to(next(model.parameters()).device))
            model.train(was)
    except RuntimeError as exc:
        c, h, w = clean.spec.image_shape
        raise BdtkError(
            f"The model cannot take {clean.source}'s {c}x{h}x{w} images: {' '.join(str(exc).split())[:200]}"
        ) from None
    if logits.dim() != 2:
        raise BdtkError(f"The model outputs {tuple(logits.shape)} for a batch, not (images, classes) logits.")
    if not bool(torch.isfinite(logits).all()):
        # finite weights can still compute NaN: a negative BatchNorm variance, weights that overflow
        # float32 on the way; every number after this would be NaN, reported as if it were a result
        broken = [
            name
            for name, module in model.named_modules()
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            and module.running_var is not None
            and bool((module.running_var < 0).any())
        ]
        why = (
            f"BatchNorm layer {broken[0]!r} has a negative running variance"
            if broken
            else "its weights overflow or its normalisation divides by zero"
        )
        raise BdtkError(
            f"The model outputs NaN or inf on {clean.source}'s images ({why}): the model file is broken; "
            "check how it was saved."
        )
    if logits.shape[1] != clean.spec.num_classes:
        names = clean.classes or []
        shown = f" ({shown_classes(names)})" if names else ""
        raise BdtkError(
            f"{clean.source} has {clean.spec.num_classes} classes{shown}, but the model outputs "
            f"{logits.shape[1]}."
        )


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One number before and after purification."""

    before: float
    after: float


@dataclass
class SplitScores:
    """Clean accuracy on one split, and each recovered trigger's success on it, before and after.

    A trigger's success is the share of the split's images of other classes that the trigger sends
    to its class (the images already of that class cannot show a backdoor).
    """

    split: str
    images: int
    accuracy: Change
    trigger_success: dict[int, Change] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "accuracy_before": _num(self.accuracy.before),
            "accuracy_after": _num(self.accuracy.after),
            "trigger_success": {
                str(k): {"before": _num(v.before), "after": _num(v.after)}
                for k, v in self.trigger_success.items()
            },
        }


@dataclass
class BackdoorScores:
    """The attacker's own backdoored test images (a stored victim's), before and after: ASR, the
    share classified as their backdoor target, and RA, the share kept at their true class (NaN
    when the source did not record true classes). Only images whose target differs from their
    class count."""

    images: int
    asr: Change
    ra: Change

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "asr_before": _num(self.asr.before),
            "asr_after": _num(self.asr.after),
            "ra_before": _num(self.ra.before),
            "ra_after": _num(self.ra.after),
        }


@dataclass
class PurifyReport:
    """What `purify` did: the purifier's own result and the numbers measured around it."""

    defense: ResolvedPlugin
    result: PurificationResult
    clean: CleanData
    #: Clean accuracy and recovered-trigger success on the held-out val split.
    val: SplitScores
    #: The same on the test set, when one was given.
    test: SplitScores | None
    seconds: float
    peak_mb: float
    #: Whether the purified model's state dict reproduces it (False when a defense left forward
    #: hooks or replaced modules: its weights alone are not the purified model, and `save` refuses).
    weights_hold_model: bool
    #: Where the model came from (`architecture`, and `file` and `sha256` for a model file).
    source: dict[str, Any] = field(default_factory=dict)
    #: Classes whose recovered trigger is measured (`recovered_targets`).
    targets: list[int] = field(default_factory=list)
    #: ASR and RA on a stored victim's backdoored test images, when the model is a victim's.
    backdoor: BackdoorScores | None = None

    @property
    def model(self) -> nn.Module:
        """The purified model."""
        return self.result.model

    @property
    def inversion(self) -> InversionResult | None:
        """The trigger inversion the defense ran, when it returned one."""
        return self.result.inversion

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (what `bdtk purify` writes to `*.report.json`)."""
        r = self.result
        return _plain(
            {
                "model": self.source,
                "data": self.clean.describe(),
                "defense": self.defense.name,
                "defense_preset": self.defense.preset,
                "defense_config": self.defense.config.model_dump(),
                "val": self.val.to_dict(),
                "test": None if self.test is None else self.test.to_dict(),
                "backdoor": None if self.backdoor is None else self.backdoor.to_dict(),
                "modified": r.modified,
                "detected": r.detected,
                "notes": r.notes,
                "diagnostics": r.diagnostics,
                "stage_seconds": r.stage_seconds,
                "inversion": None if r.inversion is None else r.inversion.summary(),
                "recovered_targets": self.targets,
                "seconds": self.seconds,
                "peak_mb": self.peak_mb,
                "weights_hold_model": self.weights_hold_model,
            }
        )

    def save(
        self, out: str | Path, *, force: bool = False, extra: Mapping[str, Any] | None = None
    ) -> PurifyOutputs:
        """Write the purified weights, the JSON beside them, the report and the trigger PNG.

        Refuses (BdtkError, nothing written) when a file exists and `force` is False, or when the
        purified model's weights do not hold it (`weights_hold_model`).
        """
        paths = PurifyOutputs.beside(Path(out).expanduser())
        paths.check(force)
        if not self.weights_hold_model:
            raise BdtkError(
                f"Defense {self.defense.label!r} changed the model in a way its weights do not hold (a "
                "forward hook or a replaced module), so a state dict would not reproduce the purified "
                "model; nothing was written."
            )
        model = self.result.model
        assert isinstance(model, ImageClassifier)
        with naming_output(paths.weights):
            save_model(model, paths.weights, self.metadata(extra))
        report = {**self.to_dict(), "outputs": paths.written(self.inversion is not None)}
        with naming_output(paths.report):
            paths.report.write_text(json_text(report) + "\n", encoding="utf-8")
        if self.inversion is not None:
            with naming_output(paths.triggers):
                trigger_sheet(self.inversion).save(paths.triggers)
        else:
            paths.triggers.unlink(missing_ok=True)  # a stale sheet of an earlier run would mislead
        return paths

    def metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON beside the purified weights: where they came from and how they were made."""
        spec = self.clean.spec
        return _plain(
            {
                "architecture": self.source.get("architecture"),
                "channels": spec.channels,
                "image_size": [spec.height, spec.width],
                "num_classes": spec.num_classes,
                "classes": self.clean.classes,
                "source_file": self.source.get("file"),
                "source_sha256": self.source.get("sha256"),
                **{k: self.source[k] for k in ("victim", "victim_content_hash") if k in self.source},
                "defense": self.defense.name,
                "defense_preset": self.defense.preset,
                "defense_config": self.defense.config.model_dump(),
                "data": self.clean.source,
                "bdtk": version("backdoor-toolkit"),
                "torch": torch.__version__,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **(extra or {}),
            }
        )


@dataclass(frozen=True)
class PurifyOutputs:
    """The files `bdtk purify --out X.safetensors` writes: X.safetensors, X.json (metadata),
    X.report.json and X.triggers.png (when the defense recovered a trigger)."""

    weights: Path
    metadata: Path
    report: Path
    triggers: Path

    @classmethod
    def beside(cls, out: Path) -> PurifyOutputs:
        if out.suffix != ".safetensors":
            raise BdtkError(f"--out {out}: give a .safetensors path (e.g. purified.safetensors).")
        stem = out.with_suffix("")
        return cls(out, out.with_suffix(".json"), Path(f"{stem}.report.json"), Path(f"{stem}.triggers.png"))

    def all(self) -> list[Path]:
        return [self.weights, self.metadata, self.report, self.triggers]

    def check(self, force: bool) -> None:
        """Refuse to overwrite without `force`, and a folder that cannot be written, before any work."""
        for path in self.all():
            check_output_file(path, "--out")  # a folder, a device, a missing or read-only folder
            if path.exists() and not force:
                raise BdtkError(f"{path} exists; pass --force to overwrite it.")

    def written(self, triggers: bool) -> list[str]:
        return [str(p) for p in self.all() if triggers or p != self.triggers]


@dataclass
class InspectReport:
    """What `inspect` did: the inverter's result, and which inverter with which settings."""

    inverter: ResolvedPlugin
    result: InversionResult
    train_images: int
    val_images: int

    @property
    def flagged(self) -> list[int]:
        return list(self.result.flagged)

    @property
    def detected(self) -> bool:
        return bool(self.result.flagged)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return _plain(
            {
                "inverter": self.inverter.name,
                "inverter_preset": self.inverter.preset,
                "inverter_config": self.inverter.config.model_dump(),
                "classes": r.classes,
                "mask_norms": r.mask_norms.tolist(),
                "anomaly_index": r.anomaly_index.tolist(),
                "attack_success": r.attack_success.tolist(),
                "flagged": r.flagged,
                "detected": bool(r.flagged),
                "seconds": r.seconds,
                "diagnostics": r.diagnostics,
            }
        )


def _num(value: float) -> float | None:
    return None if value != value else value


def _plain(value: Any) -> Any:
    """JSON-ready: NaN → None, tensors → lists, anything else unknown → its string."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


# --- the work -------------------------------------------------------------------------------------


def trigger_success(
    model: nn.Module, data: ImageData, inversion: InversionResult, classes: list[int], device: torch.device
) -> dict[int, float]:
    """Per class, the share of `data`'s images of other classes that its recovered trigger sends to it."""
    out: dict[int, float] = {}
    for cls in classes:
        others = data.labels != cls
        if not bool(others.any()):
            continue
        trigger = inversion.trigger(cls)

        def stamped(x: Tensor, trigger: MaskTrigger = trigger) -> Tensor:
            return trigger(x).clamp(0, 1)

        pred = predict(model, data.images[others], device, transform=stamped)
        out[cls] = float((pred == cls).float().mean())
    return out


def recovered_targets(inversion: InversionResult | None) -> list[int]:
    """The classes whose recovered trigger counts as the backdoor's: those the inverter flagged, or,
    when it inverted a single class (a target the defense was given), that class."""
    if inversion is None:
        return []
    if inversion.flagged:
        return list(inversion.flagged)
    return list(inversion.classes) if len(inversion.classes) == 1 else []


def _scores(
    split: str,
    before: nn.Module,
    after: nn.Module,
    data: ImageData,
    inversion: InversionResult | None,
    classes: list[int],
    device: torch.device,
) -> SplitScores:
    acc = Change(accuracy(before, data, device), accuracy(after, data, device))
    success: dict[int, Change] = {}
    if inversion is not None and len(data):
        first = trigger_success(before, data, inversion, classes, device)
        second = trigger_success(after, data, inversion, classes, device)
        success = {k: Change(first[k], second[k]) for k in first}
    return SplitScores(split, len(data), acc, success)


@torch.no_grad()
def _weights_hold(original: nn.Module, purified: nn.Module, images: Tensor, device: torch.device) -> bool:
    """Whether loading the purified state dict into a copy of the original reproduces the purified model."""
    fresh = copy.deepcopy(original)
    try:
        fresh.load_state_dict(purified.state_dict())
    except (RuntimeError, KeyError):
        return False
    x = to_float(images[:32]).to(device)
    a, b = fresh.to(device).eval()(x), purified.eval()(x)
    return bool(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def run_purification(
    model: ImageClassifier,
    clean: CleanData,
    defense: ResolvedPlugin,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    source: dict[str, Any] | None = None,
    backdoor: BackdoorTestSet | None = None,
) -> PurifyReport:
    """Purify a copy of `model` (it stays as it was) with `defense` on the clean budget and
    measure accuracy and recovered-trigger success before and after on the val split (and test),
    and, given a stored victim's backdoored test images (`backdoor`), ASR and RA on them."""
    device = device or torch.device("cpu")
    purifier = create_purifier(defense, seed=seed, device=device)
    check_capabilities(model, purifier.meta.requires, f"Defense {defense.label!r}")
    original = model.to(device).eval()
    work = copy.deepcopy(original)
    seed_everything(seed)
    with measure(device) as usage:
        result = purifier.purify(work, clean.budget)
    check_finite(result.model, f"defense {defense.label!r}")
    purified = result.model.to(device).eval()
    targets = recovered_targets(result.inversion)
    val = _scores("val", original, purified, clean.budget.val, result.inversion, targets, device)
    test = None
    if clean.test is not None:
        test = _scores("test", original, purified, clean.test, result.inversion, targets, device)
    attacked = None
    if backdoor is not None:
        asr_before, ra_before = backdoor.success(original, device)
        asr_after, ra_after = backdoor.success(purified, device)
        count = int(backdoor.non_target().sum())
        attacked = BackdoorScores(count, Change(asr_before, asr_after), Change(ra_before, ra_after))
    probe = clean.budget.val if len(clean.budget.val) else clean.budget.train
    holds = _weights_hold(original, purified, probe.images, device)
    return PurifyReport(
        defense,
        result,
        clean,
        val,
        test,
        usage.seconds,
        usage.peak_mb,
        holds,
        dict(source or {}),
        targets,
        attacked,
    )


def run_inspection(
    model: ImageClassifier,
    budget: DefenseData,
    inverter: ResolvedPlugin,
    *,
    classes: list[int] | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> InspectReport:
    """Invert triggers of `model` (unchanged) on the clean budget with `inverter`."""
    model.to(device or torch.device("cpu")).eval()
    seed_everything(seed)
    result = create_inverter(inverter, seed=seed).invert(model, budget, classes or None)
    return InspectReport(inverter, result, len(budget.train), len(budget.val))


# --- the Python API ------------------------------------------------------------------------------


def _prepare(
    model: nn.Module,
    clean_data: DataSource,
    *,
    mean: Any,
    std: Any,
    feature_layer: str | None,
    image_size: str | int | tuple[int, int] | None,
    test_data: str | Path | ImageData | None,
    val_fraction: float,
    clean_ratio: float,
    seed: int,
    data_dir: str | None,
) -> tuple[ImageClassifier, CleanData]:
    wrapped = adapt(
        model,
        None if mean is None else tuple(mean),
        None if std is None else tuple(std),
        feature_layer=feature_layer,
        architecture=type(model).__name__,
    )
    wrapped.eval()
    num_classes = None
    if isinstance(clean_data, ImageData):
        with torch.no_grad():
            logits = wrapped(to_float(clean_data.images[:2]).to(next(wrapped.parameters()).device))
        num_classes = int(logits.shape[-1])
    m, s = normalization_values(wrapped)
    clean = load_clean_data(
        clean_data,
        channels=input_channels(wrapped),
        num_classes=num_classes,
        mean=tuple(m),
        std=tuple(s),
        image_size=image_size,
        test_data=test_data,
        val_fraction=val_fraction,
        clean_ratio=clean_ratio,
        seed=seed,
        data_dir=data_dir,
    )
    fit_model(wrapped, clean)
    return wrapped, clean


def purify(
    model: nn.Module,
    clean_data: DataSource,
    defense: str = "mcldef",
    *,
    test_data: str | Path | ImageData | None = None,
    mean: Any = None,
    std: Any = None,
    feature_layer: str | None = None,
    image_size: str | int | tuple[int, int] | None = None,
    val_fraction: float = 0.2,
    clean_ratio: float = 0.05,
    data_dir: str | None = None,
    architecture: str | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    **settings: Any,
) -> PurifyReport:
    """Purify `model` with `defense` (NAME or NAME:PRESET; `settings` are its config fields) on
    `clean_data`; returns a `PurifyReport` (`.model` is the purified model, `.save(path)` writes it).

    `model`: any classifier `nn.Module` taking float images in [0, 1] after `mean`/`std` (a bdtk
    zoo model as it is; anything else through `AdaptedClassifier`, whose penultimate layer is the
    input of its last nn.Linear or the output of `feature_layer`). It is moved to `device` and
    otherwise left as it was; a copy is purified. `clean_data`: `"folder:PATH"` or a Path (an
    ImageFolder tree, resized to `image_size`), a dataset name (`clean_ratio` of its training
    split), an `ImageData` or a `DefenseData`. `val_fraction` of it is held out; the numbers are
    measured there, and on `test_data` when given. `architecture` (e.g. `"torchvision:resnet18"`)
    is recorded beside saved weights, so that `load_model` and `bdtk inspect` rebuild the model
    from the file alone.
    """
    chosen = resolve_plugin("purifier", defense, overrides=settings)
    run_device = device if isinstance(device, torch.device) else resolve_device(device)
    wrapped, clean = _prepare(
        model,
        clean_data,
        mean=mean,
        std=std,
        feature_layer=feature_layer,
        image_size=image_size,
        test_data=test_data,
        val_fraction=val_fraction,
        clean_ratio=clean_ratio,
        seed=seed,
        data_dir=data_dir,
    )
    network = type(model)
    source = {"architecture": architecture, "network": f"{network.__module__}.{network.__qualname__}"}
    return run_purification(wrapped, clean, chosen, seed=seed, device=run_device, source=source)


def inspect(
    model: nn.Module,
    clean_data: DataSource,
    inverter: str = "neural-cleanse",
    *,
    classes: list[int] | None = None,
    mean: Any = None,
    std: Any = None,
    feature_layer: str | None = None,
    image_size: str | int | tuple[int, int] | None = None,
    val_fraction: float = 0.2,
    clean_ratio: float = 0.05,
    data_dir: str | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    **settings: Any,
) -> InspectReport:
    """Scan `model` for a backdoor with `inverter` (NAME or NAME:PRESET; `settings` are its config
    fields) on `clean_data`; returns an `InspectReport` (`.result` is the `InversionResult`,
    `.flagged` the suspected target classes). Arguments as for `purify`; `classes` limits the scan."""
    chosen = resolve_plugin("inverter", inverter, overrides=settings)
    run_device = device if isinstance(device, torch.device) else resolve_device(device)
    wrapped, clean = _prepare(
        model,
        clean_data,
        mean=mean,
        std=std,
        feature_layer=feature_layer,
        image_size=image_size,
        test_data=None,
        val_fraction=val_fraction,
        clean_ratio=clean_ratio,
        seed=seed,
        data_dir=data_dir,
    )
    return run_inspection(wrapped, clean.budget, chosen, classes=classes, seed=seed, device=run_device)


# --- pictures -------------------------------------------------------------------------------------


def trigger_sheet(result: InversionResult, scale: int = 4, pattern: bool = False) -> Any:
    """One tile per class: mask (top) and masked pattern m·p (below it), with `pattern` also the
    pattern p itself (bottom); flagged classes framed red. A whole-image blend's m·p is α·p with a
    small α, nearly black: the pattern row shows what it draws.

    A PIL image; `bdtk inspect` and `bdtk purify` both draw recovered triggers with it.
    """
    from PIL import Image, ImageDraw

    def tiles(t: Tensor) -> Tensor:  # (K, C, H, W) in [0, 1] → RGB, upscaled
        rgb = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t[:, :3]
        return F.interpolate(rgb.float().cpu().clamp(0, 1), scale_factor=scale, mode="nearest")

    rows = [tiles(result.masks), tiles(result.masks * result.patterns)]
    if pattern:
        rows.append(tiles(result.patterns))
    k, _, h, w = rows[0].shape
    n, pad, label = len(rows), 4, 14
    sheet = Image.new("RGB", (k * (w + 2 * pad), label + n * h + (n + 1) * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, cls in enumerate(result.classes):
        x0 = i * (w + 2 * pad) + pad
        for row, img in enumerate(r[i] for r in rows):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            sheet.paste(Image.fromarray(arr), (x0, label + pad + row * (h + pad)))
        flagged = cls in result.flagged
        draw.text((x0, 1), f"{cls}{' !' if flagged else ''}", fill="red" if flagged else "black")
        if flagged:
            draw.rectangle(
                (x0 - 3, label + pad - 3, x0 + w + 2, label + n * h + n * pad + 2), outline="red", width=2
            )
    return sheet

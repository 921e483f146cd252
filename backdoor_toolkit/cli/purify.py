"""`bdtk purify`: purify your own model file with any registered defense, on your own clean images.

The model is a safetensors state dict with its architecture (`--model`: a zoo name,
`torchvision:NAME` or `MODULE:FACTORY`); the clean data a dataset name or `folder:PATH`. No attack
is known, so the numbers are those a defender can measure honestly: on the held-out val part of the
clean budget (and a test set, when given), clean accuracy before and after, and the success of the
trigger the defense recovered, if it recovered one. Everything is checked before any work and
nothing is written until the purified model is known to be whole, so bad input leaves no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..config import split_preset
from ..console import console
from ..errors import ConfigError
from ..inversion import InversionKeys
from ..models import AdaptedClassifier, LoadedModel, check_capabilities, load_model
from ..models.loading import normalization_values
from ..plugins import get_plugin, resolve_plugin
from ..purification import (
    CleanData,
    PurifyOutputs,
    PurifyReport,
    SplitScores,
    fit_model,
    load_clean_data,
    run_purification,
)
from ..training import resolve_device
from .common import (
    ArchitectureOption,
    DataDirOption,
    DataOption,
    DeviceOption,
    DownloadOption,
    FeatureLayerOption,
    ImageSizeOption,
    MeanOption,
    SeedOption,
    SetOption,
    StdOption,
    TestDataOption,
    ValFractionOption,
    app,
    check_writable,
    parse_floats,
    split_settings,
    user_errors,
)


def load_user_model(
    path: Path,
    architecture: str | None,
    *,
    data: str,
    mean: str | None,
    std: str | None,
    feature_layer: str | None,
    image_size: str | None,
    clean_ratio: float,
    val_fraction: float,
    seed: int,
    data_dir: str | None,
    download: bool,
    train_size: int | None,
    test_size: int | None,
    test_data: str | None = None,
) -> tuple[LoadedModel, CleanData]:
    """A model file and the clean data it is purified or inspected on, checked against each other.

    `bdtk inspect MODEL_FILE` and `bdtk purify` share it, so they take the same model and data
    options and refuse the same bad input with the same message.
    """
    loaded = load_model(
        path,
        architecture,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
        feature_layer=feature_layer,
    )
    size: Any = image_size
    if size is None and data.startswith("folder:") and loaded.metadata.get("image_size"):
        size = tuple(loaded.metadata["image_size"])
    model_mean, model_std = normalization_values(loaded.model)
    clean = load_clean_data(
        data,
        channels=loaded.channels,
        mean=tuple(model_mean),
        std=tuple(model_std),
        image_size=size,
        test_data=test_data,
        val_fraction=val_fraction,
        clean_ratio=clean_ratio,
        seed=seed,
        data_dir=data_dir,
        download=download,
        train_size=train_size,
        test_size=test_size,
    )
    fit_model(loaded.model, clean)
    return loaded, clean


def describe_model(loaded: LoadedModel, clean: CleanData) -> None:
    """What was loaded: architecture, normalisation, and for an adapted model its capabilities."""
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    where = {
        "given": "given",
        "file": "the file's",
        "metadata": "from the JSON beside the file",
        "none": "none: the network sees pixels in [0, 1]; pass --mean/--std if it was trained normalised",
    }[loaded.normalization]
    console.print(
        f"Model {escape(loaded.architecture)} ({params / 1e6:.2f}M parameters) from "
        f"{escape(str(loaded.path))}; normalisation {where}.",
        highlight=False,
    )
    if isinstance(model, AdaptedClassifier):
        for line in model.describe():
            console.print(f"  {escape(line)}", highlight=False)
    skipped = [(clean.source, clean.skipped), (clean.test_source, clean.test_skipped)]
    for source, count in skipped:
        if count:
            console.print(f"[yellow]Skipped {count} unreadable image file(s) in {escape(str(source))}.[/]")


def _percent(value: float) -> str:
    return "—" if value != value else f"{100 * value:.2f} %"


def numbers_table(report: PurifyReport) -> Table:
    """Before and after, per split: clean accuracy and each recovered trigger's success."""
    table = Table(title="Before and after purification", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("measured on")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    splits: list[tuple[str, SplitScores]] = [("held-out val", report.val)]
    if report.test is not None:
        splits.append(("test", report.test))
    for name, scores in splits:
        table.add_row(
            f"{name} accuracy ({scores.images} images)",
            _percent(scores.accuracy.before),
            _percent(scores.accuracy.after),
        )
        for cls, change in scores.trigger_success.items():
            table.add_row(
                f"{name}: recovered trigger → class {cls}", _percent(change.before), _percent(change.after)
            )
    if report.val.trigger_success:
        table.caption = (
            "trigger success: share of images of other classes the recovered trigger sends to its class"
        )
    return table


@app.command()
@user_errors
def purify(
    model_path: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_FILE", help="Safetensors state dict of the model to purify", show_default=False
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Purified weights, X.safetensors; X.json (metadata), X.report.json and X.triggers.png "
            "are written beside it",
            show_default=False,
        ),
    ],
    defense: Annotated[
        str, typer.Option("--defense", "-d", help="Purifier, NAME or NAME:PRESET (see `bdtk plugins`)")
    ] = "mcldef",
    set_: SetOption = None,
    model: ArchitectureOption = None,
    data: DataOption = "fashion-mnist",
    test_data: TestDataOption = None,
    image_size: ImageSizeOption = None,
    feature_layer: FeatureLayerOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    clean_ratio: Annotated[
        float, typer.Option(help="Clean budget of a named dataset (share of its training split)")
    ] = 0.05,
    val_fraction: ValFractionOption = 0.2,
    train_size: Annotated[int | None, typer.Option(help="Stratified training subset size")] = None,
    test_size: Annotated[int | None, typer.Option(help="Stratified test subset size")] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files")] = False,
) -> None:
    """Purify a model file with any defense on your clean images; write the weights and a report.

    Prints, on the held-out val part of the clean budget (and --test-data), clean accuracy before
    and after, and the success of the trigger the defense recovered, before and after.
    `--set FIELD=VALUE` sets the defense.
    """
    outputs = PurifyOutputs.beside(out.expanduser())
    outputs.check(force)
    get_plugin("purifier", split_preset(defense)[0])  # an unknown defense says so before --set does
    settings = split_settings(list(set_ or []), [defense], default=defense)
    chosen = resolve_plugin("purifier", defense, overrides=settings[defense])
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}.")
    run_device = resolve_device(device or "auto")
    loaded, clean = load_user_model(
        model_path,
        model,
        data=data,
        mean=mean,
        std=std,
        feature_layer=feature_layer,
        image_size=image_size,
        clean_ratio=clean_ratio,
        val_fraction=val_fraction,
        seed=seed,
        data_dir=data_dir,
        download=download,
        train_size=train_size,
        test_size=test_size,
        test_data=test_data,
    )
    # a defense that needs what the model lacks refuses now, in one line, before anything is printed
    check_capabilities(loaded.model, chosen.info.cls.meta.requires, f"Defense {chosen.label!r}")
    for path in outputs.all():
        check_writable(path, "output file")
    describe_model(loaded, clean)
    console.print(
        f"Purifying with {escape(chosen.label)} on {escape(clean.source)} ({clean.spec.num_classes} classes; "
        f"{len(clean.budget.train)} clean images to purify on, {len(clean.budget.val)} held out)…",
        highlight=False,
    )
    source = {"architecture": loaded.architecture, "file": str(loaded.path), "sha256": loaded.sha256}
    report = run_purification(loaded.model, clean, chosen, seed=seed, device=run_device, source=source)
    console.print(numbers_table(report))
    _print_outcome(report)
    paths = report.save(out.expanduser(), force=force)
    console.print(f"Wrote {escape(', '.join(paths.written(report.inversion is not None)))}.", highlight=False)


def _print_outcome(report: PurifyReport) -> None:
    r = report.result
    if r.inversion is not None:
        console.print(
            f"Recovered trigger(s) for class(es) {', '.join(map(str, report.targets))}."
            if report.targets
            else "The defense's trigger inversion flagged no class.",
            highlight=False,
        )
    elif r.diagnostics.get(InversionKeys.FLAGGED):
        console.print(
            f"The defense flagged class(es) {r.diagnostics[InversionKeys.FLAGGED]} but did not return its "
            "triggers (PurificationResult.inversion), so their success is not measured.",
            highlight=False,
        )
    state = "purified" if r.modified else "returned unchanged"
    notes = f": {r.notes}" if r.notes else "."
    console.print(
        f"{report.defense.label} {state} the model in {report.seconds:.1f} s{escape(notes)}", highlight=False
    )

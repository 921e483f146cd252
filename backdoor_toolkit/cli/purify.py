"""`bdtk purify`: purify your own model file with any registered defense, on your own clean images.

The model is a safetensors state dict with its architecture (`--model`: a zoo name,
`torchvision:NAME` or `MODULE:FACTORY`); the clean data a dataset name or `folder:PATH`. No attack
is known, so the numbers are those a defender can measure honestly: on the held-out val part of the
clean budget (and a test set, when given), clean accuracy before and after, and the success of the
trigger the defense recovered, if it recovered one. Everything is checked before any work and
nothing is written until the purified model is known to be whole, so bad input leaves no files.

The model may also be a stored victim (`bdtk import backdoorbench`'s folder, or its
model.safetensors): its model, normalisation and clean data are read from it, and its backdoored
test images give the attack's ASR and RA before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import isnan
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..config import split_preset
from ..console import console
from ..errors import BdtkError, ConfigError
from ..image_folders import shown_classes
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
    victim_clean_data,
)
from ..training import resolve_device
from ..victims import META_FILE, MODEL_FILE, Victim, load_victim, read_victim_record, victim_dir
from .common import (
    DEFAULT_DATA,
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
    ThreadsOption,
    ValFractionOption,
    app,
    parse_floats,
    split_settings,
    user_errors,
    with_threads,
)


@dataclass(frozen=True)
class ModelOptions:
    """The model and data options `bdtk purify` and `bdtk inspect MODEL_FILE` share, as given on
    the command line (None: not given), so both read them, and refuse them, the same way."""

    architecture: str | None = None
    data: str | None = None
    mean: str | None = None
    std: str | None = None
    feature_layer: str | None = None
    image_size: str | None = None
    clean_ratio: float = 1.0
    val_fraction: float = 0.2
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    test_data: str | None = None

    def __post_init__(self) -> None:
        # NaN fails every comparison, so these also refuse nan and (with the upper bounds) inf
        if not 0 < self.clean_ratio <= 1:
            raise ConfigError(
                f"--clean-ratio must be above 0 and at most 1 (a share of the clean training images), "
                f"got {self.clean_ratio}."
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction}.")

    def data_kwargs(self) -> dict[str, Any]:
        """The options `load_clean_data` takes unchanged, whatever the model."""
        return {
            "val_fraction": self.val_fraction,
            "clean_ratio": self.clean_ratio,
            "seed": self.seed,
            "data_dir": self.data_dir,
            "download": self.download,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


def load_user_model(path: Path, options: ModelOptions) -> tuple[LoadedModel, CleanData, Victim | None]:
    """A model file (or a stored victim) and the clean data it is purified or inspected on, checked
    against each other; the victim, when `path` names one.

    `bdtk inspect MODEL_FILE` and `bdtk purify` share it, so they take the same model and data
    options and refuse the same bad input with the same message. `options.data` None: a victim's own
    clean images, else `DEFAULT_DATA`.
    """
    directory = victim_dir(path)
    if directory is not None:
        return _victim_and_data(directory, options)
    data = options.data or DEFAULT_DATA
    if data.startswith("folder:"):  # options that choose a subset of a named dataset
        o = options
        given = {"--train-size": o.train_size, "--test-size": o.test_size, "--data-dir": o.data_dir}
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise ConfigError(
                f"{', '.join(used)}: not with --data {data}, whose images are all the clean budget "
                "(these options choose from a named dataset); leave them out or give a dataset name."
            )
    loaded = load_model(
        path,
        options.architecture,
        mean=parse_floats(options.mean, "--mean"),
        std=parse_floats(options.std, "--std"),
        feature_layer=options.feature_layer,
    )
    size: Any = options.image_size
    if size is None and data.startswith("folder:") and loaded.metadata.get("image_size"):
        size = tuple(loaded.metadata["image_size"])
    model_mean, model_std = normalization_values(loaded.model)
    clean = load_clean_data(
        data,
        channels=loaded.channels,
        mean=tuple(model_mean),
        std=tuple(model_std),
        image_size=size,
        test_data=options.test_data,
        **options.data_kwargs(),
    )
    fit_model(loaded.model, clean)
    return loaded, clean, None


def _victim_and_data(directory: Path, options: ModelOptions) -> tuple[LoadedModel, CleanData, Victim]:
    """A stored victim's model and clean data (`load_user_model` for a victim folder): what the
    victim stores is not given again, and the data options apply only when `options.data` replaces
    its clean images."""
    if not (directory / META_FILE).is_file():
        raise BdtkError(
            f"{directory} is a folder without {META_FILE}: give a safetensors model file, or a victim "
            "folder written by `bdtk import backdoorbench`."
        )
    o = options
    data_options: dict[str, Any] = {
        "--image-size": o.image_size,
        "--train-size": o.train_size,
        "--test-size": o.test_size,
        "--data-dir": o.data_dir,
        "--download": o.download,
    }
    given = {"--model": o.architecture, "--mean": o.mean, "--std": o.std, "--feature-layer": o.feature_layer}
    if o.data is None:  # the victim's own data: options that choose or shape other data do not apply
        given.update(data_options)
    used = [flag for flag, value in given.items() if value not in (None, False)]
    if used:
        raise ConfigError(
            f"{', '.join(used)}: not with victim {directory}, which stores its model, normalisation "
            "and clean data (--data PATH_OR_NAME replaces only the clean data)."
        )
    victim = load_victim(directory)
    loaded = LoadedModel(
        model=victim.model,
        architecture=victim.model_name,
        path=directory / MODEL_FILE,
        sha256=read_victim_record(directory)["files"][MODEL_FILE],
        channels=victim.spec.channels,
        normalization="victim",
    )
    if o.data is None:
        clean = victim_clean_data(
            victim, clean_ratio=o.clean_ratio, val_fraction=o.val_fraction, seed=o.seed, test_data=o.test_data
        )
    else:
        spec = victim.spec
        default_size = (spec.height, spec.width) if o.data.startswith("folder:") else None
        clean = load_clean_data(
            o.data,
            channels=spec.channels,
            num_classes=spec.num_classes,
            mean=spec.mean,
            std=spec.std,
            image_size=o.image_size or default_size,
            test_data=o.test_data if o.test_data is not None else victim.clean_test,
            **o.data_kwargs(),
        )
        if o.test_data is None:
            clean.test_source = f"victim {victim.name}'s clean test set"
    fit_model(loaded.model, clean)
    return loaded, clean, victim


def describe_model(loaded: LoadedModel, clean: CleanData, victim: Victim | None = None) -> None:
    """What was loaded: architecture, normalisation, for an adapted model its capabilities, and for
    a victim what it brings (its backdoored test images, its targets)."""
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    where = {
        "given": "given",
        "file": "the file's",
        "metadata": "from the JSON beside the file",
        "victim": "the victim's",
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
    if victim is not None:
        targets = ", ".join(map(str, victim.source.get("targets", []))) or "not recorded"
        console.print(
            f"  victim {escape(victim.name)} ({escape(str(victim.source.get('tool', 'stored')))}): "
            f"{int(victim.bd_test.non_target().sum())} backdoored test images (the ASR set), target "
            f"class(es) {escape(targets)}; {victim.excluded.numel()} poisoned training images never "
            "enter the clean budget",
            highlight=False,
        )
    named = loaded.metadata.get("classes")
    if isinstance(named, list) and clean.classes is not None and named != clean.classes:
        shown, mine = shown_classes([str(n) for n in named], 6), shown_classes(clean.classes, 6)
        console.print(
            f"[yellow]The model's JSON names its classes {escape(shown)}; the folder's are {escape(mine)}. "
            "Labels follow the folder's sorted names, so check that class k is the same class in both.[/]",
            highlight=False,
        )
    for source, skipped in [(clean.source, clean.skipped), (clean.test_source, clean.test_skipped)]:
        if skipped:
            shown = "; ".join(f"{path.name}: {why}" for path, why in list(skipped.items())[:3])
            more = f"; {len(skipped) - 3} more in the report" if len(skipped) > 3 else ""
            console.print(
                f"[yellow]Skipped {len(skipped)} unreadable image file(s) in {escape(str(source))} "
                f"({escape(shown)}{more}).[/]",
                highlight=False,
            )
    if clean.ignored:
        console.print(
            f"[yellow]Did not read {clean.ignored} link(s) or repeated file(s) in "
            f"{escape(str(clean.source))} (each image is read once, under the class folder it lies in).[/]"
        )
    classes = clean.spec.num_classes
    in_val = int(clean.budget.val.labels.unique().numel()) if len(clean.budget.val) else 0
    in_train = int(clean.budget.train.labels.unique().numel()) if len(clean.budget.train) else 0
    if in_train < classes or in_val < classes:
        import torch

        counts = torch.bincount(
            torch.cat([clean.budget.train.labels, clean.budget.val.labels]), minlength=classes
        )
        names = clean.classes or [str(k) for k in range(classes)]
        few = [f"{names[k]} ({int(counts[k])})" for k in range(classes) if counts[k] < 2]
        why = (
            f"classes with fewer than 2 images: {', '.join(few[:8])}{', …' if len(few) > 8 else ''}; "
            "give at least 2 images of every class"
            if few
            else "raise --val-fraction so that every class has a val image"
        )
        console.print(
            f"[yellow]The clean images cover {in_train} of {classes} classes for training and {in_val} "
            f"for the held-out val part ({len(clean.budget.val)} images): what a defense learns and "
            f"chooses on them (early stop, thresholds) will be unreliable ({why}).[/]",
            highlight=False,
        )


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
    if report.backdoor is not None:
        b = report.backdoor
        table.add_row(
            f"victim's backdoored test images: ASR ({b.images} images)",
            _percent(b.asr.before),
            _percent(b.asr.after),
        )
        if not (isnan(b.ra.before) and isnan(b.ra.after)):
            table.add_row("victim's backdoored test images: RA", _percent(b.ra.before), _percent(b.ra.after))
    captions = []
    if report.val.trigger_success:
        captions.append(
            "trigger success: share of images of other classes the recovered trigger sends to its class"
        )
    if report.backdoor is not None:
        captions.append(
            "ASR: share of the attacker's backdoored images classified as its target; RA: kept at their class"
        )
    if captions:
        table.caption = "\n".join(captions)
    return table


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


@app.command()
@user_errors
@with_threads
def purify(
    model_path: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_FILE",
            help="Safetensors state dict of the model to purify, or a victim folder (`bdtk import`)",
            show_default=False,
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
    data: DataOption = None,
    test_data: TestDataOption = None,
    image_size: ImageSizeOption = None,
    feature_layer: FeatureLayerOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    clean_ratio: Annotated[
        float,
        typer.Option(help="Clean budget of a named dataset or a victim (share of its clean training images)"),
    ] = 0.05,
    val_fraction: ValFractionOption = 0.2,
    train_size: Annotated[int | None, typer.Option(help="Stratified training subset size")] = None,
    test_size: Annotated[int | None, typer.Option(help="Stratified test subset size")] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Purify a model file with any defense on your clean images; write the weights and a report.

    Prints, on the held-out val part of the clean budget (and --test-data), clean accuracy before
    and after, and the success of the trigger the defense recovered, before and after; for a victim
    also the attack's ASR and RA on its backdoored test images. `--set FIELD=VALUE` sets the defense.
    """
    outputs = PurifyOutputs.beside(out.expanduser())
    given = model_path.expanduser()
    inputs = {given, given.with_suffix(".json")} if given.is_file() else set(given.glob("*"))
    clash = [p for p in outputs.all() if p.exists() and any(_same_file(p, q) for q in inputs)]
    if clash:  # even with --force: the model being purified would be lost if anything failed later
        raise BdtkError(f"--out would overwrite {clash[0]}, which is the input model's; give another --out.")
    outputs.check(force)
    get_plugin("purifier", split_preset(defense)[0])  # an unknown defense says so before --set does
    settings = split_settings(list(set_ or []), [defense], default=defense)
    chosen = resolve_plugin("purifier", defense, overrides=settings[defense])
    run_device = resolve_device(device or "auto")
    options = ModelOptions(
        architecture=model,
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
    loaded, clean, victim = load_user_model(model_path, options)
    # a defense that needs what the model lacks refuses now, in one line, before anything is printed
    check_capabilities(loaded.model, chosen.info.cls.meta.requires, f"Defense {chosen.label!r}")
    describe_model(loaded, clean, victim)
    console.print(
        f"Purifying with {escape(chosen.label)} on {escape(clean.source)} ({clean.spec.num_classes} classes; "
        f"{len(clean.budget.train)} clean images to purify on, {len(clean.budget.val)} held out)…",
        highlight=False,
    )
    source = {"architecture": loaded.architecture, "file": str(loaded.path), "sha256": loaded.sha256}
    if victim is not None:
        source.update(victim=victim.name, victim_content_hash=victim.content_hash)
    report = run_purification(
        loaded.model,
        clean,
        chosen,
        seed=seed,
        device=run_device,
        source=source,
        backdoor=None if victim is None else victim.bd_test,
    )
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

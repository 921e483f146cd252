"""`bdtk inspect`: scan a model for a backdoor with any registered trigger inverter (Neural Cleanse
by default), or with several, each shown and drawn on its own.

The model is either a safetensors state dict with its architecture (`bdtk inspect MODEL_FILE --model
ARCH`: a zoo name, `torchvision:NAME` or `MODULE:FACTORY`, read exactly as `bdtk purify` reads it,
on a dataset or `folder:PATH`), a stored victim (its folder: model, normalisation and clean data
read from it, its recorded target shown for comparison) or a cached backdoored model (named by the
same options as `bdtk attack`, trained on a cache miss). Only the defender's clean budget is used;
the attack, when known, is shown for comparison and never informs the scan. The table is built from
`InversionResult`'s fields and the shared `InversionKeys`, so an inverter bdtk has never seen
prints as fully as Neural Cleanse does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ..artifacts import json_text
from ..config import split_preset
from ..console import console
from ..data import budget_exclusions, draw_defense_data
from ..errors import BdtkError, ConfigError
from ..interfaces import InversionResult, Kind
from ..inversion import InversionKeys, split_diagnostics
from ..models.loading import DEFAULT_ARCHITECTURE
from ..output_paths import check_output_folder, naming_output
from ..plugins import ResolvedPlugin, get_plugin, resolve_plugin
from ..purification import run_inspection, trigger_sheet
from ..training import resolve_device
from .common import (
    DEFAULT_DATA,
    ArchitectureOption,
    CacheDirOption,
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
    ThreadsOption,
    ValFractionOption,
    app,
    merge_options,
    split_settings,
    user_errors,
    with_threads,
)
from .purify import ModelOptions, describe_model, load_user_model
from .victim import load_victim, victim_config

#: Where `bdtk inspect` writes when --out is not given (created with its parents).
DEFAULT_INSPECT_OUT = Path("bdtk-results/inspect")

#: Column headers of per-class diagnostics that read better as a symbol; others show their key.
HEADERS = {InversionKeys.LAMBDA: "λ"}

#: Said whenever no class is flagged: the one backdoor an outlier test cannot see by construction.
ALL_TO_ALL_NOTE = (
    "Note: an all-to-all backdoor (every class a target, e.g. badnets.mode=all-to-all) is not detectable "
    "by an outlier test: when every class is a target, no class stands out."
)


def _cell(value: Any) -> str:
    """One per-class diagnostic value as a table cell, whatever its type."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3g}"
    return str(value)


def _short(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(title: str, headers: list[str], rows: list[list[str]], flagged: list[bool]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for j, header in enumerate(headers):
        widest = max([len(word) for word in header.split()] + [len(row[j]) for row in rows])
        # headers wrap between words; a number is never cut
        table.add_column(header, justify="left" if j == 0 else "right", min_width=widest)
    for row, red in zip(rows, flagged, strict=True):
        table.add_row(*row, style="bold red" if red else "")
    return table


def _narrowest(table: Table, screen: Console) -> int:
    """How narrow `table` can get with its headers wrapped (unclamped by the terminal's width)."""
    return Measurement.get(screen, screen.options.update_width(1 << 16), table).minimum


def inversion_tables(
    result: InversionResult, inverter: str, true_target: int | None, screen: Console | None = None
) -> list[Table]:
    """The scan of any inverter, titled with its name: the fields every `InversionResult` has,
    then one column per per-class diagnostic the inverter wrote (see `split_diagnostics`).

    One table where it fits on `screen` (the terminal); otherwise the per-class diagnostics go
    into a second table, so that no column is cut or dropped at the terminal's edge.
    """
    per_class, _ = split_diagnostics(result.diagnostics, len(result.classes))
    flagged = [cls in result.flagged for cls in result.classes]
    common_headers = ["class", "mask L1", "anomaly index", "attack success %", "flagged"]
    extra_headers = [HEADERS.get(key, key.replace("_", " ")) for key in per_class]
    names, common, extras = [], [], []
    for i, cls in enumerate(result.classes):
        index = float(result.anomaly_index[i])
        names.append(f"{cls}" + (" (attack target)" if cls == true_target else ""))
        common.append(
            [
                f"{float(result.mask_norms[i]):.2f}",
                "—" if index != index else f"{index:.2f}",  # NaN: no outlier test (a known target)
                f"{100 * float(result.attack_success[i]):.1f}",
                "yes" if flagged[i] else "",
            ]
        )
        extras.append([_cell(values[i]) for values in per_class.values()])
    title = f"Trigger inversion by {inverter}"
    whole = [[n, *c, *e] for n, c, e in zip(names, common, extras, strict=True)]
    tables = [_table(title, common_headers + extra_headers, whole, flagged)]
    if per_class and screen is not None and _narrowest(tables[0], screen) > screen.width:
        tables = [
            _table(title, common_headers, [[n, *c] for n, c in zip(names, common, strict=True)], flagged),
            _table(
                f"{inverter}: per-class diagnostics",
                ["class", *extra_headers],
                [[n, *e] for n, e in zip(names, extras, strict=True)],
                flagged,
            ),
        ]
    caption = "attack success: how often the trigger sends clean images of other classes to the class"
    tables[0].caption = caption
    return tables


def diagnostics_lines(result: InversionResult) -> list[str]:
    """What the table does not show: the scan's cost (`InversionKeys.SCAN`) and the inverter's
    other diagnostics, as `key: value` lines (long values shortened)."""
    k = InversionKeys
    _, other = split_diagnostics(result.diagnostics, len(result.classes))
    lines = []
    if k.CLASS_STEPS in other:
        cost = f"{other[k.CLASS_STEPS]:,} class-steps"
        if other.get(k.FULL_SCAN_CLASS_STEPS_BOUND):
            cost += f" of at most {other[k.FULL_SCAN_CLASS_STEPS_BOUND]:,}"
        schedule = other.get(k.SCHEDULE_USED)
        lines.append(f"Scan: {cost}" + (f", schedule {schedule}" if schedule else "") + ".")
    shown = {k.CLASS_STEPS, k.FULL_SCAN_CLASS_STEPS_BOUND, k.SCHEDULE_USED} if lines else set()
    rest = [f"{key}: {_short(value)}" for key, value in other.items() if key not in shown]
    if rest:
        lines.append("Diagnostics: " + "; ".join(rest))
    return lines


@app.command()
@user_errors
@with_threads
def inspect(
    model_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="MODEL_FILE",
            help="Safetensors state dict of the model to inspect (its architecture: --model), or a victim "
            "folder (`bdtk import`); or name a cached backdoored model with --attack",
            show_default=False,
        ),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option("--attack", "-a", help="Inspect the cached model of this attack (NAME or NAME:PRESET)"),
    ] = None,
    set_: SetOption = None,
    model_file: Annotated[
        Path | None, typer.Option(help="The model file as an option (same as MODEL_FILE)")
    ] = None,
    dataset: DataOption = None,
    model: ArchitectureOption = None,
    feature_layer: FeatureLayerOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    image_size: ImageSizeOption = None,
    seed: SeedOption = 0,
    epochs: Annotated[int | None, typer.Option(help="Training epochs of the attacked model")] = None,
    train_size: Annotated[int | None, typer.Option(help="Stratified training subset size")] = None,
    test_size: Annotated[int | None, typer.Option(help="Stratified test subset size")] = None,
    clean_ratio: Annotated[float, typer.Option(help="Defender's clean budget (share of train)")] = 0.05,
    val_fraction: ValFractionOption = 0.2,
    inverter: Annotated[
        list[str] | None,
        typer.Option(
            help="Trigger inverter plugin, NAME or NAME:PRESET (see `bdtk plugins`); repeat it to run "
            "several, each with its own table and PNG  [default: neural-cleanse]"
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", hidden=True, help="Deprecated: --set FIELD=VALUE"),
    ] = None,
    target: Annotated[
        int | None, typer.Option(help="Known target class: skip the scan (the inverter's `target` setting)")
    ] = None,
    class_: Annotated[
        list[int] | None, typer.Option("--class", help="Invert only this class (repeatable)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Step budget (the inverter's `steps` setting)")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Anomaly index threshold (the inverter's `threshold` setting)")
    ] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    cache_dir: CacheDirOption = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for triggers.png, triggers.safetensors, inspect.json (with several inverters "
            "triggers-INVERTER.png and .safetensors for each)"
        ),
    ] = DEFAULT_INSPECT_OUT,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite the results of an earlier scan in --out")
    ] = False,
) -> None:
    """Invert a trigger for every class with any inverter, print its scan, write PNG, triggers and JSON.

    `--set FIELD=VALUE` sets the inverter (each of them when several are given), `--set
    PLUGIN.FIELD=VALUE` one inverter or the attack.
    """
    if model_path is not None and model_file is not None:
        raise BdtkError("Give the model file once: as MODEL_FILE or as --model-file, not both.")
    model_file = model_path or model_file
    if (attack is None) == (model_file is None):
        raise BdtkError(
            "Name exactly one model to inspect: MODEL_FILE (or --model-file PATH) or --attack NAME."
        )
    inverters = inverter or ["neural-cleanse"]
    if len(set(inverters)) != len(inverters):
        raise BdtkError(f"--inverter repeats an inverter ({', '.join(inverters)}); give each one once.")
    _check_out(out, force)
    for choice in inverters:  # an unknown inverter says so before --set does
        get_plugin("inverter", split_preset(choice)[0])
    items = list(set_ or [])
    if attack is not None:
        items = _attack_settings_by_old_spelling(items, attack, inverters)
    if option:  # FIELD=VALUE for the inverter, as --set FIELD=VALUE now says it
        console.print(
            "[yellow]-o/--option is deprecated and goes in the next release; use --set FIELD=VALUE.[/]",
            highlight=False,
        )
        items = [*option, *items]
    items = _for_each_inverter(items, inverters)
    plugins = inverters if attack is None else [*inverters, attack]
    settings = split_settings(items, plugins, default=inverters[0])
    # a model file needs no attack: the run config then only says which data, budget and device
    if attack is not None and (
        (dataset or "").startswith("folder:")
        or any(v is not None for v in (feature_layer, mean, std, image_size))
    ):
        raise BdtkError(
            "--attack inspects a cached zoo model on a named dataset; folder data, --feature-layer, "
            "--mean, --std and --image-size apply to a MODEL_FILE."
        )
    cfg = victim_config(
        "inspect",
        attack,
        settings[attack] if attack else {},
        epochs,
        dataset=dataset or DEFAULT_DATA,
        model=model or DEFAULT_ARCHITECTURE,
        seeds=[seed],
        train_size=train_size,
        test_size=test_size,
        clean_ratio=clean_ratio,
        val_fraction=val_fraction,
        device=device,
        data_dir=data_dir,
        download=download,
        cache_dir=cache_dir,
    )
    extra = {
        "target": ("--target", target),
        "steps": ("--steps", steps),
        "threshold": ("--threshold", threshold),
        "classes": ("--class", list(class_) if class_ else None),
    }
    chosen = []
    for choice in inverters:  # bad values fail before training
        inv_values = settings[choice]
        merge_options(inv_values, extra)
        chosen.append(resolve_plugin("inverter", choice, overrides=inv_values))
        known = getattr(chosen[-1].config, "target", None)
        if class_ and known is not None:
            raise ConfigError(
                f"--class {' --class '.join(map(str, class_))} (scan these classes) and target {known} "
                "(a known target, no scan) contradict each other; give one."
            )
    run_device = resolve_device(cfg.device)
    true_target: int | None = None
    if model_file is not None:
        options = ModelOptions(
            architecture=model,
            data=dataset,
            mean=mean,
            std=std,
            feature_layer=feature_layer,
            image_size=image_size,
            clean_ratio=cfg.clean_ratio,
            val_fraction=cfg.val_fraction,
            seed=seed,
            data_dir=data_dir,
            download=download,
            train_size=train_size,
            test_size=test_size,
        )
        loaded, clean, stored = load_user_model(model_file, options)
        describe_model(loaded, clean, stored)
        victim_model, budget, model_label = loaded.model, clean.budget, loaded.architecture
        data_label = clean.source
        source: dict[str, Any] = {"model_file": str(loaded.path), "model_sha256": loaded.sha256}
        if stored is not None:  # a stored victim: its recorded target is shown for comparison only
            source.update(victim=stored.name, victim_content_hash=stored.content_hash)
            targets = stored.source.get("targets") or []
            true_target = int(targets[0]) if len(targets) == 1 else None
    else:
        data, instance, victim = load_victim(cfg)
        victim_model, model_label, data_label = victim.model, cfg.model, cfg.dataset
        budget = draw_defense_data(
            data,
            budget_exclusions(victim.poisoned_index, instance.clean_label),
            cfg.clean_ratio,
            cfg.val_fraction,
            seed,
        )
        true_target = instance.config.target if instance.config.mode == "all-to-one" else None
        source = {
            "attack": instance.name,
            "attack_preset": cfg.attacks[0].preset,
            "attack_config": instance.config.model_dump(),
            "cache_key": victim.cache_key,
        }
    results = []
    for inv in chosen:
        console.print(
            f"Inverting triggers of {escape(model_label)} on {escape(data_label)} with {escape(inv.label)} "
            f"({len(budget.train)} clean images, {len(budget.val)} for validation)…",
            highlight=False,
        )
        result = run_inspection(
            victim_model, budget, inv, classes=class_ or None, seed=seed, device=run_device
        ).result
        _show(result, inv.label, true_target)
        results.append((inv, result))
    flagged = _flagged_by(results)
    if len(results) > 1:
        if flagged:
            detail = "; ".join(f"{cls} by {', '.join(by)}" for cls, by in flagged.items())
            console.print(f"[bold red]Flagged by any inverter: {escape(detail)}[/]")
        else:
            console.print("[green]No backdoor detected[/] (no inverter flagged a class).")
    if not flagged:
        console.print(ALL_TO_ALL_NOTE, highlight=False, markup=False)
    info = {**source, "dataset": data_label, "model": model_label, "seed": seed, "true_target": true_target}
    with naming_output(out):
        if len(results) == 1:
            _write(out, *results[0], info)
        else:
            _write_several(out, results, info)


def _show(result: InversionResult, label: str, true_target: int | None) -> None:
    """One inverter's scan: its table(s), what it flagged, its other diagnostics and its time."""
    for table in inversion_tables(result, label, true_target, console):
        console.print(table)
    if result.flagged:
        console.print(f"[bold red]Flagged target class(es): {', '.join(map(str, result.flagged))}[/]")
    else:
        console.print(f"[green]No backdoor detected[/] ({escape(label)} flagged no class).")
    for line in diagnostics_lines(result):
        console.print(line, highlight=False, markup=False)
    console.print(f"Inversion took {result.seconds:.1f} s.")


def _flagged_by(results: list[tuple[ResolvedPlugin, InversionResult]]) -> dict[int, list[str]]:
    """Class → the inverters (NAME or NAME:PRESET) that flagged it, in ascending class order."""
    by: dict[int, list[str]] = {}
    for inv, result in results:
        for cls in result.flagged:
            by.setdefault(cls, []).append(inv.label)
    return dict(sorted(by.items()))


def _for_each_inverter(items: list[str], inverters: list[str]) -> list[str]:
    """`--set FIELD=VALUE` items with several inverters: each becomes `INVERTER.FIELD=VALUE` for every
    one of them (as `--steps` sets each), since no single inverter is the command's own."""
    if len(inverters) == 1:
        return items
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        out += [f"{inv}.{item}" for inv in inverters] if sep and "." not in key else [item]
    return out


def _fields(kind: Kind, choice: str) -> set[str]:
    """The config fields of the plugin `choice` (NAME or NAME:PRESET); an unknown one fails here."""
    return set(get_plugin(kind, split_preset(choice)[0]).cls.Config.model_fields)


def _attack_settings_by_old_spelling(items: list[str], attack: str, inverter: str | list[str]) -> list[str]:
    """`--set FIELD=VALUE` items for the attack, prefixed with its name.

    Here `--set FIELD=VALUE` used to set the attack; now FIELD alone sets the inverter(s), as it does
    for each command's own plugin. For one release an item whose FIELD only the attack has still
    sets it, with a notice; a FIELD both have (`target`) is refused rather than silently changing
    meaning.
    """
    inverters = [inverter] if isinstance(inverter, str) else inverter
    attack_fields = _fields("attack", attack)
    inverter_fields = set().union(*(_fields("inverter", inv) for inv in inverters))
    name = split_preset(attack)[0]
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if sep and "." not in key and key in attack_fields:
            if key in inverter_fields:
                owner = next(inv for inv in inverters if key in _fields("inverter", inv))
                raise ConfigError(
                    f"--set {item!r}: both attack {attack!r} and inverter {owner!r} have {key!r}; "
                    f"write --set {name}.{item} or --set {split_preset(owner)[0]}.{item}."
                )
            console.print(
                f"[yellow]--set {escape(item)} for the attack is deprecated (FIELD alone now sets the "
                f"inverter); write --set {escape(name)}.{escape(item)}.[/]",
                highlight=False,
            )
            item = f"{attack}.{item}"
        out.append(item)
    return out


#: What each row of a trigger sheet shows, as the command says it.
SHEET_ROWS = "top: mask, middle: mask·pattern, bottom: pattern; flagged framed red"


def _check_out(out: Path, force: bool) -> None:
    """Before any scanning: an earlier scan's results are not overwritten without --force, and
    --out must be a folder bdtk can write (a scan can take an hour)."""
    if out.is_dir() and not force:
        # every file a scan writes, not only its JSON: a trigger sheet alone is someone's result too
        earlier = sorted(
            p
            for pattern in ("inspect.json", "triggers*.png", "triggers*.safetensors")
            for p in out.glob(pattern)
        )
        if earlier:
            shown = ", ".join(p.name for p in earlier[:3]) + (", …" if len(earlier) > 3 else "")
            raise BdtkError(
                f"{out} already holds a scan's results ({shown}); pass --force to overwrite them, or "
                "give another --out."
            )
    check_output_folder(out, "--out", default=DEFAULT_INSPECT_OUT)


def _save_triggers(out: Path, stem: str, result: InversionResult) -> tuple[Path, Path]:
    """`STEM.png` (mask, masked pattern and pattern per class) and `STEM.safetensors` in `out`."""
    from safetensors.torch import save_file

    png, tensors = out / f"{stem}.png", out / f"{stem}.safetensors"
    trigger_sheet(result, pattern=True).save(png)
    save_file(
        {"masks": result.masks.contiguous().cpu(), "patterns": result.patterns.contiguous().cpu()},
        str(tensors),
    )
    return png, tensors


def _inverter_info(inv: ResolvedPlugin) -> dict[str, Any]:
    return {"inverter": inv.name, "inverter_preset": inv.preset, "inverter_config": inv.config.model_dump()}


def _write(out: Path, inv: ResolvedPlugin, result: InversionResult, info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    png, tensors = _save_triggers(out, "triggers", result)
    payload = {**info, **_inverter_info(inv), **_result_fields(result)}
    (out / "inspect.json").write_text(json_text(payload, default=str))
    console.print(f"Wrote {png} ({SHEET_ROWS}), {tensors} and {out / 'inspect.json'}.")


def _write_several(
    out: Path, results: list[tuple[ResolvedPlugin, InversionResult]], info: dict[str, Any]
) -> None:
    """Per inverter `triggers-INVERTER.png` and `.safetensors` (`:` of a preset written `-`); one
    `inspect.json` with every inverter's scan and the classes any of them flagged."""
    out.mkdir(parents=True, exist_ok=True)
    entries, stems = [], set()
    for inv, result in results:
        stem = "triggers-" + re.sub(r"[^A-Za-z0-9._-]", "-", inv.label)
        while stem in stems:  # two labels that differ only in characters written `-`
            stem += "-"
        stems.add(stem)
        png, tensors = _save_triggers(out, stem, result)
        entries.append(
            {**_inverter_info(inv), "png": png.name, "triggers": tensors.name, **_result_fields(result)}
        )
        console.print(f"Wrote {png} ({SHEET_ROWS}) and {tensors} for {escape(inv.label)}.")
    flagged = _flagged_by(results)
    payload = {
        **info,
        "inverters": entries,
        "flagged": list(flagged),
        "flagged_by": {str(cls): by for cls, by in flagged.items()},
        "detected": bool(flagged),
    }
    (out / "inspect.json").write_text(json_text(payload, default=str))
    console.print(f"Wrote {out / 'inspect.json'}.")


def _result_fields(result: InversionResult) -> dict[str, Any]:
    """An `InversionResult` as inspect.json records it."""
    return {
        "classes": result.classes,
        "mask_norms": result.mask_norms.tolist(),
        "anomaly_index": [None if v != v else v for v in result.anomaly_index.tolist()],
        "attack_success": result.attack_success.tolist(),
        "flagged": result.flagged,
        "detected": bool(result.flagged),
        "seconds": result.seconds,
        "diagnostics": result.diagnostics,
    }

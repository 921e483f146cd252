"""`bdtk benchmark`: attacks × defenses × seeds on one dataset and model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..benchmark import CellResult, run_benchmark, write_results
from ..config import BenchmarkConfig, PluginChoice, build_config, load_config_file
from ..console import console
from ..errors import ConfigError
from .common import app, user_errors


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> None:
    """Apply `PLUGIN.FIELD=VALUE` to the attacks/defenses named PLUGIN in a raw config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        plugin, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set expects PLUGIN.FIELD=VALUE (e.g. finetune.epochs=5), got {item!r}.")
        hits = 0
        for section in ("attacks", "defenses"):
            for choice in values.get(section, []):
                if choice["name"] == plugin:
                    choice.setdefault("config", {})[field] = _parse_value(raw)
                    hits += 1
        if not hits:
            raise ConfigError(f"--set {item!r}: no attack or defense named {plugin!r} in this run.")


def _choices(names: list[str]) -> list[dict[str, Any]]:
    return [PluginChoice(name=n).model_dump() for n in names]


@app.command()
@user_errors
def benchmark(
    attack: Annotated[
        list[str] | None, typer.Option("--attack", "-a", help="Attack plugin (repeatable)")
    ] = None,
    defense: Annotated[
        list[str] | None, typer.Option("--defense", "-d", help="Defense plugin (repeatable)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (see `bdtk datasets`)")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (see `bdtk models`)")] = None,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="Seed (repeatable)")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train the backdoored model")] = None,
    clean_ratio: Annotated[
        float | None, typer.Option(help="Defender's clean budget (share of train)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Root of torchvision-format datasets")] = None,
    download: Annotated[bool, typer.Option(help="Let torchvision download missing datasets")] = False,
    output: Annotated[str | None, typer.Option(help="Results JSON path")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Artifact cache directory")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON file with BenchmarkConfig fields")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Plugin setting PLUGIN.FIELD=VALUE (repeatable)")
    ] = None,
) -> None:
    """Train (or load) backdoored models, run each defense, print BA/ASR/RA/DER and save JSON."""
    values: dict[str, Any] = load_config_file(config) if config else {}
    values.setdefault("attacks", _choices(["badnets"]))
    values.setdefault("defenses", _choices(["finetune"]))
    values["attacks"] = [PluginChoice.model_validate(v).model_dump() for v in values["attacks"]]
    values["defenses"] = [PluginChoice.model_validate(v).model_dump() for v in values["defenses"]]
    if attack:
        values["attacks"] = _choices(attack)
    if defense:
        values["defenses"] = _choices(defense)
    flags = {
        "dataset": dataset,
        "model": model,
        "seeds": seed,
        "clean_ratio": clean_ratio,
        "device": device,
        "data_dir": data_dir,
        "output": output,
        "cache_dir": cache_dir,
    }
    values.update({k: v for k, v in flags.items() if v})
    if download:
        values["download"] = True
    if epochs is not None:
        values["training"] = {**values.get("training", {}), "epochs": epochs}
    apply_overrides(values, set_ or [])
    cfg = build_config(BenchmarkConfig, values, "benchmark")
    out = Path(cfg.output)
    rows: list[CellResult] = []

    def save(row: CellResult) -> None:
        rows.append(row)
        write_results(out, cfg, rows)

    try:
        run_benchmark(cfg, on_result=save)
    except KeyboardInterrupt:
        console.print(f"[yellow]Interrupted: {len(rows)} finished rows are saved in {out}.[/]")
        raise typer.Exit(130) from None
    console.print(results_table(rows))
    console.print(f"Results written to {out}")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def results_table(rows: list[CellResult]) -> Table:
    table = Table(title="bdtk benchmark (BA on all test images; ASR/RA on non-target images; %)")
    for col in ("attack", "defense", "seed", "BA", "ASR", "RA", "DER", "time s", "peak MB", "notes"):
        table.add_column(col, justify="right" if col[0].isupper() or col[0] in "tsp" else "left")
    for r in rows:
        if r.status == "failed":
            table.add_row(r.attack, r.defense, str(r.seed), "", "", "", "", "", "", f"[red]failed: {r.error}")
            continue
        table.add_row(
            r.attack,
            r.defense,
            str(r.seed),
            _pct(r.ba),
            _pct(r.asr),
            _pct(r.ra),
            "—" if r.der is None else f"{r.der:.3f}",
            "—" if r.seconds is None else f"{r.seconds:.1f}",
            "—" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            r.notes,
        )
    return table

"""`bdtk inspect`: scan a model for a backdoor with a trigger inverter (Neural Cleanse by default).

The model is either a cached backdoored model (named by the same options as `bdtk attack`, trained
on a cache miss) or a safetensors state dict with its zoo name. Only the defender's clean budget
is used; the attack, when known, is shown for comparison and never informs the scan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table
from torch import Tensor
from torch.nn import functional as F

from ..cells import load_run_dataset
from ..config import BenchmarkConfig
from ..console import console
from ..data import draw_defense_data
from ..errors import BdtkError
from ..interfaces import InversionResult, TriggerInverter
from ..models import ImageClassifier, create_model
from ..plugins import resolve_plugin
from ..training import resolve_device, seed_everything
from .common import app, parse_settings, user_errors
from .victim import load_victim, victim_config


def load_model_file(path: Path, model_name: str, cfg: BenchmarkConfig) -> ImageClassifier:
    """A zoo model with weights from a safetensors state dict (a bdtk cache entry works too)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..data import dataset_spec

    if not path.exists():
        raise BdtkError(f"Model file {path} does not exist.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BdtkError(f"Cannot read {path} as safetensors: {exc}") from None
    if any(k.startswith("model.") for k in state):  # a bdtk cache entry: weights under "model."
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    model = create_model(model_name, dataset_spec(cfg.dataset))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise BdtkError(
            f"{path} does not hold {model_name!r} weights for {cfg.dataset!r}: {detail}"
        ) from None
    return model.eval()


def trigger_sheet(result: InversionResult, scale: int = 4) -> Any:
    """One tile per class: mask (top) and masked pattern m·p (bottom); flagged classes framed red."""
    from PIL import Image, ImageDraw

    def tiles(t: Tensor) -> Tensor:  # (K, C, H, W) in [0, 1] → RGB, upscaled
        rgb = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t[:, :3]
        return F.interpolate(rgb.float().cpu().clamp(0, 1), scale_factor=scale, mode="nearest")

    masks, stamped = tiles(result.masks), tiles(result.masks * result.patterns)
    k, _, h, w = masks.shape
    pad, label = 4, 14
    sheet = Image.new("RGB", (k * (w + 2 * pad), label + 2 * h + 3 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, cls in enumerate(result.classes):
        x0 = i * (w + 2 * pad) + pad
        for row, img in enumerate((masks[i], stamped[i])):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            sheet.paste(Image.fromarray(arr), (x0, label + pad + row * (h + pad)))
        flagged = cls in result.flagged
        draw.text((x0, 1), f"{cls}{' !' if flagged else ''}", fill="red" if flagged else "black")
        if flagged:
            draw.rectangle(
                (x0 - 3, label + pad - 3, x0 + w + 2, label + 2 * h + 2 * pad + 2), outline="red", width=2
            )
    return sheet


def anomaly_table(result: InversionResult, true_target: int | None) -> Table:
    title = "Neural Cleanse scan (attack success on the defender's clean validation images)"
    table = Table(title=title)
    for col in ("class", "mask L1", "anomaly index", "attack success %", "λ", "steps", "flagged"):
        table.add_column(col, justify="left" if col in ("class", "flagged") else "right")
    lam = result.diagnostics.get("lambda", [float("nan")] * len(result.classes))
    steps = result.diagnostics.get("steps", [0] * len(result.classes))
    for i, cls in enumerate(result.classes):
        flagged = cls in result.flagged
        style = "bold red" if flagged else ""
        name = f"{cls}" + (" (attack target)" if cls == true_target else "")
        table.add_row(
            name,
            f"{float(result.mask_norms[i]):.2f}",
            f"{float(result.anomaly_index[i]):.2f}",
            f"{100 * float(result.attack_success[i]):.1f}",
            f"{lam[i]:.2g}",
            str(steps[i]),
            "yes" if flagged else "",
            style=style,
        )
    return table


@app.command()
@user_errors
def inspect(
    attack: Annotated[
        str | None,
        typer.Option("--attack", "-a", help="Inspect the cached model of this attack (NAME or NAME:PRESET)"),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Attack setting FIELD=VALUE (repeatable)")
    ] = None,
    model_file: Annotated[
        Path | None, typer.Option(help="Inspect this safetensors state dict instead (needs --model)")
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name (see `bdtk datasets`)")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help="Model name (see `bdtk models`)")] = "wrn-16-1",
    seed: Annotated[int, typer.Option(help="Seed of poisoning, training, budget and inversion")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Training epochs of the attacked model")] = None,
    train_size: Annotated[int | None, typer.Option(help="Stratified training subset size")] = None,
    test_size: Annotated[int | None, typer.Option(help="Stratified test subset size")] = None,
    clean_ratio: Annotated[float, typer.Option(help="Defender's clean budget (share of train)")] = 0.05,
    inverter: Annotated[
        str, typer.Option(help="Trigger inverter plugin, NAME or NAME:PRESET")
    ] = "neural-cleanse",
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="Inverter setting FIELD=VALUE, over a preset's values (repeatable)"
        ),
    ] = None,
    target: Annotated[int | None, typer.Option(help="Known target class: skip the scan")] = None,
    class_: Annotated[
        list[int] | None, typer.Option("--class", help="Invert only this class (repeatable)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Inverter step budget")] = None,
    threshold: Annotated[float | None, typer.Option(help="Anomaly index threshold (default 2)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    data_dir: Annotated[str | None, typer.Option(help="Root of torchvision-format datasets")] = None,
    download: Annotated[bool, typer.Option(help="Let torchvision download missing datasets")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Artifact cache directory")] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for triggers.png, triggers.safetensors, inspect.json")
    ] = Path("bdtk-results/inspect"),
) -> None:
    """Invert a trigger for every class, print the anomaly table, write PNG, triggers and JSON."""
    if (attack is None) == (model_file is None):
        raise BdtkError("Name exactly one model to inspect: --attack NAME or --model-file PATH.")
    cfg = victim_config(
        "inspect",
        attack or "badnets",
        parse_settings(set_ or []),
        epochs,
        dataset=dataset,
        model=model,
        seeds=[seed],
        train_size=train_size,
        test_size=test_size,
        clean_ratio=clean_ratio,
        device=device,
        data_dir=data_dir,
        download=download,
        cache_dir=cache_dir,
    )
    inv_values = parse_settings(option or [])
    extra = {"target": target, "classes": class_, "steps": steps, "threshold": threshold}
    inv_values.update({k: v for k, v in extra.items() if v is not None})
    chosen = resolve_plugin("inverter", inverter, overrides=inv_values)
    inverter_cls, inv_cfg = chosen.info.cls, chosen.config
    assert issubclass(inverter_cls, TriggerInverter)
    run_device = resolve_device(cfg.device)
    if model_file is not None:
        victim_model = load_model_file(model_file, model, cfg).to(run_device)
        data = load_run_dataset(cfg)
        excluded = torch.empty(0, dtype=torch.long)
        true_target: int | None = None
        source: dict[str, Any] = {"model_file": str(model_file)}
    else:
        data, instance, victim = load_victim(cfg)
        victim_model, excluded = victim.model, victim.poisoned_index
        true_target = instance.config.target if instance.config.mode == "all-to-one" else None
        source = {
            "attack": instance.name,
            "attack_preset": cfg.attacks[0].preset,
            "attack_config": instance.config.model_dump(),
            "cache_key": victim.cache_key,
        }
    budget = draw_defense_data(data, excluded, cfg.clean_ratio, cfg.val_fraction, seed)
    seed_everything(seed)
    console.print(
        f"Inverting triggers of {model} on {dataset} with {inverter} "
        f"({len(budget.train)} clean images, {len(budget.val)} for validation)…"
    )
    result = inverter_cls(inv_cfg, seed=seed).invert(victim_model, budget)
    console.print(anomaly_table(result, true_target))
    if result.flagged:
        console.print(f"[bold red]Flagged target class(es): {', '.join(map(str, result.flagged))}[/]")
    else:
        console.print("[green]No backdoor detected[/] (no class has an anomaly index above the threshold).")
    console.print(f"Inversion took {result.seconds:.1f} s.")
    _write(
        out,
        result,
        {
            **source,
            "dataset": dataset,
            "model": model,
            "seed": seed,
            "inverter": chosen.name,
            "inverter_preset": chosen.preset,
            "inverter_config": inv_cfg.model_dump(),
            "true_target": true_target,
        },
    )


def _write(out: Path, result: InversionResult, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    trigger_sheet(result).save(out / "triggers.png")
    save_file(
        {"masks": result.masks.contiguous().cpu(), "patterns": result.patterns.contiguous().cpu()},
        str(out / "triggers.safetensors"),
    )
    payload = {
        **info,
        "classes": result.classes,
        "mask_norms": result.mask_norms.tolist(),
        "anomaly_index": [None if v != v else v for v in result.anomaly_index.tolist()],
        "attack_success": result.attack_success.tolist(),
        "flagged": result.flagged,
        "detected": bool(result.flagged),
        "seconds": result.seconds,
        "diagnostics": result.diagnostics,
    }
    (out / "inspect.json").write_text(json.dumps(payload, indent=2, default=str))
    console.print(
        f"Wrote {out / 'triggers.png'} (top: mask, bottom: mask·pattern; flagged framed red), "
        f"{out / 'triggers.safetensors'} and {out / 'inspect.json'}."
    )

"""`bdtk attack`: train (or load) one backdoored model and show its trigger as a PNG grid."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from torch import Tensor
from torch.nn import functional as F

from ..console import console
from ..data import ImageData, to_float
from ..metrics import attack_scores
from ..output_paths import GRID_EXTENSIONS, check_output_file, check_output_folder
from ..training import resolve_device
from ..victims import check_output_dir
from .common import (
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    DownloadOption,
    SeedOption,
    SetOption,
    ThreadsOption,
    app,
    split_settings,
    user_errors,
    with_threads,
)
from .victim import export_victim, load_victim, victim_config

#: Where the trigger grid goes by default (its folder is created when missing, as any --grid's one folder).
DEFAULT_GRID = Path("bdtk-results/trigger.png")


def sample_per_class(test: ImageData, count: int) -> Tensor:
    """Indices of `count` test images, cycling through the classes so every class shows."""
    pools = [torch.nonzero(test.labels == c).squeeze(1) for c in test.labels.unique().tolist()]
    picked: list[int] = []
    depth = 0
    while len(picked) < count and depth < max(p.numel() for p in pools):
        picked += [int(p[depth]) for p in pools if depth < p.numel()][: count - len(picked)]
        depth += 1
    return torch.tensor(picked, dtype=torch.long)


def trigger_grid(clean: Tensor, triggered: Tensor, scale: int) -> Tensor:
    """Rows: clean images, triggered images, and |difference| stretched to full range per image.

    The third row makes near-invisible triggers (WaNet's warp, SIG's faint sinusoid) visible.
    """
    diff = (triggered - clean).abs()
    peak = diff.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    rows = torch.cat([clean, triggered, diff / peak])
    return F.interpolate(rows, scale_factor=scale, mode="nearest")


def write_grid(path: Path, clean: Tensor, triggered: Tensor, scale: int = 4) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(exist_ok=True)  # at most this one folder can be missing (checked first)
    save_image(
        trigger_grid(clean, triggered, scale), str(path), nrow=clean.shape[0], padding=2, pad_value=1.0
    )


@app.command()
@user_errors
@with_threads
def attack(
    attack: Annotated[
        str, typer.Option("--attack", "-a", help="Attack plugin, NAME or NAME:PRESET (see `bdtk plugins`)")
    ],
    set_: SetOption = None,
    dataset: Annotated[str, typer.Option(help="Dataset name (see `bdtk datasets`)")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help="Model name (see `bdtk models`)")] = "wrn-16-1",
    seed: SeedOption = 0,
    epochs: Annotated[int | None, typer.Option(help="Training epochs")] = None,
    train_size: Annotated[int | None, typer.Option(help="Stratified training subset size")] = None,
    test_size: Annotated[int | None, typer.Option(help="Stratified test subset size")] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    cache_dir: CacheDirOption = None,
    grid: Annotated[Path, typer.Option(help="PNG of clean vs triggered test images")] = DEFAULT_GRID,
    images: Annotated[int, typer.Option(min=1, max=64, help="Test images in the grid")] = 10,
    export: Annotated[
        Path | None,
        typer.Option(
            help="Also write the backdoored model as a victim folder (weights, clean data, triggered test "
            "images), for `bdtk purify DIR` and `bdtk benchmark --victim DIR`",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --export folder")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Train (or load from the cache) a backdoored model, print BA/ASR/RA and write a trigger grid."""
    # before training: an output that cannot be written wastes no compute
    check_output_file(grid, "--grid", extensions=GRID_EXTENSIONS)
    if export is not None:
        check_output_dir(export, force)
        check_output_folder(export, "--export")
    cfg = victim_config(
        "attack",
        attack,
        split_settings(set_ or [], [attack], default=attack)[attack],
        epochs,
        dataset=dataset,
        model=model,
        seeds=[seed],
        train_size=train_size,
        test_size=test_size,
        device=device,
        data_dir=data_dir,
        download=download,
        cache_dir=cache_dir,
    )
    data, instance, victim = load_victim(cfg)
    run_device = resolve_device(cfg.device)
    scores = attack_scores(
        victim.model, data.test, instance.apply_trigger, instance.target_labels, run_device
    )
    where = "loaded from cache" if victim.from_cache else f"trained in {victim.train_seconds:.0f} s"
    console.print(f"{attack} on {cfg.model}/{cfg.dataset}: {where}; cache key {victim.cache_key}")
    console.print(f"BA {100 * scores.ba:.2f}%  ASR {100 * scores.asr:.2f}%  RA {100 * scores.ra:.2f}%")
    clean = to_float(data.test.images[sample_per_class(data.test, images)]).to(run_device)
    with torch.no_grad():
        triggered = instance.apply_trigger(clean).clamp(0, 1)
    write_grid(grid, clean.cpu(), triggered.cpu())
    console.print(f"Trigger grid (rows: clean, triggered, |difference| stretched) written to {grid}")
    if export is not None:
        content_hash, bd_test = export_victim(export, cfg, data, instance, victim, force)
        asr, _ = bd_test.success(victim.model, run_device)
        console.print(
            f"Victim written to {export} (content hash {content_hash[:12]}; {len(bd_test)} triggered test "
            f"images stored as 8-bit, ASR on them {100 * asr:.2f}%). Next: bdtk purify "
            f"{escape(shlex.quote(str(export)))} --out FILE",
            highlight=False,
        )

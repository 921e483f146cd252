"""MCLDef's speed and quality, `mcldef:paper` against the default `mcldef`, side by side from one run.

    python -m benchmarks.speed                 # the README's setting (BadNets, all of Fashion-MNIST)
    python -m benchmarks.speed --bench         # the bench setting of benchmarks/setting.py
    python -m benchmarks.speed --step-only     # only the step-cost table (no purification runs)

Three tables, all from this process:
1. the Neural Cleanse scan each preset runs (full for `paper`, scheduled for the default):
   seconds, class-steps (optimiser steps summed over classes), flagged classes;
2. stage 2: seconds per epoch, epochs run, BA / ASR / RA / DER of each preset's benchmark cell;
3. the cost of one purification step against its bound, interleaved and taken as medians: the bound
   is what a step cannot avoid (the frozen model's forward on the clean and triggered images, the
   trainable model's forward and backward on what its loss reads, the optimiser step), measured
   with the same model and layout. The speed target is a step ≤ 1.2× its bound.

The backdoored model comes from the artifact cache (trained on a miss). Rows are appended to
`--output` (JSON lines) with the machine they ran on.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from bdtk_mcldef.loss import FrozenReference
from bdtk_mcldef.mcldef import MCLDef

from backdoor_toolkit import MaskTrigger, create_model, preferred_memory_format, resolve_config
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cells import load_run_dataset
from backdoor_toolkit.config import BenchmarkConfig, PluginChoice
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.training import resolve_device

from .setting import bench_config

PRESETS = ["mcldef:paper", "mcldef"]
#: The speed target: a purification step may cost at most this multiple of its bound.
STEP_BOUND_LIMIT = 1.2


def machine() -> str:
    """The CPU model (or GPU), torch's thread count and version: numbers differ between machines."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name()}"
    return f"{cpu}; {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def _timings_ms(fn: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def step_costs(cfg: BenchmarkConfig, rounds: int) -> list[dict[str, Any]]:
    """Each preset's purification step and its bound, on a fresh model of the setting, interleaved."""
    spec = load_run_dataset(cfg).spec
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = create_model(cfg.model, spec).to(device)
    channels, height, width = spec.image_shape
    mask = torch.zeros(1, height, width)
    mask[:, -4:-1, -4:-1] = 1.0
    trigger = MaskTrigger(mask, torch.ones(channels, height, width))
    gen = torch.Generator().manual_seed(0)
    runs: dict[str, Callable[[], None]] = {}
    for name in PRESETS:
        config = resolve_config("purifier", name)
        assert isinstance(config, MCLDef.Config)
        purifier = MCLDef(config, seed=0, device=device)
        step = purifier.step_runner(copy.deepcopy(model), [trigger], spec.hflip)
        batch = torch.rand(config.batch_size, channels, height, width)
        labels = torch.randint(0, spec.num_classes, (config.batch_size,))
        runs[name] = lambda step=step, batch=batch, labels=labels: step(batch, labels, gen)
        runs[f"{name} bound"] = _bound(copy.deepcopy(model), config, batch, labels, device)
    for fn in runs.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key] += _timings_ms(fn, 3)
    rows = []
    for name in PRESETS:
        step, bound = statistics.median(times[name]), statistics.median(times[f"{name} bound"])
        rows.append({"preset": name, "step_ms": step, "bound_ms": bound, "ratio": step / bound})
    return rows


def _bound(
    model: torch.nn.Module, config: Any, batch: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    """What a step cannot avoid: frozen forward on clean + triggered, trainable forward/backward on
    the images its loss reads (the triggered ones, plus the clean ones when CE is on), SGD step."""
    frozen = FrozenReference(copy.deepcopy(model))
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    both = torch.cat([batch, batch]).to(device)
    trainable_input = both if config.ce_weight > 0 else batch.to(device)
    layout = preferred_memory_format(device)
    both = both.contiguous(memory_format=layout)
    trainable_input = trainable_input.contiguous(memory_format=layout)
    model.to(memory_format=layout)
    frozen.to(memory_format=layout)

    def run() -> None:
        with torch.no_grad():
            frozen.model.features(both)
        out = model(trainable_input)
        optimiser.zero_grad(set_to_none=True)
        out.sum().backward()
        optimiser.step()

    return run


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def tables(cells: list[CellResult], steps: list[dict[str, Any]]) -> str:
    out = []
    if cells:
        out += [
            "| preset | scan | scan s | class-steps | flagged |",
            "|---|---|---|---|---|",
        ]
        for r in cells:
            d = r.diagnostics
            out.append(
                f"| {r.defense_label} | {d.get('schedule_used', 'full')} | "
                f"{r.stage_seconds.get('inversion', float('nan')):.1f} | {d.get('class_steps', '—')} | "
                f"{d.get('flagged', '—')} |"
            )
        out += [
            "",
            "| preset | epochs run | s / epoch | purification s | defense s | BA | ASR | RA | DER |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cells:
            d = r.diagnostics
            epochs = d.get("epochs_run", 0)
            purification = r.stage_seconds.get("purification", 0.0)
            per_epoch = f"{purification / epochs:.2f}" if epochs else "—"
            total = sum(r.stage_seconds.values())
            out.append(
                f"| {r.defense_label} | {epochs} | {per_epoch} | {purification:.1f} | {total:.1f} | "
                f"{pct(r.ba)} | {pct(r.asr)} | {pct(r.ra)} | {'—' if r.der is None else f'{r.der:.3f}'} |"
            )
    if steps:
        out += ["", "| preset | step ms | bound ms | step / bound |", "|---|---|---|---|"]
        for s in steps:
            out.append(f"| {s['preset']} | {s['step_ms']:.1f} | {s['bound_ms']:.1f} | {s['ratio']:.2f}× |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="The bench setting instead of the README's")
    parser.add_argument("--attack", default="badnets", help="Attack of the backdoored model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-only", action="store_true", help="Only the step-cost table")
    parser.add_argument("--step-rounds", type=int, default=10, help="Interleaved rounds of the step timing")
    parser.add_argument("--output", type=Path, default=Path("bdtk-results/speed.jsonl"))
    args = parser.parse_args(argv)

    fields: dict[str, Any] = {
        "attacks": [PluginChoice(name=args.attack)],
        "defenses": [PluginChoice.model_validate(p) for p in PRESETS],
        "seeds": [args.seed],
        "output": str(args.output.with_suffix(".json")),
    }
    cfg = bench_config(**fields) if args.bench else BenchmarkConfig.model_validate(fields)
    # cells go to a result store as they finish: a rerun resumes instead of recomputing them
    store = ResultStore(args.output.with_suffix(".sqlite"))
    cells = [] if args.step_only else [r for r in run_benchmark(cfg, store=store) if r.defense != "none"]
    steps = step_costs(cfg, args.step_rounds)
    report = tables(cells, steps)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as fh:
        record = {
            "bdtk": version("backdoor-toolkit"),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "setting": "bench" if args.bench else "readme",
            "cells": [r.model_dump(mode="json") for r in cells],
            "steps": steps,
            "table": report,
        }
        fh.write(json.dumps(record) + "\n")
    slow = [s for s in steps if s["ratio"] > STEP_BOUND_LIMIT]
    for s in slow:
        print(f"REGRESSION: {s['preset']} step costs {s['ratio']:.2f}× its bound (limit {STEP_BOUND_LIMIT}×)")
    if slow:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

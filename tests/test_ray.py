"""The Ray executor: a small grid on a local 2-worker Ray instance matches a local run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.errors import BdtkError
from backdoor_toolkit.executors import check_reachable
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore

GRID: dict[str, Any] = {
    "model": "small-cnn",
    "train_size": 600,
    "test_size": 200,
    "training": {"epochs": 1},
    "defenses": [{"name": "finetune", "config": {"epochs": 1}}],
    "seeds": [0, 1],
    "device": "cpu",
}
MEASURED = ("status", "ba", "asr", "ra", "der", "modified", "detected")


def test_unreachable_ray_address_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(BdtkError, match=r"Cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        check_reachable("127.0.0.1:9")
    with pytest.raises(BdtkError, match="not HOST:PORT"):
        check_reachable("nowhere")
    assert time.perf_counter() - start < 10


def _by_hash(rows: list[CellResult]) -> dict[str, tuple[Any, ...]]:
    return {r.config_hash: tuple(getattr(r, f) for f in MEASURED) for r in rows}


def test_ray_grid_matches_local_run(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    local_cfg = BenchmarkConfig.model_validate({**GRID, "cache_dir": str(tmp_path / "local-cache")})
    # a separate cache, so the Ray workers really train the backdoored models themselves
    ray_cfg = BenchmarkConfig.model_validate({**GRID, "cache_dir": str(tmp_path / "ray-cache")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # whatever this process uses, each cell runs with the configured count
    try:
        with ResultStore(tmp_path / "local.sqlite") as store:
            run_benchmark(local_cfg, store=store)
            local = store.rows()
        assert torch.get_num_threads() == 1  # and the caller's count is restored
    finally:
        torch.set_num_threads(threads)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"BDTK_QUIET": "1"}},
    )
    try:
        with ResultStore(tmp_path / "ray.sqlite") as store:
            returned = run_benchmark(ray_cfg, store=store, executor="ray")
            stored = store.rows()
    finally:
        ray.shutdown()
    assert len(local) == len(stored) == len(returned) == 4
    assert _by_hash(stored) == _by_hash(local)  # same cells (config hashes), same numbers
    assert {r.notes for r in stored if r.defense == "none"} == {"undefended"}  # trained, not cached
    assert {r.provenance.threads for r in [*local, *stored]} == {local_cfg.threads}
    assert {r.setting["threads"] for r in stored} == {local_cfg.threads}


def test_threads_are_part_of_a_cells_identity() -> None:
    from backdoor_toolkit.cells import plan_grid

    one, two = (BenchmarkConfig.model_validate({**GRID, "threads": n}) for n in (1, 2))
    hashes = [{c.config_hash for p in plan_grid(cfg) for c in p.cells} for cfg in (one, two)]
    assert hashes[0].isdisjoint(hashes[1])

"""The clean-model reference row: a never-backdoored model shown each attack's trigger, planned,
run once per seed, stored, and shown beside (never among) the ranked defenses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_grid import FINETUNE, tiny
from test_plugin_system import Throwaway

from backdoor_toolkit import backdoor
from backdoor_toolkit.artifacts import ArtifactCache
from backdoor_toolkit.benchmark import cell_line, run_benchmark
from backdoor_toolkit.cells import load_run_dataset, plan_grid
from backdoor_toolkit.leaderboard import (
    build_leaderboard,
    matplotlib_available,
    scatter_svg,
    to_markdown,
    to_rich,
)
from backdoor_toolkit.metrics import attack_scores
from backdoor_toolkit.plugins import PluginError, check_plugin_class, create_attack, resolve_plugin
from backdoor_toolkit.results import CLEAN_MODEL, UNDEFENDED
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.suites import load_suite
from backdoor_toolkit.training import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
GRID: dict[str, Any] = {"attacks": ["badnets", "blended"], "defenses": [FINETUNE], "seeds": [0]}


def test_the_reference_adds_one_cell_per_model_and_changes_no_other_identity() -> None:
    off = plan_grid(tiny(**GRID))
    on = plan_grid(tiny(clean_reference=True, **GRID))
    assert [[c.defense_name for c in p.cells] for p in on] == [[UNDEFENDED, CLEAN_MODEL, "finetune"]] * 2
    kept = [[c.config_hash for c in p.cells if not c.clean_reference] for p in on]
    assert kept == [[c.config_hash for c in p.cells] for p in off]
    references = [c.config_hash for p in on for c in p.cells if c.clean_reference]
    assert len(set(references)) == 2  # one per attack: each is that trigger's floor
    assert load_suite("paper").clean_reference is True


def test_the_reference_is_the_clean_model_scored_on_the_same_triggered_images(tmp_path: Path) -> None:
    config = tiny(clean_reference=True, threads=1, cache_dir=str(tmp_path / "cache"), **GRID)
    trained: list[str] = []
    original = backdoor.train_classifier

    def counting(*args: Any, **kwargs: Any) -> Any:
        trained.append(kwargs.get("description", "?"))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backdoor, "train_classifier", counting)
        with ResultStore(tmp_path / "r.sqlite") as store:
            rows = run_benchmark(config, store=store)
            stored = {r.config_hash: r for r in store.rows()}
    assert trained.count("clean model") == 1  # trained once, loaded for the second attack
    assert stored == {r.config_hash: r for r in rows}
    references = [r for r in rows if r.defense == CLEAN_MODEL]
    assert [r.attack for r in references] == ["badnets", "blended"]
    assert all(r.status == "ok" and r.der is None for r in references)
    # the same numbers from the cached clean model, scored independently
    dataset = load_run_dataset(config)
    cache = ArtifactCache(tmp_path / "cache")
    with torch_threads(1):
        model = backdoor.clean_model(dataset, "small-cnn", 0, config.training, CPU, cache)
        for row in references:
            attack = create_attack(resolve_plugin("attack", row.attack, None, {}), spec=dataset.spec, seed=0)
            scores = attack_scores(model, dataset.test, attack.apply_trigger, attack.target_labels, CPU)
            assert (row.ba, row.asr, row.ra) == (scores.ba, scores.asr, scores.ra)
    board = build_leaderboard(rows)
    for b in board.boards:
        names = [e.defense for e in b.entries]
        assert names == ["finetune", UNDEFENDED, CLEAN_MODEL]
        reference = b.entries[2]
        assert reference.rank is None and reference.stats["asr"].mean is not None
        assert all(reference.stats[m].mean is None for m in ("der", "ba_drop", "seconds"))
    assert "`clean-model` a never-backdoored one" in to_markdown(board)
    assert "clean-model: a never-backdoored model" in str(to_rich(board)[0].caption)
    if matplotlib_available():  # drawn in the reference colour, beside the defenses
        assert "clean-model" in scatter_svg(board)


def test_no_purifier_may_take_the_reference_rows_name() -> None:
    class CleanModelDefense(Throwaway):
        name = "clean-model"

    with pytest.raises(PluginError, match=r"'clean-model' is reserved for purifiers"):
        check_plugin_class(CleanModelDefense, "purifier")


def test_a_grid_in_a_log_file_writes_a_line_per_cell(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("BDTK_QUIET", raising=False)
    config = tiny(threads=1, defenses=[], seeds=[0], clean_reference=True, cache_dir=str(tmp_path))
    rows = run_benchmark(config)
    err = capsys.readouterr().err
    assert [r.defense for r in rows] == [UNDEFENDED, CLEAN_MODEL]
    assert "[1/2] none vs badnets seed 0: BA " in err and "[2/2] clean-model vs badnets seed 0: BA " in err
    failed = rows[0].model_copy(update={"status": "failed", "error": "out of memory\ntrace"})
    assert cell_line(failed, 3, 9) == "[3/9] none vs badnets seed 0: failed: out of memory"

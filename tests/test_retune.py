"""The re-tuning attack (post-purification robustness): the set it uses, the numbers it stores,
and that grids without it keep their identities and rows from before it still read."""

from __future__ import annotations

import importlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from test_grid import FINETUNE, _ExplodePlugin, tiny
from typer.testing import CliRunner

from backdoor_toolkit import cells
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cells import plan_grid
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.benchmark import results_notes, results_table
from backdoor_toolkit.config import BenchmarkConfig, RetuneConfig
from backdoor_toolkit.data import Dataset, DataSpec, ImageData, dataset_spec, draw_defense_data
from backdoor_toolkit.leaderboard import build_leaderboard, to_csv, to_json, to_markdown
from backdoor_toolkit.models import create_model
from backdoor_toolkit.plugins import create_attack, register_plugin, resolve_plugin, unregister_plugin
from backdoor_toolkit.results import SCHEMA_VERSION, CellResult
from backdoor_toolkit.retuning import retune_attack, retune_set
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.suites import load_suite

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two contended ones


def _dataset(spec: DataSpec) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    shape = (spec.channels, spec.height, spec.width)
    train = ImageData(
        torch.randint(0, 256, (200, *shape), generator=gen, dtype=torch.uint8), torch.arange(200) % 10
    )
    test = ImageData(
        torch.randint(0, 256, (60, *shape), generator=gen, dtype=torch.uint8), torch.arange(60) % 10
    )
    return Dataset(spec, train, test)


@pytest.fixture
def setup() -> tuple[Any, Dataset, Any, torch.Tensor]:
    """BadNets on random images, 20 recorded poisoned samples (non-target), a 50-image budget."""
    spec = dataset_spec("fashion-mnist")
    dataset = _dataset(spec)
    attack = create_attack(resolve_plugin("attack", "badnets", None, {}), spec=spec, seed=0)
    poisoned = torch.nonzero(dataset.train.labels != 0).squeeze(1)[:20]
    data = draw_defense_data(dataset, poisoned, 0.25, 0.2, seed=0)
    return attack, dataset, data, poisoned


def test_the_retune_set_is_seeded_capped_and_made_of_poisoned_and_clean_images(setup: Any) -> None:
    attack, dataset, data, poisoned = setup
    config = RetuneConfig(poisoned=5, clean=30)
    one, again = (retune_set(attack, dataset, data, poisoned, config, seed=0) for _ in range(2))
    assert torch.equal(one.images, again.images) and torch.equal(one.labels, again.labels)
    assert (one.poisoned, one.clean, len(one.labels)) == (5, 30, 35)
    assert set(one.index.tolist()) <= set(poisoned.tolist())  # the victim's own poisoned samples
    stamped = attack.apply_trigger(dataset.train.subset(one.index).float_images()).clamp(0, 1)
    assert torch.equal(one.images[:5], stamped) and bool((one.labels[:5] == 0).all())  # trigger, target
    budget = data.train.float_images().flatten(1)
    assert all(bool((budget == image.flatten()).all(1).any()) for image in one.images[5:])
    other = retune_set(attack, dataset, data, poisoned, config, seed=1)
    assert not torch.equal(other.index, one.index)  # the seed draws
    capped = retune_set(attack, dataset, data, poisoned, RetuneConfig(poisoned=999, clean=999), seed=0)
    assert (capped.poisoned, capped.clean) == (20, len(data.train))


def test_a_budget_holding_clean_originals_of_poisoned_images_is_kept_out_of_the_retune_set(
    setup: Any,
) -> None:
    attack, dataset, _, poisoned = setup
    data = draw_defense_data(dataset, torch.empty(0, dtype=torch.long), 0.25, 0.2, seed=0)  # clean-label rule
    budget = set(data.index_train.tolist()) | set(data.index_val.tolist())
    assert budget & set(poisoned.tolist())  # the case: some poisoned positions are in the budget
    chosen = retune_set(attack, dataset, data, poisoned, RetuneConfig(poisoned=999), seed=0)
    assert chosen.poisoned == len(set(poisoned.tolist()) - budget)
    assert not set(chosen.index.tolist()) & budget


def test_attacks_that_poison_on_the_fly_draw_outside_the_budget(setup: Any) -> None:
    attack, dataset, data, _ = setup
    chosen = retune_set(attack, dataset, data, torch.empty(0, dtype=torch.long), RetuneConfig(), seed=0)
    budget = set(data.index_train.tolist()) | set(data.index_val.tolist())
    assert chosen.poisoned == 10 and "on the fly" in chosen.source
    assert not set(chosen.index.tolist()) & budget
    assert bool((dataset.train.labels[chosen.index] != 0).all())  # non-target images, relabelled
    assert bool((chosen.labels[:10] == 0).all())


def test_retune_attack_leaves_the_model_alone_and_reproduces(setup: Any) -> None:
    attack, dataset, data, poisoned = setup
    model = create_model("small-cnn", dataset.spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RetuneConfig(poisoned=5, clean=20, epochs=2, batch_size=10)
    runs = [
        retune_attack(model, attack, dataset, data, poisoned, config, device=torch.device("cpu"), seed=0)
        for _ in range(2)
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert runs[0].scores == runs[1].scores and 0.0 <= runs[0].scores.asr <= 1.0
    assert runs[0].steps == 2 * 3  # 25 images in batches of 10, twice
    assert set(runs[0].record()) == {"poisoned", "clean", "steps", "ba", "ra", "seconds", "source"}


def test_grids_without_retune_keep_their_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    grid: dict[str, Any] = {"attacks": ["badnets", "blended"], "defenses": [FINETUNE, "fine-pruning"]}
    plain, retuned = tiny(seeds=[0, 1], **grid), tiny(seeds=[0, 1], retune=True, **grid)
    now = [c.config_hash for p in plan_grid(plain) for c in p.cells]
    on = [c.config_hash for p in plan_grid(retuned) for c in p.cells]
    other = [
        c.config_hash for p in plan_grid(tiny(seeds=[0, 1], retune={"epochs": 3}, **grid)) for c in p.cells
    ]
    fields = {"training", "train_size", "test_size", "clean_ratio", "val_fraction", "threads"}
    # the setting exactly as it was computed before the re-tuning attack existed
    monkeypatch.setattr(cells, "run_setting", lambda config: config.model_dump(include=fields))
    before = [c.config_hash for p in plan_grid(plain) for c in p.cells]
    assert now == before
    assert not set(on) & set(now) and not set(other) & set(on)  # on, and its settings, are identities
    assert len(set(on)) == len(on)


def test_retune_is_computed_for_every_cell_stored_and_ranked(tmp_path: Path) -> None:
    register_plugin(_ExplodePlugin(), "test-explode-retune")
    try:
        config = tiny(seeds=[0], defenses=["explode", FINETUNE], retune=True, threads=1)
        with ResultStore(tmp_path / "r.sqlite") as store:
            rows = run_benchmark(config, store=store)
            stored = {r.config_hash: r for r in store.rows()}
    finally:
        unregister_plugin("test-explode-retune")
    none, explode, finetune = rows
    assert [(r.defense, r.status) for r in rows] == [
        ("none", "ok"),
        ("explode", "failed"),
        ("finetune", "ok"),
    ]
    for row in (none, finetune):
        assert row.asr_retuned is not None and 0.0 <= row.asr_retuned <= 1.0
        assert row.setting["retune"] == RetuneConfig().model_dump()
        assert row.schema_version == SCHEMA_VERSION
    # the same set for the reference and every defense
    budget = round(0.05 * 600) - round(0.2 * round(0.05 * 600))
    same = {k: none.retune[k] for k in ("poisoned", "clean", "steps", "source")}
    assert same == {k: finetune.retune[k] for k in same}
    assert (same["poisoned"], same["clean"]) == (10, min(190, budget))
    assert explode.asr_retuned is None and explode.retune == {"skipped": "the cell failed"}  # marked
    assert stored == {r.config_hash: r for r in rows}
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        column = dict(db.execute("SELECT config_hash, asr_retuned FROM cells").fetchall())
    assert column == {r.config_hash: r.asr_retuned for r in rows}
    table = results_table(rows)
    assert "ASR rt" in [c.header for c in table.columns] and table.row_count == 3
    board = build_leaderboard(rows)
    undefended = next(e for e in board.boards[0].entries if e.defense == "none")
    assert "asr_retuned" in board.columns() and undefended.stats["asr_retuned"].mean == none.asr_retuned
    assert "ASR retuned" in to_markdown(board) and "asr_retuned_mean" in to_csv(board)
    assert json.loads(to_json(board))["metrics"]["asr_retuned"]["higher_is_better"] is False


def test_a_failing_retune_is_marked_and_the_cell_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("no room")

    monkeypatch.setattr(cells, "retune_attack", broken)
    (row,) = run_benchmark(tiny(seeds=[0], defenses=[], retune=True, threads=1))
    assert row.status == "ok" and row.asr is not None and row.asr_retuned is None
    assert row.retune == {"skipped": "re-tuning failed: RuntimeError: no room"}
    assert "re-tuning failed" in " ".join(results_notes([row]))


def test_a_row_from_before_loads_and_shows_a_dash() -> None:
    old = CellResult.model_validate(json.loads((DATA / "cell_result_v2.json").read_text()))
    assert old.schema_version == 2 < SCHEMA_VERSION and old.asr_retuned is None and old.retune == {}
    new = old.model_copy(
        update={
            "schema_version": SCHEMA_VERSION,
            "config_hash": "new",
            "asr_retuned": 0.25,
            "setting": {**old.setting, "retune": RetuneConfig().model_dump()},
        }
    )
    board = build_leaderboard([old, new])
    md = to_markdown(board).splitlines()
    header = next(line for line in md if line.startswith("| rank |"))
    column = [c.strip() for c in header.strip("|").split("|")].index("ASR retuned % ↓")
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| 1 | finetune")
    ]
    # per attack and overall, in each setting: with the re-tuning attack, and from before it
    assert sorted(r[column] for r in rows) == ["25.0", "25.0", "—", "—"]
    assert any("no retune" in line for line in md) and any(", retune" in line for line in md)
    entries = [e for b in json.loads(to_json(board))["boards"] for e in b["entries"]]
    assert sorted(str(e["metrics"]["asr_retuned"]["mean"]) for e in entries) == [
        "0.25",
        "0.25",
        "None",
        "None",
    ]


V1_SCHEMA = """
CREATE TABLE cells (
    config_hash TEXT PRIMARY KEY, status TEXT NOT NULL, dataset TEXT NOT NULL, model TEXT NOT NULL,
    attack TEXT NOT NULL, defense TEXT NOT NULL, seed INTEGER NOT NULL,
    ba REAL, asr REAL, ra REAL, der REAL, seconds REAL, peak_mb REAL,
    error TEXT NOT NULL, bdtk_version TEXT NOT NULL, date TEXT NOT NULL, record TEXT NOT NULL
);
CREATE INDEX cells_scenario ON cells (dataset, model, attack, defense);
PRAGMA user_version=1;
"""


def test_a_store_from_before_is_migrated_when_written_and_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    text = (DATA / "cell_result_v2.json").read_text()
    old = CellResult.model_validate(json.loads(text))
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    values = (old.config_hash, old.status, old.dataset, old.model, old.attack, old.defense, old.seed)
    metrics = (old.ba, old.asr, old.ra, old.der, old.seconds, old.peak_mb)
    db.execute(
        f"INSERT INTO cells VALUES ({', '.join('?' * 17)})",
        (*values, *metrics, old.error, old.provenance.bdtk, old.provenance.date, text),
    )
    db.commit()
    db.close()

    def version() -> int:
        with sqlite3.connect(path) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    with ResultStore(path, write=False) as store:  # a leaderboard reads it and changes nothing
        assert store.rows() == [old]
    assert version() == 1
    with ResultStore(path) as store:
        store.put(old.model_copy(update={"config_hash": "new", "asr_retuned": 0.5}))
        assert store.get(old.config_hash) == old
    assert version() == 2
    with sqlite3.connect(path) as conn:
        column = dict(conn.execute("SELECT config_hash, asr_retuned FROM cells").fetchall())
    assert column == {old.config_hash: None, "new": 0.5}


def test_cli_flag_and_the_paper_suite_turn_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[BenchmarkConfig] = []

    def capture(config: BenchmarkConfig, **_: Any) -> list[CellResult]:
        seen.append(config)
        return []

    monkeypatch.setattr(importlib.import_module("backdoor_toolkit.cli.benchmark"), "run_benchmark", capture)
    base = ["benchmark", "--db", str(tmp_path / "r.sqlite"), "--output", str(tmp_path / "o.json")]
    runner = CliRunner()
    for extra in ([], ["--retune"], ["--suite", "paper"], ["--suite", "paper", "--no-retune"]):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
    assert [c.retune for c in seen] == [None, RetuneConfig(), RetuneConfig(), None]
    assert load_suite("paper").retune == RetuneConfig() and load_suite("quick").retune is None

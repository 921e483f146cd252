"""The SQLite result store: round trip, replacement by hash, failed cells, locked/corrupt files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from backdoor_toolkit.results import CellResult, Provenance
from backdoor_toolkit.store import ResultStore, StoreError, default_db_path


def cell(defense: str = "finetune", seed: int = 0, status: str = "ok", **values: object) -> CellResult:
    fields: dict[str, object] = {
        "dataset": "fashion-mnist",
        "model": "small-cnn",
        "attack": "badnets",
        "attack_config": {"target": 0},
        "defense": defense,
        "seed": seed,
        "status": status,
        "config_hash": f"{defense}-{seed}",
        "setting": {"train_size": 600, "training": {"epochs": 1}},
        "provenance": Provenance(
            bdtk="0.1.0",
            torch="2.x",
            python="3.x",
            device="cpu",
            date="2026-01-01T00:00:00+00:00",
            attack_plugin="backdoor-toolkit 0.1.0",
            defense_plugin=None if defense == "none" else "backdoor-toolkit 0.1.0",
        ),
    }
    if status == "ok":
        fields.update(ba=0.9, asr=0.05, ra=0.8, der=0.95, seconds=1.5, peak_mb=12.0)
    fields.update(values)
    return CellResult.model_validate(fields)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    row = cell(diagnostics={"val_accuracy": 0.7}, stage_seconds={"fit": 1.0})
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(row)
    with ResultStore(tmp_path / "r.sqlite") as store:  # a fresh connection reads what was committed
        assert store.get(row.config_hash) == row
        assert store.get("missing") is None
        assert store.rows() == [row]


def test_same_hash_replaces_instead_of_duplicating(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(cell(ba=0.5))
        store.put(cell(ba=0.6))
        assert len(store) == 1
        assert store.rows()[0].ba == 0.6


def test_failed_cells_are_stored_but_not_counted_as_done(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(cell("finetune"))
        store.put(cell("broken", status="failed", error="RuntimeError: boom"))
        assert store.hashes() == {"finetune-0"}
        assert store.hashes(None) == {"finetune-0", "broken-0"}
        failed = store.get("broken-0")
        assert failed is not None and failed.status == "failed" and "boom" in failed.error


def test_filters(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(cell(seed=0))
        store.put(cell(seed=1, attack="blended", config_hash="b1"))
        assert [r.attack for r in store.rows(attacks=["blended"])] == ["blended"]
        assert len(store.rows(dataset="fashion-mnist", model="small-cnn")) == 2
        assert store.rows(model="wrn-16-1") == []


def test_locked_database_is_a_clear_error_and_rows_survive(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.put(cell(seed=0))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        with (
            pytest.raises(StoreError, match="locked"),
            ResultStore(path, timeout=0.1, retry_seconds=0.5) as store,
        ):
            store.put(cell(seed=1))
    finally:
        other.execute("ROLLBACK")
        other.close()
    with ResultStore(path) as store:
        assert [r.seed for r in store.rows()] == [0]


def test_write_while_another_process_writes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultStore(path, timeout=0.1, retry_seconds=0.5) as store:  # a write retries, then fails
        store.put(cell(seed=0))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock; readers still pass
        try:
            assert len(store.rows()) == 1
            with pytest.raises(StoreError, match="locked"):
                store.put(cell(seed=1))
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [r.seed for r in store.rows()] == [0]


def test_corrupt_database_is_a_clear_error_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    garbage = b"this is not an sqlite database" * 100
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="corrupt"):
        ResultStore(path)
    assert path.read_bytes() == garbage


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    with pytest.raises(StoreError, match="not a bdtk result store"):
        ResultStore(path)


def test_default_location_honours_bdtk_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDTK_DB", str(tmp_path / "mine.sqlite"))
    assert default_db_path() == tmp_path / "mine.sqlite"
    monkeypatch.delenv("BDTK_DB", raising=False)
    assert default_db_path().name == "results.sqlite" and "bdtk" in str(default_db_path())


def test_a_row_stored_before_schema_versions_still_validates() -> None:
    """The mteb habit: a row exactly as an earlier bdtk stored it (an `mcldef:paper` cell) still reads."""
    from backdoor_toolkit.results import SCHEMA_VERSION

    stored = json.loads((Path(__file__).parent / "data" / "cell_result_v1.json").read_text())
    assert "schema_version" not in stored
    row = CellResult.model_validate(stored)
    assert row.schema_version == 1 < SCHEMA_VERSION
    assert row.defense_label == "mcldef:paper" and row.ba is not None and row.provenance.bdtk
    assert CellResult.model_validate(row.model_dump()) == row  # and round-trips as version 1


def test_a_reader_never_creates_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^No result database at .*absent\.sqlite"):
        ResultStore(tmp_path / "absent.sqlite", write=False)
    assert not (tmp_path / "absent.sqlite").exists()


def test_a_reader_never_writes_a_schema_into_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(StoreError, match=r"No stored results in .*empty\.sqlite"):
        ResultStore(empty, write=False)
    assert empty.stat().st_size == 0


def test_a_database_path_under_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match=r"afile is a file, not a folder"):
        ResultStore(tmp_path / "afile" / "x.sqlite")


def test_a_failed_rerun_never_replaces_a_stored_result(tmp_path: Path) -> None:
    """With --force, a cell that fails for a reason of the moment (a broken cache folder, say)
    would otherwise overwrite the result an earlier run computed."""
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert store.put(cell("finetune"))
        assert not store.put(cell("finetune", status="failed", error="the cache is a file"))
        kept = store.get("finetune-0")
        assert kept is not None and kept.status == "ok" and kept.ba == 0.9
        store.put(cell("broken", status="failed", error="first"))
        assert store.put(cell("broken", status="failed", error="second"))  # failed over failed: latest
        assert store.put(cell("broken"))  # and a result replaces a failure
        assert {r.config_hash: r.status for r in store.rows()} == {"finetune-0": "ok", "broken-0": "ok"}


def test_another_programs_cells_table_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "theirs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cells (id INTEGER, name TEXT)")
    with pytest.raises(StoreError, match="not a bdtk result store; nothing was changed"):
        ResultStore(path)
    with sqlite3.connect(path) as db:
        assert [r[1] for r in db.execute("PRAGMA table_info(cells)")] == ["id", "name"]
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


@pytest.mark.parametrize(
    "damage",
    [
        {"ba": float("nan")},
        {"ba": 5.0},
        {"der": float("inf")},
        {"seconds": -5},
        {"schema_version": 99},
        {"ba": True},
        {"ba": "0.5"},
        {"seed": -1},
        {"config_hash": "finetune-0"},
    ],
    ids=[
        "nan",
        "ba-500%",
        "inf",
        "negative-seconds",
        "future-schema",
        "bool",
        "string",
        "seed",
        "other-hash",
    ],
)
def test_a_stored_record_that_is_not_a_valid_result_is_skipped(
    tmp_path: Path, damage: dict[str, object]
) -> None:
    """A NaN, a share outside [0, 1] or a record of a later bdtk is never shown or reused as a
    result: the store skips it with a warning, and a resume recomputes the cell."""
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put(cell("finetune"))
        store.put(cell("nad"))
    record = json.loads(cell("nad").model_dump_json())
    record.update(damage)
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        db.execute("UPDATE cells SET record = ? WHERE config_hash = 'nad-0'", (json.dumps(record),))
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert [r.defense for r in store.rows()] == ["finetune"]
        assert store.get("nad-0") is None
        assert store.hashes() == {"finetune-0", "nad-0"}  # still in the file, for a resume to replace

"""The result store: one SQLite row per finished cell, keyed by the cell's config hash.

The store is the source of truth; leaderboards are views derived from it. Each cell is written
in its own transaction as soon as it finishes, so a crash or Ctrl-C loses at most the cell in
flight, and a re-run skips every cell whose hash is already stored. A locked or corrupt database
raises a StoreError before anything is written, so existing rows are never touched.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import platformdirs

from .config import split_preset
from .errors import BdtkError
from .results import CellResult

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE cells (
    config_hash TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    attack TEXT NOT NULL,
    defense TEXT NOT NULL,
    seed INTEGER NOT NULL,
    ba REAL, asr REAL, ra REAL, der REAL, seconds REAL, peak_mb REAL,
    error TEXT NOT NULL,
    bdtk_version TEXT NOT NULL,
    date TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX cells_scenario ON cells (dataset, model, attack, defense);
"""


class StoreError(BdtkError):
    """The result database cannot be used (locked, corrupt, newer schema, unwritable)."""


def default_db_path() -> Path:
    """`BDTK_DB` when set, else `results.sqlite` in the user's data directory."""
    env = os.environ.get("BDTK_DB")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("bdtk")) / "results.sqlite"


def _explain(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreError(
            f"The result database {path} is locked by another process ({text}). Wait for that run to "
            "finish, or pass --db (or set BDTK_DB) to use another database."
        )
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return StoreError(
            f"The result database {path} is corrupt or not a bdtk database ({text}). Nothing was "
            "changed; move the file aside or pass --db to use another database."
        )
    return StoreError(f"Cannot use the result database {path}: {text}")


class ResultStore:
    """Cells by config hash; `put` replaces a stored cell with the same hash (e.g. under --force)."""

    def __init__(self, path: Path | str | None = None, timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the folder of the result database {self.path}: {exc}") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _explain(self.path, exc) from None
        try:
            self._prepare()
        except sqlite3.Error as exc:
            self._db.close()
            raise _explain(self.path, exc) from None
        except StoreError:
            self._db.close()
            raise

    def _prepare(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "cells" in tables:
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The result database {self.path} has schema version {version}, newer than this "
                    f"bdtk understands ({SCHEMA_VERSION}); upgrade bdtk."
                )
            return
        if tables:
            raise StoreError(f"{self.path} is an SQLite database, but not a bdtk result store.")
        with self._transaction():
            self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Commit on success, roll back on any error, turning SQLite errors into StoreError."""
        try:
            yield
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise _explain(self.path, exc) from None
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def put(self, row: CellResult) -> None:
        """Write one cell at once (its own transaction), replacing a stored cell with its hash."""
        values = (
            row.config_hash,
            row.status,
            row.dataset,
            row.model,
            row.attack,
            row.defense,
            row.seed,
            row.ba,
            row.asr,
            row.ra,
            row.der,
            row.seconds,
            row.peak_mb,
            row.error,
            row.provenance.bdtk,
            row.provenance.date,
            row.model_dump_json(),
        )
        with self._transaction():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT OR REPLACE INTO cells VALUES ({', '.join('?' * len(values))})", values)

    def get(self, config_hash: str) -> CellResult | None:
        found = self._query("SELECT record FROM cells WHERE config_hash = ?", (config_hash,))
        return found[0] if found else None

    def hashes(self, status: str | None = "ok") -> set[str]:
        """Hashes of the stored cells (only those with `status`, or all when None)."""
        sql, args = "SELECT config_hash FROM cells", tuple[str, ...]()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._transaction():
            return {r[0] for r in self._db.execute(sql, args)}

    def rows(
        self, dataset: str | None = None, model: str | None = None, attacks: list[str] | None = None
    ) -> list[CellResult]:
        """Stored cells, optionally filtered, in a stable order.

        An attack given as `NAME` keeps every row of that plugin, with or without a preset; as
        `NAME:PRESET`, only the rows of that preset (the preset lives in the record, not in a
        column, so that filter is applied after the query).
        """
        clauses, args = [], []
        for column, value in (("dataset", dataset), ("model", model)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        wanted = [split_preset(a) for a in attacks or []]
        names = sorted({name for name, _ in wanted})
        if names:
            clauses.append(f"attack IN ({', '.join('?' * len(names))})")
            args.extend(names)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT record FROM cells{where} ORDER BY dataset, model, attack, defense, seed, config_hash"
        rows = self._query(sql, tuple(args))
        if any(preset is not None for _, preset in wanted):
            rows = [r for r in rows if any(r.attack == n and p in (None, r.attack_preset) for n, p in wanted)]
        return rows

    def _query(self, sql: str, args: tuple[object, ...]) -> list[CellResult]:
        with self._transaction():
            records = [r[0] for r in self._db.execute(sql, args)]
        return [CellResult.model_validate(json.loads(text)) for text in records]

    def __len__(self) -> int:
        with self._transaction():
            return int(self._db.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

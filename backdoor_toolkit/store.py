"""The result store: one SQLite row per finished cell, keyed by the cell's config hash.

The store is the source of truth; leaderboards are views derived from it. Each cell is written
in its own transaction as soon as it finishes, so a crash or Ctrl-C loses at most the cell in
flight, and a re-run skips every cell whose hash is already stored. A locked or corrupt database
raises a StoreError before anything is written, so existing rows are never touched.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import platformdirs

from .config import split_preset
from .console import console
from .errors import BdtkError
from .results import CellResult

SCHEMA_VERSION = 2
"""1: the first layout; 2: adds the `asr_retuned` column (a version 1 store is migrated when it is
opened for writing; rows stored before it hold NULL there)."""

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
    record TEXT NOT NULL,
    asr_retuned REAL
);
CREATE INDEX cells_scenario ON cells (dataset, model, attack, defense);
"""

#: How a store of each older schema version is brought to the next one.
_MIGRATIONS = {1: ("ALTER TABLE cells ADD COLUMN asr_retuned REAL",)}

_COLUMNS = (
    "config_hash, status, dataset, model, attack, defense, seed, ba, asr, ra, der, seconds, peak_mb, "
    "error, bdtk_version, date, record, asr_retuned"
)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(exc).__name__


class StoreError(BdtkError):
    """The result database cannot be used (locked, corrupt, newer schema, unwritable)."""


def default_db_path() -> Path:
    """`BDTK_DB` when set, else `results.sqlite` in the user's data directory."""
    env = os.environ.get("BDTK_DB")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("bdtk")) / "results.sqlite"


def unsaved_rows_path(db: Path) -> Path:
    """The side file beside database `db` that keeps rows the database refused (a lock that outlasted
    every retry) until the next run imports them."""
    return db.with_name(db.name + ".unsaved.jsonl")


def _busy(exc: BaseException) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _explain(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if _busy(exc):
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
    """Cells by config hash; `put` replaces a stored cell with the same hash (e.g. under --force).

    Opened for writing (the default), an unwritable database or folder is refused at once, before
    any cell is computed. A write that keeps finding the database locked is retried with back-off
    for `retry_seconds`; `put_or_keep` then keeps the row in a side file, which the next run
    imports, so a finished cell is never lost.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        timeout: float = 5.0,
        *,
        write: bool = True,
        retry_seconds: float = 60.0,
    ) -> None:
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        self.retry_seconds = retry_seconds
        self._write = write
        if self.path.is_dir():
            raise StoreError(
                f"The result database {self.path} is a folder; give a file path (--db or BDTK_DB), e.g. "
                f"{self.path / 'results.sqlite'}."
            )
        if write:
            self._check_writable()
        elif not self.path.exists():  # a reader never creates the file (sqlite3.connect would)
            raise StoreError(f"No result database at {self.path}; run `bdtk benchmark` first (or pass --db).")
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _explain(self.path, exc) from None
        try:
            self._retrying(self._prepare)
        except StoreError:
            self._db.close()
            raise

    def _check_writable(self) -> None:
        """SQLite needs the file and its folder (journal files) writable; say so before any work."""
        blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise StoreError(
                f"The result database {self.path} cannot be created: {blocker} is a file, not a folder. "
                "Pass --db (or set BDTK_DB) to use another location."
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the folder of the result database {self.path}: {exc.strerror or exc}. "
                "Pass --db (or set BDTK_DB) to use another location."
            ) from None
        for target in (self.path.parent, self.path):
            if target.exists() and not os.access(target, os.W_OK):
                raise StoreError(
                    f"The result database {self.path} is not writable ({target} is read-only). "
                    "Pass --db (or set BDTK_DB) to use another location."
                )

    @property
    def unsaved_path(self) -> Path:
        """Where rows that could not be written are kept until the next run imports them."""
        return unsaved_rows_path(self.path)

    def _prepare(self) -> None:
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            raise _explain(self.path, exc) from None
        if "cells" in tables:
            try:
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(cells)")}
            except sqlite3.Error as exc:
                raise _explain(self.path, exc) from None
            if not {"config_hash", "status", "record"} <= columns:  # before any migration touches it
                raise StoreError(
                    f"{self.path} is an SQLite database with a `cells` table, but not a bdtk result "
                    "store; nothing was changed. Pass --db (or set BDTK_DB) to use another file."
                )
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The result database {self.path} has schema version {version}, newer than this "
                    f"bdtk understands ({SCHEMA_VERSION}); upgrade bdtk."
                )
            if version < SCHEMA_VERSION and self._write:
                self._migrate(version)
            return
        if tables:
            raise StoreError(f"{self.path} is an SQLite database, but not a bdtk result store.")
        if not self._write:  # a reader never changes the file: an empty one holds no results
            raise StoreError(f"No stored results in {self.path} (an empty file); run `bdtk benchmark` first.")
        with self._transaction():
            self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};")

    def _migrate(self, version: int) -> None:
        """Bring an older store up to `SCHEMA_VERSION` in one transaction; its rows stay as they are.

        Only a store opened for writing is migrated: a read (`bdtk leaderboard`) never changes the
        file, and reads only the records, which every version shares.
        """
        with self._transaction():
            self._db.execute("BEGIN IMMEDIATE")
            # another writer may have migrated it since `version` was read: read it again, locked
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(max(version, 1), SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def put(self, row: CellResult) -> bool:
        """Write one cell at once (its own transaction), replacing a stored cell with its hash;
        False (nothing written) when the row is failed and the stored one is ok: a re-run that
        failed (a broken environment, say, under --force) must not lose a computed result."""
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
            row.asr_retuned,
        )

        written = True

        def write() -> None:
            nonlocal written
            with self._transaction():
                self._db.execute("BEGIN IMMEDIATE")
                if row.status != "ok":
                    stored = self._db.execute(
                        "SELECT status FROM cells WHERE config_hash = ?", (row.config_hash,)
                    ).fetchone()
                    if stored is not None and stored[0] == "ok":
                        written = False  # a failed re-run never replaces a result (e.g. with --force)
                        return
                self._db.execute(
                    f"INSERT OR REPLACE INTO cells ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})",
                    values,
                )

        self._retrying(write)
        return written

    def _retrying(self, action: Callable[[], None]) -> None:
        """Run `action`, retrying with back-off (0.25 s doubling to 8 s) while the database is
        locked by another writer, for up to `retry_seconds`; then the StoreError stands."""
        delay, waited = 0.25, 0.0
        while True:
            try:
                action()
                return
            except StoreError as exc:
                if not _busy(exc) or waited >= self.retry_seconds:
                    raise
            if waited == 0:  # a silent wait of a minute reads as a hang
                console.print(
                    f"[yellow]{self.path} is locked by another process; waiting up to "
                    f"{self.retry_seconds:.0f} s for it…[/]",
                    highlight=False,
                )
            time.sleep(delay)
            waited += delay
            delay = min(2 * delay, 8.0)

    def put_or_keep(self, row: CellResult) -> StoreError | None:
        """`put`, or, when the database still refuses the write, append the row to `unsaved_path`.

        Returns the error when the row went to the side file (the caller reports it and carries
        on); `import_unsaved` moves such rows into the database on the next run.
        """
        try:
            written = self.put(row)
        except StoreError as exc:
            with self.unsaved_path.open("a") as fh:
                fh.write(row.model_dump_json() + "\n")
            return exc
        if not written:
            console.print(
                f"[yellow]{row.defense_label} vs {row.attack_label} seed {row.seed} failed this time; "
                f"its stored result in {self.path} was kept.[/]",
                highlight=False,
            )
        return None

    def import_unsaved(self) -> int:
        """Move the rows kept in `unsaved_path` by an earlier run into the database; their count."""
        if not self.unsaved_path.exists():
            return 0
        rows = []
        for number, line in enumerate(self.unsaved_path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(CellResult.model_validate_json(line))
                except ValueError as exc:
                    console.print(
                        f"[yellow]Skipping line {number} of {self.unsaved_path}: not a result row "
                        f"({_first_line(exc)}).[/]"
                    )
        for row in rows:
            self.put(row)
        self.unsaved_path.unlink()
        return len(rows)

    def get(self, config_hash: str) -> CellResult | None:
        found = self._query("SELECT config_hash, record FROM cells WHERE config_hash = ?", (config_hash,))
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
        order = "ORDER BY dataset, model, attack, defense, seed, config_hash"
        sql = f"SELECT config_hash, record FROM cells{where} {order}"
        rows = self._query(sql, tuple(args))
        if any(preset is not None for _, preset in wanted):
            rows = [r for r in rows if any(r.attack == n and p in (None, r.attack_preset) for n, p in wanted)]
        return rows

    def _query(self, sql: str, args: tuple[object, ...]) -> list[CellResult]:
        """The rows `sql` selects (as `config_hash, record`).

        A row that no longer validates is skipped with a warning naming it, so one bad row cannot
        break every view and every resume of the database.
        """
        with self._transaction():
            records = list(self._db.execute(sql, args))
        rows = []
        for config_hash, text in records:
            try:
                # strict: a hand-edited `"ba": true` or `"ba": "0.5"` is damage, not BA 100 % or 50 %
                row = CellResult.model_validate_json(text, strict=True)
                if row.config_hash != config_hash:
                    raise ValueError(f"its record names config hash {row.config_hash!r}, not its key")
                rows.append(row)
            except (ValueError, TypeError, RecursionError) as exc:
                console.print(
                    f"[yellow]Skipping stored cell {config_hash} in {self.path}: not a valid result "
                    f"record ({_first_line(exc)}). `bdtk benchmark` recomputes it.[/]",
                    highlight=False,
                )
        return rows

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

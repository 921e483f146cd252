"""Result records: one `CellResult` per cell, with the `Provenance` of the code that made it.

These rows are the source of truth the store keeps and every leaderboard view derives from, so
they carry a `schema_version`: a row written by an older bdtk still validates, and a reader can
tell which fields it may rely on (version 1: rows stored before the field existed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .artifacts import atomic_write_text, json_text
from .config import SEED_MAX, BenchmarkConfig, join_preset

# the reference rows' names, re-exported: rows are read by them
from .interfaces import CLEAN_MODEL as CLEAN_MODEL
from .interfaces import REFERENCE_ROWS as REFERENCE_ROWS
from .interfaces import UNDEFENDED as UNDEFENDED

SCHEMA_VERSION = 3
"""The version new rows are written with. 1: rows stored before `schema_version` existed; 2: rows
stored before `asr_retuned` and `retune` existed (they read as None and {})."""


class Provenance(BaseModel):
    bdtk: str
    torch: str
    python: str
    device: str
    date: str
    attack_plugin: str
    defense_plugin: str | None
    threads: int | None = Field(default=None, description="torch CPU threads the cell ran with")


class CellResult(BaseModel):
    """One leaderboard row: an attack on a model, then one defense (or none), for one seed.

    `attack` and `defense` are plugin names; `attack_preset` and `defense_preset` the presets they
    were chosen with (None: none, as in every row stored before presets existed), and the configs
    are the resolved ones (defaults ⊕ preset ⊕ explicit values).
    """

    # a record of a later bdtk is refused rather than read as if its fields meant the same
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    dataset: str
    model: str
    attack: str
    attack_preset: str | None = None
    attack_config: dict[str, Any]
    defense: str
    defense_preset: str | None = None
    defense_config: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(ge=0, le=SEED_MAX)
    status: Literal["ok", "failed"] = "ok"
    error: str = ""
    # rates are shares in [0, 1] and never NaN (a NaN is an error, not a result): a stored record
    # outside that is damaged, and the store skips it (and a resume recomputes it)
    ba: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    asr: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    ra: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    der: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    asr_retuned: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="ASR after the re-tuning attack (`BenchmarkConfig.retune`); None when it was off, "
        "skipped, or the row predates it",
    )
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    peak_mb: float | None = Field(default=None, allow_inf_nan=False)
    modified: bool | None = None
    detected: bool | None = None
    notes: str = ""
    diagnostics: dict[str, Any] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    config_hash: str
    provenance: Provenance
    setting: dict[str, Any] = Field(default_factory=dict)
    retune: dict[str, Any] = Field(
        default_factory=dict,
        description="What the re-tuning attack did (sizes, steps, BA/RA after it, time) or, under "
        "`skipped`, why it did not run; empty when it was off",
    )

    @property
    def attack_label(self) -> str:
        """`NAME` or `NAME:PRESET`: a preset is a different recipe, so tables name it."""
        return join_preset(self.attack, self.attack_preset)

    @property
    def defense_label(self) -> str:
        return join_preset(self.defense, self.defense_preset)

    @property
    def error_line(self) -> str:
        """The error's first non-empty line (a traceback's tail stays in `notes`), for one-line reports."""
        lines = (self.error or "").strip().splitlines()
        return lines[0] if lines else "no message"

    @model_validator(mode="before")
    @classmethod
    def _versioned(cls, data: Any) -> Any:
        """A stored row without `schema_version` predates it: version 1."""
        if isinstance(data, dict) and "schema_version" not in data:
            data = {**data, "schema_version": 1}
        return data


def jsonable(value: Any) -> Any:
    """A value as plain JSON (tensors become lists); diagnostics are stored this way."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_results(path: Path, config: BenchmarkConfig, rows: list[CellResult]) -> None:
    """Write (atomically) the run's config and rows as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config.model_dump(), "results": [r.model_dump() for r in rows]}
    atomic_write_text(path, json_text(payload))

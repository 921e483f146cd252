"""Aggregation: the ranked board built from stored CellResult rows, with no rendering in it.

This is the one place that decides what a leaderboard says, so that every view (the tables and
exports in `tables`, the scatter in `plot`) shows the same numbers and ranks. Rows are grouped by
scenario (dataset, model and the run setting: sizes, training, clean budget), then by attack and
defense (a `NAME:PRESET` apart from `NAME`); each metric is a mean ± sample std over seeds.
Defenses are ranked per attack and overall (every attack and seed pooled) by one metric, in the
direction that metric declares (`METRICS[...].higher_is_better`), so no ranking rule is hard-coded
here. BA drop is derived per seed against the undefended model of the same attack and seed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..config import config_hash
from ..errors import BdtkError, UnknownNameError
from ..metrics import METRICS, MetricInfo
from ..results import CellResult

DERIVED = {
    "ba_drop": MetricInfo("BA drop", False, "clean accuracy lost against the undefended model, same seed"),
}
COLUMNS = ("der", "ba_drop", "asr", "ra", "ba", "seconds")
PERCENT = {"ba_drop", "asr", "ra", "ba"}
UNDEFENDED = "none"


def metric_info(name: str) -> MetricInfo:
    info = METRICS.get(name) or DERIVED.get(name)
    if info is None:
        raise UnknownNameError("metric", name, list(COLUMNS))
    return info


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std is None with fewer than two)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(None, None, 0)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, metric: str) -> str:
        if self.mean is None:
            return "—"
        scale, digits = (100.0, 1) if metric in PERCENT else (1.0, 3 if metric == "der" else 1)
        out = f"{self.mean * scale:.{digits}f}"
        return out if self.std is None else f"{out} ± {self.std * scale:.{digits}f}"


@dataclass
class Entry:
    defense: str
    rank: int | None
    seeds: int
    failed: int
    stats: dict[str, Stat]
    errors: list[str] = field(default_factory=list)


@dataclass
class Board:
    """One ranking: a scenario and an attack, or the scenario overall (attack None)."""

    dataset: str
    model: str
    setting: str
    attack: str | None
    entries: list[Entry]

    @property
    def title(self) -> str:
        scope = f"attack {self.attack}" if self.attack else "overall (all attacks)"
        return f"{self.dataset} · {self.model} · {self.setting} — {scope}"


@dataclass
class Leaderboard:
    rank_by: str
    boards: list[Board]

    def points(self) -> list[tuple[str, str, float, float]]:
        """(attack, defense, BA, ASR) for each per-attack entry with numbers, for the scatter plot."""
        out = []
        for board in self.boards:
            if board.attack is None:
                continue
            for e in board.entries:
                ba, asr = e.stats["ba"].mean, e.stats["asr"].mean
                if ba is not None and asr is not None:
                    out.append((board.attack, e.defense, ba, asr))
        return out


def describe_setting(setting: dict[str, Any]) -> str:
    if not setting:
        return "setting not recorded"
    training = setting.get("training", {})
    sizes = f"train {setting.get('train_size') or 'all'}/test {setting.get('test_size') or 'all'}"
    return f"{sizes}, {training.get('epochs', '?')} epochs, clean {setting.get('clean_ratio', '?')}"


def _labels(names: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """Each row's `NAME` or `NAME:PRESET`, with its config hash appended where that label ran with
    several configs. A preset is a label of its own, so `mcldef:paper` never pools with `mcldef`."""
    variants: dict[str, set[str]] = defaultdict(set)
    for name, config in zip(names, configs, strict=True):
        variants[name].add(config_hash(config))
    return [
        name + (f"[{config_hash(config)[:6]}]" if len(variants[name]) > 1 else "")
        for name, config in zip(names, configs, strict=True)
    ]


@dataclass
class _Cell:
    attack: str
    defense: str
    row: CellResult


def _entries(
    cells: dict[str, list[_Cell]], base_ba: dict[tuple[str, int], float], rank_by: str
) -> list[Entry]:
    entries = []
    for defense, group in cells.items():
        ok = [c for c in group if c.row.status == "ok"]
        values: dict[str, list[float]] = {m: [] for m in COLUMNS}
        for c in ok:
            for m in ("der", "asr", "ra", "ba"):
                v = getattr(c.row, m)
                if v is not None and v == v:  # NaN (no non-target test image) is left out
                    values[m].append(v)
            if defense != UNDEFENDED and c.row.seconds is not None:
                values["seconds"].append(c.row.seconds)
            base = base_ba.get((c.attack, c.row.seed))
            if base is not None and c.row.ba is not None:
                values["ba_drop"].append(base - c.row.ba)
        failed = [c.row for c in group if c.row.status == "failed"]
        entries.append(
            Entry(
                defense,
                None,
                len({(c.attack, c.row.seed) for c in ok}),
                len(failed),
                {m: Stat.of(v) for m, v in values.items()},
                sorted({r.error for r in failed}),
            )
        )
    sign = -1.0 if metric_info(rank_by).higher_is_better else 1.0
    ranked = [e for e in entries if e.defense != UNDEFENDED and e.stats[rank_by].mean is not None]
    ranked.sort(key=lambda e: (sign * (e.stats[rank_by].mean or 0.0), e.defense))
    for position, e in enumerate(ranked, start=1):
        e.rank = position
    rest = sorted((e for e in entries if e.rank is None), key=lambda e: (e.defense != UNDEFENDED, e.defense))
    return ranked + rest


def build_leaderboard(rows: list[CellResult], rank_by: str = "der") -> Leaderboard:
    """Group stored cells into per-attack and overall boards for each scenario."""
    if rank_by not in COLUMNS:
        raise BdtkError(f"Cannot rank by {rank_by!r}; choose one of {', '.join(COLUMNS)}.")
    cells = [
        _Cell(a, d, r)
        for a, d, r in zip(
            _labels([r.attack_label for r in rows], [r.attack_config for r in rows]),
            _labels([r.defense_label for r in rows], [r.defense_config for r in rows]),
            rows,
            strict=True,
        )
    ]
    scenarios: dict[tuple[str, str, str], list[_Cell]] = defaultdict(list)
    described: dict[str, str] = {}
    for c in cells:
        key = config_hash(c.row.setting)
        described[key] = describe_setting(c.row.setting)
        scenarios[(c.row.dataset, c.row.model, key)].append(c)
    boards: list[Board] = []
    for (dataset, model, key), group in sorted(scenarios.items()):
        base_ba = {
            (c.attack, c.row.seed): c.row.ba
            for c in group
            if c.defense == UNDEFENDED and c.row.status == "ok" and c.row.ba is not None
        }
        by_attack: dict[str, dict[str, list[_Cell]]] = defaultdict(lambda: defaultdict(list))
        overall: dict[str, list[_Cell]] = defaultdict(list)
        for c in group:
            by_attack[c.attack][c.defense].append(c)
            overall[c.defense].append(c)
        for attack in sorted(by_attack):
            boards.append(
                Board(dataset, model, described[key], attack, _entries(by_attack[attack], base_ba, rank_by))
            )
        boards.append(Board(dataset, model, described[key], None, _entries(overall, base_ba, rank_by)))
    return Leaderboard(rank_by, boards)

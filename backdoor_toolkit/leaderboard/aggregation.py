"""Aggregation: the ranked board built from stored CellResult rows, with no rendering in it.

This is the one place that decides what a leaderboard says, so that every view (the tables and
exports in `tables`, the scatter in `plot`) shows the same numbers and ranks. Rows are grouped by
scenario (dataset, model and the run setting: sizes, training, clean budget), then by attack and
defense (a `NAME:PRESET` apart from `NAME`); each metric is a mean ± sample std over seeds.
Defenses are ranked per attack and overall (every attack and seed pooled) by one metric, in the
direction that metric declares (`METRICS[...].higher_is_better`), so no ranking rule is hard-coded
here. BA drop is derived per seed against the undefended model of the same attack and seed.
Each setting is described by the fields in which the settings present differ (`describe_settings`),
so two scenarios never share a title, a CSV row or a JSON entry.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..config import config_hash
from ..errors import BdtkError, UnknownNameError
from ..metrics import METRICS, MetricInfo
from ..results import CLEAN_MODEL, REFERENCE_ROWS, UNDEFENDED, CellResult

DERIVED = {
    "ba_drop": MetricInfo("BA drop", False, "clean accuracy lost against the undefended model, same seed"),
}
COLUMNS = ("der", "ba_drop", "asr", "asr_retuned", "ra", "ba", "seconds")
PERCENT = {"ba_drop", "asr", "asr_retuned", "ra", "ba"}
#: Columns that only some grids fill (the re-tuning attack is opt-in): views may leave them out
#: when no row has a value.
OPTIONAL = {"asr_retuned"}
#: What a defense did to the backdoored model: not shown for the never-backdoored reference row.
DEFENSE_ONLY = {"der", "ba_drop", "seconds"}


def reference_order(defense: str) -> int:
    """Sort key: the undefended row, then the clean-model row, then everything else."""
    return REFERENCE_ROWS.index(defense) if defense in REFERENCE_ROWS else len(REFERENCE_ROWS)


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
    """One ranking: a scenario and an attack, or the scenario overall (attack None).

    `setting` is the setting's description (distinct for distinct settings), `setting_hash` its
    identity and `setting_fields` the stored setting itself, for exports that need every field.
    """

    dataset: str
    model: str
    setting: str
    attack: str | None
    entries: list[Entry]
    setting_hash: str = ""
    setting_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def scenario(self) -> str:
        """Dataset, model and setting: what the boards of one scenario share."""
        return f"{self.dataset} · {self.model} · {self.setting}"

    @property
    def title(self) -> str:
        scope = f"attack {self.attack}" if self.attack else "overall (all attacks)"
        return f"{self.scenario} — {scope}"


@dataclass(frozen=True)
class Point:
    """One mark of the BA-versus-ASR scatter: a defense against an attack in one scenario."""

    scenario: str
    attack: str
    defense: str
    ba: float
    asr: float
    ba_std: float | None
    asr_std: float | None


@dataclass(frozen=True)
class Gap:
    """A cell a scenario's grid implies but that has no result: failed (with why) or not stored.

    The grid implied is every attack × defense × seed seen anywhere in the scenario, so a block
    still running or never started shows as missing instead of silently thinning a mean.
    """

    scenario: str
    attack: str
    seed: int
    defense: str
    reason: str  # the failure's first line, or MISSING

    @property
    def failed(self) -> bool:
        return self.reason != MISSING


MISSING = "not in the store (not run yet, interrupted, or its record skipped as damaged)"


@dataclass
class Leaderboard:
    rank_by: str
    boards: list[Board]
    gaps: list[Gap] = field(default_factory=list)

    def points(self) -> list[Point]:
        """A point for each per-attack entry with a BA and an ASR, in board order."""
        out = []
        for board in self.boards:
            if board.attack is None:
                continue
            for e in board.entries:
                ba, asr = e.stats["ba"], e.stats["asr"]
                if ba.mean is not None and asr.mean is not None:
                    out.append(
                        Point(board.scenario, board.attack, e.defense, ba.mean, asr.mean, ba.std, asr.std)
                    )
        return out

    def scenarios(self) -> list[str]:
        """The scenarios in board order, each once."""
        return list(dict.fromkeys(b.scenario for b in self.boards))

    def columns(self) -> tuple[str, ...]:
        """COLUMNS less the optional ones no entry has a value for (e.g. grids run without
        re-tuning), so tables are not padded with empty columns."""
        filled = {m for b in self.boards for e in b.entries for m in OPTIONAL if e.stats[m].mean is not None}
        return tuple(m for m in COLUMNS if m not in OPTIONAL or m in filled)


def describe_setting(setting: dict[str, Any]) -> str:
    if not setting:
        return "setting not recorded"
    training = setting.get("training", {})
    sizes = f"train {setting.get('train_size') or 'all'}/test {setting.get('test_size') or 'all'}"
    return f"{sizes}, {training.get('epochs', '?')} epochs, clean {setting.get('clean_ratio', '?')}"


_ABSENT = object()


def _differences(settings: list[dict[str, Any]], prefix: str = "") -> list[list[str]]:
    """For each setting, phrases naming its values of the fields in which `settings` differ.

    Nested tables are followed (`training.batch_size=32`); a table some settings lack is named by
    its presence (`retune` / `no retune`) plus whatever differs inside it among the others.
    """
    out: list[list[str]] = [[] for _ in settings]
    for key in sorted({k for s in settings for k in s}):
        values = [s.get(key, _ABSENT) for s in settings]
        if all(v is not _ABSENT for v in values) and all(v == values[0] for v in values):
            continue
        name = f"{prefix}{key}"
        present = [i for i, v in enumerate(values) if v is not _ABSENT]
        if len({repr(values[i]) for i in present}) <= 1 and len(present) < len(values):
            for i, v in enumerate(values):  # one value where present: name it, or its presence
                if v is _ABSENT:
                    out[i].append(f"no {name}")
                else:
                    out[i].append(name if isinstance(v, dict) else f"{name}={v}")
            continue
        if present and all(isinstance(values[i], dict) for i in present):
            inner = _differences([values[i] for i in present], f"{name}.")
            for i, phrases in zip(present, inner, strict=True):
                out[i].extend(phrases or [name])
        else:
            for i in present:
                out[i].append(f"{name}={values[i]}")
        for i, v in enumerate(values):
            if v is _ABSENT:
                out[i].append(f"no {name}")
    return out


def describe_settings(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A description per setting (by key), distinct for settings that differ in any field.

    Each is `describe_setting`'s summary (sizes, epochs, clean budget) followed by the fields in
    which the settings present differ and the summary does not show (`training.batch_size=32`,
    `retune`). Should two still read alike (a field the summary rounds away), the setting's hash
    tells them apart.
    """
    keys = list(settings)
    summary = {k: describe_setting(settings[k]) for k in keys}
    shown = {"train_size", "test_size", "clean_ratio", "training.epochs"}
    extra = _differences([settings[k] for k in keys])
    described = {}
    for k, phrases in zip(keys, extra, strict=True):
        rest = [p for p in phrases if p.split("=")[0].removeprefix("no ") not in shown]
        described[k] = ", ".join([summary[k], *rest])
    texts = list(described.values())
    return {k: t if texts.count(t) == 1 else f"{t} [{k[:6]}]" for k, t in described.items()}


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
            for m in ("der", "asr", "asr_retuned", "ra", "ba"):
                v = getattr(c.row, m)
                if v is not None and v == v:  # NaN (no non-target test image) is left out
                    values[m].append(v)
            if defense not in REFERENCE_ROWS and c.row.seconds is not None:
                values["seconds"].append(c.row.seconds)
            base = base_ba.get((c.attack, c.row.seed))
            if base is not None and c.row.ba is not None:
                values["ba_drop"].append(base - c.row.ba)
        if defense == CLEAN_MODEL:
            values.update({m: [] for m in DEFENSE_ONLY})
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
    ranked = [e for e in entries if e.defense not in REFERENCE_ROWS and e.stats[rank_by].mean is not None]
    ranked.sort(key=lambda e: (sign * (e.stats[rank_by].mean or 0.0), e.defense))
    for position, e in enumerate(ranked, start=1):
        e.rank = position
    rest = sorted(
        (e for e in entries if e.rank is None), key=lambda e: (reference_order(e.defense), e.defense)
    )
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
    settings: dict[str, dict[str, Any]] = {}
    for c in cells:
        key = config_hash(c.row.setting)
        settings[key] = c.row.setting
        scenarios[(c.row.dataset, c.row.model, key)].append(c)
    described = describe_settings(settings)
    boards: list[Board] = []
    gaps: list[Gap] = []
    for (dataset, model, key), group in sorted(scenarios.items()):
        gaps += _gaps(f"{dataset} · {model} · {described[key]}", group)
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
        scopes = [(attack, by_attack[attack]) for attack in sorted(by_attack)] + [(None, overall)]
        for attack, scope in scopes:
            entries = _entries(scope, base_ba, rank_by)
            boards.append(Board(dataset, model, described[key], attack, entries, key, settings[key]))
    return Leaderboard(rank_by, boards, gaps)


def _gaps(scenario: str, group: list[_Cell]) -> list[Gap]:
    """The failed and the missing cells of one scenario's implied grid, in grid order."""
    done = {(c.attack, c.row.seed, c.defense): c.row for c in group}
    attacks = sorted({c.attack for c in group})
    seeds = sorted({c.row.seed for c in group})
    defenses = sorted({c.defense for c in group}, key=lambda d: (reference_order(d), d))
    out = []
    for seed in seeds:
        for attack in attacks:
            for defense in defenses:
                row = done.get((attack, seed, defense))
                if row is None:
                    out.append(Gap(scenario, attack, seed, defense, MISSING))
                elif row.status == "failed":
                    out.append(Gap(scenario, attack, seed, defense, row.error_line))
    return out


def describe_gaps(gaps: list[Gap], scenario: str) -> list[str]:
    """One line per attack and seed of `scenario` with gaps: which defenses are missing, and each
    failed cell with its reason. Empty when the scenario's grid is complete."""
    lines = []
    blocks: dict[tuple[str, int], list[Gap]] = defaultdict(list)
    for gap in gaps:
        if gap.scenario == scenario:
            blocks[(gap.attack, gap.seed)].append(gap)
    for (attack, seed), block in blocks.items():
        missing = [g.defense for g in block if not g.failed]
        parts = [f"{', '.join(missing)}: {MISSING}"] if missing else []
        parts += [f"{g.defense} failed: {g.reason}" for g in block if g.failed]
        lines.append(f"{attack}, seed {seed}: " + "; ".join(parts))
    return lines


#: An undefended model whose ASR is below this holds little backdoor: a defense's DER there
#: measures little (every defense scores about 0.5), yet it is averaged into the ranking.
WEAK_BACKDOOR_ASR = 0.2


def weak_backdoors(rows: list[CellResult], below: float = WEAK_BACKDOOR_ASR) -> list[str]:
    """One line per undefended model (attack, seed, dataset, model) whose ASR is below `below`,
    so a reader knows which cells of the ranking had little backdoor to remove."""
    lines = []
    for row in rows:
        if row.defense == UNDEFENDED and row.status == "ok" and row.asr is not None and row.asr < below:
            lines.append(
                f"{row.attack_label}, seed {row.seed} ({row.dataset}, {row.model}): the undefended "
                f"model's ASR is {100 * row.asr:.2f} %, so there was little backdoor to remove and its "
                "defenses' DER says little."
            )
    return sorted(set(lines))

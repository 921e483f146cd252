"""Validated configuration: a strict pydantic base for plugin configs and the run configs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base of every bdtk config: unknown or misspelt fields are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """On a field (or list) of numbers, a boolean or a string is a mistake to report, whatever
        path (CLI, file, Python) the value came by: pydantic would take `true` as 1 (`--set
        epochs=true` trained one epoch) and `"3"` as 3 (`create_defense(..., {"epochs": "3"})`
        hides a caller's type error). `--set` parses numbers itself, so a string here was quoted."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _numeric(field.annotation):
            return value
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, bool) for v in values):
            raise ValueError(f"{_shown(value)} is a boolean, not a number")
        if any(isinstance(v, str | bytes) for v in values):
            if isinstance(value, str) and "," in value:  # `--set betas=1,2,3`
                raise ValueError(f"{_shown(value)} is a string, not numbers; write a list as JSON: [{value}]")
            raise ValueError(f"{_shown(value)} is a string, not a number (write the number without quotes)")
        return _no_negative_zero(value)


def _no_negative_zero(value: Any) -> Any:
    """-0.0 as 0.0 (in a list too): the two are the same setting, but JSON keeps the sign, so a
    config hash would make them two cells and two leaderboard rows."""
    if isinstance(value, float) and value == 0.0:
        return 0.0
    if isinstance(value, list | tuple):
        return type(value)(_no_negative_zero(v) for v in value)
    return value


def _shown(value: Any) -> str:
    """`value` as its JSON spelling where it has one (true, "3", [1, "2"]), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _numeric(annotation: Any) -> bool:
    """Whether a field typed `annotation` holds numbers: int or float, optional, or a list of them."""
    if annotation in (int, float):
        return True
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric(args[0])
    return (
        bool(args)
        and origin in (list, tuple, Union, UnionType)
        and all(_numeric(a) for a in args if a is not ...)
    )


def build_config(cls: type[C], values: Any, where: str) -> C:
    """Validate `values` into `cls`, turning pydantic's error into a one-line ConfigError naming
    `where` (`validation_message` says how each problem is worded)."""
    try:
        return cls.model_validate(values or {})
    except ValidationError as exc:
        raise ConfigError(f"Invalid configuration for {where}: {validation_message(cls, exc)}") from None


def check_typed(cls: type[BaseModel], values: dict[str, Any], where: str) -> None:
    """Validate a file's `values` strictly: TOML and JSON have types, so a quoted number or a
    boolean where a number belongs is a mistake to report (`seeds = [true]` would run seed 1),
    not a value to convert. Values typed on the command line are converted by the CLI instead."""
    try:
        cls.model_validate(values, strict=True)
    except ValidationError as exc:
        raise ConfigError(f"Invalid {where}: {validation_message(cls, exc)}") from None


def validation_message(cls: type[BaseModel], exc: ValidationError) -> str:
    """Every problem of `exc` as `FIELD: what is wrong`, joined by '; ' into one line.

    A value out of bounds is answered with the field's whole valid range, not only the bound it
    crossed ("greater than 0" alone leaves the user guessing the upper end); a field the config
    does not have is answered with the closest one ("did you mean") or, failing that, the list
    of fields, as an unknown plugin name is.
    """
    problems = []
    for loc, message in validation_problems(cls, exc):
        where_in = ".".join(str(p) for p in loc)
        problems.append(f"{where_in}: {message}" if where_in else message)
    return "; ".join(problems)


def validation_problems(
    cls: type[BaseModel], exc: ValidationError
) -> list[tuple[tuple[int | str, ...], str]]:
    """Each problem of `exc` as (location, what is wrong, with the valid range or a field hint)."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")  # our validators' own words
        if err["type"] in _BOUND_ERRORS:
            message += valid_range(cls, loc)
        elif err["type"] == "extra_forbidden" and loc:
            message += _field_hint(cls, loc)
        problems.append((loc, message))
    return problems


def _field_hint(cls: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """' (did you mean 'epochs'?)' or ' (fields: a, b)' for an unknown field at `loc`, or ''."""
    import difflib

    model: Any = cls
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return ""
        model = model.model_fields[str(part)].annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    fields = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (fields: {', '.join(fields)})"


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def valid_range(cls: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """' (valid: 0 < value ≤ 0.5)' for the numeric field at `loc` of `cls`, or '' if unknown."""
    import annotated_types as at

    model: Any = cls
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return ""
        field = model.model_fields[str(part)]
        model = field.annotation
    if field is None:
        return ""
    low = high = ""
    for bound in field.metadata:
        if isinstance(bound, at.Gt):
            low = f"{bound.gt} < "
        elif isinstance(bound, at.Ge):
            low = f"{bound.ge} ≤ "
        elif isinstance(bound, at.Lt):
            high = f" < {bound.lt}"
        elif isinstance(bound, at.Le):
            high = f" ≤ {bound.le}"
    return f" (valid: {low}{loc[-1]}{high})" if low or high else ""


def config_hash(payload: Any) -> str:
    """A stable short hash of any JSON-serialisable payload (configs, cache keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Marks a config field added after results were stored (`Field(..., json_schema_extra=
#: ADDED_FIELD)`): at its default it is left out of a cell's hash, so grids stored before the field
#: existed still resume. Its default must therefore do exactly what the code did without it.
ADDED_FIELD: dict[str, Any] = {"hash_omits_default": True}


def hashed_config(config: BaseModel) -> dict[str, Any]:
    """`config.model_dump()` for a cell's hash: fields marked ADDED_FIELD are left out at their
    default. Stored rows keep the full dump; only the hash, a cell's identity, omits them."""
    dump = config.model_dump()
    for name, field in type(config).model_fields.items():
        extra = field.json_schema_extra
        added = isinstance(extra, dict) and extra.get("hash_omits_default") is True
        if added and name in dump and dump[name] == field.get_default(call_default_factory=True):
            del dump[name]
    return dump


#: Separates a plugin's name from one of its presets: `mcldef:paper`.
PRESET_SEPARATOR = ":"
#: The largest seed: every generator bdtk seeds (torch, NumPy, Python) takes 32 bits, and a larger
#: seed would silently wrap around onto a smaller one, turning different seeds into the same run.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


#: Thread counts every machine accepts: the benchmark default (2) must give the same cells on a
#: one-core machine as elsewhere, slower but reproducible.
ALWAYS_ALLOWED_THREADS = 2


def check_threads(count: int) -> int:
    """`count` torch threads, refused above this machine's cores (the default 2 always passes):
    oversubscribed threads run a cell many times slower, and since results depend on the count it
    is never lowered silently."""
    cores = available_cores()
    if count > max(cores, ALWAYS_ALLOWED_THREADS):
        raise ValueError(
            f"{count} threads is more than the {cores} CPU core(s) this process may use; give at most {cores}"
        )
    return count


def split_preset(choice: str) -> tuple[str, str | None]:
    """`"mcldef:paper"` → `("mcldef", "paper")`; a plain name → `(name, None)`.

    Only the syntax is checked here (one separator, both parts non-empty); whether the plugin
    and its preset exist is the registry's business (`plugins.resolve_config`).
    """
    name, sep, preset = choice.partition(PRESET_SEPARATOR)
    if not sep:
        return choice, None
    if not name or not preset or PRESET_SEPARATOR in preset:
        raise ConfigError(f"{choice!r} is not NAME or NAME:PRESET (e.g. 'mcldef' or 'mcldef:paper').")
    return name, preset


def join_preset(name: str, preset: str | None) -> str:
    """The inverse of `split_preset`: how a plugin with a preset is written and labelled."""
    return name if preset is None else f"{name}{PRESET_SEPARATOR}{preset}"


class PluginChoice(StrictConfig):
    """A plugin by name, optionally one of its named presets, and explicit config values.

    Written as a string (`"mcldef"`, `"mcldef:paper"`) or a table (`name`, `preset`, `config`);
    `name = "mcldef:paper"` is split into name and preset. The values are validated later, against
    the plugin's Config, as defaults ⊕ preset ⊕ `config` (see `plugins.resolve_config`).
    """

    name: str = Field(description="Registered plugin name")
    preset: str | None = Field(default=None, description="One of the plugin's named presets")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Values for its Config (over the preset's values)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            try:
                name, preset = split_preset(value["name"])
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            if preset is not None:
                given = value.get("preset")
                if given is not None and given != preset:
                    raise ValueError(f"name {value['name']!r} and preset {given!r} disagree; give one")
                value = {**value, "name": name, "preset": preset}
        return value

    @property
    def spec(self) -> str:
        """`NAME` or `NAME:PRESET`, as a user writes it."""
        return join_preset(self.name, self.preset)

    @property
    def label(self) -> str:
        """The spec, with the config's hash when explicit values are given."""
        return self.spec if not self.config else f"{self.spec}[{config_hash(self.config)[:6]}]"


class TrainingConfig(StrictConfig):
    """How the (backdoored) model is trained: SGD with momentum and a cosine schedule."""

    epochs: int = Field(default=2, ge=1, le=1000, description="Training epochs")
    batch_size: int = Field(default=128, ge=1, le=8192, description="Batch size")
    lr: float = Field(default=0.05, gt=0, le=10, description="Initial learning rate")
    weight_decay: float = Field(default=5e-4, ge=0, le=1, description="Weight decay")
    augment: bool = Field(default=True, description="Random crop (and flips where they fit)")


class RetuneConfig(StrictConfig):
    """The re-tuning attack that measures post-purification robustness (`asr_retuned`).

    Min et al. (NeurIPS 2024, "superficial safety") show that a purified model with a low ASR can
    relearn its backdoor within a few steps of fine-tuning on a handful of poisoned samples, while
    a model that never learnt it does not: a low ASR after purification may only hide the
    backdoor. Every cell's model (the undefended one included, as the reference) is fine-tuned on
    the same small set: `poisoned` samples of the attack's own poisoned training set mixed with
    `clean` images of the defender's clean budget, for `epochs` passes. The defaults (10 + 190
    images, 4 batches of 50 a pass, 5 passes: 20 SGD steps at lr 0.01) are small enough that a
    clean model barely moves, and they are fixed for every defense of a grid, so the numbers
    compare defenses rather than re-tuning budgets.
    """

    poisoned: int = Field(
        default=10, ge=1, le=10_000, description="Poisoned training samples in the re-tuning set"
    )
    clean: int = Field(
        default=190,
        ge=0,
        le=100_000,
        description="Clean images from the defender's budget in the re-tuning set (at most the budget's "
        "training part)",
    )
    epochs: int = Field(default=5, ge=1, le=100, description="Passes over the re-tuning set")
    batch_size: int = Field(default=50, ge=1, le=4096, description="Batch size")
    lr: float = Field(default=0.01, gt=0, le=1, description="Initial SGD learning rate (cosine decay)")
    weight_decay: float = Field(default=5e-4, ge=0, le=0.1, description="SGD weight decay")
    augment: bool = Field(
        default=False,
        description="Random crop and flips (off: the poisoned samples keep their exact trigger)",
    )


class BenchmarkConfig(StrictConfig):
    """Everything that determines a benchmark run; a config file holds exactly these fields."""

    dataset: str = Field(default="fashion-mnist", description="Dataset name")
    data_dir: str | None = Field(default=None, description="Root of torchvision-format data")
    download: bool = Field(default=False, description="Let torchvision download missing data")
    model: str = Field(default="wrn-16-1", description="Model name from the zoo")
    datasets: list[str] = Field(
        default_factory=list, description="Several datasets for a grid (used instead of `dataset`)"
    )
    models: list[str] = Field(
        default_factory=list, description="Several models for a grid (used instead of `model`)"
    )
    train_size: int | None = Field(
        default=None, ge=100, description="Use a seeded, class-stratified subset of the training set"
    )
    test_size: int | None = Field(
        default=None, ge=100, description="Use a seeded, class-stratified subset of the test set"
    )
    attacks: list[PluginChoice] = Field(
        default_factory=lambda: [PluginChoice(name="badnets")], min_length=1, description="Attacks"
    )
    defenses: list[PluginChoice] = Field(
        default_factory=lambda: [PluginChoice(name="finetune")], description="Defenses"
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [0], min_length=1, description=f"Seeds, each from 0 to {SEED_MAX}"
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Attack training")
    clean_ratio: float = Field(
        default=0.05, gt=0, le=0.5, description="Defender's clean budget, share of the training set"
    )
    val_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="Share of the budget held out for choosing thresholds"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    threads: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="torch CPU threads per cell, wherever it runs (results depend on it, so cells "
        "and cached models record it)",
    )
    retune: RetuneConfig | None = Field(
        default=None,
        description="Re-tune every cell's model on a few poisoned samples and report the ASR after it "
        "(asr_retuned); `true` for the defaults, a table to change them, off by default",
    )
    clean_reference: bool = Field(
        default=False,
        description="Also score a never-backdoored model of each dataset, model and seed with every "
        "attack's trigger: the `clean-model` reference row, the floor an ASR is read against (costs "
        "one clean training per dataset, model and seed)",
    )
    cache_dir: str | None = Field(default=None, description="Artifact cache (default: user cache)")
    output: str = Field(default="bdtk-results/results.json", description="Results JSON path")

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_is_a_folder(cls, value: str | None) -> str | None:
        """Checked before anything trains: every cell would otherwise fail on it, one by one."""
        if value is not None and Path(value).expanduser().is_file():
            raise ValueError(f"{value} is a file; give a folder")
        return value

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, value: int) -> int:
        return check_threads(value)

    @model_validator(mode="after")
    def _no_repeats(self) -> BenchmarkConfig:
        """A repeated seed, attack or defense would compute the same cells again and count them as
        more evidence (a mean ± std over copies); name it instead."""
        lists: dict[str, list[Any]] = {
            "seeds": list(self.seeds),
            "datasets": list(self.datasets),
            "models": list(self.models),
            "attacks": [json.dumps(c.model_dump(), sort_keys=True) for c in self.attacks],
            "defenses": [json.dumps(c.model_dump(), sort_keys=True) for c in self.defenses],
        }
        for field, values in lists.items():
            seen: set[Any] = set()
            for i, value in enumerate(values):
                if value in seen:
                    shown = getattr(self, field)[i]
                    label = (
                        join_preset(shown.name, shown.preset) if isinstance(shown, PluginChoice) else shown
                    )
                    raise ValueError(f"{field} lists {label} more than once; give each one once")
                seen.add(value)
        return self

    @field_validator("retune", mode="before")
    @classmethod
    def _retune_switch(cls, value: Any) -> Any:
        """`retune = true` turns the re-tuning attack on with its defaults, `false` leaves it off."""
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @property
    def grid_datasets(self) -> list[str]:
        return self.datasets or [self.dataset]

    @property
    def grid_models(self) -> list[str]:
        return self.models or [self.model]


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a dict; errors name the file."""
    text = read_text_file(path, "Config file")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"Config file {path}: give a .toml or .json file (other formats are not read).")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            return tomllib.loads(text)
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nesting past Python's stack
        raise ConfigError(f"Cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a table of fields, not {type(data).__name__}.")
    return data


def read_text_file(path: Path, what: str) -> str:
    """A small UTF-8 text file's contents; a folder, binary or unreadable file is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file (a folder?); give the path of a file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read {what.lower()} {path}: {exc.strerror or exc}.") from None
    if len(raw) > 10_000_000:
        raise ConfigError(f"{what} {path} is {len(raw):,} bytes; that is not a config file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text (a binary file?).") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {path} is not a text file (it holds NUL bytes).")
    return text

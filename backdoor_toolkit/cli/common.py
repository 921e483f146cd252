"""What every `bdtk` command shares: the typer app, its shared options, reading `--set`, and turning
bdtk errors into messages."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ..config import SEED_MAX, check_threads
from ..console import console
from ..errors import BdtkError, ConfigError
from ..training import torch_threads

try:  # typer vendors click from 0.2x on; its exceptions are the ones its commands raise
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]


class OneLineUsageErrors(TyperGroup):
    """The `bdtk` group, whose usage errors (an unknown option, a value out of range) are printed as
    one `Error:` line like every other bad input, instead of click's usage line, hint and box."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `bdtk` alone: the help, as asked for
                exc.show()
                sys.exit(exc.exit_code)
            line = escape(usage_error_line(exc))
            console.print(f"[bold red]Error:[/] {line}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            console.print("[yellow]Aborted.[/]")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def usage_error_line(exc: click_exceptions.ClickException) -> str:
    """Click's message on one line, with where to read the command's options."""
    line = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_exceptions.UsageError) and ctx is not None:
        line += f" (see `{ctx.command_path} --help`)"
    return line


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="bdtk: attack, inspect and purify backdoored image classifiers; benchmark defenses.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


# --- options several commands take, defined once so that they are spelled and explained alike ------
# Each command gives its own default in its signature: `bdtk benchmark` uses None ("as the config
# file or suite says"), `bdtk attack` and `bdtk inspect` the config's default.

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Plugin setting PLUGIN.FIELD=VALUE, over any preset; PLUGIN is NAME or NAME:PRESET, and may "
        "be left out for the command's own plugin (the attack in `attack`, the inverter in `inspect`, the "
        "defense in `purify`) "
        "(repeatable)",
    ),
]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps")]
DataDirOption = Annotated[str | None, typer.Option(help="Root of torchvision-format datasets")]
DownloadOption = Annotated[bool, typer.Option(help="Let torchvision download missing datasets")]
CacheDirOption = Annotated[str | None, typer.Option(help="Artifact cache directory")]
SeedOption = Annotated[
    int,
    typer.Option(
        min=0,
        max=SEED_MAX,
        help="Seed of everything drawn or trained (poisoning, training, budget, inversion)",
    ),
]
SeedsOption = Annotated[
    list[int] | None, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed (repeatable)")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=1024,
        help="Torch CPU threads (default: torch's own, i.e. the cores or OMP_NUM_THREADS). A trained model's "
        "cache key records the count, since floats differ with it: `bdtk benchmark` trains with 2, so "
        "`--threads 2` reuses its models",
        show_default=False,
    ),
]


def with_threads(fn: F) -> F:
    """Run a command that takes `threads: ThreadsOption` with that many torch threads, restoring the
    count afterwards (commands also run inside one process: tests, notebooks); torch's default when
    the option is not given."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count = kwargs.get("threads")
        if count is None:
            return fn(*args, **kwargs)
        try:
            check_threads(count)
        except ValueError as exc:
            raise ConfigError(f"--threads {count}: {exc}.") from None
        with torch_threads(count):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --- the model and data options of the commands that take a user's model file (inspect, purify) ----

ArchitectureOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Architecture of MODEL_FILE: a zoo name (`bdtk models`), torchvision:NAME (any torchvision "
        "classifier, never with downloaded weights) or MODULE:FACTORY (a function returning an nn.Module; "
        "MODULE may be a .py file); default: the `architecture` in the JSON beside the file, else wrn-16-1",
        show_default=False,
    ),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        "--dataset",
        help="Clean data: a dataset name (`bdtk datasets`; the clean budget is --clean-ratio of its training "
        "split) or folder:PATH (class sub-folders, all of it the clean budget); default: a victim's own "
        "clean images, else fashion-mnist",
        show_default=False,
    ),
]
#: The clean data of a model file when `--data` is left out (a victim brings its own).
DEFAULT_DATA = "fashion-mnist"
TestDataOption = Annotated[
    str | None,
    typer.Option(help="A test set, folder:PATH with the clean folder's classes; reported before and after"),
]
ImageSizeOption = Annotated[
    str | None,
    typer.Option(
        help="Resize folder images to N or HxW pixels (default: the `image_size` in the JSON beside the "
        "model file, else the size all the images share)",
        show_default=False,
    ),
]
FeatureLayerOption = Annotated[
    str | None,
    typer.Option(
        help="Module of a non-zoo model whose output is its penultimate representation (default: the "
        "input of its last nn.Linear)",
        show_default=False,
    ),
]
MeanOption = Annotated[
    str | None,
    typer.Option(
        help="Per-channel mean the model normalises with, comma-separated (e.g. 0.485,0.456,0.406); "
        "default: the JSON beside the file, a zoo model's own, else none",
        show_default=False,
    ),
]
StdOption = Annotated[
    str | None,
    typer.Option(help="Per-channel std, comma-separated; default as for --mean", show_default=False),
]
ValFractionOption = Annotated[
    float, typer.Option(help="Share of the clean budget held out (never trained on) to measure and tune on")
]


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """`--mean 0.485,0.456,0.406` as numbers; a malformed list is one clear error."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(
            f"{option} expects comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}."
        ) from None
    if not values:
        raise ConfigError(f"{option} expects comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}.")
    return values


DEBUG_ENV = "BDTK_DEBUG"


def user_errors(fn: F) -> F:
    """Every way a command can stop, as one line and an exit code; never a traceback.

    bdtk's own errors exit 2; a file the system refuses (permissions, a folder where a file was
    expected, a full disk) exits 2 naming the path; Ctrl-C exits 130 and SIGTERM 143. Anything else
    is a bug (in bdtk or a plugin): one line saying so, exit 1, and the traceback only with
    BDTK_DEBUG=1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminate_as_interrupt():
                return fn(*args, **kwargs)
        except BdtkError as exc:
            console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            console.print(
                f"[bold red]Error:[/] {escape(str(exc.strerror or exc) + where)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except Terminated:
            console.print("[yellow]Terminated.[/]")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            console.print(
                f"[bold red]Unexpected error:[/] {type(exc).__name__}: {escape(detail)} (a bug in bdtk or a "
                f"plugin; run with {DEBUG_ENV}=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so a command stops as cleanly as on Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) instead of killing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, booleans, lists), else the plain string; `inf`
    and `nan` as the floats they name (a config then refuses them as not finite, where a string
    would be refused as a quoted number)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"--set value nests too deeply to read ({text[:40]}…).") from None
    except json.JSONDecodeError:
        if text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
            return float(text.strip())
        return text


def parse_settings(items: list[str], attack: str | None = None) -> dict[str, Any]:
    """`--set FIELD=VALUE` (or `ATTACK.FIELD=VALUE`, as `bdtk benchmark` spells it) as a dict.

    With `attack` given as `NAME:PRESET`, both `NAME.FIELD` and `NAME:PRESET.FIELD` are accepted,
    as `bdtk benchmark` accepts them.
    """
    prefixes = [] if not attack else [f"{attack}.", f"{attack.partition(':')[0]}."]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                break
        if not sep or not key:
            raise ConfigError(f"--set expects FIELD=VALUE (e.g. alpha=0.1), got {item!r}.")
        set_once(out, key, parse_value(raw), item)
    return out


def set_once(values: dict[str, Any], field: str, value: Any, item: str) -> None:
    """Record `field` = `value`, refusing a field given twice: which one counts would be a guess."""
    if field in values and values[field] != value:
        raise ConfigError(
            f"--set {item!r}: {field} is already set to {json.dumps(values[field], default=str)}; give "
            "each field once."
        )
    values[field] = value


def merge_options(values: dict[str, Any], options: dict[str, tuple[str, Any]]) -> None:
    """Put the values of a command's own options (`{"steps": ("--steps", 2)}`, None: not given)
    into `values`, refusing a field that `--set` gave a different value too: keeping either one
    in silence would run with a setting the user did not mean."""
    for field, (option, value) in options.items():
        if value is None:
            continue
        if field in values and values[field] != value:
            raise ConfigError(
                f"{option} {json.dumps(value, default=str)} and --set {field}="
                f"{json.dumps(values[field], default=str)} both set {field}; give it once."
            )
        values[field] = value


def split_settings(items: list[str], plugins: Sequence[str], default: str) -> dict[str, dict[str, Any]]:
    """`--set` items sorted by the plugin they set: `PLUGIN.FIELD=VALUE`, or `FIELD=VALUE` for `default`.

    `plugins` are the command's choices as NAME or NAME:PRESET (`default` among them); an item's
    PLUGIN may be a whole choice or its NAME, as `bdtk benchmark` accepts it. Every command spells
    settings this way. An item naming a plugin the command does not run is an error that lists
    those it does, so a typo never silently sets nothing.
    """
    out: dict[str, dict[str, Any]] = {p: {} for p in plugins}
    for item in items:
        key, sep, raw = item.partition("=")
        plugin, dot, field = key.rpartition(".")
        if not dot:
            plugin = default
        if not sep or not field or not plugin:
            raise ConfigError(
                f"--set expects PLUGIN.FIELD=VALUE or FIELD=VALUE (FIELD alone sets {default!r}), "
                f"got {item!r}."
            )
        chosen = next((p for p in plugins if plugin in (p, p.partition(":")[0])), None)
        if chosen is None:
            raise ConfigError(
                f"--set {item!r}: no plugin named {plugin!r} in this command; it runs "
                f"{', '.join(map(repr, plugins))}."
            )
        set_once(out[chosen], field, parse_value(raw), item)
    return out

"""Checks on the paths a command writes to, run before any work: one rule for every output.

A path written at the end of a long run must be known to work before the run starts: a bad one
otherwise costs the training (and, with several outputs, the ones after it). At most one new
folder is made, as `mkdir` without `-p` would: a file's own folder (`--out purified/m.safetensors`)
or the folder an option names (`--out DIR`), inside a folder that exists. A typo such as
`/nonexistdir/sub/a.csv` would otherwise leave new directory trees in arbitrary places; only a
command's own default folder (`bdtk-results/inspect`) may bring its parent along. Every command
(`benchmark --output`, `purify --out`, `inspect --out`, `leaderboard`, `attack`) and the library's
own writers (`PurifyReport.save`) check through here.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import BdtkError

#: Image formats a trigger grid may be written as (PIL picks the format from the extension).
GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def _check_folder_of(path: Path, option: str, may_create: bool) -> None:
    """`path`'s folder exists and is writable, or (with `may_create`) can be created in one step."""
    parent = path.parent
    if may_create and not parent.exists():
        _check_folder_of(parent, option, may_create=False)
        return
    if not parent.exists():
        raise BdtkError(
            f"{option} {path}: folder {parent} does not exist; create it first or give a path in an "
            "existing folder."
        )
    if not parent.is_dir():
        raise BdtkError(f"{option} {path}: {parent} is a file, not a folder.")
    _refuse_read_only(path, option)


def _refuse_read_only(path: Path, what: str) -> None:
    """`path` and its folder, where they exist, must be writable, and `path` a regular file: the
    atomic write would replace a device or pipe (`/dev/null`, even) by a plain file."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise BdtkError(f"{what} {path} is not a regular file (a device or a pipe); give a file path.")
    for target in (path.parent, path):
        if target.exists() and not os.access(target, os.W_OK):
            raise BdtkError(f"Cannot write {what} {path}: {target} is read-only; choose another path.")
    _probe_folder(path if path.is_dir() else path.parent, path, what)


def _probe_folder(folder: Path, path: Path, what: str) -> None:
    """Create and remove a file in `folder`: permission bits do not tell (root passes `os.access`
    on /sys or /proc, a read-only mount, a quota), and the write that fails must not be the one
    at the end of the run."""
    if not folder.is_dir():
        return
    probe = folder / f".bdtk-write-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise BdtkError(
            f"Cannot write {what} {path}: {folder} does not accept new files ({exc.strerror or exc}); "
            "choose another path."
        ) from None
    os.close(fd)
    probe.unlink(missing_ok=True)


@contextmanager
def naming_output(path: Path) -> Iterator[None]:
    """Make an OSError raised while writing `path` name it: a full disk's error names no file, and
    an atomic writer's names its temporary file, neither of which tells the user which output
    failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or str(exc.filename).endswith(".tmp"):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same inode when both exist (links, `..`, another
    spelling), else the same resolved path."""
    a, b = a.expanduser(), b.expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:  # a link loop: then it is not a file anyone reads
        return False


def refuse_inputs(path: Path, option: str, inputs: Mapping[str, Path | None]) -> None:
    """Refuse an output that is a file the same command reads: writing it would destroy the input
    (a leaderboard's CSV written over the result database it reads, every stored cell gone)."""
    for what, source in inputs.items():
        if source is not None and same_file(path, source):
            raise BdtkError(
                f"{option} {path} is the {what} this command reads; writing it would destroy it. "
                "Give another path."
            )


def check_output_file(
    path: Path,
    option: str,
    *,
    extensions: Collection[str] | None = None,
    inputs: Mapping[str, Path | None] | None = None,
) -> None:
    """Refuse a file output that could not be written or must not be: a folder, a file the command
    reads (`inputs`, by what it is: {"result database": db}), an extension the writer does not
    know (`extensions`, compared case-insensitively), a read-only folder, or a folder that is
    missing and whose own parent is missing too (the writer creates one missing folder)."""
    if str(path) == "-":
        raise BdtkError(f"{option} -: bdtk writes files, not standard output; give a file path.")
    if path.is_dir():
        raise BdtkError(f"{option} {path} is a folder; give a file path.")
    refuse_inputs(path, option, inputs or {})
    if extensions is not None and path.suffix.lower() not in extensions:
        what = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise BdtkError(
            f"{option} {path} has {what}; give one of {', '.join(extensions)} (e.g. "
            f"{path.stem}{next(iter(extensions))})."
        )
    _check_folder_of(path, option, may_create=True)


def check_output_folder(path: Path, option: str, *, default: Path | str | None = None) -> None:
    """Refuse a folder output that could not be written: a file, or a folder whose parent is
    missing or read-only. The folder itself may be new (the command creates it), and so may its
    parents when it is the command's `default`."""
    if path.exists() and not path.is_dir():
        raise BdtkError(f"{option} {path} is a file; give a folder.")
    if path.is_dir():
        _refuse_read_only(path, option)
        return
    _check_folder_of(path, option, may_create=default is not None and path == Path(default))

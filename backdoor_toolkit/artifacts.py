"""The artifact cache: tensors as safetensors plus JSON metadata, never an unsafe pickle.

An entry `KEY` is `KEY.safetensors` and `KEY.json`. The JSON holds the key, the metadata, the
SHA-256 of the tensor file and a digest over all three, so an edited value (`train_seconds`), a
renamed entry or weights that do not belong to the metadata are all caught on load, reported once
and returned as a miss, which makes the caller rebuild the entry. Loading also refuses metadata
that lacks a field the caller needs and tensors holding NaN or infinity.

Writers go through uniquely named temporary files in the cache directory and `os.replace` them
into place, weights first and JSON last, so concurrent writers never clobber each other's
half-written files. The two renames happen under an exclusive lock on the directory's `.lock`
file and readers read both files under a shared one, so nobody sees (or leaves) the weights of one
writer beside the JSON of another. Where locks are unavailable (Windows, some network file
systems) a reader that finds the files disagreeing waits and reads again before calling the entry
corrupt.

`BDTK_CACHE_DIR` moves the cache; `BDTK_NO_CACHE=1` turns reads and writes off (while developing a
plugin whose trigger keeps changing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from rich.markup import escape
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from .console import console
from .errors import BdtkError
from .output_paths import naming_output

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: readers fall back to reading again
    fcntl = None  # type: ignore[assignment]

#: Set to 1 (or true/yes/on) to neither read nor write cached models.
NO_CACHE_ENV = "BDTK_NO_CACHE"
#: The record layout inside KEY.json; a different one is treated as corrupt (and rebuilt).
RECORD_FORMAT = 2
#: Waits between reads while the files disagree because a writer may be between its two renames;
#: the same two disagreeing files for `_SETTLE_SECONDS` or longer mean a corrupt entry.
_RETRY_DELAYS = (0.01, 0.02, 0.04, 0.08, 0.16)
_SETTLE_SECONDS = 0.05

FieldType = type | tuple[type, ...]


def default_cache_dir() -> Path:
    env = os.environ.get("BDTK_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("bdtk"))


def cache_disabled() -> bool:
    """Whether `BDTK_NO_CACHE` asks for no model caching (any value but empty, 0, false, no, off)."""
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def check_writable_folder(folder: Path, what: str, hint: str = "") -> None:
    """Create `folder` if needed and prove a file can be written in it, before any work: a result
    that took minutes to compute must not be lost to an output path that was never writable."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BdtkError(f"{folder} is a file; {what} needs a folder there{hint}.")
    probe = folder / f".bdtk-write-test-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise BdtkError(f"Cannot write {what} in {folder}: {exc.strerror or exc}{hint}.") from None


def non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or ±inf, else None.

    A diverged model is worse than no model: cached, it would be reused by every later run.
    """
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _digest(key: str, tensors_sha256: str, metadata: Any) -> str:
    """What KEY.json vouches for: its key, its metadata and the exact bytes of KEY.safetensors."""
    text = f"{RECORD_FORMAT}\n{tensors_sha256}\n{_canonical({'key': key, 'metadata': metadata})}"
    return hashlib.sha256(text.encode()).hexdigest()


def _temporary(directory: Path, name: str) -> tuple[int, Path]:
    """A new, uniquely named file in `directory` (so `os.replace` stays on one file system).

    Created with O_EXCL and mode 0o666, so the umask applies as for any file and no two writers
    (threads, processes or machines sharing the directory) can ever get the same one.
    """
    while True:
        path = directory / f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def _write_temporary(path: Path, data: bytes) -> Path:
    """`data` in a new uniquely named file beside `path` (removed again if writing fails).

    An OSError names `path`, the file the user asked for, not the temporary one (`naming_output`)."""
    with naming_output(path):
        fd, tmp = _temporary(path.parent, path.name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp


def _write_replace(path: Path, data: bytes) -> None:
    """Write `data` to a unique temporary file beside `path`, then rename it over `path`.

    The temporary file is removed when anything fails, so failures leave no debris.
    """
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` by `text` atomically: readers see the old or the new file, never a part.

    Safe with concurrent writers of the same path (each uses its own temporary file; the last
    rename wins). Creates the parent directory. No fsync: this guards against interleaving, not
    against power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_replace(path, text.encode(encoding))


def write_all_or_none(files: Mapping[Path, bytes]) -> None:
    """Write every file or none: each goes to a temporary file beside its target first, and only
    when all are written are they renamed into place.

    A disk that fills (or a folder that turns read-only) half-way through a set of exports would
    otherwise leave some files new, some old and one truncated: a leaderboard's Markdown from one
    store beside its CSV from another. The error names the file whose write failed; a previous
    export stays whole. Renames within a folder do not need space, so the second phase does not
    meet the first one's failures.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append((_write_temporary(path, data), path))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for index, (tmp, path) in enumerate(written):
        try:
            with naming_output(path):
                os.replace(tmp, path)
        except BaseException:
            for left, _ in written[index:]:
                left.unlink(missing_ok=True)
            raise


def json_text(value: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """`value` as strict JSON: NaN and ±inf become null (Python's json would write bare `NaN`,
    which is not JSON and which other readers reject), the rest as `json.dumps` writes it."""

    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    # a round trip through json first, so `default`'s conversions are cleaned as well
    plain = json.loads(json.dumps(value, default=default))
    return json.dumps(finite(plain), indent=indent, allow_nan=False)


class CorruptEntry(ValueError):
    """A cache entry that cannot be trusted; the message says why."""


class _Mismatch(CorruptEntry):
    """KEY.json and KEY.safetensors disagree: corrupt, or a writer caught between its renames."""


@dataclass(frozen=True)
class _Snapshot:
    """The bytes of both files of an entry and the identity of the files they were read from."""

    record: bytes
    weights: bytes
    identity: tuple[tuple[int, int, int, int], ...]


def _read(path: Path) -> tuple[bytes, tuple[int, int, int, int]]:
    with path.open("rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _is_instance(value: Any, types: FieldType) -> bool:
    """isinstance, except that a bool is not accepted as a number (JSON `true` is no duration)."""
    wanted = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and (bool in wanted or not isinstance(value, bool))


def _type_names(types: FieldType) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


class ArtifactCache:
    """Cached tensors with metadata under `root`; `enabled=False` (or BDTK_NO_CACHE=1) turns it off."""

    def __init__(self, root: Path | None = None, *, enabled: bool | None = None) -> None:
        self.root = (root or default_cache_dir()).expanduser()
        if self.root.exists() and not self.root.is_dir():  # else a model is trained, then lost
            raise BdtkError(f"The artifact cache {self.root} is a file; give a folder (--cache-dir).")
        self.enabled = not cache_disabled() if enabled is None else enabled
        if self.enabled:  # an unwritable cache is found now, not after the training it would keep
            hint = "; give another --cache-dir, or set BDTK_NO_CACHE=1 to train without caching"
            check_writable_folder(self.root, "the artifact cache", hint)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def save(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        """Store an entry (replacing any old one); a no-op when the cache is disabled.

        Raises ValueError for NaN/inf tensors: `load` would refuse them anyway, so storing them
        could only hide the failure until the next run. A write that fails (a full disk, a folder
        made read-only since the start) is a warning: the cache only saves time, and the model
        just trained is still good, so the run goes on with it instead of failing its cell.
        """
        try:
            self._save(key, tensors, metadata)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            line = (
                f"Could not cache {key} in {self.root} ({reason}); going on without caching it. "
                "Free space there or give another --cache-dir."
            )
            console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)

    def _save(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        bad = non_finite(cpu)
        if bad is not None:
            raise ValueError(f"refusing to cache {key}: tensor {bad!r} holds NaN or inf")
        # the JSON form of the metadata, so that what `save` hashes is exactly what `load` reads back
        plain = json.loads(json.dumps(dict(metadata), default=str))
        data = save_bytes(cpu)
        sha = hashlib.sha256(data).hexdigest()
        record = {
            "format": RECORD_FORMAT,
            "key": key,
            "sha256": sha,
            "metadata": plain,
            "digest": _digest(key, sha, plain),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        weights, meta = self._paths(key)
        temporary: list[Path] = []
        try:  # the slow part, writing, outside the lock; only the renames inside it
            temporary.append(_write_temporary(weights, data))
            temporary.append(_write_temporary(meta, json.dumps(record, indent=2, sort_keys=True).encode()))
            with self._locked(exclusive=True):
                os.replace(temporary[0], weights)  # weights first: the JSON vouches for them
                os.replace(temporary[1], meta)
        finally:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)  # only left when something failed

    def load(
        self,
        key: str,
        *,
        require_metadata: Mapping[str, FieldType] | None = None,
        require_tensors: Collection[str] = (),
    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The entry's tensors and metadata, or None: absent, disabled, or corrupt (then reported
        in one line and removed, so the caller rebuilds it).

        `require_metadata` maps metadata fields the caller reads to their types and
        `require_tensors` names tensors it reads: an entry lacking one is corrupt too, so a caller
        never fails half-way through using a hit.
        """
        if not self.enabled:
            return None
        seen: object = None  # the identity of the disagreeing files, and for how long it held
        unchanged_for = 0.0
        for delay in (*_RETRY_DELAYS, None):
            snapshot = self._snapshot(key)
            if snapshot is None:
                return None
            try:
                return self._verify(key, snapshot, require_metadata or {}, require_tensors)
            except _Mismatch as exc:
                if snapshot.identity != seen:
                    seen, unchanged_for = snapshot.identity, 0.0
                elif unchanged_for >= _SETTLE_SECONDS:  # no writer is on its way: really corrupt
                    self._corrupt(key, str(exc), snapshot)
                    return None
                if delay is None:  # the files kept changing under us: a miss, not corruption
                    return None
                time.sleep(delay)
                unchanged_for += delay
            except CorruptEntry as exc:
                self._corrupt(key, str(exc), snapshot)
                return None
        return None  # pragma: no cover - the loop always returns

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the cache directory's lock (shared for reading an entry, exclusive for replacing
        or removing one); without one where the platform or file system offers none."""
        fd: int | None = None
        if fcntl is not None:
            try:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError:  # no directory yet, read-only, or no locks on this file system
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def _snapshot(self, key: str) -> _Snapshot | None:
        weights, meta = self._paths(key)
        if not meta.exists():
            return None
        try:
            with self._locked(exclusive=False):
                record, meta_id = _read(meta)
                data, weights_id = _read(weights)
        except FileNotFoundError:  # absent, half there, or just removed by another reader
            return None
        return _Snapshot(record, data, (meta_id, weights_id))

    def _verify(
        self,
        key: str,
        snapshot: _Snapshot,
        require_metadata: Mapping[str, FieldType],
        require_tensors: Iterable[str],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        try:
            record = json.loads(snapshot.record)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptEntry(f"unreadable metadata: {exc}") from None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise CorruptEntry("metadata in an unknown layout")
        metadata, sha, digest = record.get("metadata"), record.get("sha256"), record.get("digest")
        if record.get("key") != key or not isinstance(metadata, dict):
            raise CorruptEntry("metadata belongs to another entry or is malformed")
        if not (isinstance(sha, str) and isinstance(digest, str)):
            raise CorruptEntry("checksum missing")
        if digest != _digest(key, sha, metadata):
            raise CorruptEntry("checksum mismatch: the metadata changed since it was written")
        if sha != hashlib.sha256(snapshot.weights).hexdigest():
            raise _Mismatch("checksum mismatch: the tensor file does not match its metadata")
        try:
            tensors = load_bytes(snapshot.weights)
        except (SafetensorError, ValueError, OSError) as exc:  # a well-formed digest of a bad file
            raise CorruptEntry(f"unreadable tensors: {exc}") from None
        bad = non_finite(tensors)
        if bad is not None:
            raise CorruptEntry(f"tensor {bad!r} holds NaN or inf")
        for name in require_tensors:
            if name not in tensors:
                raise CorruptEntry(f"tensor {name!r} missing")
        for name, types in require_metadata.items():
            if name not in metadata:
                raise CorruptEntry(f"metadata field {name!r} missing")
            if not _is_instance(metadata[name], types):
                raise CorruptEntry(f"metadata field {name!r} is {metadata[name]!r}, not {_type_names(types)}")
        return tensors, metadata

    def discard(self, key: str, reason: str) -> None:
        """Report a loaded entry as corrupt (e.g. its tensors do not fit the model) and remove it."""
        self._corrupt(key, reason, None)

    def _corrupt(self, key: str, reason: str, snapshot: _Snapshot | None) -> None:
        console.print(
            f"[yellow]{escape(f'Cache entry {key} is corrupt ({reason}); rebuilding it.')}[/]", soft_wrap=True
        )
        if snapshot is None:
            self.remove(key)
            return
        # remove only the files that were judged: a writer may have replaced them meanwhile
        meta_id, weights_id = snapshot.identity
        weights, meta = self._paths(key)
        with self._locked(exclusive=True):
            for path, seen in ((meta, meta_id), (weights, weights_id)):
                if _identity(path) == seen:
                    path.unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        with self._locked(exclusive=True):
            for path in self._paths(key):
                path.unlink(missing_ok=True)

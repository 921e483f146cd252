"""The artifact cache: tensors as safetensors plus JSON metadata, never an unsafe pickle.

An entry `KEY` is `KEY.safetensors` and `KEY.json`; the JSON records the SHA-256 of the tensor
file, so a corrupt or tampered entry is detected on load, reported, and rebuilt by the caller.
Writes go to a temporary file first and are renamed into place, so an interrupted run never
leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import platformdirs
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .console import console


def default_cache_dir() -> Path:
    env = os.environ.get("BDTK_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("bdtk"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()).expanduser()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def save(self, key: str, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        weights, meta = self._paths(key)
        tmp_weights = weights.with_suffix(".safetensors.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_weights))
        record = {"key": key, "sha256": _sha256(tmp_weights), "metadata": metadata}
        tmp_meta = meta.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(tmp_weights, weights)
        os.replace(tmp_meta, meta)

    def load(self, key: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The entry's tensors and metadata; None when absent, corrupt or tampered (then removed)."""
        weights, meta = self._paths(key)
        if not (weights.exists() and meta.exists()):
            return None
        try:
            record = json.loads(meta.read_text())
            if record.get("sha256") != _sha256(weights):
                raise ValueError("checksum mismatch (file changed since it was written)")
            tensors = load_file(str(weights))
        except (ValueError, KeyError, OSError, SafetensorError) as exc:
            console.print(f"[yellow]Cache entry {key} is corrupt ({exc}); rebuilding it.[/]")
            self.remove(key)
            return None
        return tensors, record["metadata"]

    def remove(self, key: str) -> None:
        for path in self._paths(key):
            path.unlink(missing_ok=True)

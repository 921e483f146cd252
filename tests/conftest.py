"""Test-wide settings: quiet progress bars and a private artifact cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("BDTK_QUIET", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's cache; one cache per session so tests can share trained models."""
    root = tmp_path_factory.getbasetemp() / "bdtk-cache"
    monkeypatch.setenv("BDTK_CACHE_DIR", str(root))
    # and never the user's result database: one fresh database per test
    monkeypatch.setenv("BDTK_DB", str(tmp_path_factory.mktemp("bdtk-db") / "results.sqlite"))
    return root

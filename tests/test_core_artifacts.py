from __future__ import annotations

import torch

from backdoor_toolkit.artifacts import ArtifactCache


def test_round_trip(tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.arange(6.0).view(2, 3)}, {"seed": 1})
    hit = cache.load("k")
    assert hit is not None
    assert torch.equal(hit[0]["w"], torch.arange(6.0).view(2, 3))
    assert hit[1] == {"seed": 1}
    assert cache.load("missing") is None


def test_tampered_entry_is_detected_and_removed(tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.zeros(100)}, {})
    path = tmp_path / "k.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.load("k") is None
    assert not path.exists()


def test_truncated_entry_is_detected(tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.zeros(100)}, {})
    (tmp_path / "k.json").write_text("{not json")
    assert cache.load("k") is None

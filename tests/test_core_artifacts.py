from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from bdtk_attacks.badnets import BadNets
from bdtk_attacks.wanet import WaNet
from safetensors.torch import save as save_bytes

from backdoor_toolkit import Attack, BdtkError, artifacts, backdoor
from backdoor_toolkit.artifacts import ArtifactCache, atomic_write_text, json_text
from backdoor_toolkit.backdoor import BackdooredModel, backdoored_model
from backdoor_toolkit.config import TrainingConfig
from backdoor_toolkit.data import Dataset
from backdoor_toolkit.plugins import IN_PROCESS, PluginInfo, Source
from backdoor_toolkit.testing import TINY_SPEC, tiny_images


def test_round_trip(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.arange(6.0).view(2, 3)}, {"seed": 1})
    hit = cache.load("k")
    assert hit is not None
    assert torch.equal(hit[0]["w"], torch.arange(6.0).view(2, 3))
    assert hit[1] == {"seed": 1}
    assert cache.load("missing") is None


def test_tampered_entry_is_detected_and_removed(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.zeros(100)}, {})
    path = tmp_path / "k.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.load("k") is None
    assert not path.exists()


def test_truncated_entry_is_detected(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.zeros(100)}, {})
    (tmp_path / "k.json").write_text("{not json")
    assert cache.load("k") is None


# --- the checksum covers the metadata; loaders state what they need ------------------------------


def _forge(root: Path, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """A well-formed entry that bypasses `save`'s checks (NaN tensors): what a buggy writer could leave."""
    data = save_bytes(tensors)
    sha = hashlib.sha256(data).hexdigest()
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{key}.safetensors").write_bytes(data)
    record = {
        "format": artifacts.RECORD_FORMAT,
        "key": key,
        "sha256": sha,
        "metadata": metadata,
        "digest": artifacts._digest(key, sha, metadata),
    }
    (root / f"{key}.json").write_text(json.dumps(record))


def _edit_metadata(root: Path, key: str, **changes: Any) -> None:
    path = root / f"{key}.json"
    record = json.loads(path.read_text())
    record["metadata"].update(changes)
    path.write_text(json.dumps(record))


def _files(root: Path) -> list[str]:
    """The cache directory's files, less its lock file."""
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


@pytest.mark.parametrize("value", [9999, "fast", None])
def test_edited_metadata_is_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.ones(3)}, {"train_seconds": 1.5})
    _edit_metadata(tmp_path, "k", train_seconds=value)
    assert cache.load("k") is None
    assert (
        "Cache entry k is corrupt (checksum mismatch: the metadata changed since it was written); "
        "rebuilding it." in _said(capsys)
    )
    assert not (tmp_path / "k.json").exists() and not (tmp_path / "k.safetensors").exists()


def test_an_entry_copied_under_another_key_is_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("a", {"w": torch.ones(3)}, {})
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"b{suffix}").write_bytes((tmp_path / f"a{suffix}").read_bytes())
    assert cache.load("b") is None
    assert "Cache entry b is corrupt (metadata belongs to another entry" in _said(capsys)
    assert cache.load("a") is not None


def test_weights_from_another_save_are_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("k", {"w": torch.ones(3)}, {"n": 1})
    old_json = (tmp_path / "k.json").read_bytes()
    cache.save("k", {"w": torch.zeros(3)}, {"n": 2})
    (tmp_path / "k.json").write_bytes(old_json)  # e.g. a writer killed between its two renames
    assert cache.load("k") is None
    assert "the tensor file does not match its metadata" in _said(capsys)


def test_loader_requirements(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ArtifactCache(tmp_path)
    need: dict[str, Any] = {"require_metadata": {"train_seconds": (int, float)}, "require_tensors": ["idx"]}
    cache.save("ok", {"idx": torch.arange(3)}, {"train_seconds": 2})
    assert cache.load("ok", **need) is not None
    cache.save("no-field", {"idx": torch.arange(3)}, {})
    assert cache.load("no-field", **need) is None
    cache.save("bad-type", {"idx": torch.arange(3)}, {"train_seconds": "fast"})
    assert cache.load("bad-type", **need) is None
    cache.save("bool", {"idx": torch.arange(3)}, {"train_seconds": True})
    assert cache.load("bool", **need) is None
    cache.save("no-tensor", {"w": torch.ones(1)}, {"train_seconds": 1.0})
    assert cache.load("no-tensor", **need) is None
    said = _said(capsys)
    assert "Cache entry no-field is corrupt (metadata field 'train_seconds' missing); rebuilding it." in said
    assert (
        "Cache entry bad-type is corrupt (metadata field 'train_seconds' is 'fast', not int or float)" in said
    )
    assert "Cache entry no-tensor is corrupt (tensor 'idx' missing); rebuilding it." in said


def test_non_finite_tensors_are_neither_saved_nor_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(ValueError, match="'w' holds NaN or inf"):
        cache.save("k", {"w": torch.tensor([1.0, float("nan")])}, {})
    assert _files(tmp_path) == []
    _forge(tmp_path, "k", {"i": torch.arange(2), "w": torch.tensor([float("inf")])}, {})
    assert cache.load("k") is None
    assert "Cache entry k is corrupt (tensor 'w' holds NaN or inf); rebuilding it." in _said(capsys)
    assert _files(tmp_path) == []


def test_no_cache_env_disables_reads_and_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ArtifactCache(tmp_path).save("k", {"w": torch.ones(1)}, {})
    monkeypatch.setenv("BDTK_NO_CACHE", "1")
    off = ArtifactCache(tmp_path)
    assert not off.enabled and off.load("k") is None
    off.save("other", {"w": torch.ones(1)}, {})
    assert _files(tmp_path) == ["k.json", "k.safetensors"]
    monkeypatch.setenv("BDTK_NO_CACHE", "0")
    assert ArtifactCache(tmp_path).load("k") is not None


# --- concurrent writers -----------------------------------------------------------------------


@pytest.mark.parametrize("locks", [True, False], ids=["locked", "no-locks"])
def test_concurrent_writers_and_readers_of_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: bool
) -> None:
    """8 threads × 25 save+load of one key: no exception, no debris, every hit self-consistent;
    also where the file system offers no locks (then a load may miss, but never mismatch)."""
    if not locks:
        monkeypatch.setattr(artifacts, "fcntl", None)
    cache = ArtifactCache(tmp_path)
    errors: list[BaseException] = []
    hits = 0
    lock = threading.Lock()

    def work(writer: int) -> None:
        nonlocal hits
        try:
            for n in range(25):
                value = writer * 100 + n
                cache.save("k", {"w": torch.full((16,), float(value))}, {"value": value})
                hit = cache.load("k")
                if hit is not None:
                    tensors, meta = hit
                    assert torch.equal(tensors["w"], torch.full((16,), float(meta["value"])))
                    with lock:
                        hits += 1
        except BaseException as exc:  # collected: a failing thread must fail the test
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert hits == 200 if locks and artifacts.fcntl is not None else hits > 0
    assert time.perf_counter() - start < 10
    assert _files(tmp_path) == ["k.json", "k.safetensors"]  # no temp files
    final = cache.load("k")
    assert final is not None and torch.equal(final[0]["w"], torch.full((16,), float(final[1]["value"])))


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", refuse)
    ArtifactCache(tmp_path).save("k", {"w": torch.ones(1)}, {})  # the cache warns; the run goes on
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(tmp_path / "results.json", "{}")
    assert _files(tmp_path) == []


def test_atomic_write_text_with_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    texts = [json.dumps({"writer": i, "rows": list(range(2000))}) for i in range(8)]

    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(25):
                atomic_write_text(path, text)
        except BaseException as exc:  # collected: a failing thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert path.read_text() in texts
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not mkstemp's 0o600


# --- cached models: backdoor.clean_model / backdoored_model ------------------------------------


@pytest.fixture
def tiny_data() -> Dataset:
    return Dataset(TINY_SPEC, tiny_images(), tiny_images(seed=1))


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Training replaced by a counter (the model keeps its initial weights): caching is under test."""
    calls: list[str] = []

    def fit(self: Attack, model: torch.nn.Module, poisoned: Any, settings: Any) -> None:
        calls.append(self.name)

    monkeypatch.setattr(Attack, "fit", fit)
    monkeypatch.setattr(WaNet, "fit", fit)
    return calls


def _victim(data: Dataset, cache: ArtifactCache, attack: Attack | None = None) -> BackdooredModel:
    attack = attack or BadNets(BadNets.Config(), TINY_SPEC, seed=0)
    return backdoored_model(data, "small-cnn", attack, TrainingConfig(), torch.device("cpu"), cache)


def _fake_source(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    info = PluginInfo("attack", "badnets", BadNets, Source("attacks", "bdtk-fake", version))
    monkeypatch.setattr(backdoor, "get_plugin", lambda kind, name: info)


@pytest.mark.parametrize("value", [9999, "fast"])
def test_edited_train_seconds_is_rebuilt_not_used(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    cache = ArtifactCache(tmp_path)
    first = _victim(tiny_data, cache)
    assert not first.from_cache and _victim(tiny_data, cache).from_cache and fits == ["badnets"]
    _edit_metadata(tmp_path, first.cache_key, train_seconds=value)
    capsys.readouterr()
    again = _victim(tiny_data, cache)
    assert not again.from_cache and again.train_seconds != 9999 and len(fits) == 2
    assert f"Cache entry {first.cache_key} is corrupt (checksum mismatch" in _said(capsys)
    assert _victim(tiny_data, cache).from_cache  # the rebuilt entry is good


def test_entry_without_a_needed_field_is_rebuilt(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ArtifactCache(tmp_path)
    key = _victim(tiny_data, cache).cache_key
    tensors, meta = cache.load(key) or ({}, {})
    del meta["train_seconds"]
    cache.save(key, tensors, meta)  # a valid checksum over metadata lacking the field
    assert not _victim(tiny_data, cache).from_cache and len(fits) == 2
    assert f"Cache entry {key} is corrupt (metadata field 'train_seconds' missing); rebuilding it." in _said(
        capsys
    )


def test_tensors_that_do_not_fit_the_model_are_rebuilt(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ArtifactCache(tmp_path)
    key = _victim(tiny_data, cache).cache_key
    tensors, meta = cache.load(key) or ({}, {})
    name = next(k for k in tensors if k.startswith("model.") and k.endswith("weight"))
    cache.save(key, {**tensors, name: torch.zeros(3, 2)}, meta)  # e.g. the model's layers changed
    victim = _victim(tiny_data, cache)
    assert not victim.from_cache and len(fits) == 2
    assert f"Cache entry {key} is corrupt (its tensors do not fit small-cnn/badnets: RuntimeError" in _said(
        capsys
    )


def test_a_trigger_state_that_does_not_fit_leaves_the_attack_untouched(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """WaNet stores `control` before it fails to build its grid from a wrong-shaped one."""
    cache = ArtifactCache(tmp_path)
    key = _victim(tiny_data, cache, WaNet(WaNet.Config(), TINY_SPEC, seed=0)).cache_key
    tensors, meta = cache.load(key) or ({}, {})
    cache.save(key, {**tensors, "trigger.control": torch.ones(1, 3, 4, 4)}, meta)
    attack = WaNet(WaNet.Config(), TINY_SPEC, seed=0)
    pristine = attack.control.clone()
    victim = _victim(tiny_data, cache, attack)
    assert not victim.from_cache and torch.equal(attack.control, pristine) and len(fits) == 2
    assert "its tensors do not fit small-cnn/wanet" in _said(capsys)


def test_clean_model_with_unfit_tensors_is_rebuilt(
    tmp_path: Path, tiny_data: Dataset, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained: list[int] = []
    monkeypatch.setattr(backdoor, "train_classifier", lambda *args, **kwargs: trained.append(1))
    cache, cfg, cpu = ArtifactCache(tmp_path), TrainingConfig(), torch.device("cpu")
    backdoor.clean_model(tiny_data, "small-cnn", 0, cfg, cpu, cache)
    backdoor.clean_model(tiny_data, "small-cnn", 0, cfg, cpu, cache)
    assert trained == [1]
    key = backdoor._model_key(tiny_data, "small-cnn", None, 0, cfg)
    cache.save(key, {"nonsense": torch.ones(1)}, {})
    backdoor.clean_model(tiny_data, "small-cnn", 0, cfg, cpu, cache)
    assert trained == [1, 1]
    assert f"Cache entry {key} is corrupt (its tensors do not fit small-cnn: RuntimeError" in _said(capsys)


def test_non_finite_weights_raise_and_cache_nothing(
    tmp_path: Path, tiny_data: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverge(self: Attack, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Attack, "fit", diverge)
    cache = ArtifactCache(tmp_path)
    with pytest.raises(BdtkError) as raised:
        _victim(tiny_data, cache)
    message = str(raised.value)
    assert message.startswith("training the model backdoored by badnets produced non-finite weights (NaN/inf")
    assert message.endswith("— lower the learning rate or weight decay") and "\n" not in message

    def diverge_clean(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        diverge(BadNets(BadNets.Config(), TINY_SPEC), model)

    monkeypatch.setattr(backdoor, "train_classifier", diverge_clean)
    with pytest.raises(BdtkError, match=r"^training the clean model produced non-finite weights \(NaN/inf"):
        backdoor.clean_model(tiny_data, "small-cnn", 0, TrainingConfig(), torch.device("cpu"), cache)
    assert not tmp_path.exists() or _files(tmp_path) == []


def test_a_new_plugin_version_retrains(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ArtifactCache(tmp_path)
    _fake_source(monkeypatch, "1.0")
    old = _victim(tiny_data, cache)
    assert _victim(tiny_data, cache).from_cache
    _fake_source(monkeypatch, "1.1")  # the author changed the trigger and bumped the version
    new = _victim(tiny_data, cache)
    assert not new.from_cache and new.cache_key != old.cache_key and len(fits) == 2


def test_cache_key_covers_code_and_threads(tiny_data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    attack = BadNets(BadNets.Config(), TINY_SPEC, seed=0)
    cfg = TrainingConfig()

    def key(a: Attack | None = attack, **kwargs: Any) -> str:
        return backdoor._model_key(tiny_data, "small-cnn", a, 0, cfg, **kwargs)

    assert key(threads=1) != key(threads=2)
    assert key(None, threads=1) != key(None, threads=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = key()
        torch.set_num_threads(2)
        two = key()
    finally:
        torch.set_num_threads(threads)
    assert one == key(threads=1) and two == key(threads=2) and one != two
    builtin = key(threads=1)
    monkeypatch.setattr(backdoor, "bdtk_version", lambda: "99.0")
    versioned = key(threads=1)
    assert versioned != builtin
    monkeypatch.setattr(backdoor, "CACHE_FORMAT", backdoor.CACHE_FORMAT + 1)
    assert key(threads=1) != versioned  # a new cache format retires every old entry


def test_attack_provenance_as_the_registry_records_it(bdtk_register: Any) -> None:
    assert backdoor._attack_provenance(BadNets(BadNets.Config(), TINY_SPEC))["distribution"] == (
        "backdoor-toolkit"
    )

    class Local(BadNets):
        name = "test-cache-local"

    class Stray(BadNets):
        name = "test-cache-stray"

    bdtk_register(Local)
    local = backdoor._attack_provenance(Local(Local.Config(), TINY_SPEC))
    assert local["distribution"] == IN_PROCESS and local["class"].endswith("Local")
    assert backdoor._attack_provenance(Stray(Stray.Config(), TINY_SPEC))["distribution"] == "(unregistered)"


def test_no_cache_env_trains_every_time(
    tmp_path: Path, tiny_data: Dataset, fits: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BDTK_NO_CACHE", "1")
    assert not _victim(tiny_data, ArtifactCache(tmp_path)).from_cache
    assert not _victim(tiny_data, ArtifactCache(tmp_path)).from_cache
    assert len(fits) == 2
    assert not tmp_path.exists() or _files(tmp_path) == []


def test_json_text_writes_nan_and_inf_as_null() -> None:
    """Python's json writes bare NaN, which is not JSON: leaderboard, results and report files
    holding one could not be read by other tools."""
    text = json_text({"a": float("nan"), "b": [float("inf"), 1.5, {"c": float("-inf")}], "d": "x"})
    assert json.loads(text) == {"a": None, "b": [None, 1.5, {"c": None}], "d": "x"}
    assert "NaN" not in text and "Infinity" not in text


def test_an_unwritable_cache_is_refused_before_anything_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "ro"
    blocked.mkdir()
    monkeypatch.delenv("BDTK_NO_CACHE", raising=False)

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "touch", refuse)  # as root, chmod alone would not stop the write
    with pytest.raises(BdtkError, match=r"Cannot write the artifact cache in .*ro: Permission denied; give"):
        ArtifactCache(blocked)
    assert ArtifactCache(blocked, enabled=False).enabled is False  # a disabled cache is never written

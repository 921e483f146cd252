"""Hostile and broken inputs through the CLI: one clear line and the right exit code, never a
traceback, a NaN ranked as a result, or a finished cell lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    TrainingSettings,
    train_classifier,
)
from backdoor_toolkit import data as data_module
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.common import user_errors
from backdoor_toolkit.data import load_dataset
from backdoor_toolkit.errors import BdtkError, DatasetCorruptError, DatasetNotFoundError, NonFiniteError
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.testing import TINY_SPEC, tiny_images, tiny_model

runner = CliRunner()
STORED_ROW = Path(__file__).parent / "data" / "cell_result_v1.json"
TINY_RUN: dict[str, Any] = {
    "model": "small-cnn",
    "train_size": 600,
    "test_size": 200,
    "training": {"epochs": 1},
    "device": "cpu",
}


def _one_line_error(output: str) -> str:
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "Error" in line]
    assert errors, output
    return " ".join(output.split())


def _config(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**TINY_RUN, "output": str(tmp_path / "out" / "results.json"), **values}))
    return path


class QuitConfig(StrictConfig):
    pass


class Quits(Purifier):
    """A defense that ends the process the wrong way: the grid must record it and carry on."""

    name = "quits"
    Config = QuitConfig
    meta = PluginMeta(summary="Calls sys.exit", paper="none", threat_model="none")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        raise SystemExit(3)


class Diverges(Purifier):
    """A defense whose training diverged: its model holds NaN, which must never be scored."""

    name = "diverges"
    Config = QuitConfig
    meta = PluginMeta(summary="Returns a NaN model", paper="none", threat_model="none")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        with torch.no_grad():
            next(iter(model.parameters())).fill_(float("nan"))
        return PurificationResult(model=model, modified=True)


def test_an_explicit_zero_is_honoured_and_refused_with_the_valid_range(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    result = runner.invoke(
        app, ["benchmark", "--config", str(_config(tmp_path)), "--clean-ratio", "0", "--db", str(db)]
    )
    assert result.exit_code == 2
    assert "clean_ratio" in _one_line_error(result.output) and "valid: 0 < clean_ratio ≤ 0.5" in result.output
    assert not db.exists() or len(ResultStore(db)) == 0


def test_failed_cells_exit_non_zero_and_the_grid_goes_on(tmp_path: Path, bdtk_register: Any) -> None:
    bdtk_register(Quits, Diverges)
    db = tmp_path / "r.sqlite"
    args = ["benchmark", "--config", str(_config(tmp_path)), "--db", str(db)]
    result = runner.invoke(
        app, [*args, "-d", "quits", "-d", "diverges", "-d", "finetune", "--set", "finetune.epochs=1"]
    )
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "2 of 4 cells failed" in text and "sys.exit(3)" in text and "NaN" in text
    with ResultStore(db) as store:
        rows = {r.defense: r for r in store.rows()}
    assert {d: r.status for d, r in rows.items()} == {
        "none": "ok",
        "quits": "failed",
        "diverges": "failed",
        "finetune": "ok",  # the cell after the broken ones still ran
    }
    assert rows["diverges"].ba is None and "non-finite" not in rows["finetune"].error


def test_a_diverging_loss_stops_training_with_a_clear_error() -> None:
    model = tiny_model(TINY_SPEC)
    data = tiny_images(n=32)
    settings = TrainingSettings(1, 16, 0.1, 0.0, False, False, torch.device("cpu"))

    def exploding(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return model(x).sum() * float("inf"), None

    with pytest.raises(NonFiniteError, match="loss became"):
        train_classifier(model, data.images, data.labels, settings, seed=0, loss_fn=exploding)


def _row() -> CellResult:
    return CellResult.model_validate(json.loads(STORED_ROW.read_text()))


def test_a_locked_store_keeps_the_row_aside_and_the_next_run_imports_it(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultStore(path, timeout=0.05, retry_seconds=0.3) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        error = store.put_or_keep(_row())
        blocker.execute("ROLLBACK")
        blocker.close()
        assert error is not None and "locked" in str(error)
        assert store.unsaved_path.exists() and len(store) == 0
        assert store.import_unsaved() == 1
        assert len(store) == 1 and not store.unsaved_path.exists()


def test_a_store_write_retries_while_another_writer_holds_the_lock(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "r.sqlite"
    with ResultStore(path, timeout=0.05, retry_seconds=10) as store:
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")
        release = threading.Timer(0.5, lambda: blocker.execute("ROLLBACK"))
        release.start()
        assert store.put_or_keep(_row()) is None  # retried with back-off until the lock went
        release.join()
        blocker.close()
        assert len(store) == 1 and not store.unsaved_path.exists()


def test_an_invalid_stored_row_is_skipped_with_a_warning_naming_it(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "r.sqlite"
    good = _row()
    bad = good.model_copy(update={"config_hash": "badbadbadbadbad0", "seed": 7})
    with ResultStore(path) as store:
        store.put(good)
        store.put(bad)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE cells SET record = ? WHERE config_hash = ?", ('{"ba": "high"}', bad.config_hash))
    db.close()
    result = runner.invoke(app, ["leaderboard", "--db", str(path)])
    assert result.exit_code == 0, result.output
    assert "Skipping stored cell badbadbadbadbad0" in " ".join(result.output.split())
    with ResultStore(path) as store:
        assert [r.config_hash for r in store.rows()] == [good.config_hash]
        assert store.get(bad.config_hash) is None


def test_unwritable_places_are_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    trained: list[str] = []
    monkeypatch.setattr("backdoor_toolkit.cells.backdoored_model", lambda *a, **k: trained.append("x"))
    for flag in (["--output", str(locked / "results.json")], ["--db", str(locked / "r.sqlite")]):
        args = ["benchmark", "--config", str(_config(tmp_path)), "--db", str(tmp_path / "ok.sqlite"), *flag]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "read-only" in _one_line_error(result.output)
    assert trained == []


@pytest.mark.parametrize("option", ["--config", "--suite"])
def test_a_folder_or_binary_file_as_config_is_one_line(tmp_path: Path, option: str) -> None:
    binary = tmp_path / "model.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    for target, words in ((tmp_path, "is not a file"), (binary, "not UTF-8 text")):
        result = runner.invoke(app, ["benchmark", option, str(target)])
        assert result.exit_code == 2
        assert words in _one_line_error(result.output)


def _write_idx(path: Path, dims: list[int], payload: bytes) -> None:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + payload)


def test_a_corrupt_dataset_file_is_named(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", [10, 28, 28], bytes(100))  # truncated
    _write_idx(tmp_path / "train-labels-idx1-ubyte", [10], bytes(10))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", [10, 28, 28], bytes(7840))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", [10], bytes(10))
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte is damaged"):
        load_dataset("fashion-mnist", tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte", [10, 28, 28], bytes(7840))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", [10], bytes([42] * 10))  # no class 42
    with pytest.raises(DatasetCorruptError, match=r"labels 0\.\.9"):
        load_dataset("fashion-mnist", tmp_path)
    result = runner.invoke(
        app, ["benchmark", "--data-dir", str(tmp_path), "--db", str(tmp_path / "r.sqlite")]
    )
    assert result.exit_code == 2 and "does not look like fashion-mnist" in _one_line_error(result.output)


@pytest.mark.parametrize(("files_of", "requested"), [("fashion-mnist", "mnist"), ("mnist", "fashion-mnist")])
def test_one_datasets_files_under_anothers_name_are_refused(
    tmp_path: Path, files_of: str, requested: str
) -> None:
    """MNIST and Fashion-MNIST share format, sizes and file names: the brightness tells them apart."""
    mean = data_module.dataset_spec(files_of).mean[0]
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 1200), ("t10k", 100)):
        # binary images whose mean brightness is the named dataset's
        images = (rng.random((n, 28, 28)) < mean).astype(np.uint8) * 255
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", [n, 28, 28], images.tobytes())
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", [n], bytes(i % 10 for i in range(n)))
    assert len(load_dataset(files_of, tmp_path).train) == 1200
    with pytest.raises(DatasetCorruptError, match=f"look like '{files_of}', not '{requested}'"):
        load_dataset(requested, tmp_path)
    db = str(tmp_path / "r.sqlite")
    result = runner.invoke(
        app, ["benchmark", "--dataset", requested, "--data-dir", str(tmp_path), "--db", db]
    )
    assert result.exit_code == 2 and f"--dataset {files_of}" in _one_line_error(result.output)


def test_a_budget_smaller_than_the_classes_is_refused_before_training(tmp_path: Path) -> None:
    """One or two clean images 'work' (every defense runs) but collapse the model to one class."""
    db = tmp_path / "r.sqlite"
    args = ["benchmark", "-a", "badnets", "-d", "finetune", "--model", "small-cnn", "--epochs", "1"]
    args += ["--train-size", "200", "--test-size", "100", "--db", str(db)]
    args += ["--output", str(tmp_path / "r.json")]
    result = runner.invoke(app, [*args, "--clean-ratio", "0.02"])
    line = _one_line_error(result.output)
    assert result.exit_code == 2 and "3 to train, 1 to validate" in line
    suggested = float(line.split("at least ")[1].rstrip("."))
    split = data_module.budget_split
    assert split(200, suggested, 0.2)[0] >= 10 > split(200, 0.02, 0.2)[0]
    assert not (tmp_path / "r.json").exists()  # refused before any cell ran


def test_every_output_makes_at_most_one_new_folder(tmp_path: Path) -> None:
    """One rule (output_paths): a file's own missing folder is made, as `mkdir` would; a path two
    missing folders deep is a typo to report before any work, for purify's files and benchmark's
    results JSON alike."""
    from backdoor_toolkit.purification import PurifyOutputs

    PurifyOutputs.beside(tmp_path / "new" / "m.safetensors").check(force=False)
    with pytest.raises(BdtkError, match="does not exist; create it first"):
        PurifyOutputs.beside(tmp_path / "nope" / "deeper" / "m.safetensors").check(force=False)
    deep = tmp_path / "nope" / "deeper" / "r.json"
    result = runner.invoke(app, ["benchmark", "--db", str(tmp_path / "r.sqlite"), "--output", str(deep)])
    assert result.exit_code == 2 and "does not exist; create it first" in _one_line_error(result.output)
    assert not (tmp_path / "nope").exists()


def test_an_unusable_cache_from_the_environment_is_one_line_before_any_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BDTK_CACHE_DIR naming a file once failed every cell, and under --force those failed rows
    replaced the stored results."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("BDTK_CACHE_DIR", str(blocker))
    monkeypatch.delenv("BDTK_NO_CACHE", raising=False)
    db = tmp_path / "r.sqlite"
    args = ["benchmark", "-a", "badnets", "-d", "finetune", "--model", "small-cnn", "--train-size", "600"]
    args += ["--test-size", "200", "--epochs", "1", "--db", str(db), "--output", str(tmp_path / "r.json")]
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 2 and "artifact cache" in _one_line_error(result.output)
    assert not (tmp_path / "r.json").exists()


def test_a_fifo_named_like_an_image_is_ignored_not_read(tmp_path: Path) -> None:
    """Reading a FIFO blocks until someone writes to it: an image folder holding one hung forever."""
    from PIL import Image

    from backdoor_toolkit.image_folders import load_image_folder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8), 128).save(tmp_path / name / "x.png")
    os.mkfifo(tmp_path / "a" / "fifo.png")
    folder = load_image_folder(tmp_path, channels=1)
    assert len(folder.data) == 2 and folder.ignored == [tmp_path / "a" / "fifo.png"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda t: t.long() * 100, "is int64, not a float weight"),
        (lambda t: t > 0, "is bool, not a float weight"),
        (lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn, not a float weight"),
    ],
    ids=["int64", "bool", "float8"],
)
def test_weights_that_are_not_floats_are_refused_by_name(tmp_path: Path, change: Any, says: str) -> None:
    """They were cast to float silently (int, bool) or crashed the NaN check (float8)."""
    from safetensors.torch import save_file

    from backdoor_toolkit.models import load_model

    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    save_file({**state, name: change(state[name]).contiguous()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(BdtkError, match=f"tensor {name!r} {says}"):
        load_model(tmp_path / "m.safetensors", "small-cnn")


def test_a_tensor_with_no_values_or_a_negative_std_is_refused(tmp_path: Path) -> None:
    """A (2**31, 0) head holds no bytes but made the model built from its shape allocate a terabyte."""
    from safetensors.torch import save_file

    from backdoor_toolkit.models import load_model

    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    head = next(k for k, v in state.items() if v.dim() == 2)
    save_file({**state, head: torch.empty(2**31, 0)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(BdtkError, match=r"has shape \(2147483648, 0\), with no values"):
        load_model(tmp_path / "m.safetensors", "small-cnn")
    save_file({**state, "normalize.std": -state["normalize.std"]}, str(tmp_path / "s.safetensors"))
    with pytest.raises(BdtkError, match=r"normalize\.std must be positive"):
        load_model(tmp_path / "s.safetensors", "small-cnn")


def test_test_images_the_defense_sees_are_refused(tmp_path: Path) -> None:
    """`--test-data` naming the clean folder itself reported accuracy on the training images."""
    from PIL import Image

    from backdoor_toolkit.purification import load_clean_data

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "clean" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "clean" / name / f"{i}.png")
    clean = f"folder:{tmp_path / 'clean'}"
    with pytest.raises(BdtkError, match=r"12 of the 12 test images .* are also in the clean data"):
        load_clean_data(clean, channels=1, num_classes=2, test_data=clean)
    (tmp_path / "test").mkdir()
    shutil.copytree(tmp_path / "clean" / "a", tmp_path / "test" / "a")  # a copy of one class
    (tmp_path / "test" / "b").mkdir()
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(tmp_path / "test" / "b" / "new.png")
    with pytest.raises(BdtkError, match="6 of the 7 test images"):
        load_clean_data(clean, channels=1, num_classes=2, test_data=f"folder:{tmp_path / 'test'}")


def test_purify_refuses_a_dataset_budget_smaller_than_the_classes() -> None:
    from backdoor_toolkit.purification import load_clean_data

    with pytest.raises(BdtkError, match="fewer training images than fashion-mnist's 10 classes"):
        load_clean_data("fashion-mnist", channels=1, num_classes=10, train_size=100)


@pytest.mark.parametrize("mean", ['"5"', "[true]", "[1e999]", f"[{10**400}]"])
def test_a_model_json_mean_is_a_list_of_finite_numbers_as_written(tmp_path: Path, mean: str) -> None:
    """A string was read character by character, a boolean as 1.0, and 10**400 overflowed."""
    from safetensors.torch import save_file

    from backdoor_toolkit.models import load_model

    save_file(
        {k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(tmp_path / "m.safetensors")
    )
    meta = f'{{"format": "bdtk-model/1", "architecture": "small-cnn", "mean": {mean}, "std": [0.5]}}'
    (tmp_path / "m.json").write_text(meta)
    with pytest.raises(BdtkError, match=r"mean must be (a list of numbers|finite numbers)"):
        load_model(tmp_path / "m.safetensors", "small-cnn")


def test_a_boolean_is_never_taken_as_a_number() -> None:
    """pydantic takes true as 1: `--set epochs=true` trained one epoch, `seeds = [true]` seed 1."""
    from backdoor_toolkit import create_purifier
    from backdoor_toolkit.config import BenchmarkConfig, ConfigError, build_config

    with pytest.raises(ConfigError, match="epochs: true is a boolean, not a number"):
        create_purifier("finetune", {"epochs": True})
    with pytest.raises(ConfigError, match=r"seeds: \[true\] is a boolean, not a number"):
        build_config(BenchmarkConfig, {"seeds": [True]}, "benchmark")
    assert create_purifier("mcldef", {"augment": False}).config.augment is False  # a real boolean field


def test_a_string_is_never_taken_as_a_number() -> None:
    """pydantic's lax mode takes "3" as 3: from Python a quoted number hid a caller's type error."""
    from backdoor_toolkit import create_inverter, create_purifier
    from backdoor_toolkit.config import BenchmarkConfig, ConfigError, build_config

    with pytest.raises(ConfigError, match=r'epochs: "3" is a string, not a number'):
        create_purifier("finetune", {"epochs": "3"})
    with pytest.raises(ConfigError, match=r'seeds: \[0, "1"\] is a string, not a number'):
        build_config(BenchmarkConfig, {"seeds": [0, "1"]}, "benchmark")
    with pytest.raises(ConfigError, match="is a string, not a number"):
        create_inverter("neural-cleanse", {"lr": "0.1"})
    with pytest.raises(ConfigError, match=r"write a list as JSON: \[1,2,3\]"):  # `--set nad.betas=1,2,3`
        create_purifier("nad", {"betas": "1,2,3"})
    assert create_purifier("finetune", {"epochs": 3}).config.epochs == 3


def test_without_the_embedded_dataset_the_message_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.delenv("BDTK_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist")
    message = str(caught.value)
    assert "fashion-mnist" in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message


def test_a_misspelt_setting_in_a_suite_names_the_file_and_line(tmp_path: Path) -> None:
    suite = tmp_path / "mine.toml"
    suite.write_text('attacks = ["badnets"]\n\n[[defenses]]\nname = "finetune"\nconfig = { epoch = 3 }\n')
    result = runner.invoke(app, ["benchmark", "--suite", str(suite)])
    assert result.exit_code == 2
    text = _one_line_error(result.output)
    assert "mine.toml" in text and "(line 5)" in text and "epoch" in text


def test_sigterm_and_unexpected_errors_end_in_one_line(capsys: Any) -> None:
    import typer

    before = signal.getsignal(signal.SIGTERM)

    @user_errors
    def terminated() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    @user_errors
    def buggy() -> None:
        raise ZeroDivisionError("division by zero")

    for command, code, words in ((terminated, 143, "Terminated"), (buggy, 1, "ZeroDivisionError")):
        with pytest.raises(typer.Exit) as stopped:
            command()
        assert stopped.value.exit_code == code
        assert words in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone again


def test_concurrent_store_writers_lose_nothing(tmp_path: Path) -> None:
    """Four processes' worth of writers (threads with their own connections) on one database,
    one of them holding the write lock for longer than SQLite's busy timeout: every row lands."""
    import threading

    path = tmp_path / "r.sqlite"
    template = _row()
    ResultStore(path).close()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with ResultStore(path, timeout=0.05, retry_seconds=20) as store:
                for i in range(20):
                    row = template.model_copy(update={"config_hash": f"{worker:02d}{i:014d}", "seed": i})
                    assert store.put_or_keep(row) is None
        except BaseException as exc:  # collected: an assertion in a thread would vanish
            errors.append(exc)

    hog = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    hog.execute("BEGIN EXCLUSIVE")
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.3)  # longer than the writers' busy timeout
    hog.execute("ROLLBACK")
    hog.close()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with ResultStore(path) as store:
        assert len(store) == 80 and not store.unsaved_path.exists()


def test_every_given_flag_reaches_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-d NAME` keeps the file's settings for NAME; --train-size, --threads and zeros are honoured."""
    seen: list[Any] = []
    monkeypatch.setattr(
        "backdoor_toolkit.cli.benchmark.run_benchmark", lambda cfg, **kw: seen.append(cfg) or []
    )
    config = _config(tmp_path, defenses=[{"name": "finetune", "config": {"epochs": 1}}, "nad"])
    args = ["benchmark", "--config", str(config), "--db", str(tmp_path / "r.sqlite"), "-d", "finetune"]
    result = runner.invoke(app, [*args, "--train-size", "300", "--threads", "1", "--seed", "0"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert [(d.name, d.config) for d in cfg.defenses] == [("finetune", {"epochs": 1})]
    assert (cfg.train_size, cfg.threads, cfg.seeds) == (300, 1, [0])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "0", "--seed", "0"], "--seed repeats '0'"),
        (["-d", "finetune", "-d", "finetune"], "--defense repeats 'finetune'"),
        (["-a", "badnets", "-a", "badnets"], "--attack repeats 'badnets'"),
        (["--model", "small-cnn", "--model", "small-cnn"], "--model repeats 'small-cnn'"),
    ],
)
def test_a_repeated_benchmark_flag_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    """`--seed 0 --seed 0 -d finetune -d finetune` ran 6 cells instead of 2 and reported copies
    as separate rows; the flag and its value are named before anything runs."""
    monkeypatch.setattr("backdoor_toolkit.cli.benchmark.run_benchmark", lambda cfg, **kw: pytest.fail("ran"))
    args = ["benchmark", "--config", str(_config(tmp_path)), "--db", str(tmp_path / "r.sqlite"), *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{message}; give each one once" in _one_line_error(result.output)


def test_an_interrupted_benchmark_counts_this_runs_cells_apart_from_the_stored_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message said "0 finished cells are stored in X" while X held cells of earlier runs."""
    db = tmp_path / "r.sqlite"
    template = _row()
    with ResultStore(db) as store:
        for i in range(3):
            store.put(template.model_copy(update={"config_hash": f"{i:016d}", "seed": i}))

    def one_cell_then_stop(cfg: Any, on_result: Any, **kw: Any) -> list[CellResult]:
        on_result(template)
        raise KeyboardInterrupt

    monkeypatch.setattr("backdoor_toolkit.cli.benchmark.run_benchmark", one_cell_then_stop)
    result = runner.invoke(app, ["benchmark", "--config", str(_config(tmp_path)), "--db", str(db)])
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    assert f"Interrupted: 1 cell finished in this run, stored in {db}; it holds 3 in all" in text


def test_an_empty_suite_is_refused_not_run_as_the_default_grid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here\n")
    for suite in ("", str(empty)):
        result = runner.invoke(app, ["benchmark", "--suite", suite, "--db", str(tmp_path / "r.sqlite")])
        assert result.exit_code == 2 and "Training" not in result.output, result.output
        assert "empty" in result.output or "sets nothing" in _one_line_error(result.output)


def test_an_output_that_is_a_device_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    result = runner.invoke(
        app, ["benchmark", "--suite", "quick", "--output", str(fifo), "--db", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "not a regular file" in _one_line_error(result.output), result.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_model_that_outputs_nan_is_an_error_not_a_score() -> None:
    """argmax of NaN is class 0: a model emitting NaN on some images was scored (33 % accuracy)."""
    from backdoor_toolkit.metrics import accuracy

    class NanOnWhite(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            white = x.flatten(1).min(1).values >= 1.0
            return torch.where(white[:, None], torch.full_like(out, torch.nan), out)

    model = NanOnWhite(tiny_model())
    images = tiny_images()
    assert 0 <= accuracy(model, images, torch.device("cpu")) <= 1  # no white image: scored
    broken = images.images.clone()
    broken[:5] = 255
    with pytest.raises(NonFiniteError, match=r"NaN or infinite values on 5 of 64 images"):
        accuracy(model, type(images)(broken, images.labels), torch.device("cpu"))


def test_an_output_folder_that_refuses_new_files_is_found_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission bits do not tell (root passes os.access on /sys): a real file is tried."""
    import errno

    from backdoor_toolkit import output_paths

    real_open = os.open

    def refusing(path: Any, *args: Any, **kwargs: Any) -> int:
        if ".bdtk-write-probe." in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(output_paths.os, "open", refusing)
    with pytest.raises(BdtkError, match=r"Cannot write --out .*p\.safetensors: .* does not accept new files"):
        output_paths.check_output_file(tmp_path / "p.safetensors", "--out")
    monkeypatch.undo()
    output_paths.check_output_file(tmp_path / "p.safetensors", "--out")
    assert [p.name for p in tmp_path.iterdir()] == []  # the probe leaves nothing behind


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_names_the_output_not_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from backdoor_toolkit import artifacts
    from backdoor_toolkit.artifacts import atomic_write_text
    from backdoor_toolkit.output_paths import naming_output

    with pytest.raises(OSError) as info, naming_output(tmp_path / "board.csv"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "board.csv")
    # a full disk: the temporary file's write fails with ENOSPC, which names no file
    monkeypatch.setattr(
        artifacts, "_temporary", lambda folder, name: (os.open("/dev/full", os.O_WRONLY), tmp_path / ".t.tmp")
    )
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "x.json", "{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.json")


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the cache failed the cell and threw the trained model away."""
    import errno

    from backdoor_toolkit import artifacts

    def full(path: Path, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    cache = artifacts.ArtifactCache(tmp_path / "cache", enabled=True)
    monkeypatch.setattr(artifacts, "_write_temporary", full)
    from backdoor_toolkit.console import console

    with console.capture() as captured:
        cache.save("k", {"w": torch.ones(2)}, {"m": 1})  # a warning, not an exception
    said = " ".join(captured.get().split())
    assert "Could not cache k in" in said and "No space left on device" in said
    monkeypatch.undo()
    assert cache.load("k") is None and not list((tmp_path / "cache").glob("*.tmp"))


def test_minus_zero_and_zero_are_one_setting() -> None:
    from backdoor_toolkit import create_purifier

    a = create_purifier("finetune", {"weight_decay": -0.0}).config.model_dump_json()
    b = create_purifier("finetune", {"weight_decay": 0}).config.model_dump_json()
    assert a == b and "-0.0" not in a


def test_a_small_folder_is_split_class_by_class(tmp_path: Path) -> None:
    """A draw over the whole budget left a class out of the val part of a 30-image folder."""
    from PIL import Image

    from backdoor_toolkit.purification import load_clean_data

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    for seed in range(5):
        clean = load_clean_data(f"folder:{tmp_path}", channels=1, num_classes=3, seed=seed)
        assert torch.bincount(clean.budget.val.labels, minlength=3).tolist() == [2, 2, 2]
        assert torch.bincount(clean.budget.train.labels, minlength=3).tolist() == [8, 8, 8]
    again = load_clean_data(f"folder:{tmp_path}", channels=1, num_classes=3, seed=4)
    assert torch.equal(again.budget.index_val, clean.budget.index_val)  # seeded
    most = load_clean_data(f"folder:{tmp_path}", channels=1, num_classes=3, val_fraction=0.99)
    assert torch.bincount(most.budget.train.labels, minlength=3).tolist() == [1, 1, 1]  # one kept each


def test_a_model_json_written_for_other_weights_is_refused(tmp_path: Path) -> None:
    from backdoor_toolkit.models import load_model, save_model

    save_model(tiny_model(), tmp_path / "m.safetensors", {"architecture": "small-cnn"})
    assert load_model(tmp_path / "m.safetensors").sha256
    other = tmp_path / "other.safetensors"
    save_model(tiny_model(seed=1), other, {"architecture": "small-cnn"})
    shutil.copy(other, tmp_path / "m.safetensors")  # new weights, the old JSON beside them
    with pytest.raises(BdtkError, match=r"m\.json was written for other weights"):
        load_model(tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "other.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**meta, "image_size": [100000, 100000]}))
    with pytest.raises(BdtkError, match=r"other\.json: 'image_size' must be .* from 1 to 4096"):
        load_model(other)


def test_a_field_set_twice_and_options_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    twice = ["--set", "finetune.epochs=1", "--set", "finetune.epochs=2"]
    result = runner.invoke(app, ["benchmark", *twice, "--db", str(tmp_path / "r")])
    said = _one_line_error(result.output)
    assert result.exit_code == 2 and "epochs is already set to 1; give each field once" in said
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    folder = f"folder:{tmp_path / 'imgs'}"
    out = str(tmp_path / "p.safetensors")
    result = runner.invoke(
        app, ["purify", str(tmp_path / "m.safetensors"), "--data", folder, "--train-size", "5", "--out", out]
    )
    said = _one_line_error(result.output)
    assert result.exit_code != 0 and "--train-size: not with --data folder:" in said


def test_leaderboard_exports_and_filters_that_cannot_mean_anything_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.put(_row())
    same = tmp_path / "same.txt"
    result = runner.invoke(app, ["leaderboard", "--db", str(db), "--markdown", str(same), "--csv", str(same)])
    assert result.exit_code != 0 and "--markdown and --csv name the same file" in _one_line_error(
        result.output
    )
    assert not same.exists()
    result = runner.invoke(app, ["leaderboard", "--db", str(db), "--model", ""])
    assert "--model is empty" in _one_line_error(result.output)
    result = runner.invoke(app, ["leaderboard", "--db", str(tmp_path)])
    assert "is a folder; give a file path" in _one_line_error(result.output)


def test_json_nested_past_pythons_stack_is_bad_input_not_a_crash(tmp_path: Path) -> None:
    """json.loads raises RecursionError, not ValueError, on deep nesting: it escaped every reader's
    except clause as an unexpected error."""
    from backdoor_toolkit.cli.common import parse_value
    from backdoor_toolkit.config import load_config_file
    from backdoor_toolkit.models import load_model, save_model

    deep = "[" * 100_000 + "]" * 100_000
    save_model(tiny_model(), tmp_path / "m.safetensors", {})
    (tmp_path / "m.json").write_text(deep)
    with pytest.raises(BdtkError, match="is not readable JSON"):
        load_model(tmp_path / "m.safetensors")
    (tmp_path / "c.json").write_text(deep)
    with pytest.raises(BdtkError, match="Cannot parse config file"):
        load_config_file(tmp_path / "c.json")
    with pytest.raises(BdtkError, match="nests too deeply"):
        parse_value(deep)
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.put(_row())
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE cells SET record = ?", (deep,))
    with ResultStore(db) as store:
        assert store.rows() == []  # skipped with a warning, as any damaged record


def test_no_output_may_overwrite_the_result_database_or_a_file_of_another_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`leaderboard --csv r.sqlite` and `benchmark --output r.sqlite` replaced every stored cell
    by a table; `--json model.safetensors` replaced a model's weights."""
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.put(_row())
    before = db.read_bytes()
    (tmp_path / "link.csv").symlink_to(db)
    attempts = [
        ["leaderboard", "--db", str(db), "--csv", str(tmp_path / "link.csv")],
        ["benchmark", "--db", str(db), "--output", str(tmp_path / "sub" / ".." / "r.sqlite")],
    ]
    for args in attempts:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Training" not in result.output, result.output
    said = _one_line_error(runner.invoke(app, attempts[0]).output)
    assert "is the result database this command reads" in said
    board = tmp_path / "board" / "leaderboard.csv"  # a store named like one of --out's files
    board.parent.mkdir()
    board.write_bytes(before)
    result = runner.invoke(app, ["leaderboard", "--db", str(board), "--out", str(board.parent)])
    assert "--out" in _one_line_error(result.output) and board.read_bytes() == before
    monkeypatch.setenv("BDTK_DB", str(db))  # the default store is protected too
    result = runner.invoke(app, ["benchmark", "--output", str(db)])
    assert "is the result database this command reads" in _one_line_error(result.output)
    assert db.read_bytes() == before
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    result = runner.invoke(app, ["leaderboard", "--db", str(db), "--json", str(model)])
    assert "has extension '.safetensors'; give one of .json" in _one_line_error(result.output)
    assert model.read_bytes() == b"weights"
    result = runner.invoke(app, ["leaderboard", "--db", str(db), "--json", "-"])
    assert "not standard output" in _one_line_error(result.output)


def test_a_disk_that_fills_during_a_leaderboard_export_leaves_the_previous_export_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exports are written all or none: the fourth file's failed write used to leave three new
    files beside a truncated one and the old rest."""
    import errno

    from backdoor_toolkit import artifacts

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.put(_row())
    out = tmp_path / "board"
    args = ["leaderboard", "--db", str(db), "--out", str(out), "--csv", str(tmp_path / "b.csv")]
    assert runner.invoke(app, args).exit_code == 0
    before = {path.name: path.read_bytes() for path in [*out.iterdir(), tmp_path / "b.csv"]}
    with ResultStore(db) as store:
        store.put(_row().model_copy(update={"ba": 0.123}))  # the next export differs
    real = artifacts._write_temporary
    calls: list[Path] = []

    def fills_up(path: Path, data: bytes) -> Path:
        calls.append(path)
        if len(calls) == 4:
            with artifacts.naming_output(path):
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(artifacts, "_write_temporary", fills_up)
    result = runner.invoke(app, args)
    said = _one_line_error(result.output)
    assert result.exit_code != 0 and "No space left on device" in said and calls[3].name in said
    after = {path.name: path.read_bytes() for path in [*out.iterdir(), tmp_path / "b.csv"]}
    assert after == before  # nothing new, nothing truncated, no temporary files left
    monkeypatch.undo()
    assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "b.csv").read_bytes() != before["b.csv"]


def test_an_undefended_model_without_much_backdoor_is_pointed_out() -> None:
    from backdoor_toolkit.leaderboard import weak_backdoors

    weak = _row().model_copy(update={"defense": "none", "asr": 0.05})
    strong = weak.model_copy(update={"seed": 1, "asr": 0.95})
    lines = weak_backdoors([weak, strong])
    assert len(lines) == 1 and f"seed {weak.seed}" in lines[0] and "5.00 %" in lines[0]


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=r"--data-dir .*f is a file"):
        load_dataset("fashion-mnist", tmp_path / "f")


def test_class_names_that_differ_from_the_models_json_are_pointed_out(tmp_path: Path) -> None:
    from PIL import Image

    from backdoor_toolkit.cli.purify import describe_model
    from backdoor_toolkit.console import console
    from backdoor_toolkit.models import load_model, save_model
    from backdoor_toolkit.purification import load_clean_data

    named = {"architecture": "small-cnn", "classes": ["w", "x", "y", "z"]}  # the tiny model's 4 classes
    save_model(tiny_model(), tmp_path / "m.safetensors", named)
    for name in ("a", "b", "c", "d"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(
                tmp_path / "imgs" / name / f"{i}.png"
            )
    loaded = load_model(tmp_path / "m.safetensors")
    clean = load_clean_data(f"folder:{tmp_path / 'imgs'}", channels=loaded.channels, image_size=16)
    with console.capture() as captured:
        describe_model(loaded, clean)
    assert "names its classes w, x, y, z; the folder's are a, b, c, d" in " ".join(captured.get().split())


def test_a_huge_unknown_name_is_cut_in_its_one_line_message() -> None:
    from backdoor_toolkit.errors import UnknownNameError

    message = str(UnknownNameError("defense", "x" * 100_000, ["finetune", "nad"]))
    assert len(message) < 300 and "(100,000 characters)" in message and "Available: finetune, nad" in message
    assert "\\n" in str(
        UnknownNameError("defense", "a\nb", ["finetune"])
    )  # escaped: the message stays one line

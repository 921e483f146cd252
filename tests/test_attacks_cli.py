"""`bdtk attack`: trains into the cache, writes the trigger grid, and rejects bad input early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from backdoor_toolkit import Attack
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli import attack as attack_cli
from backdoor_toolkit.cli.attack import sample_per_class, trigger_grid
from backdoor_toolkit.data import ImageData

runner = CliRunner()
TINY = [
    "--model",
    "small-cnn",
    "--train-size",
    "100",
    "--test-size",
    "100",
    "--epochs",
    "1",
    "--device",
    "cpu",
]


def test_attack_command_trains_once_and_writes_the_grid(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    args = [
        "attack",
        "--attack",
        "blended",
        "--set",
        "alpha=0.3",
        *TINY,
        "--grid",
        str(grid),
        "--images",
        "5",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "trained in" in first.output and "ASR" in first.output
    with Image.open(grid) as png:
        # 5 columns and 3 rows (clean, triggered, difference) of 4× upscaled 28-pixel images, 2px padding
        assert png.size == (2 + 5 * (4 * 28 + 2), 2 + 3 * (4 * 28 + 2))
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "loaded from cache" in second.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "blended", "--set", "alpha=0"], "alpha"),
        (["--attack", "trojan", "--set", "trojan.size=40"], "does not fit"),
        (["--attack", "sig", "--set", "target=12"], "outside the 10 classes"),
        (["--attack", "blendd"], "Did you mean 'blended'"),
        (["--attack", "blended", "--set", "alpha"], "FIELD=VALUE"),
    ],
)
def test_bad_attack_settings_fail_before_training(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["attack", *args, *TINY])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Training" not in result.output


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("gn.txt", "has extension '.txt'; give one of .png"),
        ("grid", "has no extension"),
        ("a_folder", "is a folder; give a file path"),
        ("missing/deeper/g.png", "does not exist; create it first"),
        ("export:missing/victim", "does not exist; create it first"),
    ],
)
def test_unwritable_outputs_fail_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, message: str
) -> None:
    """A --grid PIL cannot write (or an --export folder in a missing folder) once failed after the
    training, losing the --export victim with it; now it is one line before anything runs, and no
    folder is created."""
    monkeypatch.setattr(attack_cli, "load_victim", lambda cfg: pytest.fail("trained before checking"))
    (tmp_path / "a_folder").mkdir()
    args = ["attack", "--attack", "badnets", *TINY, "--grid", str(tmp_path / "g.png")]
    if where.startswith("export:"):
        args += ["--export", str(tmp_path / where.removeprefix("export:"))]
    else:
        args += ["--grid", str(tmp_path / where)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "missing").exists()


def test_grid_rows_and_class_sampling() -> None:
    clean = torch.zeros(3, 1, 4, 4)
    triggered = clean.clone()
    triggered[:, :, 0, 0] = 0.1
    rows = trigger_grid(clean, triggered, scale=2)
    assert rows.shape == (9, 1, 8, 8)
    assert rows[6:, :, :2, :2].eq(1).all() and rows[6:, :, 2:, :].eq(0).all()  # difference stretched
    data = ImageData(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 2] * 2))
    picked = sample_per_class(data, 4)
    assert data.labels[picked].tolist() == [0, 1, 2, 0]


def test_attack_command_rebuilds_a_tampered_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edited cached JSON (`train_seconds: "fast"`) is reported in one line and retrained, with
    no traceback; training itself is stubbed out, the cache is what is tested."""
    trained: list[str] = []
    monkeypatch.setattr(Attack, "fit", lambda self, model, poisoned, settings: trained.append(self.name))
    # no PNG: spares the torchvision import
    monkeypatch.setattr(attack_cli, "write_grid", lambda *args, **kwargs: None)
    cache = tmp_path / "cache"
    args = [
        "attack",
        "--attack",
        "badnets",
        *TINY,
        "--cache-dir",
        str(cache),
        "--grid",
        str(tmp_path / "g.png"),
    ]
    assert runner.invoke(app, args).exit_code == 0
    (meta,) = cache.glob("*.json")
    record = json.loads(meta.read_text())
    record["metadata"]["train_seconds"] = "fast"
    meta.write_text(json.dumps(record))
    result = runner.invoke(app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert (
        f"Cache entry {meta.stem} is corrupt (checksum mismatch: the metadata changed since it was "
        "written); rebuilding it." in output
    )
    assert "trained in" in output and "Traceback" not in output and trained == ["badnets", "badnets"]
    assert "loaded from cache" in " ".join(runner.invoke(app, args).output.split())


def test_attack_exports_a_victim_that_purify_measures(tmp_path: Path) -> None:
    """`bdtk attack --export DIR` writes a victim whose backdoored test set is the attack's own
    triggered non-target test images; `bdtk purify DIR` then reports ASR on it, and a second export
    into the same folder is refused before anything trains."""
    from backdoor_toolkit.victims import load_victim

    out = tmp_path / "victim"
    cache = tmp_path / "cache"
    args = ["attack", "--attack", "badnets", *TINY, "--cache-dir", str(cache), "--threads", "1"]
    args += ["--grid", str(tmp_path / "g.png"), "--export", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Victim written to" in " ".join(result.output.split())
    (meta,) = cache.glob("*.json")
    assert json.loads(meta.read_text())["metadata"]["torch_threads"] == 1  # --threads reached training

    victim = load_victim(out)
    bd = victim.bd_test
    assert bd.labels is not None and bd.index is not None
    assert bd.targets.eq(0).all() and bd.labels.ne(0).all()  # BadNets' target 0, non-target images only
    assert len(bd) == int(victim.clean_test.labels.ne(0).sum())
    assert bd.images.dtype == torch.uint8
    # the stamped corner differs from the clean test image it came from; the rest of it does not
    clean = victim.clean_test.images[bd.index]
    assert not torch.equal(bd.images, clean)
    assert victim.source["targets"] == [0] and victim.source["tool"] == "bdtk attack"

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output and "Training" not in again.output

    purified = tmp_path / "p.safetensors"
    purify = runner.invoke(
        app,
        [
            "purify",
            str(out),
            "-d",
            "finetune",
            "--set",
            "epochs=1",
            "--clean-ratio",
            "0.2",
            "--out",
            str(purified),
        ],
    )
    assert purify.exit_code == 0, purify.output
    report = json.loads((tmp_path / "p.report.json").read_text())
    asr_before, _ = bd.success(victim.model, torch.device("cpu"))
    assert report["backdoor"]["asr_before"] == pytest.approx(asr_before)

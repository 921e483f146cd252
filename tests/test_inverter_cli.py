"""`bdtk inspect` on a model file: table, PNG, triggers and JSON; bad input → one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_toolkit.cli import app
from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.models import create_model

runner = CliRunner()
TINY = ["--dataset", "fashion-mnist", "--train-size", "200", "--test-size", "100", "--clean-ratio", "0.25"]
FAST = ["--steps", "2", "--option", "batch_size=4", "--option", "eval_images=8", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_file(create_model("small-cnn", dataset_spec("fashion-mnist")).state_dict(), str(path))
    return path


def test_inspect_a_model_file_writes_png_triggers_and_json(model_file: Path, tmp_path: Path) -> None:
    args = ["inspect", "--model-file", str(model_file), "--model", "small-cnn", *TINY, *FAST]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "anomaly index" in result.output and "Inversion took" in result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["classes"] == list(range(10)) and len(report["mask_norms"]) == 10
    assert report["detected"] == bool(report["flagged"])
    assert (tmp_path / "triggers.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(tmp_path / "triggers.png").size[0] > 10 * 28


def test_known_target_and_class_subset(model_file: Path, tmp_path: Path) -> None:
    base = ["inspect", "--model-file", str(model_file), "--model", "small-cnn", *TINY, *FAST]
    result = runner.invoke(app, [*base, "--class", "3", "--class", "7", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "inspect.json").read_text())["classes"] == [3, 7]
    result = runner.invoke(app, [*base, "--target", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["classes"] == [4] and report["flagged"] == [4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one"),
        (["--attack", "badnets", "--model-file", "x.safetensors"], "exactly one"),
        (["--model-file", "missing.safetensors"], "does not exist"),
        (["--model-file", "{model}", "--model", "wrn-16-1"], "does not hold 'wrn-16-1' weights"),
        (["--model-file", "{model}", "--model", "small-cnn", "--class", "12"], "out of range"),
        (["--model-file", "{model}", "--model", "small-cnn", "--option", "stepz=3"], "stepz"),
    ],
)
def test_bad_input_is_one_clear_message(model_file: Path, extra: list[str], message: str) -> None:
    args = ["inspect", *[a.replace("{model}", str(model_file)) for a in extra], *TINY, *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output

"""`bdtk inspect` on a model file: table, PNG, triggers and JSON for any inverter; `--set` routing;
bad input → one clear message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_toolkit import (
    ConfigError,
    DefenseData,
    ImageClassifier,
    InversionKeys,
    InversionResult,
    PluginMeta,
    StrictConfig,
    TriggerInverter,
)
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.common import split_settings
from backdoor_toolkit.cli.inspect import _attack_settings_by_old_spelling
from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.models import create_model

runner = CliRunner()
TINY = ["--dataset", "fashion-mnist", "--train-size", "200", "--test-size", "100", "--clean-ratio", "0.25"]
FAST = ["--steps", "2", "--set", "batch_size=4", "--set", "neural-cleanse.eval_images=8", "--device", "cpu"]
Register = Callable[..., str]


def inspect_file(model_file: Path, out: Path) -> list[str]:
    """`bdtk inspect` of the tiny model file on the tiny data, on the CPU, writing into `out`."""
    return ["inspect", str(model_file), "--model", "small-cnn", *TINY, "--device", "cpu", "--out", str(out)]


def one_line(text: str) -> str:
    return " ".join(text.split())


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
    assert "Trigger inversion by neural-cleanse" in result.output and "Inversion took" in result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["classes"] == list(range(10)) and len(report["mask_norms"]) == 10
    assert report["detected"] == bool(report["flagged"])
    assert (tmp_path / "triggers.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(tmp_path / "triggers.png").size[0] > 10 * 28


def test_trigger_files_alone_are_not_overwritten_and_target_with_classes_is_refused(
    model_file: Path, tmp_path: Path
) -> None:
    base = ["inspect", "--model-file", str(model_file), "--model", "small-cnn", *TINY, *FAST]
    sheet = tmp_path / "triggers-blend-inversion.png"
    sheet.write_bytes(b"someone's result")
    refused = runner.invoke(app, [*base, "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "triggers-blend-inversion.png" in one_line(refused.output)
    assert sheet.read_bytes() == b"someone's result"
    both = runner.invoke(app, [*base, "--target", "0", "--class", "1", "--out", str(tmp_path / "new")])
    assert both.exit_code == 2 and "contradict each other" in one_line(both.output), both.output
    setting = runner.invoke(
        app, [*base, "--set", "target=0", "--set", "classes=[1]", "--out", str(tmp_path / "n2")]
    )
    assert setting.exit_code == 2 and "contradict each other" in one_line(setting.output), setting.output


def test_known_target_and_class_subset(model_file: Path, tmp_path: Path) -> None:
    base = ["inspect", "--model-file", str(model_file), "--model", "small-cnn", *TINY, *FAST]
    result = runner.invoke(app, [*base, "--class", "3", "--class", "7", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "inspect.json").read_text())["classes"] == [3, 7]
    refused = runner.invoke(app, [*base, "--target", "4", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "holds a scan's results (inspect.json" in one_line(refused.output)
    assert json.loads((tmp_path / "inspect.json").read_text())["classes"] == [3, 7]  # kept
    result = runner.invoke(app, [*base, "--target", "4", "--out", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["classes"] == [4] and report["flagged"] == [4]
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    result = runner.invoke(app, [*base, "--out", str(blocked / "scan")])  # checked before scanning
    assert result.exit_code == 2 and "a-file is a file, not a folder" in one_line(result.output)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one"),
        (["--attack", "badnets", "--model-file", "x.safetensors"], "exactly one"),
        (["--model-file", "missing.safetensors"], "does not exist"),
        (["--model-file", "{model}", "--model", "wrn-16-1"], "does not hold 'wrn-16-1' weights"),
        (["--model-file", "{model}", "--model", "small-cnn", "--class", "12"], "out of range"),
        (["--model-file", "{model}", "--model", "small-cnn", "--set", "stepz=3"], "stepz"),
        (["{model}", "--model-file", "{model}"], "as MODEL_FILE or as --model-file, not both"),
        (
            ["{model}", "--model", "small-cnn", "--set", "badnets.poison_rate=0.2"],
            "no plugin named 'badnets'",
        ),
        (["{model}", "--model", "small-cnn", "--set", "steps"], "--set expects PLUGIN.FIELD=VALUE"),
        (["{model}", "--model", "small-cnn", "--inverter", "nural-cleanse"], "Did you mean"),
        (
            [
                "{model}",
                "--model",
                "small-cnn",
                "--inverter",
                "neural-cleanse",
                "--inverter",
                "blnd-inversion",
            ],
            "Unknown inverter 'blnd-inversion'. Did you mean 'blend-inversion'",
        ),
        (
            [
                "{model}",
                "--model",
                "small-cnn",
                "--inverter",
                "blend-inversion",
                "--inverter",
                "blend-inversion",
            ],
            "give each one once",
        ),
    ],
)
def test_bad_input_is_one_clear_message(model_file: Path, extra: list[str], message: str) -> None:
    args = ["inspect", *[a.replace("{model}", str(model_file)) for a in extra], *TINY, *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


# --- any inverter, the positional model file, one spelling of settings ---------------------------


class EchoConfig(StrictConfig):
    scale: float = Field(default=1.0, gt=0, le=100, description="Multiplies every mask norm")


class EchoInverter(TriggerInverter):
    """Flags the last class; writes a per-class diagnostic, a scan cost and a free-form note."""

    name = "echo-inverter"
    Config = EchoConfig
    config: EchoConfig
    meta = PluginMeta(summary="test-only inverter with its own diagnostics")

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        chosen = list(range(data.spec.num_classes)) if classes is None else classes
        k, (c, h, w) = len(chosen), data.spec.image_shape
        norms = torch.arange(k, 0, -1).float() * self.config.scale
        return InversionResult(
            chosen,
            torch.zeros(k, 1, h, w),
            torch.zeros(k, c, h, w),
            norms,
            torch.full((k,), 0.5),
            torch.linspace(0, 3, k),
            [chosen[-1]],
            diagnostics={
                "wobble": [i % 2 == 0 for i in range(k)],
                InversionKeys.CLASS_STEPS: 12_345,
                "note": "echoed",
            },
        )


def test_inspect_prints_any_registered_inverter_by_name(
    bdtk_register: Register, model_file: Path, tmp_path: Path
) -> None:
    bdtk_register(EchoInverter)
    args = ["inspect", str(model_file), "--model", "small-cnn", *TINY, "--device", "cpu"]
    result = runner.invoke(
        app, [*args, "--inverter", "echo-inverter", "--set", "scale=2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "Trigger inversion by echo-inverter" in text and "Neural Cleanse" not in text
    assert "wobble" in text and "attack success" in text  # its per-class extra is a column
    assert "Flagged target class(es): 9" in text
    assert "12,345 class-steps" in text and "note: echoed" in text
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["inverter"] == "echo-inverter" and report["inverter_config"] == {"scale": 2.0}
    assert report["mask_norms"][0] == 20.0 and report["flagged"] == [9]


def test_inspect_a_positional_model_file_needs_no_attack(model_file: Path, tmp_path: Path) -> None:
    args = ["inspect", str(model_file), "--model", "small-cnn", *TINY, *FAST, "--class", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Trigger inversion by neural-cleanse" in one_line(result.output)
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["model_file"] == str(model_file) and "attack" not in report
    assert report["classes"] == [1] and report["inverter_config"]["batch_size"] == 4


def test_option_o_still_works_with_a_deprecation_notice(model_file: Path, tmp_path: Path) -> None:
    base = ["inspect", str(model_file), "--model", "small-cnn", *TINY, "--steps", "2", "--device", "cpu"]
    result = runner.invoke(
        app, [*base, "-o", "batch_size=3", "--option", "eval_images=8", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert text.count("-o/--option is deprecated") == 1 and "use --set FIELD=VALUE" in text
    config = json.loads((tmp_path / "inspect.json").read_text())["inverter_config"]
    assert (config["batch_size"], config["eval_images"]) == (3, 8)
    plain = runner.invoke(app, [*base, "--set", "batch_size=3", "--out", str(tmp_path), "--force"])
    assert plain.exit_code == 0 and "deprecated" not in plain.output


def test_an_option_and_set_giving_one_field_two_values_are_refused(model_file: Path, tmp_path: Path) -> None:
    """`--steps 2 --set steps=5` ran with 2 and dropped the --set in silence (even an invalid one)."""
    base = inspect_file(model_file, tmp_path)
    for given, field in (
        (["--steps", "2", "--set", "steps=5"], "steps"),
        (["--steps", "2", "--set", "steps=nan"], "steps"),
        (["--class", "0", "--set", "classes=[99]"], "classes"),
    ):
        result = runner.invoke(app, [*base, *given])
        assert result.exit_code == 2 and f"both set {field}; give it once" in one_line(result.output)
        assert "Training" not in result.output and not (tmp_path / "inspect.json").exists()


def test_set_is_sorted_by_plugin_name_or_name_and_preset() -> None:
    items = ["steps=3", "neural-cleanse.lr=0.5", "badnets:x.poison_rate=0.2", "badnets.mode=all-to-all"]
    assert split_settings(items, ["neural-cleanse:k-arm", "badnets:x"], default="neural-cleanse:k-arm") == {
        "neural-cleanse:k-arm": {"steps": 3, "lr": 0.5},
        "badnets:x": {"poison_rate": 0.2, "mode": "all-to-all"},
    }
    with pytest.raises(ConfigError, match=r"no plugin named 'nc'.*'neural-cleanse'"):
        split_settings(["nc.steps=3"], ["neural-cleanse"], default="neural-cleanse")


def test_attack_settings_in_the_old_spelling_still_reach_the_attack(capsys: Any) -> None:
    """Before FIELD alone meant the inverter, `inspect --set FIELD=VALUE` set the attack."""
    out = _attack_settings_by_old_spelling(["poison_rate=0.2", "steps=3"], "badnets", "neural-cleanse")
    assert out == ["badnets.poison_rate=0.2", "steps=3"]
    assert "deprecated" in one_line(capsys.readouterr().err)
    with pytest.raises(
        ConfigError, match="both attack 'badnets' and inverter 'neural-cleanse' have 'target'"
    ):
        _attack_settings_by_old_spelling(["target=3"], "badnets", "neural-cleanse")
    assert _attack_settings_by_old_spelling(["badnets.target=3"], "badnets", "neural-cleanse") == [
        "badnets.target=3"
    ]


# --- several inverters, and what is said when nothing is flagged ------------------------------------

#: Height of a trigger sheet of 28×28 images at scale 4: label, three rows of tiles, four gaps.
THREE_ROWS = 14 + 3 * 28 * 4 + 4 * 4


def test_several_inverters_each_get_their_table_and_png(model_file: Path, tmp_path: Path) -> None:
    args = ["inspect", str(model_file), "--model", "small-cnn", *TINY, "--device", "cpu"]
    args += ["--inverter", "neural-cleanse", "--inverter", "blend-inversion", "--steps", "2"]
    result = runner.invoke(
        app, [*args, "--set", "batch_size=4", "--set", "eval_images=8", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "Trigger inversion by neural-cleanse" in text and "Trigger inversion by blend-inversion" in text
    assert text.count("Inversion took") == 2
    from PIL import Image

    for name in ("neural-cleanse", "blend-inversion"):
        sheet = Image.open(tmp_path / f"triggers-{name}.png")  # mask, mask·pattern, pattern
        assert sheet.size[0] > 10 * 28 and sheet.size[1] == THREE_ROWS
        assert (tmp_path / f"triggers-{name}.safetensors").stat().st_size > 0
    assert not (tmp_path / "triggers.png").exists()
    report = json.loads((tmp_path / "inspect.json").read_text())
    entries = report["inverters"]
    assert [e["inverter"] for e in entries] == ["neural-cleanse", "blend-inversion"]
    assert [e["png"] for e in entries] == ["triggers-neural-cleanse.png", "triggers-blend-inversion.png"]
    for entry in entries:  # FIELD=VALUE and the shorthands set every inverter
        assert entry["inverter_config"]["steps"] == 2 and entry["inverter_config"]["batch_size"] == 4
        assert entry["classes"] == list(range(10)) and len(entry["mask_norms"]) == 10
    union = sorted({c for e in entries for c in e["flagged"]})
    assert report["flagged"] == union and report["detected"] == bool(union)
    assert ("all-to-all backdoor" in text) == (not union)


class QuietInverter(EchoInverter):
    """Flags nothing."""

    name = "quiet-inverter"

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        result = super().invert(model, data, classes)
        result.flagged = []
        return result


def test_flags_of_several_inverters_are_summed_up_and_no_flag_names_the_all_to_all_limit(
    bdtk_register: Register, model_file: Path, tmp_path: Path
) -> None:
    bdtk_register(EchoInverter, QuietInverter)
    args = [*inspect_file(model_file, tmp_path), "--force"]
    both = runner.invoke(
        app,
        [
            *args,
            "--inverter",
            "quiet-inverter",
            "--inverter",
            "echo-inverter",
            "--set",
            "echo-inverter.scale=2",
        ],
    )
    assert both.exit_code == 0, both.output
    text = one_line(both.output)
    assert "Flagged by any inverter: 9 by echo-inverter" in text and "all-to-all" not in text
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["flagged_by"] == {"9": ["echo-inverter"]}
    assert [e["inverter_config"]["scale"] for e in report["inverters"]] == [1.0, 2.0]
    quiet = runner.invoke(app, [*args, "--inverter", "quiet-inverter"])
    assert quiet.exit_code == 0, quiet.output
    text = one_line(quiet.output)
    assert "No backdoor detected (quiet-inverter flagged no class)" in text
    assert (
        "Note: an all-to-all backdoor (every class a target, e.g. badnets.mode=all-to-all) is not "
        "detectable by an outlier test: when every class is a target, no class stands out." in text
    )
    assert json.loads((tmp_path / "inspect.json").read_text())["inverter"] == "quiet-inverter"


def test_periodic_inversion_shows_its_signals_and_draws_them(model_file: Path, tmp_path: Path) -> None:
    args = [*inspect_file(model_file, tmp_path), "--inverter", "periodic-inversion"]
    result = runner.invoke(app, [*args, "--set", "phases=2", "--set", "search_images=32"])
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "Trigger inversion by periodic-inversion" in text
    assert "amplitude" in text and "periods, phase" in text
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["inverter"] == "periodic-inversion" and len(report["mask_norms"]) == 10
    assert (tmp_path / "triggers.png").stat().st_size > 0

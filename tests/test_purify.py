"""Purify (and inspect) your own model: model files of any architecture, image folders, the
`bdtk purify` command, the Python API, and bad input → one clear message with nothing written.

Everything is tiny (16×16 images, a handful per class) so the module runs in well under a minute on
two CPU cores; one test runs torchvision's ResNet-18 end to end, one runs MCLDef for a few steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import backdoor_toolkit as bdtk
from backdoor_toolkit import (
    AdaptedClassifier,
    BdtkError,
    Capability,
    DefenseData,
    ImageClassifier,
    InversionResult,
    ModelRequirementError,
    PluginMeta,
    PurificationResult,
    Purifier,
    load_image_folder,
    load_model,
)
from backdoor_toolkit.cli import app
from backdoor_toolkit.data import DataSpec
from backdoor_toolkit.models import create_model
from backdoor_toolkit.plugins import get_registry

runner = CliRunner()
Register = Callable[..., str]
pytestmark = pytest.mark.usefixtures("one_thread")

NETS_PY = '''
from torch import nn


def make() -> nn.Module:
    """A tiny CNN outside the zoo: conv-BN-ReLU, pooled, one hidden Linear, then the head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4),
    )
'''


def one_line(text: str) -> str:
    return " ".join(text.split())


def write_folder(
    root: Path, classes: int = 4, per_class: int = 6, size: int = 16, mode: str = "RGB", seed: int = 0
) -> Path:
    """An ImageFolder tree of random images; class k has a brighter top-left corner (a weak signal)."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (size, size, channels), dtype=np.uint8)
            pixels[: size // 4, : size // 4] += np.uint8(30 * k)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("purify")


@pytest.fixture(scope="module")
def rgb_folder(work: Path) -> Path:
    return write_folder(work / "clean-rgb")


@pytest.fixture(scope="module")
def gray_folder(work: Path) -> Path:
    return write_folder(work / "clean-gray", mode="L", seed=1)


@pytest.fixture(scope="module")
def zoo_file(work: Path) -> Path:
    """A small-cnn for 1-channel images and 4 classes."""
    torch.manual_seed(0)
    spec = DataSpec("x", 4, 1, 16, 16, (0.5,), (0.5,), False)
    path = work / "small.safetensors"
    save_file(create_model("small-cnn", spec).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def nets_py(work: Path) -> Path:
    path = work / "nets.py"
    path.write_text(NETS_PY)
    return path


@pytest.fixture(scope="module")
def factory_file(work: Path, nets_py: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_for_test", nets_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    path = work / "tiny.safetensors"
    save_file(module.make().state_dict(), str(path))
    return path


def purify_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["purify", str(model), "--out", str(out), "--device", "cpu", "--set", "batch_size=8", *extra]


# --- the done-when: a torchvision ResNet-18 state dict and a folder of images ----------------------


def test_torchvision_resnet18_and_a_folder_give_purified_weights_and_a_report(
    rgb_folder: Path, tmp_path: Path
) -> None:
    import torchvision

    torch.manual_seed(0)
    source = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=4).state_dict(), str(source))
    out = tmp_path / "out" / "clean.safetensors"
    args = purify_args(
        source, out, "--model", "torchvision:resnet18", "--data", f"folder:{rgb_folder}",
        "--defense", "finetune", "--set", "epochs=1", "--mean", "0.5,0.5,0.5", "--std", "0.25",
    )  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "held-out val accuracy" in text and "features: the input of 'fc'" in text
    # the weights load into the user's own architecture as they are
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict(load_file(str(out)))
    meta = json.loads(out.with_suffix(".json").read_text())
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["architecture"] == "torchvision:resnet18" and meta["defense"] == "finetune"
    assert meta["defense_config"]["epochs"] == 1 and meta["image_size"] == [16, 16]
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.25] and meta["bdtk"] and meta["date"]
    report = json.loads((tmp_path / "out" / "clean.report.json").read_text())
    assert report["data"]["train_images"] + report["data"]["val_images"] == 24
    assert set(report["val"]) >= {"accuracy_before", "accuracy_after"} and report["weights_hold_model"]
    # the JSON beside the purified file is enough to load it again
    again = load_model(out)
    assert again.architecture == "torchvision:resnet18" and again.normalization == "metadata"


# --- a recovered trigger: its success before and after, and its picture -------------------------


class CornerTrigger(Purifier):
    """Returns an 'inversion' whose trigger for class 1 is a white 4×4 corner; changes nothing."""

    name = "corner-trigger"
    meta = PluginMeta(summary="test-only purifier that reports a recovered trigger")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        k, (c, h, w) = data.spec.num_classes, data.spec.image_shape
        masks = torch.zeros(k, 1, h, w)
        masks[:, :, :4, :4] = 1
        inversion = InversionResult(
            list(range(k)), masks, torch.ones(k, c, h, w), masks.flatten(1).sum(1), torch.zeros(k),
            torch.zeros(k), flagged=[1],
        )  # fmt: skip
        return PurificationResult(model, modified=False, inversion=inversion, diagnostics=inversion.summary())


def test_a_recovered_trigger_is_measured_before_and_after_and_drawn(
    bdtk_register: Register, zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    bdtk_register(CornerTrigger)
    out = tmp_path / "p.safetensors"
    test = write_folder(tmp_path / "test", per_class=3, mode="L", seed=5)
    args = ["purify", str(zoo_file), "--model", "small-cnn", "--data", f"folder:{gray_folder}"]
    args += ["--test-data", f"folder:{test}", "--defense", "corner-trigger", "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "recovered trigger → class 1" in text and "test accuracy (12 images)" in text
    assert "returned unchanged" in text
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert set(report["val"]["trigger_success"]) == {"1"} and report["test"]["images"] == 12
    success = report["test"]["trigger_success"]["1"]
    assert success["before"] == success["after"]  # the model was not changed
    assert Image.open(tmp_path / "p.triggers.png").size[0] > 4 * 16


def test_mcldef_with_a_few_steps_purifies_a_zoo_model(
    zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    settings = [
        "target=0", "epochs=1", "early_stop=false", "min_attack_success=0",
        'inverter_config={"steps": 3, "batch_size": 8, "eval_images": 8}',
    ]  # fmt: skip
    args = purify_args(zoo_file, out, "--model", "small-cnn", "--data", f"folder:{gray_folder}")
    result = runner.invoke(app, [*args, *[x for s in settings for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert "recovered trigger → class 0" in one_line(result.output)
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["modified"] and report["recovered_targets"] == [0]  # a known target: inverted alone
    assert (tmp_path / "m.triggers.png").exists()
    assert set(load_file(str(out))) == set(load_file(str(zoo_file)))  # same keys: a zoo model's file


# --- any PyTorch model: MODULE:FACTORY, feature layers, capabilities ----------------------------


def test_a_factory_model_is_adapted_and_a_defense_it_cannot_serve_refuses(
    factory_file: Path, nets_py: Path, rgb_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "n.safetensors"
    base = purify_args(factory_file, out, "--model", f"{nets_py}:make", "--data", f"folder:{rgb_folder}")
    result = runner.invoke(app, [*base, "--defense", "nad"])
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "needs a model with layer_groups" in text and "cannot be derived" in text
    assert not list(tmp_path.iterdir())
    result = runner.invoke(app, [*base, "--defense", "finetune", "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    assert "features: the input of '7'" in one_line(result.output)
    assert (tmp_path / "n.safetensors").exists()


def test_the_penultimate_layer_can_be_named_and_is_checked(factory_file: Path, nets_py: Path) -> None:
    folder_images = torch.rand(4, 3, 16, 16)
    loaded = load_model(factory_file, f"{nets_py}:make", feature_layer="6")  # the ReLU before the head
    model = loaded.model
    assert isinstance(model, AdaptedClassifier)
    model.verify(folder_images)
    assert Capability.FEATURES in model.capabilities() and model.features(folder_images).shape == (4, 6)
    wrong = load_model(factory_file, f"{nets_py}:make", feature_layer="3").model  # 8 pooled maps
    assert isinstance(wrong, AdaptedClassifier)
    wrong.verify(folder_images)
    assert Capability.FEATURES not in wrong.capabilities()
    with pytest.raises(ModelRequirementError, match="--feature-layer"):
        bdtk.models.check_capabilities(wrong, [Capability.FEATURES], "Defense 'mcldef'")
    with pytest.raises(BdtkError, match="Did you mean"):
        load_model(factory_file, f"{nets_py}:make", feature_layer="66")


def test_inspect_takes_the_same_model_and_data_options(
    factory_file: Path, nets_py: Path, rgb_folder: Path, tmp_path: Path
) -> None:
    args = ["inspect", str(factory_file), "--model", f"{nets_py}:make", "--data", f"folder:{rgb_folder}"]
    args += ["--mean", "0.5", "--std", "0.5", "--image-size", "12", "--steps", "2", "--set", "batch_size=4"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["classes"] == [0, 1, 2, 3] and report["model"] == f"{nets_py}:make"
    assert report["model_sha256"]


# --- the Python API -------------------------------------------------------------------------------


def test_the_python_api_purifies_and_inspects_a_plain_module(
    nets_py: Path, rgb_folder: Path, tmp_path: Path
) -> None:
    from backdoor_toolkit.models.adapter import factory_network

    torch.manual_seed(0)
    net = factory_network(f"{nets_py}:make")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = bdtk.purify(
        net, rgb_folder, "finetune", epochs=1, batch_size=8, device="cpu", architecture=f"{nets_py}:make"
    )
    assert isinstance(report, bdtk.PurifyReport) and report.result.modified
    assert 0 <= report.val.accuracy.after <= 1 and report.test is None and report.inversion is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy was purified
    paths = report.save(tmp_path / "api.safetensors")
    assert paths.weights.exists() and paths.report.exists() and not paths.triggers.exists()
    with pytest.raises(BdtkError, match="exists; pass --force"):
        report.save(tmp_path / "api.safetensors")
    # the JSON records the factory, but loading it back takes the user's word, not the file's
    assert load_model(paths.weights, f"{nets_py}:make").metadata["architecture"] == f"{nets_py}:make"
    with pytest.raises(BdtkError, match="never runs code"):
        load_model(paths.weights)
    found = bdtk.inspect(net, f"folder:{rgb_folder}", steps=2, batch_size=4, device="cpu")
    assert isinstance(found.result, InversionResult) and found.result.classes == [0, 1, 2, 3]
    assert found.train_images + found.val_images == 24


class HookLeaving(Purifier):
    """Changes the model by a forward hook only: its weights alone are not the purified model."""

    name = "hook-leaving"
    meta = PluginMeta(summary="test-only purifier whose change a state dict cannot hold")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return -output

        model.fc.register_forward_hook(hook)
        return PurificationResult(model)


def test_a_model_its_weights_do_not_hold_is_never_written(
    bdtk_register: Register, zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    bdtk_register(HookLeaving)
    out = tmp_path / "h.safetensors"
    args = ["purify", str(zoo_file), "--model", "small-cnn", "--data", f"folder:{gray_folder}"]
    result = runner.invoke(app, [*args, "--out", str(out), "--defense", "hook-leaving", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "weights do not hold" in one_line(result.output)
    assert not list(tmp_path.iterdir())


def test_fine_pruning_writes_weights_that_reproduce_the_pruned_model(
    zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    """The channel mask is folded into the weights, so the file alone is the purified model."""
    settings = ["epochs=1", "max_val_drop=1", "max_prune_ratio=0.5"]  # prune, whatever the val accuracy
    out = tmp_path / "fp.safetensors"
    args = purify_args(zoo_file, out, "--model", "small-cnn", "--data", f"folder:{gray_folder}")
    result = runner.invoke(app, [*args, "-d", "fine-pruning", *[x for s in settings for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fp.report.json").read_text())
    assert report["weights_hold_model"] and report["diagnostics"]["pruned_count"] == 64
    assert report["diagnostics"]["pruning_in_weights"] == "groups.2.1"
    # the same purification in Python: the saved file, loaded into a plain small-cnn, gives its outputs
    net = load_model(zoo_file, "small-cnn").model
    purified = bdtk.purify(
        net, f"folder:{gray_folder}", "fine-pruning", epochs=1, max_val_drop=1, max_prune_ratio=0.5,
        batch_size=8, device="cpu", architecture="small-cnn",
    )  # fmt: skip
    paths = purified.save(tmp_path / "api.safetensors")
    again = load_model(paths.weights).model
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), purified.model.eval()(x))
    pruned = purified.result.diagnostics["pruned_channels"]
    assert torch.count_nonzero(again.final_maps(x)[:, pruned]) == 0


# --- image folders ---------------------------------------------------------------------------------


def test_image_folders_read_like_torchvision(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for name, size in (("b", (10, 12)), ("a", (20, 20))):
        (root / name / "deeper").mkdir(parents=True)
        Image.new("RGB", size[::-1], (200, 10, 10)).save(root / name / "deeper" / "x.PNG")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BdtkError, match="different sizes"):
        load_image_folder(root, channels=1)
    images = load_image_folder(root, channels=1, image_size=(8, 6))
    assert images.classes == ["a", "b"] and images.data.labels.tolist() == [0, 1]
    assert images.data.images.shape == (2, 1, 8, 6) and images.data.images.dtype == torch.uint8
    assert [p.name for p in images.skipped] == ["broken.jpg"]
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are no class
    assert load_image_folder(root, channels=1, image_size=(8, 6)).classes == ["a", "b"]
    assert "cannot identify image file" in images.skip_reasons[root / "a" / "broken.jpg"]


def test_a_model_without_a_convolution_reads_a_folder_as_its_images_are(
    gray_folder: Path, tmp_path: Path
) -> None:
    """An MLP gives no channel count to read off its first convolution: greyscale images stay one
    channel (they were read as RGB, and an MLP on 1×16×16 inputs could not be purified)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 4))
    report = bdtk.purify(mlp, gray_folder, "finetune", epochs=1, batch_size=8, device="cpu")
    assert report.result.modified and 0 <= report.val.accuracy.after <= 1
    mixed = tmp_path / "mixed"
    for name, mode in (("a", "L"), ("b", "RGB")):
        (mixed / name).mkdir(parents=True)
        Image.new(mode, (4, 4), 90).save(mixed / name / "x.png")
    images = load_image_folder(mixed, channels=None)
    assert images.data.images.shape == (2, 3, 4, 4)  # greyscale beside colour: all read as colour
    assert torch.equal(images.data.images[0], torch.full((3, 4, 4), 90, dtype=torch.uint8))


def test_image_folders_never_loop_and_count_each_image_once(tmp_path: Path) -> None:
    """A link back up (`class_0/up -> ..`) once made the walk endless, and links to another class's
    folder or file counted its images twice under the wrong label; a link out of the folder is
    followed as ImageFolder follows it."""
    root = write_folder(tmp_path / "f", classes=2, per_class=3, mode="L")
    outside = write_folder(tmp_path / "elsewhere", classes=1, per_class=2, mode="L") / "class_0"
    (root / "class_0" / "up").symlink_to("..")
    (root / "class_0" / "sibling").symlink_to(root / "class_1")
    (root / "class_0" / "stolen.png").symlink_to(root / "class_1" / "0.png")
    (root / "class_1" / "extra").symlink_to(outside)
    (root / "class_1" / "extra_again").symlink_to(outside)
    images = load_image_folder(root, channels=1)
    assert images.data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    ignored = sorted(str(p.relative_to(root)) for p in images.ignored)
    assert ignored == ["class_0/sibling", "class_0/stolen.png", "class_0/up", "class_1/extra_again"]
    from backdoor_toolkit.purification import load_clean_data

    clean = load_clean_data(root, channels=1)
    assert clean.ignored == 4 and clean.describe()["ignored_links_or_repeats"] == 4


def test_image_folders_that_would_exhaust_memory_stop_at_their_first_bad_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few tiny PNGs that declare 9000x9000 pixels each were all decoded at full size (6 GB for
    twenty) before the run failed for memory."""
    from backdoor_toolkit import image_folders

    wide = tmp_path / "wide"
    for name in ("a", "b"):
        (wide / name).mkdir(parents=True)
        Image.new("L", (5000, 20)).save(wide / name / "wide.png")
    with pytest.raises(BdtkError, match=r"are 20x5000 \(wide.png\); past 4096 a side give .*--image-size"):
        load_image_folder(wide, channels=1)
    assert load_image_folder(wide, channels=1, image_size=(8, 8)).data.images.shape == (2, 1, 8, 8)
    root = write_folder(tmp_path / "f", classes=2, per_class=2, size=8, mode="L")
    monkeypatch.setattr(image_folders, "MAX_FOLDER_BYTES", 4 * 8 * 8 - 1)
    with pytest.raises(BdtkError, match=r"4 images of 64 bytes each would take .* smaller --image-size"):
        load_image_folder(root, channels=1)
    assert len(load_image_folder(root, channels=1, image_size=(4, 4)).data) == 4


def test_image_folders_skip_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image past PIL's pixel limit (an error past twice the limit, a warning below it) is
    skipped like a corrupt file instead of ending the run with an unexpected error."""
    root = write_folder(tmp_path / "f", classes=2, per_class=2, size=8, mode="L")
    Image.new("L", (12, 12)).save(root / "class_0" / "warns.png")
    Image.new("L", (20, 20)).save(root / "class_1" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    images = load_image_folder(root, channels=1)
    assert sorted(p.name for p in images.skipped) == ["bomb.png", "warns.png"]
    assert all("decompression bomb" in why for why in images.skip_reasons.values())
    assert images.data.labels.tolist() == [0, 0, 1, 1]


# --- bad input: one clear message, exit 2, nothing written ---------------------------------------


def _bad_files(work: Path, zoo_file: Path) -> dict[str, Path]:
    text = work / "bad" / "notes.safetensors"
    text.parent.mkdir(exist_ok=True)
    text.write_text("hello, I am not a tensor file")
    pickle = work / "bad" / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    state = load_file(str(zoo_file))
    state["groups.1.0.weight"] = torch.zeros(64, 32, 5, 5)
    reshaped = work / "bad" / "reshaped.safetensors"
    save_file(state, str(reshaped))
    empty = work / "bad" / "empty"
    (empty / "cat").mkdir(parents=True, exist_ok=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    broken = work / "bad" / "broken"
    for k in range(4):
        (broken / f"c{k}").mkdir(parents=True, exist_ok=True)
        (broken / f"c{k}" / "x.png").write_bytes(b"\x89PNG but not really")
    state = load_file(str(zoo_file))
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    nan = work / "bad" / "nan.safetensors"
    save_file(state, str(nan))
    state = load_file(str(zoo_file))
    for key in [k for k in state if k.endswith("running_var")]:
        state[key] = torch.full_like(state[key], -1.0)  # finite weights, NaN outputs
    negvar = work / "bad" / "negvar.safetensors"
    save_file(state, str(negvar))
    badmeta = work / "bad" / "badmeta.safetensors"
    badmeta.write_bytes(zoo_file.read_bytes())
    badmeta.with_suffix(".json").write_text(json.dumps({"format": "bdtk-model/1", "architecture": 5}))
    return {
        "text": text, "pickle": pickle, "reshaped": reshaped, "empty": empty, "broken": broken, "nan": nan,
        "three": write_folder(work / "bad" / "three", classes=3, per_class=2, mode="L"),
        "negvar": negvar, "badmeta": badmeta,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("text", [], "is not a safetensors file"),
        ("pickle", [], "is a PyTorch pickle (torch.save), not safetensors"),
        (
            "reshaped",
            [],
            "tensor 'groups.1.0.weight' has shape (64, 32, 5, 5) in the file but (64, 32, 3, 3)",
        ),
        ("zoo", ["--model", "wrn-16-1"], "does not hold 'wrn-16-1' weights: the file lacks tensor"),
        ("zoo", ["--model", "resnet-9000"], "Unknown architecture 'resnet-9000'"),
        ("zoo", ["--model", "torchvision:resnet9000"], "Unknown torchvision classification model"),
        ("zoo", ["--data", "folder:{empty}"], "has no images"),
        ("zoo", ["--data", "folder:{broken}"], "none of its 4 image files could be read"),
        (
            "zoo",
            ["--data", "folder:{three}"],
            "has 3 classes (class_0, class_1, class_2), but the model outputs 4",
        ),
        ("zoo", ["--data", "folder:{missing}"], "does not exist"),
        ("zoo", ["--defense", "nowhere"], "Unknown purifier 'nowhere'"),
        ("zoo", ["--set", "epochz=1"], "epochz"),
        ("zoo", ["--mean", "a,b"], "--mean expects comma-separated numbers"),
        ("zoo", ["--mean", "nan"], "--mean must be finite numbers"),
        ("nan", [], "tensor 'fc.weight' holds NaN or infinite values"),
        ("negvar", [], "outputs NaN or inf on"),
        ("badmeta", [], "'architecture' must be a model name (text), got 5"),
        ("zoo", ["--clean-ratio", "nan"], "--clean-ratio must be above 0 and at most 1"),
        ("zoo", ["--image-size", "0"], "--image-size 0x0 is out of range"),
        ("zoo", ["--out-name", "x.pt"], "give a .safetensors path"),
        ("zoo", ["--out-name", "exists.safetensors"], "exists; pass --force to overwrite it"),
    ],
)
def test_bad_input_is_one_message_and_writes_nothing(
    work: Path, zoo_file: Path, gray_folder: Path, tmp_path: Path, model: str, extra: list[str], message: str
) -> None:
    files = {**_bad_files(work, zoo_file), "zoo": zoo_file, "missing": work / "nope"}
    out = tmp_path / "out" / "p.safetensors"
    if extra[:1] == ["--out-name"]:
        out, extra = tmp_path / "out" / extra[1], []
        if out.name.startswith("exists"):
            out.parent.mkdir()
            out.write_bytes(b"keep me")
    extra = [e.format(**files) for e in extra]
    args = ["purify", str(files[model]), "--model", "small-cnn", "--data", f"folder:{gray_folder}"]
    args += ["--defense", "finetune", "--out", str(out), "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in one_line(result.output)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    written = sorted(p.name for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert written == (["exists.safetensors"] if out.name.startswith("exists") else [])
    if out.name.startswith("exists"):
        assert out.read_bytes() == b"keep me"


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["purify", str(zoo_file), "--model", "small-cnn", "--data", f"folder:{gray_folder}"]
    result = runner.invoke(app, [*args, "--defense", "finetune", "--out", str(blocker / "p.safetensors")])
    assert result.exit_code == 2, result.output
    assert "a-file is a file, not a folder" in one_line(result.output)
    assert "purified the model" not in result.output  # refused before the defense ran


@pytest.mark.parametrize("command", ["purify", "inspect"])
def test_a_factory_named_beside_a_model_file_is_never_imported(
    work: Path, factory_file: Path, gray_folder: Path, tmp_path: Path, command: str
) -> None:
    """A downloaded model and its JSON are data: a MODULE:FACTORY there must not run code."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    marker = tmp_path / "ran"
    (bundle / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n" + NETS_PY
    )
    model = bundle / "model.safetensors"
    model.write_bytes(factory_file.read_bytes())
    record = {"format": "bdtk-model/1", "architecture": f"{bundle / 'evil.py'}:make"}
    (bundle / "model.json").write_text(json.dumps(record))
    args = [command, str(model), "--data", f"folder:{gray_folder}", "--device", "cpu"]
    args += ["--defense", "finetune", "--out", str(tmp_path / "p.safetensors")] if command == "purify" else []
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "never runs code" in one_line(result.output) and "--model" in one_line(result.output)
    assert not marker.exists()


def test_clean_images_that_miss_classes_are_warned_about(zoo_file: Path, tmp_path: Path) -> None:
    """A class with one image cannot be in both parts: early stops and thresholds chosen on a val
    part without it mean little, and the user should know which class to add images to. Two
    images a class are enough: the folder is split class by class."""
    few = write_folder(tmp_path / "few", classes=4, per_class=2, mode="L")
    args = purify_args(
        zoo_file, tmp_path / "p.safetensors", "--model", "small-cnn", "--data", f"folder:{few}"
    )
    result = runner.invoke(app, [*args, "--defense", "finetune", "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    assert "held-out val part" not in result.output  # one val image of each class
    (few / "class_3" / "1.png").unlink()
    result = runner.invoke(app, [*args, "--defense", "finetune", "--set", "epochs=1", "--force"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "cover 4 of 4 classes for training and 3 for the held-out val part (3 images)" in said
    assert "classes with fewer than 2 images: class_3 (1)" in said


def test_an_unreadable_json_beside_a_model_is_an_error_not_ignored(zoo_file: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(zoo_file.read_bytes())
    (tmp_path / "m.json").write_text("{ not json")
    with pytest.raises(BdtkError, match="is not readable JSON"):
        load_model(model, "small-cnn")


def test_a_zoo_network_saved_without_its_normalisation_loads_with_mean_and_std(
    zoo_file: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    bare = {k: v for k, v in load_file(zoo_file).items() if not k.startswith("normalize.")}
    path = tmp_path / "bare.safetensors"
    save_file(bare, path)
    with pytest.raises(BdtkError, match=r"no normalize.mean or normalize.std tensor .* --mean and --std"):
        load_model(path, "small-cnn")
    loaded = load_model(path, "small-cnn", mean=[0.25], std=[0.5])
    assert loaded.model.normalize.mean.flatten().tolist() == [0.25] and loaded.normalization == "given"
    for name, tensor in loaded.model.state_dict().items():
        if name in bare:
            assert torch.equal(tensor, bare[name])


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("[]", "holds a JSON list, not a model's JSON object"),
        ('"resnet18"', "holds a JSON str"),
        ('{"format": "bdtk-model/9", "architecture": "small-cnn"}', "of format 'bdtk-model/9'"),
        ('{"architecture": "small-cnn", "mean": [0.5]}', 'names architecture, mean but has no "format"'),
        ('{"format": 1, "architecture": "small-cnn"}', "(its format: 1)"),
        ('{"format": "bdtk-model/1", "classes": ["a", "b"]}', "classes is 2 names, but the model outputs 4"),
        ('{"format": "bdtk-model/1", "classes": 5}', "classes is a int, but the model outputs 4"),
        (
            '{"format": "bdtk-model/1", "channels": 3}',
            "channels is 3, but the model's first convolution reads 1",
        ),
    ],
)
def test_a_json_beside_a_model_that_bdtk_would_misread_is_an_error(
    zoo_file: Path, tmp_path: Path, content: str, said: str
) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(zoo_file.read_bytes())
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(BdtkError, match=r"fix or remove it|remove the file") as caught:
        load_model(model, "small-cnn")
    assert said in str(caught.value)


def test_another_records_json_beside_a_model_is_ignored(zoo_file: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(zoo_file.read_bytes())
    (tmp_path / "m.json").write_text('{"format": "bdtk-cache/3", "key": "abc", "metadata": {}}')
    assert load_model(model, "small-cnn").metadata == {}


def test_unreadable_images_are_skipped_and_named_with_why(zoo_file: Path, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "clean", per_class=3, mode="L")
    (folder / "class_2" / "zz.png").write_bytes(b"broken")
    out = tmp_path / "p.safetensors"
    args = purify_args(zoo_file, out, "--model", "small-cnn", "--data", f"folder:{folder}", "-d", "finetune")
    result = runner.invoke(app, [*args, "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    said = one_line(result.output)
    assert "Skipped 1 unreadable image file(s)" in said and "zz.png: cannot identify image file" in said
    data = json.loads((tmp_path / "p.report.json").read_text())["data"]
    assert data["skipped_images"] == 1
    assert data["skipped_files"][0]["file"].endswith("zz.png")
    assert "cannot identify image file" in data["skipped_files"][0]["reason"]
    # and --force overwrites what a first run wrote
    assert runner.invoke(app, [*args, "--set", "epochs=1"]).exit_code == 2
    result = runner.invoke(app, [*args, "--set", "epochs=1", "--force"])
    assert result.exit_code == 0, result.output


# --- every registered purifier -----------------------------------------------------------------------

#: Small settings for the purifiers that declare no `conformance_config` (a full scan or 20 epochs
#: would only make this test slow; what is checked is that the result can be written and read back).
QUICK = {
    "mcldef": {
        "target": 0,
        "epochs": 1,
        "early_stop": False,
        "min_attack_success": 0.0,
        "inverter_config": {"steps": 5},
    },
    "finetune": {"epochs": 1},
    "fine-pruning": {"epochs": 1},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "anp": {"iterations": 2},
}


@pytest.mark.parametrize("name", sorted(get_registry().by_kind["purifier"]))
def test_every_registered_purifier_writes_weights_that_reproduce_its_model(
    name: str, zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    """`bdtk purify` promises every registered purifier: the saved file alone is the purified model."""
    cls = bdtk.get_purifier(name)
    fields = cls.Config.model_fields
    settings = {**getattr(cls, "conformance_config", {}), **QUICK.get(name, {})}
    settings = {k: v for k, v in settings.items() if k in fields}
    if "batch_size" in fields:
        settings["batch_size"] = 8
    net = load_model(zoo_file, "small-cnn").model
    purified = bdtk.purify(
        net, f"folder:{gray_folder}", name, device="cpu", architecture="small-cnn", **settings
    )
    paths = purified.save(tmp_path / f"{name}.safetensors")
    again = load_model(paths.weights).model.eval()
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), purified.model.eval()(x))


def test_sixteen_bit_greyscale_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert("L") clips 16-bit values at 255: a 16-bit scan once loaded nearly all white."""
    import numpy as np
    from PIL import Image

    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        ramp = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
        Image.fromarray(ramp).save(tmp_path / f"c{k}" / "x.png")
    data = load_image_folder(tmp_path, channels=1)
    row = data.data.images[0, 0].flatten().tolist()
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row) and len(set(row)) == 16


def test_out_never_overwrites_the_model_being_purified(
    zoo_file: Path, gray_folder: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(zoo_file.read_bytes())
    args = ["purify", str(model), "--model", "small-cnn", "--data", f"folder:{gray_folder}", "-d", "finetune"]
    result = runner.invoke(app, [*args, "--out", str(model), "--force"])
    assert result.exit_code == 2 and "which is the input model's" in one_line(result.output)
    assert model.read_bytes() == zoo_file.read_bytes()

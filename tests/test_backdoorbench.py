"""BackdoorBench import through the CLI: a synthetic attack result with BackdoorBench's structure
(NumPy index arrays, int64 dict keys, PNGs under the run folder) becomes a victim that
`bdtk benchmark --victim` defends; malicious or malformed files are refused with one message.

The clean dataset is a tiny MNIST written as IDX files (bdtk's loader reads them from --data-dir),
so nothing is downloaded. BackdoorBench's own models take 3 channels; the synthetic model takes 1
to match MNIST, which changes no key name and only the first convolution's shape. A torchvision
ResNet-18 (the network BackdoorBench's `resnet18` is) is imported on a tiny CIFAR-10 in
torchvision's pickled-batch layout instead.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from typer.testing import CliRunner

from backdoor_toolkit.backdoorbench import DATASETS, REQUIRED_KEYS, safe_globals_names, safe_load
from backdoor_toolkit.cli import app
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.errors import BdtkError, ConfigError
from backdoor_toolkit.models import AdaptedClassifier, load_model
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.victim_benchmark import run_victim_benchmark
from backdoor_toolkit.victims import VictimError, load_victim

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
N_TRAIN, N_TEST, TARGET = 40, 20, 0
POISONED_TRAIN = [1, 5, 9]


# --- a reference PreActResNet18 with BackdoorBench's names and forward pass ----------------------


class _RefBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus identity, or a 1×1 projection (in a Sequential) of the
    pre-activated input; the forward pass BackdoorBench's PreActBlock computes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class _RefPreActResNet18(nn.Module):
    """conv1 → layer1..4 → average pool → linear, with no BN-ReLU before pooling."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin = 64
        for i, width in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(_RefBlock(cin, width, stride), _RefBlock(width, width, 1))
            setattr(self, f"layer{i}", layer)
            cin = width
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _away_from_init(model: nn.Module) -> None:
    """BatchNorm statistics and affine weights far from their init, so that a wrongly mapped or
    missing layer changes the logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                mean, var, count = module.running_mean, module.running_var, module.num_batches_tracked
                assert mean is not None and var is not None and count is not None
                mean.uniform_(-0.2, 0.2)
                var.uniform_(0.5, 1.5)
                count.fill_(100)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


@pytest.fixture(scope="module")
def reference() -> _RefPreActResNet18:
    """BackdoorBench's PreAct-ResNet-18 for MNIST's one channel, away from its init."""
    torch.manual_seed(0)
    model = _RefPreActResNet18(1, 10)
    _away_from_init(model)
    return model.eval()


@pytest.fixture(scope="module")
def tv_reference() -> nn.Module:
    """What BackdoorBench's `resnet18` is: torchvision's constructor with `num_classes` alone."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _away_from_init(model)
    return model.eval()


# --- the synthetic BackdoorBench run ------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MNIST in IDX files: 40 training and 20 test images."""
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 in torchvision's layout: 5 training batches of 8 images, 20 test images."""
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> None:
        data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(data))

    for k in range(1, 6):
        batch(f"data_batch_{k}", N_TRAIN // 5)
    batch("test_batch", N_TEST)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    return root


@pytest.fixture
def tiny_cifar(cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`cifar_dir`, accepted by torchvision's loader (which otherwise checks the real files' MD5s)."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    return cifar_dir


def resnet18_run(root: Path, reference: nn.Module, **changes: Any) -> Path:
    """A BackdoorBench `resnet18` run on CIFAR-10; the PNGs stay MNIST-sized grey images, which the
    import converts and resizes to 32×32 RGB as BackdoorBench's test transform would."""
    cifar = {"clean_data": "cifar10", "img_size": [32, 32, 3], "data_path": "./data/cifar10"}
    return make_run(root, reference, **{"model_name": "resnet18", **cifar, **changes})


def _dataset_state(
    n: int,
    poisoned: list[int],
    folder: str,
    labels: list[int],
    images: dict[int, np.ndarray] | None,
    run: Path,
) -> dict[str, Any]:
    """A `prepro_cls_DatasetBD_v2.retrieve_state()` in the on-disk mode, as BackdoorBench saves it."""
    indicator = np.zeros(n)  # float64, as np.zeros makes it
    indicator[poisoned] = 1
    data_dict = {}
    for i in poisoned:
        path = f"{folder}/{labels[i]}/{i}.png"
        data_dict[np.int64(i)] = {"path": path, "other_info": [TARGET, labels[i]]}
        if images is not None:
            png = run / Path(path).relative_to(Path(folder).parent)
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(png)
    return {
        "bd_data_container": {"save_folder_path": folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.array(poisoned, dtype=np.int64),
        "poison_indicator": indicator,
        "save_folder_path": folder,
    }


def bb_images() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i: rng.integers(0, 256, (28, 28), dtype=np.uint8) for i in range(N_TEST)}


def make_run(root: Path, reference: nn.Module, layout: str = "v2", **changes: Any) -> Path:
    """A BackdoorBench run folder (record/<run>/attack_result.pt and its PNGs); `changes` replace
    top-level keys (None removes one)."""
    run = root / "record" / "bb-badnet"
    run.mkdir(parents=True)
    labels_test = [i % 10 for i in range(N_TEST)]
    non_target = [i for i in range(N_TEST) if labels_test[i] != TARGET]
    images = bb_images()
    if layout == "v2":
        folder = "./record/bb-badnet/bd_test_dataset"
        bd_test = _dataset_state(N_TEST, non_target, folder, labels_test, images, run)
        labels_train = [i % 10 for i in range(N_TRAIN)]
        folder = "./record/bb-badnet/bd_train_dataset"
        bd_train = _dataset_state(N_TRAIN, POISONED_TRAIN, folder, labels_train, None, run)
    else:  # early releases: images inline as float N×C×H×W in 0..255, backdoor labels only
        x = torch.tensor(np.stack([images[i] for i in non_target]))[:, None].float()
        bd_test = {"x": x, "y": torch.full((len(non_target),), TARGET)}
        bd_train = {"x": x[:3], "y": torch.full((3,), TARGET), "original_index": np.array(POISONED_TRAIN)}
    result: dict[str, Any] = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": reference.state_dict(),
        "data_path": "./data/mnist",
        "img_size": [28, 28, 1],
        "clean_data": "mnist",
        "bd_train": bd_train,
        "bd_test": bd_test,
    }
    for key, value in changes.items():
        if value is None:
            result.pop(key)
        else:
            result[key] = value
    torch.save(result, run / "attack_result.pt")
    return run / "attack_result.pt"


def as_numpy1(path: Path) -> None:
    """Rewrite a torch.save file as NumPy 1.x (BackdoorBench's environment) writes it: its pickle
    names `numpy.core.multiarray` where NumPy 2 writes `numpy._core.multiarray`."""
    with zipfile.ZipFile(path) as zf:
        records = [(info.filename, zf.read(info.filename)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zf.writestr(name, data)


def import_(source: Path, out: Path, data_dir: Path | None, *extra: str) -> Any:
    args = ["import", "backdoorbench", str(source), "--out", str(out)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return runner.invoke(app, [*args, *extra])


def message(result: Any) -> str:
    return " ".join(result.output.split())


# --- import -------------------------------------------------------------------------------------


def test_import_maps_every_parameter_and_keeps_the_backdoored_images(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    source = make_run(tmp_path, reference)
    result = import_(source.parent, tmp_path / "victim", mnist_dir)  # the run folder works too
    assert result.exit_code == 0, result.output
    assert "Imported bb-badnet" in message(result) and "RA measurable" in message(result)

    victim = load_victim(tmp_path / "victim")
    assert victim.name == "bb-badnet" and victim.model_name == "preact-resnet18-bb"
    assert victim.spec.name == "mnist" and victim.spec.mean == (0.5,) and victim.spec.std == (0.5,)
    # same logits as BackdoorBench's forward pass on its normalised input
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(victim.model(x), reference((x - 0.5) / 0.5), atol=1e-4)
    # the ASR set: the PNGs, their backdoor labels and original labels, non-target images only
    non_target = [i for i in range(N_TEST) if i % 10 != TARGET]
    assert victim.bd_test.index is not None and victim.bd_test.index.tolist() == non_target
    images = bb_images()
    assert torch.equal(victim.bd_test.images[:, 0], torch.tensor(np.stack([images[i] for i in non_target])))
    assert victim.bd_test.targets.tolist() == [TARGET] * len(non_target)
    assert victim.bd_test.labels is not None
    assert victim.bd_test.labels.tolist() == [i % 10 for i in non_target]
    # the clean splits come from --data-dir; the poisoned training images are kept out of the budget
    assert len(victim.clean_train) == N_TRAIN and len(victim.clean_test) == N_TEST
    assert victim.excluded.tolist() == POISONED_TRAIN
    budget = victim.defense_data(clean_ratio=0.5, val_fraction=0.2, seed=0)
    drawn = set(budget.index_train.tolist()) | set(budget.index_val.tolist())
    assert len(drawn) == 20 and not drawn & set(POISONED_TRAIN)
    scores = victim.scores(victim.model, torch.device("cpu"))
    assert 0 <= scores.ba <= 1 and 0 <= scores.asr <= 1 and 0 <= scores.ra <= 1

    record = json.loads((tmp_path / "victim" / "victim.json").read_text())
    assert record["source"]["tool"] == "backdoorbench" and record["source"]["targets"] == [TARGET]


def test_early_layout_with_inline_images_imports_without_ra(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    source = make_run(tmp_path, reference, layout="v1")
    as_numpy1(source)  # early releases were written under NumPy 1.x
    # without --data-dir the clean data is looked for where BackdoorBench keeps it: its data_path
    # (./data/mnist) beside the record/ folder
    shutil.copytree(mnist_dir, tmp_path / "data" / "mnist")
    result = import_(source, tmp_path / "victim", None)
    assert result.exit_code == 0, result.output
    assert "no RA" in message(result)
    victim = load_victim(tmp_path / "victim")
    assert victim.bd_test.labels is None and len(victim.bd_test) == 18
    assert victim.excluded.tolist() == POISONED_TRAIN
    assert torch.isnan(torch.tensor(victim.scores(victim.model, torch.device("cpu")).ra))


@pytest.mark.parametrize(
    ("bd_test", "says"),
    [
        (
            {"x": torch.zeros(0, 1, 28, 28), "y": torch.zeros(0, dtype=torch.long)},
            "holds no backdoored test images",
        ),
        (
            {
                "x": torch.zeros(1, 1, 28, 28).expand(100_000, 1, 28, 28),
                "y": torch.zeros(100_000, dtype=torch.long),
            },
            "an expanded view of fewer stored values",
        ),
        (
            {"x": torch.zeros(N_TEST + 1, 1, 28, 28), "y": torch.zeros(N_TEST + 1, dtype=torch.long)},
            f"more than the {N_TEST} test images",
        ),
    ],
)
def test_an_early_layout_test_set_that_is_empty_or_expanded_is_one_line(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path, bd_test: dict[str, Any], says: str
) -> None:
    source = make_run(tmp_path, reference, layout="v1", bd_test=bd_test)
    result = import_(source, tmp_path / "victim", mnist_dir)
    assert result.exit_code == 2 and says in message(result), result.output


def test_an_edited_victim_is_refused(tmp_path: Path, reference: nn.Module, mnist_dir: Path) -> None:
    assert import_(make_run(tmp_path, reference), tmp_path / "victim", mnist_dir).exit_code == 0
    data = tmp_path / "victim" / "data.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(VictimError, match=r"data\.safetensors does not match"):
        load_victim(tmp_path / "victim")


def test_a_victim_whose_weights_hold_nan_is_refused(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    """Even with its hashes made to match: NaN weights would score as a perfect backdoor."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from backdoor_toolkit.victims import _content_hash

    assert import_(make_run(tmp_path, reference), tmp_path / "victim", mnist_dir).exit_code == 0
    model = tmp_path / "victim" / "model.safetensors"
    state = load_file(str(model))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(model))
    meta = tmp_path / "victim" / "victim.json"
    record = json.loads(meta.read_text())
    record["files"]["model.safetensors"] = hashlib.sha256(model.read_bytes()).hexdigest()
    record["content_hash"] = _content_hash(record)
    meta.write_text(json.dumps(record))
    with pytest.raises(VictimError, match="holds NaN or infinite values"):
        load_victim(tmp_path / "victim")

    def rehash(file: str) -> None:
        record["files"][file] = hashlib.sha256((tmp_path / "victim" / file).read_bytes()).hexdigest()
        record["content_hash"] = _content_hash(record)
        meta.write_text(json.dumps(record))

    # loosely typed data, its hashes made to match: refused by name, not a crash or a wrong count
    data_file = tmp_path / "victim" / "data.safetensors"
    pristine = load_file(str(data_file))
    for key, value, says in (
        ("clean_train.labels", pristine["clean_train.labels"].int(), "clean_train.labels is torch.int32"),
        ("clean_train.excluded", pristine["clean_train.excluded"].float(), "not int64 indices"),
        ("clean_train.excluded", torch.zeros(3, dtype=torch.long), "more than once"),
    ):
        save_file({**pristine, key: value}, str(data_file))
        rehash("data.safetensors")
        with pytest.raises(VictimError, match=says):
            load_victim(tmp_path / "victim")
    save_file(pristine, str(data_file))
    rehash("data.safetensors")
    record["spec"]["num_classes"] = "10"
    rehash("data.safetensors")
    with pytest.raises(VictimError, match="not positive integers"):
        load_victim(tmp_path / "victim")
    record["spec"]["num_classes"] = 10
    with pytest.raises(VictimError, match="does not exist"):
        load_victim(tmp_path / "nowhere")
    record["name"] = "evil\x1b[2J\nname"  # would clear a terminal and break a Markdown table
    record["content_hash"] = _content_hash(record)
    meta.write_text(json.dumps(record))
    with pytest.raises(VictimError, match="control characters"):
        load_victim(tmp_path / "victim")


# --- the safe load ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_malicious_file_is_refused_without_running(tmp_path: Path, mnist_dir: Path) -> None:
    marker = tmp_path / "pwned"
    source = tmp_path / "attack_result.pt"
    torch.save({"model_name": "preactresnet18", "model": {}, "bd_test": _Payload(marker)}, source)
    result = import_(source, tmp_path / "victim", mnist_dir)
    assert result.exit_code == 2
    text = message(result)
    assert "Refusing" in text and "io.open" in text and "nothing outside that allow-list was run" in text
    assert len(result.output.strip().splitlines()) <= 3  # one message (wrapped at most)
    assert not marker.exists()
    assert not (tmp_path / "victim").exists()


def test_a_numpy_type_outside_the_allow_list_is_named(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    """A dtype class shows only while loading (the static scan sees `numpy.dtype`): still refused."""
    source = make_run(tmp_path, reference, num_classes=np.zeros(1, dtype=np.float16))
    result = import_(source, tmp_path / "victim", mnist_dir)
    assert result.exit_code == 2
    assert "Refusing" in message(result) and "Float16DType" in message(result)


def test_the_allow_list_is_numpy_only() -> None:
    names = safe_globals_names()
    assert all(name.startswith("numpy.") for name in names)
    assert "numpy.core.multiarray._reconstruct" in names and "numpy._core.multiarray._reconstruct" in names


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model_name": "vit_b_16", "model": {}}, "'vit_b_16' has no parameter-for-parameter match"),
        ({"model_name": "resnext29", "model": {}}, "supported: alexnet, convnext_tiny, densenet121"),
        ({"model_name": "googlenet", "model": {}}, "vgg19_bn, wide_resnet50_2."),
        ({"bd_test": None, "img_size": None, "model": {}}, "lacks the keys img_size, bd_test (an incomplete"),
        (
            {"clean_data": "tiny", "model": {}},
            "'tiny' cannot be imported; supported: cifar10, cifar100, mnist",
        ),
    ],
)
def test_bad_results_get_one_message(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path, changes: dict[str, Any], expected: str
) -> None:
    result = import_(make_run(tmp_path, reference, **changes), tmp_path / "victim", mnist_dir)
    assert result.exit_code == 2, result.output
    assert expected in message(result)


def test_other_bad_input(tmp_path: Path, reference: nn.Module, mnist_dir: Path) -> None:
    source = make_run(tmp_path, reference)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    assert "not a file written by torch.save" in message(import_(not_torch, tmp_path / "v0", mnist_dir))
    # the clean data is not in the file: say what is needed
    result = import_(source, tmp_path / "v1", None)
    assert result.exit_code == 2
    assert "holds no clean images" in message(result) and "'mnist'" in message(result)
    # an existing output folder needs --force
    (tmp_path / "v2").mkdir()
    result = import_(source, tmp_path / "v2", mnist_dir)
    assert result.exit_code == 2 and "already exists; pass --force" in message(result)
    assert import_(source, tmp_path / "v2", mnist_dir, "--force").exit_code == 0
    # a PNG path that leaves the run folder
    original = safe_load(source)
    state = safe_load(source)
    entry = next(iter(state["bd_test"]["bd_data_container"]["data_dict"].values()))
    entry["path"] = "./record/bb-badnet/../../../../etc/passwd"
    torch.save(state, source)
    result = import_(source, tmp_path / "v3", mnist_dir)
    assert result.exit_code == 2 and "outside the run folder" in message(result)
    # a test image listed twice would count twice in ASR
    state = original
    index = state["bd_test"]["original_index_array"]
    index[1] = index[0]
    torch.save(state, source)
    result = import_(source, tmp_path / "v4", mnist_dir)
    assert result.exit_code == 2 and "lists a test image more than once" in message(result)


# --- purifying and inspecting the imported victim ----------------------------------------------


def test_purify_and_inspect_read_model_data_and_asr_set_from_a_victim(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    assert import_(make_run(tmp_path, reference), tmp_path / "victim", mnist_dir).exit_code == 0
    victim = load_victim(tmp_path / "victim")
    out = tmp_path / "p" / "purified.safetensors"
    settings = ["epochs=1", "batch_size=8", "max_val_drop=1", "max_prune_ratio=0.25"]
    args = ["purify", str(tmp_path / "victim"), "--out", str(out), "-d", "fine-pruning"]
    args += [*[x for s in settings for x in ("--set", s)], "--clean-ratio", "0.5", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = message(result)
    assert "normalisation the victim's" in text and "victim bb-badnet (backdoorbench)" in text
    assert "victim's backdoored test images: ASR (18 images)" in text
    report = json.loads((out.parent / "purified.report.json").read_text())
    before = victim.scores(victim.model, torch.device("cpu"))
    assert report["backdoor"]["images"] == 18
    assert report["backdoor"]["asr_before"] == pytest.approx(before.asr)
    assert report["backdoor"]["ra_before"] == pytest.approx(before.ra)
    assert report["test"]["images"] == N_TEST  # the victim's clean test set
    data = report["data"]
    assert data["train_images"] + data["val_images"] == N_TRAIN // 2 and "bb-badnet" in data["source"]
    assert report["model"]["victim_content_hash"] == victim.content_hash
    # BackdoorBench's PreAct-ResNet: the pruning is held by the head's columns, and the file reloads
    assert report["diagnostics"]["pruning_in_weights"] == "fc" and report["weights_hold_model"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "preact-resnet18-bb" and meta["victim"] == "bb-badnet"
    assert meta["mean"] == [0.5] and meta["image_size"] == [28, 28]
    assert load_model(out).architecture == "preact-resnet18-bb"

    # the victim's weights file names it too; its recorded target is shown, never used by the scan
    scan = tmp_path / "scan"
    args = ["inspect", str(tmp_path / "victim" / "model.safetensors"), "--out", str(scan)]
    args += ["--steps", "2", "--set", "batch_size=4", "--class", "0", "--class", "3"]
    result = runner.invoke(app, [*args, "--clean-ratio", "0.5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "0 (attack target)" in message(result)
    record = json.loads((scan / "inspect.json").read_text())
    assert record["victim"] == "bb-badnet" and record["true_target"] == TARGET
    assert record["model"] == "preact-resnet18-bb" and record["classes"] == [0, 3]

    # --data replaces only the clean data: own images, resized to the victim's 28×28
    folder = tmp_path / "own"
    rng = np.random.default_rng(2)
    for k in range(10):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{k}" / f"{i}.png")
    result = runner.invoke(app, [*args, "--data", f"folder:{folder}", "--device", "cpu", "--force"])
    assert result.exit_code == 0, result.output
    record = json.loads((scan / "inspect.json").read_text())
    assert record["dataset"] == f"folder:{folder}" and record["victim"] == "bb-badnet"

    # what the victim already says is not given again
    for extra in (["--model", "small-cnn"], ["--mean", "0.1"], ["--train-size", "200"]):
        result = runner.invoke(app, ["inspect", str(tmp_path / "victim"), *extra, "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert f"{extra[0]}: not with victim" in message(result)


# --- defending the imported victim --------------------------------------------------------------


def test_benchmark_runs_defenses_on_an_imported_victim(
    tmp_path: Path, reference: nn.Module, mnist_dir: Path
) -> None:
    assert import_(make_run(tmp_path, reference), tmp_path / "victim", mnist_dir).exit_code == 0
    db = tmp_path / "results.sqlite"
    args = ["benchmark", "--victim", str(tmp_path / "victim"), "-d", "finetune", "--set", "finetune.epochs=1"]
    args += ["--clean-ratio", "0.5", "--device", "cpu", "--threads", "1"]
    args += ["--db", str(db), "--output", str(tmp_path / "r.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with ResultStore(db) as store:
        rows = store.rows()
    assert sorted(r.defense for r in rows) == ["finetune", "none"]
    victim = load_victim(tmp_path / "victim")
    for row in rows:
        assert row.status == "ok" and row.attack == "bb-badnet" and row.model == "preact-resnet18-bb"
        assert row.attack_config["victim"] == victim.content_hash  # the victim is part of the identity
        assert row.ba is not None and row.asr is not None and row.ra is not None
        assert row.setting["clean_ratio"] == 0.5 and row.setting["victim_source"] == "backdoorbench"
    defended = next(r for r in rows if r.defense == "finetune")
    assert defended.der is not None and defended.seconds is not None
    assert json.loads((tmp_path / "r.json").read_text())["config"]["dataset"] == "mnist"
    # a second run finds both cells stored and skips them
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "2 cells already in" in message(again)
    with ResultStore(db) as store:
        assert len(store.rows()) == 2
    # a victim damaged since is refused, even though every one of its cells is stored
    data = tmp_path / "victim" / "data.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    damaged = runner.invoke(app, args)
    assert damaged.exit_code == 2 and "does not match" in message(damaged)


def test_benchmark_victim_refuses_grid_options(tmp_path: Path) -> None:
    result = runner.invoke(app, ["benchmark", "--victim", str(tmp_path), "--attack", "badnets"])
    assert result.exit_code == 2 and "--attack: not with --victim" in message(result)
    # re-tuning needs poisoned training samples, which a stored victim does not have: said, not ignored
    result = runner.invoke(app, ["benchmark", "--victim", str(tmp_path), "-d", "finetune", "--retune"])
    assert result.exit_code == 2 and "--retune: not with --victim" in message(result)
    assert "poisoned training samples" in message(result) and len(result.output.strip().splitlines()) <= 4
    toml = tmp_path.parent / f"{tmp_path.name}-retune.toml"
    toml.write_text("retune = true\n")
    result = runner.invoke(app, ["benchmark", "--victim", str(tmp_path), "--config", str(toml)])
    assert result.exit_code == 2 and "--retune: not with --victim" in message(result)
    config = BenchmarkConfig.model_validate({"retune": True})
    with pytest.raises(ConfigError, match="poisoned training samples"):  # the Python entry point too
        run_victim_benchmark(tmp_path, config)
    result = runner.invoke(app, ["benchmark", "--victim", str(tmp_path)])
    assert result.exit_code == 2 and "is not a bdtk victim" in message(result)
    assert not os.listdir(tmp_path)


# --- a torchvision network: BackdoorBench's resnet18 --------------------------------------------


def test_a_torchvision_resnet18_is_imported_defended_purified_and_inspected(
    tmp_path: Path, tv_reference: nn.Module, tiny_cifar: Path
) -> None:
    victim_dir = tmp_path / "victim"
    result = import_(resnet18_run(tmp_path, tv_reference), victim_dir, tiny_cifar)
    assert result.exit_code == 0, result.output
    assert "Imported bb-badnet: torchvision:resnet18 on cifar10" in message(result)

    # the victim records the architecture and BackdoorBench's normalisation, and rebuilds from them
    record = json.loads((victim_dir / "victim.json").read_text())
    mean, std = DATASETS["cifar10"]
    assert record["model"] == "torchvision:resnet18" and record["source"]["model_name"] == "resnet18"
    assert tuple(record["spec"]["mean"]) == mean and tuple(record["spec"]["std"]) == std
    victim = load_victim(victim_dir)
    assert isinstance(victim.model, AdaptedClassifier) and victim.model.architecture == "torchvision:resnet18"
    x = torch.rand(4, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(victim.model(x), tv_reference(normalised), atol=1e-4)
    assert len(victim.clean_train) == N_TRAIN and victim.excluded.tolist() == POISONED_TRAIN
    assert tuple(victim.bd_test.images.shape[1:]) == (3, 32, 32)

    # bdtk benchmark --victim
    db = tmp_path / "results.sqlite"
    args = ["benchmark", "--victim", str(victim_dir), "-d", "finetune", "--set", "finetune.epochs=1"]
    args += ["--set", "finetune.batch_size=8", "--clean-ratio", "0.5", "--device", "cpu", "--threads", "1"]
    result = runner.invoke(app, [*args, "--db", str(db), "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    with ResultStore(db) as store:
        rows = store.rows()
    assert sorted(r.defense for r in rows) == ["finetune", "none"]
    for row in rows:
        assert row.status == "ok" and row.model == "torchvision:resnet18" and row.dataset == "cifar10"
        assert row.attack_config["victim"] == victim.content_hash and row.asr is not None

    # bdtk purify: the purified weights are torchvision's state dict, named as such beside it
    out = tmp_path / "p" / "purified.safetensors"
    args = ["purify", str(victim_dir), "--out", str(out), "-d", "finetune", "--set", "epochs=1"]
    args += ["--set", "batch_size=8", "--clean-ratio", "0.5", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = message(result)
    assert "Model torchvision:resnet18" in text and "normalisation the victim's" in text
    report = json.loads((out.parent / "purified.report.json").read_text())
    assert report["backdoor"]["images"] == 18
    assert report["model"]["victim_content_hash"] == victim.content_hash
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "torchvision:resnet18" and meta["mean"] == pytest.approx(list(mean))
    reloaded = load_model(out)
    assert reloaded.architecture == "torchvision:resnet18"
    assert set(reloaded.model.network_state()) == set(tv_reference.state_dict())

    # bdtk inspect
    scan = tmp_path / "scan"
    args = ["inspect", str(victim_dir), "--out", str(scan), "--steps", "2", "--set", "batch_size=4"]
    args += ["--class", "0", "--class", "3", "--clean-ratio", "0.5", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scanned = json.loads((scan / "inspect.json").read_text())
    assert scanned["model"] == "torchvision:resnet18" and scanned["victim"] == "bb-badnet"


def test_a_torchvision_weight_that_does_not_fit_is_named(tmp_path: Path, tv_reference: nn.Module) -> None:
    """Keys are matched by name against the constructed network; the data is never reached."""
    state = dict(tv_reference.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    result = import_(resnet18_run(tmp_path / "a", tv_reference, model=state), tmp_path / "v1", None)
    assert result.exit_code == 2, result.output
    text = message(result)
    assert "The model's layer2.0.conv1.weight has shape (128, 64, 1, 1)" in text
    assert "torchvision:resnet18 expects (128, 64, 3, 3) for it (net.layer2.0.conv1.weight)" in text

    # a key the network lacks, and one it needs, are named too (a `module.` prefix is dropped first)
    state = {f"module.{k}": v for k, v in tv_reference.state_dict().items() if k != "fc.bias"}
    state["module.head.weight"] = torch.zeros(10, 512)
    result = import_(resnet18_run(tmp_path / "b", tv_reference, model=state), tmp_path / "v2", None)
    assert result.exit_code == 2, result.output
    text = message(result)
    assert "keys bdtk's torchvision:resnet18 does not have: head.weight" in text
    assert "no weights for net.fc.bias" in text


def test_a_defense_result_and_an_incomplete_attack_result_are_told_apart() -> None:
    from backdoor_toolkit.backdoorbench import _check_keys

    with pytest.raises(BdtkError, match=r"\(a BackdoorBench defense result, not an attack result\)"):
        _check_keys({"model": {}}, Path("defense_result.pt"))
    with pytest.raises(BdtkError, match=r"lacks the keys bd_test \(an incomplete attack result"):
        _check_keys({k: None for k in REQUIRED_KEYS if k != "bd_test"}, Path("attack_result.pt"))

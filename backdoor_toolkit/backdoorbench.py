"""Import a BackdoorBench attack result (`attack_result.pt`) as a bdtk victim, without unpickling code.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks) saves each attack as a
`torch.save`d dict with the keys `model_name, num_classes, model, data_path, img_size, clean_data,
bd_train, bd_test` (read from its public `utils/save_load_attack.py`; nothing of its code is used
here). Two layouts exist:

- current releases (`bd_dataset_v2`): `bd_test` and `bd_train` are dataset states. Their
  `bd_data_container.data_dict` maps each poisoned index to a PNG path under the run folder
  (`./record/<run>/bd_test_dataset/<label>/<index>.png`) and `other_info = [backdoor label,
  original label]`; `original_index_array` (NumPy int64) lists the backdoored test images (only
  non-target ones) and `poison_indicator` (NumPy float64 0/1) marks poisoned samples.
- early releases: `bd_test = {"x": float images N×C×H×W in 0..255, "y": backdoor labels}` and
  `bd_train = {"x", "y", "original_index"}`; the images are inline, original labels are absent.

Neither stores the trigger, so the backdoored test images themselves become the victim's ASR set;
their labels are already the target labels. Neither stores clean images either: `clean_data` only
names the dataset (`data_path` is a folder on the machine that ran the attack), so bdtk loads the
same dataset from `--data-dir` and keeps its splits in the victim. Only datasets whose order bdtk
reproduces exactly are accepted (the poison indices refer to positions in it).

Loading is `torch.load(weights_only=True)` with an allow-list of exactly the NumPy pieces such a
file holds (`SAFE_GLOBALS`); the pickle is first scanned statically, and a file that needs any
other global (a `__reduce__` payload, a PIL image of BackdoorBench's in-memory mode) is refused
with one message naming it, before anything in it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import DataSpec, ImageData, dataset_spec, load_dataset
from .errors import BdtkError, DatasetNotFoundError
from .image_folders import UnreadableImage, decode_image
from .models import ImageClassifier
from .models.adapter import TORCHVISION_PREFIX, input_channels
from .victims import BackdoorTestSet, check_output_dir, save_victim, victim_model

#: The keys BackdoorBench's own loader requires of an attack result.
REQUIRED_KEYS = (
    "model_name",
    "num_classes",
    "model",
    "data_path",
    "img_size",
    "clean_data",
    "bd_train",
    "bd_test",
)


class UnsafeFileError(BdtkError):
    """A file that cannot be loaded without unpickling something other than tensors and NumPy data."""


# --- the safe load ------------------------------------------------------------------------------


def _multiarray() -> Any:
    """NumPy's multiarray module (`numpy._core` from NumPy 2, `numpy.core` before)."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - NumPy < 1.26
        return importlib.import_module("numpy.core.multiarray")


def _safe_globals() -> list[Any]:
    """The allow-list: what unpickling NumPy arrays and scalars calls, and nothing else.

    - `numpy.ndarray` and `numpy.dtype`, and `_reconstruct` (rebuilds an array; `original_index_array`,
      `poison_indicator`, `original_index`), under the module names NumPy 1.x
      (`numpy.core.multiarray`, BackdoorBench's environment) and NumPy 2.x (`numpy._core.multiarray`)
      write;
    - `scalar` (rebuilds a NumPy scalar: the int64 keys of `data_dict`, labels), under both names;
    - the dtype classes of the arrays and scalars such files hold (int64, int32 where NumPy 1.x on
      Windows made index arrays, float64 poison indicators, float32, bool, uint8): unpickling a
      dtype sets its state, which torch only allows for listed classes.
    """
    multiarray = _multiarray()
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    allowed += [type(np.dtype(name)) for name in ("int64", "int32", "float64", "float32", "bool", "uint8")]
    return allowed


def safe_globals_names() -> list[str]:
    """The allow-list as the dotted names a pickle refers to (for the docs and error messages)."""
    names = []
    for item in _safe_globals():
        names.append(item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}")
    return sorted(names)


def _torch_supports_safe_globals() -> bool:
    """Whether this torch has `safe_globals`, the static scan and the `(callable, name)` form (2.6+)."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return match is not None and (int(match[1]), int(match[2])) >= (2, 6)


def _offender(exc: BaseException) -> str:
    """The global or type an UnpicklingError names, else its first line."""
    text = str(exc)
    for pattern in (
        r"GLOBAL (\S+)",
        r"got <class '([^']+)'>",
        r"unrecognized function (\S+)",
        r"but got (\S+)",
    ):
        if found := re.search(pattern, text):
            return found[1].rstrip(".,")
    detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return detail[0] if detail else type(exc).__name__


def _refuse(path: Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"Refusing {path}: loading it needs {what}, which bdtk does not unpickle (a BackdoorBench "
        "result holds only tensors, numbers, strings and NumPy arrays); nothing outside that allow-list "
        "was run."
    )


def safe_load(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` allowing only `_safe_globals()`; UnsafeFileError else.

    The pickle is scanned first (`get_unsafe_globals_in_checkpoint` reads its opcodes without
    running them), so a file naming any other global is refused before loading starts; what only
    shows while loading (the class of a dtype being built) is refused by the weights-only
    unpickler itself, and named the same way.
    """
    if not _torch_supports_safe_globals():
        raise BdtkError(
            f"Importing BackdoorBench results safely needs torch 2.6 or newer (found {torch.__version__})."
        )
    if not zipfile.is_zipfile(path):
        raise BdtkError(
            f"{path} is not a file written by torch.save (BackdoorBench results are torch zip files)."
        )
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (ValueError, RuntimeError, KeyError, zipfile.BadZipFile) as exc:
            raise BdtkError(f"{path} is not a file written by torch.save ({exc}).") from None
        if unsafe:
            raise _refuse(path, ", ".join(unsafe))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refuse(path, _offender(exc)) from None
        except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise BdtkError(f"{path} could not be read as a torch.save file ({detail}).") from None


# --- models and datasets ------------------------------------------------------------------------

_LAYER = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def _preactresnet18_key(key: str) -> str | None:
    """bdtk's name for a key of BackdoorBench's PreActResNet18, or None for a key it does not have.

    conv1 → stem; layerN.i → groups.(N-1).i; a block's projection `shortcut.0` (a one-layer
    Sequential there) → `shortcut` (a bare conv here); linear → fc. Names, never positions.
    """
    if key == "conv1.weight":
        return "stem.weight"
    if key in ("linear.weight", "linear.bias"):
        return "fc." + key.split(".", 1)[1]
    if found := _LAYER.match(key):
        rest = found[3]
        rest = "shortcut." + rest.removeprefix("shortcut.0.") if rest.startswith("shortcut.0.") else rest
        return f"groups.{int(found[1]) - 1}.{found[2]}.{rest}"
    return None


def _torchvision_key(key: str) -> str:
    """bdtk's name for a key of a torchvision network: the same name inside the adapter (`net.`)."""
    return "net." + key


@dataclass(frozen=True)
class _ModelMap:
    #: What the victim records and is rebuilt from: a zoo name or `torchvision:NAME`.
    architecture: str
    key: Callable[[str], str | None]


#: BackdoorBench names whose network `generate_cls_model` (utils/aggregate_block/
#: model_trainer_generate.py) builds by calling the torchvision constructor of the same name with
#: `num_classes` alone (its attacks pass no other keyword) and returns unwrapped; `convnext_tiny`
#: is first given ImageNet weights where the shapes fit, which changes no layer. bdtk builds the
#: same constructor behind its adapter. Not mapped: `vit_*` (ImageNet-pretrained, head replaced,
#: and wrapped in a Sequential behind a Resize to 224), `googlenet` and `inception_v3` (built with
#: auxiliary classifiers, which the adapter's torchvision models leave out), `resnext29` and
#: `senet18` (BackdoorBench's own networks, with no twin in the zoo).
_TORCHVISION_NAMES = (
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "efficientnet_b0",
    "efficientnet_b3",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
    "vgg11",
    "vgg16",
    "vgg19",
    "vgg19_bn",
    "wide_resnet50_2",
)

#: BackdoorBench model names bdtk rebuilds parameter for parameter: `preactresnet18` (BackdoorBench's
#: own network, whose twin is the zoo's `preact-resnet18-bb`) and the torchvision ones above.
MODELS: dict[str, _ModelMap] = {
    "preactresnet18": _ModelMap("preact-resnet18-bb", _preactresnet18_key),
    **{name: _ModelMap(TORCHVISION_PREFIX + name, _torchvision_key) for name in _TORCHVISION_NAMES},
}

#: BackdoorBench dataset names bdtk loads in the same order (torchvision's), with the normalisation
#: BackdoorBench's models were trained under (`get_dataset_normalization`; it differs from bdtk's
#: own for CIFAR-10 and MNIST). Not accepted: `gtsrb` (BackdoorBench reads its own folder layout,
#: in another order than torchvision's), `tiny`, `celeba`, `imagenet` (no bdtk loader).
DATASETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
}


def _translate(
    model_map: _ModelMap, state: Mapping[str, Tensor], model: ImageClassifier
) -> dict[str, Tensor]:
    """BackdoorBench's state dict under bdtk's names, every key and shape checked against `model`."""
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    translated: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = model_map.key(key)
        if name is None or name not in ours:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            raise BdtkError(
                f"The model's {key} has shape {tuple(value.shape)}; bdtk's {model_map.architecture} expects "
                f"{tuple(ours[name].shape)} for it ({name})."
            )
        translated[name] = value
    missing = sorted(set(ours) - set(translated))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"keys bdtk's {model_map.architecture} does not have: {', '.join(unknown[:5])}")
        if missing:
            parts.append(f"no weights for {', '.join(missing[:5])}")
        raise BdtkError(f"The model does not match BackdoorBench's architecture ({'; '.join(parts)}).")
    return translated


# --- reading the result -------------------------------------------------------------------------


def _int_array(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray | Tensor | list | tuple):
        raise BdtkError(f"{what} is {type(value).__name__}, not an array of indices.")
    array = np.asarray(value.numpy() if isinstance(value, Tensor) else value)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iuf"):
        raise BdtkError(f"{what} is not a one-dimensional array of numbers.")
    if array.size and (not np.all(np.isfinite(array)) or not np.all(array == np.round(array))):
        raise BdtkError(f"{what} holds values that are not whole numbers.")
    return array.astype(np.int64)


def _label(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise BdtkError(f"{what} is {value!r}, not a class index.")
    return int(value)


def _inside(run_dir: Path, stored: str, folder: str | None, what: str) -> Path:
    """The file a stored path names, rebased from the attacking machine's run folder onto `run_dir`.

    BackdoorBench writes `<save_path>/bd_test_dataset/<label>/<index>.png` with `save_path` relative
    to its working directory (`./record/<run>`). The part below the run folder is kept; absolute
    parts, `..` and anything that resolves outside `run_dir` (a symlink, say) are refused.
    """
    path = PurePosixPath(stored.replace("\\", "/"))
    base = PurePosixPath(folder.replace("\\", "/")).parent if folder else None
    try:
        relative = path.relative_to(base) if base is not None else PurePosixPath(*path.parts[-3:])
    except ValueError:
        raise BdtkError(f"{what}: {stored!r} is not under the run folder {str(base)!r}.") from None
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BdtkError(f"{what}: {stored!r} points outside the run folder.")
    root = run_dir.resolve()
    full = (root / relative).resolve()
    if not full.is_relative_to(root):
        raise BdtkError(f"{what}: {stored!r} resolves outside the run folder {root}.")
    return full


def _read_png(path: Path, spec: DataSpec, what: str) -> Tensor:
    """One image as uint8 (C, H, W). Resized, as BackdoorBench's test transform does, when stored
    at another size (bilinear, like torchvision's Resize on a PIL image)."""
    from PIL import Image

    if not path.is_file():
        raise BdtkError(
            f"{what}: {path} is missing; keep the run folder whole (attack_result.pt with its "
            "bd_test_dataset/ beside it)."
        )
    try:
        image = decode_image(path, "RGB" if spec.channels == 3 else "L")
    except UnreadableImage as exc:
        raise BdtkError(f"{what}: cannot read {path} as an image ({exc}).") from None
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _bd_test_v2(state: Mapping[str, Any], run_dir: Path, spec: DataSpec) -> tuple[BackdoorTestSet, int]:
    """The backdoored test set of a dataset state, and the test-set size its indicator covers."""
    container = state.get("bd_data_container")
    if not isinstance(container, Mapping) or not isinstance(container.get("data_dict"), Mapping):
        raise BdtkError("bd_test.bd_data_container has no data_dict.")
    folder = container.get("save_folder_path")
    if folder is not None and not isinstance(folder, str):
        raise BdtkError("bd_test.bd_data_container.save_folder_path is not a path.")
    entries = {_label(k, "a key of bd_test's data_dict"): v for k, v in container["data_dict"].items()}
    index = _int_array(state.get("original_index_array"), "bd_test.original_index_array")
    indicator = _int_array(state.get("poison_indicator"), "bd_test.poison_indicator")
    if index.size == 0:
        raise BdtkError("bd_test holds no backdoored test images.")
    if index.min() < 0 or index.max() >= indicator.size:
        raise BdtkError("bd_test.original_index_array points outside bd_test.poison_indicator.")
    if np.unique(index).size != index.size:
        # a test image counted twice would weigh twice in ASR and RA
        raise BdtkError("bd_test.original_index_array lists a test image more than once.")
    images, targets, labels = [], [], []
    for i in index.tolist():
        entry = entries.get(i)
        if indicator[i] != 1 or entry is None:
            raise BdtkError(f"bd_test lists test image {i}, but holds no backdoored version of it.")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise BdtkError(
                "bd_test keeps its images in memory, not as PNG files; bdtk reads only the on-disk "
                "layout every BackdoorBench attack writes."
            )
        info = entry.get("other_info")
        if not isinstance(info, list | tuple) or len(info) < 2:
            raise BdtkError(f"bd_test image {i}: other_info is not [backdoor label, original label].")
        targets.append(_label(info[0], f"bd_test image {i}'s backdoor label"))
        labels.append(_label(info[1], f"bd_test image {i}'s original label"))
        png = _inside(run_dir, entry["path"], folder, f"bd_test image {i}")
        images.append(_read_png(png, spec, f"bd_test image {i}"))
    bd = BackdoorTestSet(
        torch.stack(images), torch.tensor(targets), torch.tensor(labels), torch.from_numpy(index.copy())
    )
    return bd, int(indicator.size)


def _bd_test_v1(state: Mapping[str, Any], spec: DataSpec) -> BackdoorTestSet:
    """The inline backdoored test set of early releases: float images in 0..255 and their labels."""
    x, y = state.get("x"), state.get("y")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise BdtkError("bd_test.x and bd_test.y are not tensors.")
    if x.dim() != 4 or tuple(x.shape[1:]) != spec.image_shape or y.shape != (x.shape[0],):
        raise BdtkError(
            f"bd_test.x is {tuple(x.shape)} with {tuple(y.shape)} labels; expected (N, "
            f"{', '.join(map(str, spec.image_shape))}) images with N labels."
        )
    if x.shape[0] == 0:
        raise BdtkError("bd_test holds no backdoored test images.")
    if 0 in x.stride() or 0 in y.stride():
        # an expanded tensor: a few stored numbers posing as many images (and gigabytes once copied)
        raise BdtkError("bd_test.x or bd_test.y is an expanded view of fewer stored values, not real images.")
    values = x.float()
    if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > 255:
        raise BdtkError("bd_test.x holds values outside 0..255.")
    return BackdoorTestSet(values.round().to(torch.uint8), y.long())


def _excluded(bd_train: Any, n_train: int) -> tuple[Tensor, str]:
    """The training indices the attacker poisoned (never part of the defender's budget)."""
    if bd_train is None:
        return torch.empty(0, dtype=torch.long), "not recorded (bd_train is None)"
    if not isinstance(bd_train, Mapping):
        raise BdtkError(f"bd_train is {type(bd_train).__name__}, not a dataset state.")
    if "poison_indicator" in bd_train:
        indicator = _int_array(bd_train["poison_indicator"], "bd_train.poison_indicator")
        if indicator.size != n_train:
            raise BdtkError(
                f"bd_train.poison_indicator covers {indicator.size} training images, but the dataset "
                f"loaded from --data-dir has {n_train}: not the data the attack used."
            )
        index = np.flatnonzero(indicator == 1)
    elif bd_train.get("original_index") is not None:
        index = _int_array(bd_train["original_index"], "bd_train.original_index")
    else:
        return torch.empty(0, dtype=torch.long), "not recorded"
    if index.size and (index.min() < 0 or index.max() >= n_train):
        raise BdtkError(f"bd_train's poisoned indices point outside the {n_train} training images.")
    return torch.from_numpy(index.copy()), f"{index.size} (kept out of the defender's clean budget)"


def _check_runs(model: ImageClassifier, images: Tensor, spec: DataSpec, what: str) -> None:
    """Run the imported model on a few backdoored test images.

    Matching weights do not mean the network can take the dataset's images (torchvision's AlexNet
    pools 32×32 images down to nothing); that is said here, in one line, rather than by a traceback
    inside the first defense.
    """
    model.eval()
    try:
        with torch.no_grad():
            logits = model(images.float() / 255)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:160]
        raise BdtkError(
            f"{what} does not run on {spec.name}'s {spec.height}×{spec.width} images ({detail})."
        ) from None
    if tuple(logits.shape) != (images.shape[0], spec.num_classes):
        raise BdtkError(
            f"{what} outputs {tuple(logits.shape)} for {images.shape[0]} images, not one score per class "
            f"of {spec.name} ({spec.num_classes})."
        )


def _check_keys(raw: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise BdtkError(f"{path} holds a {type(raw).__name__}, not a BackdoorBench attack result (a dict).")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        # a defense result holds the purified `model` without the attack's own description
        defense = "model" in raw and not any(k in raw for k in ("model_name", "num_classes", "bd_test"))
        what = (
            "a BackdoorBench defense result, not an attack result"
            if defense
            else "an incomplete attack result: was it written by an interrupted run, or edited?"
            if any(k in raw for k in REQUIRED_KEYS)
            else "not an attack result"
        )
        raise BdtkError(f"{path} lacks the keys {', '.join(missing)} ({what}).")
    return raw


def _beside_record(file: Path, data_path: Any) -> str | None:
    """Where BackdoorBench itself would look for the clean data of a run: its `data_path` from
    `data` on, under the folder that holds `record/` (`<BackdoorBench>/data/cifar10`), if it exists."""
    parts = file.resolve().parts
    if "record" not in parts or not isinstance(data_path, str) or "data" not in data_path:
        return None
    root = Path(*parts[: len(parts) - 1 - parts[::-1].index("record")])
    relative = PurePosixPath(data_path[data_path.index("data") :].replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        return None
    candidate = root.joinpath(*relative.parts)
    return str(candidate) if candidate.is_dir() else None


def _clean_dataset(
    name: str, data_dir: str | None, data_path: Any, file: Path
) -> tuple[ImageData, ImageData, str | None]:
    """The clean splits, from `data_dir`, else $BDTK_DATA_DIR, else beside the run's record folder."""
    if data_dir is None and not os.environ.get("BDTK_DATA_DIR"):
        data_dir = _beside_record(file, data_path)
    try:
        dataset = load_dataset(name, data_dir)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(
            f"A BackdoorBench result holds no clean images: it names its dataset ({name!r}, kept in "
            f"{data_path!r} on the machine that ran the attack), and bdtk needs the same dataset to "
            f"measure BA and to draw the defender's clean images. {exc}"
        ) from None
    return dataset.train, dataset.test, data_dir


@dataclass(frozen=True)
class ImportSummary:
    """What `import_backdoorbench` wrote, for the command to report."""

    out: Path
    name: str
    model: str
    dataset: str
    content_hash: str
    bd_test: int
    targets: list[int]
    has_original_labels: bool
    excluded: str


def _victim_name(given: str | None, file: Path) -> str:
    name = given if given is not None else re.sub(r"[^A-Za-z0-9_.-]+", "-", file.resolve().parent.name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise BdtkError(f"Victim name {name!r}: use letters, digits, '.', '_' and '-' only.")
    return name


def import_backdoorbench(
    source: Path,
    out: Path,
    *,
    data_dir: str | None = None,
    name: str | None = None,
    force: bool = False,
) -> ImportSummary:
    """Read a BackdoorBench run (its folder or its attack_result.pt) and write a bdtk victim to `out`.

    `data_dir` is where bdtk finds the clean dataset the result names (as for every bdtk
    command); `name` labels the victim in results (default: the run folder's name).
    """
    file = source / "attack_result.pt" if source.is_dir() else source
    if not file.is_file():
        raise BdtkError(f"{file} does not exist; give a BackdoorBench attack_result.pt or its run folder.")
    check_output_dir(out, force)
    victim_name = _victim_name(name, file)
    raw = _check_keys(safe_load(file), file)
    model_name, clean_data = raw["model_name"], raw["clean_data"]
    if not isinstance(model_name, str) or model_name not in MODELS:
        raise BdtkError(
            f"BackdoorBench model {model_name!r} has no parameter-for-parameter match in bdtk (a zoo "
            f"twin, or a plain torchvision constructor); supported: {', '.join(sorted(MODELS))}."
        )
    if not isinstance(clean_data, str) or clean_data not in DATASETS:
        supported = ", ".join(sorted(DATASETS))
        raise BdtkError(f"BackdoorBench dataset {clean_data!r} cannot be imported; supported: {supported}.")
    num_classes, img_size = raw["num_classes"], raw["img_size"]
    base = dataset_spec(clean_data)
    mean, std = DATASETS[clean_data]
    spec = DataSpec(
        base.name, base.num_classes, base.channels, base.height, base.width, mean, std, base.hflip
    )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes != spec.num_classes:
        raise BdtkError(f"num_classes is {num_classes!r}, but {clean_data} has {spec.num_classes} classes.")
    if not isinstance(img_size, list | tuple) or list(img_size) != [spec.height, spec.width, spec.channels]:
        raise BdtkError(
            f"img_size is {img_size!r}, but {clean_data} images are "
            f"[{spec.height}, {spec.width}, {spec.channels}] (height, width, channels)."
        )
    state = raw["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BdtkError("The result's model is not a state dict of tensors.")
    model_map = MODELS[model_name]
    first = state.get("conv1.weight", state.get("module.conv1.weight"))
    if isinstance(first, Tensor) and first.dim() == 4 and first.shape[1] != spec.channels:
        raise BdtkError(
            f"The model's first convolution takes {first.shape[1]} channels, but {clean_data} images have "
            f"{spec.channels}."
        )
    model = victim_model(model_map.architecture, spec)
    channels = input_channels(model)
    if channels is not None and channels != spec.channels:
        raise BdtkError(
            f"BackdoorBench's {model_name} ({model_map.architecture}) reads {channels}-channel images, "
            f"but {clean_data} images have {spec.channels}."
        )
    weights = _translate(model_map, state, model)
    weights.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    model.load_state_dict(weights)

    bd_state = raw["bd_test"]
    if not isinstance(bd_state, Mapping):
        raise BdtkError(f"bd_test is {type(bd_state).__name__}, not a dataset state.")
    if "bd_data_container" in bd_state:
        layout = "on-disk images (bd_dataset_v2)"
        bd_test, n_test = _bd_test_v2(bd_state, file.parent, spec)
    elif "x" in bd_state:
        layout, n_test = "inline images (early releases)", None
        bd_test = _bd_test_v1(bd_state, spec)
    else:
        raise BdtkError("bd_test is neither a dataset state (bd_data_container) nor inline images (x, y).")
    if not bool((bd_test.targets < spec.num_classes).all() and (bd_test.targets >= 0).all()):
        raise BdtkError(f"bd_test's backdoor labels are not classes of {clean_data}.")
    _check_runs(model, bd_test.images[:2], spec, f"BackdoorBench's {model_name} ({model_map.architecture})")

    train, test, data_dir = _clean_dataset(clean_data, data_dir, raw["data_path"], file)
    if n_test is not None and n_test != len(test):
        raise BdtkError(
            f"bd_test.poison_indicator covers {n_test} test images, but the dataset loaded from --data-dir "
            f"has {len(test)}: not the data the attack used."
        )
    if len(bd_test.targets) > len(test):
        # early releases keep no test indices, but the backdoored images are a subset of the test set
        raise BdtkError(
            f"bd_test holds {len(bd_test.targets)} backdoored images, more than the {len(test)} test images "
            "of the dataset loaded from --data-dir: not the data the attack used."
        )
    excluded, excluded_note = _excluded(raw["bd_train"], len(train))
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    targets = sorted({int(t) for t in bd_test.targets.tolist()})
    source_record = {
        "tool": "backdoorbench",
        "file": str(file.resolve()),
        "sha256": digest.hexdigest(),
        "layout": layout,
        "model_name": model_name,
        "clean_data": clean_data,
        "data_path": raw["data_path"],
        "img_size": list(img_size),
        "clean_data_from": data_dir if data_dir is not None else os.environ.get("BDTK_DATA_DIR", ""),
        "num_classes": num_classes,
        "targets": targets,
        "poisoned_training_images": excluded_note,
        "other_keys": sorted(str(k) for k in raw if k not in REQUIRED_KEYS),
    }
    content_hash = save_victim(
        out,
        name=victim_name,
        model_name=model_map.architecture,
        model=model,
        spec=spec,
        clean_train=train,
        excluded=excluded,
        clean_test=test,
        bd_test=bd_test,
        source=source_record,
        force=force,
    )
    return ImportSummary(
        out=out,
        name=victim_name,
        model=model_map.architecture,
        dataset=clean_data,
        content_hash=content_hash,
        bd_test=len(bd_test),
        targets=targets,
        has_original_labels=bd_test.labels is not None,
        excluded=excluded_note,
    )

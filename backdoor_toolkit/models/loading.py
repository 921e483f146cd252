"""Model files: a safetensors state dict, the architecture it belongs to, and the JSON beside it.

`load_model(file, arch)` is the one way bdtk reads a user's model (`bdtk purify`, `bdtk inspect
MODEL_FILE`, importers of other toolkits' checkpoints). The architecture is a zoo name, `torchvision:
NAME` or `MODULE:FACTORY`; its input channels and class count are read from the file's tensors, so
a file is never forced into a shape it was not trained with. Weights are only ever read from
safetensors (never unpickled). `save_model` writes the counterpart: the network's own state dict
(loadable into the user's architecture as it is) and `FILE.json` beside it, whose `architecture`,
`mean`, `std`, `feature_layer` and `image_size` the next `load_model` of that file picks up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..artifacts import non_finite
from ..data import DataSpec
from ..errors import BdtkError, UnknownNameError
from .adapter import (
    TORCHVISION_PREFIX,
    AdaptedClassifier,
    adapt,
    factory_network,
    input_channels,
    torchvision_network,
    torchvision_num_classes,
)
from .base import ImageClassifier
from .registry import available_models, create_model

#: The `format` field of the JSON bdtk writes beside a model file.
METADATA_FORMAT = "bdtk-model/1"
#: The architecture `load_model` assumes when neither the caller nor the JSON beside the file names one.
DEFAULT_ARCHITECTURE = "wrn-16-1"


@dataclass
class LoadedModel:
    """A model read from a file, and what is known about where it came from."""

    model: ImageClassifier
    architecture: str
    path: Path
    sha256: str
    #: The JSON beside the file (`metadata_path`), {} when there is none or it is not bdtk's.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Image channels the network reads (its first Conv2d, else the JSON beside the file), or None.
    channels: int | None = None
    #: Where mean/std came from: "given", "file" (a zoo model's buffers), "metadata" or "none".
    normalization: str = "none"


def metadata_path(path: Path) -> Path:
    """`model.safetensors` → `model.json`."""
    return path.with_suffix(".json")


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON bdtk wrote beside model file `path`; {} when absent or another record (a bdtk cache
    entry's KEY.json, for one, is a different record and is ignored). A JSON there that cannot be
    read, is not an object, is a model JSON of another format version, or names model fields
    without the format line is an error: ignoring it would read the model with another
    architecture or normalisation than the file says."""
    beside = metadata_path(path)
    if not beside.is_file():
        return {}
    try:
        data = json.loads(beside.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        # ignored, it would silently change the architecture or normalisation the model is read with
        raise BdtkError(
            f"{beside} beside the model is not readable JSON ({' '.join(str(exc).split())[:120]}); "
            "fix or remove it."
        ) from None
    if not isinstance(data, dict):
        raise BdtkError(
            f"{beside} beside the model holds a JSON {type(data).__name__}, not a model's JSON object "
            f'({{"format": "{METADATA_FORMAT}", "architecture": ...}}); fix or remove it.'
        )
    kind = data.get("format")
    if kind == METADATA_FORMAT:
        _check_metadata_types(data, beside)
        return data
    if isinstance(kind, str) and kind.startswith(METADATA_FORMAT.split("/")[0] + "/"):
        raise BdtkError(
            f"{beside} is a model JSON of format {kind!r}; this bdtk reads {METADATA_FORMAT!r}. Upgrade "
            "bdtk, or remove the file and give --model (and --mean/--std) yourself."
        )
    fields = sorted(_MODEL_KEYS & data.keys())
    if fields and not (isinstance(kind, str) and kind.startswith("bdtk-")):  # not another bdtk record
        # a hand-written model JSON without its format line would otherwise be ignored in silence,
        # and the model read with another architecture or normalisation than the user wrote
        raise BdtkError(
            f'{beside} names {", ".join(fields)} but has no "format": "{METADATA_FORMAT}" (its '
            f"format: {json.dumps(kind)}), so it is not read as the model's JSON; fix that line, or "
            "remove the file."
        )
    return {}  # another record (a bdtk cache entry's KEY.json, say)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_size(value: Any) -> bool:
    """[height, width] within what --image-size accepts (1 to 4096 a side)."""
    return isinstance(value, list) and len(value) == 2 and all(_is_count(v) and v <= 4096 for v in value)


#: The fields of bdtk's model JSON that loading reads, and what each must be.
_METADATA_FIELDS: dict[str, tuple[str, Any]] = {
    "architecture": ("a model name (text)", lambda v: isinstance(v, str) and bool(v)),
    "feature_layer": ("a module name (text) or null", lambda v: v is None or isinstance(v, str)),
    "channels": ("a positive whole number", _is_count),
    "image_size": ("[height, width], two whole numbers from 1 to 4096", _is_size),
}


#: Keys by which a JSON without a "format" line shows that it was meant as a model's JSON.
_MODEL_KEYS = {*_METADATA_FIELDS, "mean", "std", "classes"}


def _check_metadata_types(data: dict[str, Any], beside: Path) -> None:
    """A hand-edited model JSON with a field of the wrong type is named here, in one line, rather
    than failing later inside the loader."""
    for key, (expected, valid) in _METADATA_FIELDS.items():
        if key in data and not valid(data[key]):
            raise BdtkError(
                f"{beside}: {key!r} must be {expected}, got {json.dumps(data[key])[:60]}; fix or remove it."
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; anything else is one clear error (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise BdtkError(f"Model file {path} does not exist.")
    if not path.is_file():
        raise BdtkError(f"Model file {path} is not a file (a folder?).")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise BdtkError(
            f"{path} is a PyTorch pickle (torch.save), not safetensors; bdtk never unpickles weights. "
            "Convert it where you trust it: safetensors.torch.save_file(torch.load(PATH), OUT)."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BdtkError(f"{path} is not a safetensors file ({' '.join(str(exc).split())[:160]}).") from None
    if not state:
        raise BdtkError(f"{path} holds no tensors.")
    check_weight_tensors(state, path)
    return state


#: Weight dtypes a model file may hold; integer tensors only as BatchNorm's step counters.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weight_tensors(state: Mapping[str, Tensor], path: Path | str) -> None:
    """Refuse tensors no trained classifier holds, by name, before anything is built from them.

    Integer or boolean weights would be cast to float silently (and measured as if they meant
    something); float8 and complex ones break the checks that follow; a tensor with a zero-sized
    dimension can claim a huge class count while holding no bytes, and the model built from that
    shape would try to allocate terabytes; a non-positive normalisation std divides by zero.
    """
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if tensor.dtype not in WEIGHT_DTYPES:
            raise BdtkError(
                f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not a float "
                "weight (float16, bfloat16, float32 or float64); convert the model's weights to float32."
            )
        if tensor.dim() and 0 in tensor.shape:
            raise BdtkError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, with no values.")
    std = state.get("normalize.std")
    if std is not None and not bool((std > 0).all()):
        raise BdtkError(f"{path}: normalize.std must be positive, got {std.flatten().tolist()[:6]}.")


def load_weights(target: nn.Module, state: dict[str, Tensor], path: Path, architecture: str) -> None:
    """Load `state` strictly; a mismatch names the first mismatching key and both shapes.

    Only `num_batches_tracked` counters may be missing (some exporters drop them; they are not
    weights).
    """
    expected = target.state_dict()
    where = f"{path} does not hold {architecture!r} weights"
    # other names first: a file of another architecture is told so, not one of its shapes
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BdtkError(f"{where}: the file lacks tensor {missing[0]!r}{more}, which the architecture has.")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise BdtkError(
            f"{where}: the file has tensor {unexpected[0]!r}{more}, which the architecture lacks."
        )
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise BdtkError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)} in the file but "
                f"{tuple(tensor.shape)} in the architecture."
            )
    target.load_state_dict(state, strict=False)


def _zoo_shape(architecture: str, state: dict[str, Tensor]) -> tuple[int, int]:
    """(input channels, classes) of a zoo model's file: its first conv's and fc's weights."""
    probe = create_model(architecture, DataSpec("probe", 10, 3, 32, 32, (0.5,) * 3, (0.5,) * 3, False))
    channels, classes = 3, 10
    for name, module in probe.named_modules():
        weight = state.get(f"{name}.weight")
        if isinstance(module, nn.Conv2d) and weight is not None and weight.dim() == 4:
            channels = int(weight.shape[1])
            break
    fc = state.get("fc.weight")
    if fc is not None and fc.dim() == 2:
        classes = int(fc.shape[0])
    return channels, classes


def _zoo_normalization(state: dict[str, Tensor], channels: int) -> tuple[float, ...]:
    """Placeholder mean/std as long as the file's normalisation buffers (they are loaded over it),
    so that a model with one mean for all channels still fits."""
    mean = state.get("normalize.mean")
    return (0.5,) * (int(mean.numel()) if mean is not None else channels)


def _checked_values(values: Any, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    # a list of real numbers as written: a string ("5" is not [5]) or a boolean is a mistake
    numbers = isinstance(values, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )
    try:
        out = tuple(float(v) for v in values) if numbers else None
    except OverflowError:  # an integer beyond float range (10**400)
        out = (math.inf,)
    if out is None:
        raise BdtkError(f"{name} must be a list of numbers, got {str(values)[:80]}.")
    if not out:
        raise BdtkError(f"{name} is empty; give one value per channel (or one for all).")
    if not all(math.isfinite(v) for v in out):
        raise BdtkError(f"{name} must be finite numbers, got {list(out)}.")
    if name.endswith("std") and any(v <= 0 for v in out):
        raise BdtkError(f"{name} must be positive, got {list(out)}.")
    return out


def _runs_code(architecture: str) -> bool:
    """Whether building `architecture` imports user code (`MODULE:FACTORY`, `file.py:FACTORY`)
    rather than naming a zoo or torchvision model."""
    return ":" in architecture and not architecture.startswith(TORCHVISION_PREFIX)


def load_model(
    path: str | Path,
    architecture: str | None = None,
    *,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    feature_layer: str | None = None,
) -> LoadedModel:
    """The model in safetensors file `path`, built as `architecture` and ready for defenses.

    `architecture`: a zoo name (`bdtk models`), `torchvision:NAME` (any torchvision
    classification model, `weights=None`, its class count read from the file) or `MODULE:FACTORY`
    / `file.py:FACTORY` (called with no arguments). None: the `architecture` in the JSON beside
    the file, else `DEFAULT_ARCHITECTURE`; a factory named there is refused, since a model file and
    its JSON are data (downloaded, perhaps) and must never make bdtk import code. Weights holding
    NaN or ±inf are refused too: every number computed from them would be meaningless.
    `mean`/`std`: the normalisation the network was trained with; None takes it from the JSON
    beside the file, or leaves a zoo model's own buffers, or (other models) none.
    `feature_layer`: see `AdaptedClassifier`.
    Every problem (not safetensors, an unknown architecture, tensors that do not fit) is one
    BdtkError naming the file.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    bad = non_finite(state)
    if bad is not None:
        raise BdtkError(
            f"{path}: tensor {bad!r} holds NaN or infinite values; such a model cannot be measured or "
            "purified (the file was damaged, or the training that made it diverged)."
        )
    metadata = read_metadata(path)
    named = metadata.get("architecture")
    if architecture is None and isinstance(named, str) and _runs_code(named):
        raise BdtkError(
            f"{metadata_path(path)} names architecture {named!r}, a Python factory; bdtk never runs code "
            f"that a file beside a model names. If you trust it, pass it yourself: --model {named}."
        )
    architecture = architecture or named or DEFAULT_ARCHITECTURE
    given_mean, given_std = _checked_values(mean, "--mean"), _checked_values(std, "--std")
    meta_mean = _checked_values(metadata.get("mean"), f"{metadata_path(path)} mean")
    meta_std = _checked_values(metadata.get("std"), f"{metadata_path(path)} std")
    if feature_layer is None:
        feature_layer = metadata.get("feature_layer")
    model: ImageClassifier
    if architecture.startswith(TORCHVISION_PREFIX) or ":" in architecture:
        if architecture.startswith(TORCHVISION_PREFIX):
            name = architecture.removeprefix(TORCHVISION_PREFIX)
            net = torchvision_network(name, torchvision_num_classes(name, state))
        else:
            net = factory_network(architecture)
        load_weights(net, state, path, architecture)
        use_mean, use_std = given_mean or meta_mean, given_std or meta_std
        source = "given" if given_mean or given_std else "metadata" if meta_mean or meta_std else "none"
        model = AdaptedClassifier(
            net, use_mean, use_std, feature_layer=feature_layer, architecture=architecture
        )
    else:
        known = [m.name for m in available_models()]
        if architecture not in known:
            hint = " (or torchvision:NAME, or MODULE:FACTORY)"
            raise UnknownNameError("architecture", architecture, known, note=f"Give a zoo name{hint}.")
        if any(k.startswith("model.") for k in state):  # a bdtk cache entry: weights under "model."
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        in_channels, classes = _zoo_shape(architecture, state)
        placeholder = _zoo_normalization(state, in_channels)
        spec = DataSpec("file", classes, in_channels, 32, 32, placeholder, placeholder, False)
        model = create_model(architecture, spec)
        bare = [k for k in ("normalize.mean", "normalize.std") if k not in state]
        if bare:  # then the JSON's values may stand in; a file's own buffers otherwise win over it
            given_mean, given_std = given_mean or meta_mean, given_std or meta_std
        if bare and (given_mean is None or given_std is None):
            raise BdtkError(
                f"{path} has no {' or '.join(bare)} tensor (the bare network, without bdtk's "
                "normalisation); give the mean and std it was trained with: --mean and --std (one "
                "value per channel, or one for all)."
            )
        # the bare network's weights with the given normalisation (placeholders, replaced by adapt)
        state = {**{k: model.state_dict()[k] for k in bare}, **state}
        load_weights(model, state, path, architecture)
        model = adapt(model, given_mean, given_std, feature_layer=feature_layer)
        source = "given" if given_mean or given_std else "file"
    _check_metadata_agrees(model, metadata, path)
    channels = input_channels(model) or metadata.get("channels")
    for name, values in (("mean", model.normalize.mean), ("std", model.normalize.std)):
        if channels is not None and values.numel() not in (1, channels):
            raise BdtkError(
                f"{architecture} reads {channels}-channel images, but its {name} has {values.numel()} "
                f"values ({source}); give one per channel."
            )
    sha256 = file_sha256(path)
    written_for = metadata.get("sha256")
    if isinstance(written_for, str) and written_for and written_for != sha256:
        # its architecture, normalisation and classes describe other weights
        raise BdtkError(
            f"{metadata_path(path)} was written for other weights (its sha256 {written_for[:12]}… is not "
            f"{path.name}'s {sha256[:12]}…); remove it or restore the file it describes, and give "
            "--model/--mean/--std yourself."
        )
    return LoadedModel(
        model=model.eval(),
        architecture=architecture,
        path=path,
        sha256=sha256,
        metadata=metadata,
        channels=channels,
        normalization=source,
    )


def _check_metadata_agrees(model: ImageClassifier, metadata: dict[str, Any], path: Path) -> None:
    """The JSON beside a model must describe the network the weights build: class names for another
    class count, or a channel count the first convolution does not read, mean a JSON edited by
    hand or copied from another model, and it would be ignored in silence."""
    beside = metadata_path(path)
    named = metadata.get("classes")
    outputs = getattr(model, "num_classes", None)
    if named is not None and (not isinstance(named, list) or (outputs is not None and len(named) != outputs)):
        count = f"{len(named)} names" if isinstance(named, list) else f"a {type(named).__name__}"
        raise BdtkError(
            f"{beside}: classes is {count}, but the model outputs {outputs} classes; fix or remove it."
        )
    reads, said = input_channels(model), metadata.get("channels")
    if reads is not None and said is not None and said != reads:
        raise BdtkError(
            f"{beside}: channels is {said}, but the model's first convolution reads {reads}; fix or "
            "remove it."
        )


def network_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a model's own architecture loads: an adapted network's without the
    adapter's prefix and normalisation, a zoo model's as it is."""
    if isinstance(model, AdaptedClassifier):
        return model.network_state()
    return model.state_dict()


def normalization_values(model: ImageClassifier) -> tuple[list[float], list[float]]:
    """The first layer's mean and std, as lists."""
    return (
        [float(v) for v in model.normalize.mean.flatten()],
        [float(v) for v in model.normalize.std.flatten()],
    )


def save_model(model: ImageClassifier, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write `network_state(model)` to safetensors file `path` and `metadata` (plus the model's
    architecture, normalisation and the file's SHA-256) to the JSON beside it; returns the JSON's path.

    Each file goes to a temporary name first and is renamed into place, weights before JSON, so
    an interrupted write never leaves a JSON describing other weights.
    """
    from safetensors.torch import save

    path = Path(path).expanduser()
    tensors = {k: v.detach().cpu().contiguous() for k, v in network_state(model).items()}
    data = save(tensors)
    mean, std = normalization_values(model)
    record = {
        "format": METADATA_FORMAT,
        "architecture": getattr(model, "architecture", None),
        "mean": mean,
        "std": std,
        "feature_layer": getattr(model, "feature_layer", None),
        **metadata,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    beside = metadata_path(path)
    _replace(path, data)
    _replace(beside, (json.dumps(record, indent=2, default=str) + "\n").encode())
    return beside


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to a unique temporary file beside `path`, then rename it into place (created
    with "x" rather than by mkstemp, so the file gets the user's umask, not mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with temporary.open("xb") as fh:
            fh.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

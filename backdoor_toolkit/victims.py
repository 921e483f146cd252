"""Stored victims: a backdoored model kept with the data needed to defend and measure it.

bdtk's own victims are trained from an attack plugin, whose trigger re-creates the backdoored test
images whenever ASR is measured. A victim made elsewhere (imported from BackdoorBench, say) comes
without a trigger bdtk could re-apply: its backdoored test images are stored instead, and ASR is
measured on exactly those. A victim directory holds

    victim.json          what the victim is (name, architecture, data spec, where it came from),
                         the SHA-256 of each tensor file, and a content hash over all of it
    model.safetensors    the bdtk state dict of the model (normalisation buffers included)
    data.safetensors     clean_train.images/labels/excluded, clean_test.images/labels,
                         bd_test.images/targets and, when the source recorded them,
                         bd_test.labels (original classes, for RA) and bd_test.index

Images are uint8 (N, C, H, W), labels int64. `clean_train.excluded` are the training indices the
attacker poisoned: the defender's clean budget never draws them. The content hash is the victim's
identity (a benchmark cell's config hash includes it), so an edited file is caught on load rather
than producing results that claim to be about another model. Nothing here unpickles: safetensors
and JSON only.

The architecture (`model`) is a zoo name, or `torchvision:NAME` for a torchvision network, which
is rebuilt behind bdtk's adapter with the spec's classes and normalisation (its state dict is
the network's under `net.`, plus `normalize.*`). Records written before torchvision networks
were accepted name zoo models only, and read as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .artifacts import atomic_write_text, non_finite
from .data import Dataset, DataSpec, DefenseData, ImageData, draw_defense_data
from .errors import BdtkError
from .metrics import Scores, predict
from .models import AdaptedClassifier, ImageClassifier, create_model
from .models.adapter import TORCHVISION_PREFIX, torchvision_network
from .models.loading import check_weight_tensors

#: The layout of victim.json; another value is refused with a message rather than misread.
VICTIM_FORMAT = 1
META_FILE = "victim.json"
MODEL_FILE = "model.safetensors"
DATA_FILE = "data.safetensors"


class VictimError(BdtkError):
    """A victim directory that cannot be used (absent, damaged, inconsistent); the message says why."""


@dataclass
class BackdoorTestSet:
    """Backdoored test images as stored by the tool that made them.

    `targets` are the classes the backdoor sends each image to (what ASR counts); `labels` are the
    images' true classes, when the source recorded them (what RA counts), and `index` their
    positions in the clean test set.
    """

    images: Tensor
    targets: Tensor
    labels: Tensor | None = None
    index: Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def non_target(self) -> Tensor:
        """Which images count for ASR and RA: those whose target differs from their true class
        (all of them when true classes are unknown; BackdoorBench stores only such images)."""
        if self.labels is None:
            return torch.ones(len(self), dtype=torch.bool)
        return self.targets != self.labels

    def success(self, model: nn.Module, device: torch.device) -> tuple[float, float]:
        """ASR and RA of `model` on the non-target images: the share classified as their target,
        and the share kept at their true class (NaN when the source did not record true classes)."""
        keep = self.non_target()
        triggered = predict(model, self.images[keep], device)
        asr = float((triggered == self.targets[keep]).float().mean())
        ra = float("nan") if self.labels is None else float((triggered == self.labels[keep]).float().mean())
        return asr, ra


@dataclass
class Victim:
    """A loaded victim: the model, its data spec, the defender's clean training images, the clean
    test set and the backdoored test set, plus where it came from and its content hash."""

    path: Path
    name: str
    model_name: str
    spec: DataSpec
    model: ImageClassifier
    clean_train: ImageData
    excluded: Tensor
    clean_test: ImageData
    bd_test: BackdoorTestSet
    content_hash: str
    source: dict[str, Any]

    def defense_data(self, clean_ratio: float, val_fraction: float, seed: int) -> DefenseData:
        """The defender's clean budget: `clean_ratio` of the clean training images, stratified,
        never one the attacker poisoned, with `val_fraction` of it held out (as for any cell)."""
        dataset = Dataset(self.spec, self.clean_train, self.clean_test)
        return draw_defense_data(dataset, self.excluded, clean_ratio, val_fraction, seed)

    def scores(self, model: nn.Module, device: torch.device) -> Scores:
        """BA on the clean test set; ASR and RA on the stored backdoored images.

        ASR is the share classified as their target, RA the share classified as their true class;
        RA is NaN when the source did not record true classes.
        """
        clean = predict(model, self.clean_test.images, device)
        ba = float((clean == self.clean_test.labels).float().mean())
        asr, ra = self.bd_test.success(model, device)
        return Scores(ba=ba, asr=asr, ra=ra)


# --- writing ------------------------------------------------------------------------------------


def victim_model(architecture: str, spec: DataSpec) -> ImageClassifier:
    """A randomly initialised model of `architecture` for `spec`'s classes and normalisation.

    The importer builds the model with it before loading the translated weights, and
    `load_victim` rebuilds it the same way, so what is stored and what is loaded are one
    architecture: a zoo model, or a torchvision network (`torchvision:NAME`) behind the adapter.
    """
    if architecture.startswith(TORCHVISION_PREFIX):
        net = torchvision_network(architecture.removeprefix(TORCHVISION_PREFIX), spec.num_classes)
        return AdaptedClassifier(net, spec.mean, spec.std, architecture=architecture)
    return create_model(architecture, spec)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to write into an existing path unless `force` (then only the victim's three files
    are replaced; nothing else in the folder is touched)."""
    if out.exists() and not out.is_dir():
        raise VictimError(f"Output {out} is a file; give a folder for the victim.")
    if out.exists() and not force:
        raise VictimError(f"Output folder {out} already exists; pass --force to replace the victim in it.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_hash(record: Mapping[str, Any]) -> str:
    """The hash of everything victim.json says, the file hashes included (so, of the tensors too)."""
    body = {k: v for k, v in record.items() if k != "content_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write a safetensors file beside its final name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_victim(
    out: Path,
    *,
    name: str,
    model_name: str,
    model: ImageClassifier,
    spec: DataSpec,
    clean_train: ImageData,
    excluded: Tensor,
    clean_test: ImageData,
    bd_test: BackdoorTestSet,
    source: Mapping[str, Any],
    force: bool = False,
) -> str:
    """Write a victim directory and return its content hash.

    The tensors are checked as `load_victim` checks them, so a victim that could not be loaded is
    never written. The tensor files go first and victim.json (which vouches for them) last.
    """
    check_output_dir(out, force)
    name = "".join(c if c.isprintable() else "?" for c in name).strip() or "victim"  # see read_victim_record
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    data: dict[str, Tensor] = {
        "clean_train.images": clean_train.images,
        "clean_train.labels": clean_train.labels.long(),
        "clean_train.excluded": excluded.long(),
        "clean_test.images": clean_test.images,
        "clean_test.labels": clean_test.labels.long(),
        "bd_test.images": bd_test.images,
        "bd_test.targets": bd_test.targets.long(),
    }
    if bd_test.labels is not None:
        data["bd_test.labels"] = bd_test.labels.long()
    if bd_test.index is not None:
        data["bd_test.index"] = bd_test.index.long()
    _check_data(data, spec, str(out))
    bad = non_finite(state)
    if bad is not None:
        raise VictimError(f"The model's {bad} holds NaN or inf; refusing to store it as a victim.")
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / MODEL_FILE, state)
    _save_tensors(out / DATA_FILE, data)
    record: dict[str, Any] = {
        "format": VICTIM_FORMAT,
        "name": name,
        "model": model_name,
        "spec": dataclasses.asdict(spec),
        "source": json.loads(json.dumps(dict(source), default=str)),
        "files": {f: _sha256(out / f) for f in (MODEL_FILE, DATA_FILE)},
    }
    record["content_hash"] = _content_hash(record)
    atomic_write_text(out / META_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return str(record["content_hash"])


# --- reading ------------------------------------------------------------------------------------


def victim_dir(path: Path | str) -> Path | None:
    """The victim folder that `path` names, for commands that take a model file or a victim: a
    folder (whether it holds a victim is checked when it is read), or a victim's model.safetensors
    with its victim.json beside it. None for anything else, e.g. a plain model file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if path.name == MODEL_FILE and (path.parent / META_FILE).is_file():
        return path.parent
    return None


def read_victim_record(path: Path) -> dict[str, Any]:
    """victim.json of the victim at `path`, checked for layout and its own content hash (cheap:
    the tensor files are hashed by `load_victim`)."""
    path = Path(path)
    meta = path / META_FILE
    if not path.exists():
        raise VictimError(f"Victim {path} does not exist.")
    if not meta.is_file():
        raise VictimError(
            f"{path} is not a bdtk victim (no {META_FILE}); make one with `bdtk import backdoorbench`."
        )
    try:
        record = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise VictimError(f"{meta} is not readable JSON ({exc}).") from None
    if not isinstance(record, dict) or record.get("format") != VICTIM_FORMAT:
        raise VictimError(f"{meta} is not a victim record of format {VICTIM_FORMAT}.")
    fields = {"name": str, "model": str, "spec": dict, "source": dict, "files": dict, "content_hash": str}
    for field, kind in fields.items():
        if not isinstance(record.get(field), kind):
            raise VictimError(f"{meta} lacks a valid {field!r}.")
    if not record["name"].isprintable() or not record["name"].strip():
        raise VictimError(
            f"{meta}: its name {record['name']!r} is empty or holds control characters; it would be "
            "printed to terminals and tables as it is."
        )
    if record["content_hash"] != _content_hash(record):
        raise VictimError(f"{meta} was edited after it was written (its content hash does not match).")
    return record


def _spec(record: Mapping[str, Any], where: str) -> DataSpec:
    raw = dict(record["spec"])
    try:
        for field in ("mean", "std"):
            raw[field] = tuple(float(v) for v in raw[field])
        spec = DataSpec(**raw)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise VictimError(f"{where}: its data spec is malformed ({exc}).") from None
    # typed as written, not coerced: "10" classes or a NaN mean would break later, far from here
    sizes = (spec.num_classes, spec.channels, spec.height, spec.width)
    if not all(type(v) is int and v > 0 for v in sizes) or spec.num_classes < 2:
        raise VictimError(f"{where}: its data spec's sizes {sizes} are not positive integers (2+ classes).")
    if not isinstance(spec.name, str) or type(spec.hflip) is not bool:
        raise VictimError(f"{where}: its data spec's name or hflip has the wrong type.")
    if len(spec.mean) != len(spec.std) or not all(math.isfinite(v) for v in (*spec.mean, *spec.std)):
        raise VictimError(f"{where}: its data spec's mean and std must be finite, one pair per channel.")
    if not all(v > 0 for v in spec.std):
        raise VictimError(f"{where}: its data spec's std must be positive, got {list(spec.std)}.")
    return spec


def _check_data(data: Mapping[str, Tensor], spec: DataSpec, where: str) -> None:
    """Shapes, dtypes and label ranges of a victim's data, each failure named."""
    required = (
        "clean_train.images",
        "clean_train.labels",
        "clean_train.excluded",
        "clean_test.images",
        "clean_test.labels",
        "bd_test.images",
        "bd_test.targets",
    )
    missing = [k for k in required if k not in data]
    if missing:
        raise VictimError(f"{where}: the data lacks {', '.join(missing)}.")
    splits = (("clean_train", ("labels",)), ("clean_test", ("labels",)), ("bd_test", ("targets", "labels")))
    for split, label_keys in splits:
        images = data[f"{split}.images"]
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != spec.image_shape:
            raise VictimError(
                f"{where}: {split} images are {images.dtype} {tuple(images.shape)}, not uint8 "
                f"(N, {', '.join(map(str, spec.image_shape))})."
            )
        if images.shape[0] == 0:
            raise VictimError(f"{where}: the {split} set is empty.")
        for key in label_keys:
            values = data.get(f"{split}.{key}")
            if values is None:
                continue
            if values.dtype != torch.int64:
                raise VictimError(f"{where}: {split}.{key} is {values.dtype}, not int64 class indices.")
            if values.dim() != 1 or values.shape[0] != images.shape[0]:
                raise VictimError(f"{where}: {split}.{key} does not have one entry per image.")
            if not 0 <= int(values.min()) <= int(values.max()) < spec.num_classes:
                raise VictimError(f"{where}: {split}.{key} holds classes outside 0..{spec.num_classes - 1}.")
    excluded, n_train = data["clean_train.excluded"], data["clean_train.images"].shape[0]
    if excluded.dtype != torch.int64 or excluded.dim() != 1:
        raise VictimError(
            f"{where}: clean_train.excluded is {excluded.dtype} {tuple(excluded.shape)}, not int64 indices."
        )
    if excluded.unique().numel() != excluded.numel():
        raise VictimError(f"{where}: clean_train.excluded lists a training image more than once.")
    if excluded.numel() and not 0 <= int(excluded.min()) <= int(excluded.max()) < n_train:
        raise VictimError(
            f"{where}: clean_train.excluded holds indices outside the {n_train} training images."
        )
    index = data.get("bd_test.index")
    if index is not None:
        n_test = data["clean_test.images"].shape[0]
        if (
            index.dtype != torch.int64
            or index.dim() != 1
            or index.shape[0] != data["bd_test.images"].shape[0]
        ):
            raise VictimError(
                f"{where}: bd_test.index is not one int64 test-image index per backdoored image."
            )
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < n_test:
            raise VictimError(f"{where}: bd_test.index holds indices outside the {n_test} test images.")
    if "bd_test.labels" in data and not bool((data["bd_test.targets"] != data["bd_test.labels"]).any()):
        raise VictimError(
            f"{where}: every backdoored test image already has its target class; ASR is undefined."
        )


def load_victim(path: Path | str) -> Victim:
    """The victim stored at `path`: checked against its hashes, its model rebuilt (`victim_model`).

    Raises VictimError (one line, naming the file) when anything does not match.
    """
    path = Path(path)
    record = read_victim_record(path)
    where = str(path)
    for file in (MODEL_FILE, DATA_FILE):
        if not (path / file).is_file():
            raise VictimError(f"{where}: {file} is missing.")
        if record["files"].get(file) != _sha256(path / file):
            raise VictimError(f"{where}: {file} does not match {META_FILE} (damaged or replaced).")
    spec = _spec(record, where)
    try:
        state = load_file(str(path / MODEL_FILE))
        data = load_file(str(path / DATA_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VictimError(f"{where}: unreadable tensors ({exc}).") from None
    _check_data(data, spec, where)
    try:
        check_weight_tensors(state, path / MODEL_FILE)
    except BdtkError as exc:
        raise VictimError(f"{where}: {exc}") from None
    bad = non_finite(state)
    if bad is not None:
        raise VictimError(
            f"{where}: its model's tensor {bad!r} holds NaN or infinite values; such a model cannot be "
            "measured or purified (the file was damaged, or the training that made it diverged)."
        )
    model = victim_model(record["model"], spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise VictimError(f"{where}: its weights do not fit {record['model']!r} ({detail}).") from None
    return Victim(
        path=path,
        name=record["name"],
        model_name=record["model"],
        spec=spec,
        model=model.eval(),
        clean_train=ImageData(data["clean_train.images"], data["clean_train.labels"]),
        excluded=data["clean_train.excluded"],
        clean_test=ImageData(data["clean_test.images"], data["clean_test.labels"]),
        bd_test=BackdoorTestSet(
            data["bd_test.images"],
            data["bd_test.targets"],
            data.get("bd_test.labels"),
            data.get("bd_test.index"),
        ),
        content_hash=record["content_hash"],
        source=record["source"],
    )

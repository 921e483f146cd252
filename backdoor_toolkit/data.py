"""Datasets as in-memory uint8 tensors, and the splits a backdoor experiment needs.

Images stay uint8 (N, C, H, W) until a batch is drawn, then become float in [0, 1]; normalisation
is the model's first layer. Whole datasets fit in memory, which makes CPU training far faster
than per-sample PIL pipelines.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import BdtkError, ConfigError, DatasetCorruptError, DatasetNotFoundError, UnknownNameError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DataSpec:
    """What a model and a trigger need to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flips are a label-preserving augmentation here

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def check_images(self, images: Tensor) -> None:
        """Fail clearly when a batch does not have this dataset's image shape."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise BdtkError(
                f"Images of shape {tuple(images.shape)} do not match dataset {self.name!r}, "
                f"which has images of shape (N, {', '.join(map(str, self.image_shape))})."
            )


@dataclass
class ImageData:
    """A labelled image set: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        """The number of images (`len(data.val) == 0`: an empty val part)."""
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> ImageData:
        """The images and labels at positions `index` (a new ImageData; indexing copies)."""
        return ImageData(self.images[index], self.labels[index])

    def float_images(self) -> Tensor:
        """All images as float in [0, 1] (uint8 is scaled; float is passed through)."""
        return to_float(self.images)


def to_float(images: Tensor) -> Tensor:
    """uint8 images (as `ImageData` stores them) as floats in [0, 1]; float images as floats."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


@dataclass
class Dataset:
    spec: DataSpec
    train: ImageData
    test: ImageData


Loader = Callable[[Path | None, bool], tuple[ImageData, ImageData]]


@dataclass(frozen=True)
class _Entry:
    spec: DataSpec
    loader: Loader
    how_to_get: str


_DATASETS: dict[str, _Entry] = {}


def _register(spec: DataSpec, how_to_get: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _DATASETS[spec.name] = _Entry(spec, fn, how_to_get)
        return fn

    return deco


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_spec(name: str) -> DataSpec:
    if name not in _DATASETS:
        raise UnknownNameError("dataset", name, available_datasets())
    return _DATASETS[name].spec


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name; a missing dataset raises one message that says how to get it."""
    spec = dataset_spec(name)
    entry = _DATASETS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else None
    what = "--data-dir"
    if root is None and os.environ.get("BDTK_DATA_DIR"):
        root, what = Path(os.environ["BDTK_DATA_DIR"]).expanduser(), "BDTK_DATA_DIR"
    if root is not None and root.exists() and not root.is_dir():
        raise DatasetNotFoundError(f"{what} {root} is a file; give the folder that holds the datasets.")
    if root is not None and not root.exists() and not download:  # a typo must not switch the data
        raise DatasetNotFoundError(
            f"{what} {root} does not exist; give the folder that holds the datasets (or --download "
            "to fetch them into it, where a network is reachable)."
        )
    try:
        train, test = entry.loader(root, download)
    except DatasetCorruptError:
        raise
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(f"Dataset {name!r} was not found ({exc}). {entry.how_to_get}") from None
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        where = f" under {root}" if root else ""
        raise DatasetNotFoundError(
            f"Dataset {name!r} was not found{where} ({exc}). {entry.how_to_get}"
        ) from None
    for split, part in (("training", train), ("test", test)):
        bad = part.labels.numel() != part.images.shape[0] or tuple(part.images.shape[1:]) != spec.image_shape
        if bad or (
            part.labels.numel()
            and not 0 <= int(part.labels.min()) <= int(part.labels.max()) < spec.num_classes
        ):
            raise DatasetCorruptError(
                f"Dataset {name!r}: the {split} split does not look like {name} (images "
                f"{tuple(part.images.shape)}, {part.labels.numel()} labels; expected images of "
                f"{spec.image_shape} with labels 0..{spec.num_classes - 1}). {entry.how_to_get}"
            )
    _check_identity(spec, train, root)
    return Dataset(spec, train, test)


#: Below this many training images the mean brightness says too little to name a dataset.
_IDENTITY_MIN_IMAGES = 1000
#: A dataset's training images sit within this of its registered per-channel mean (in [0, 1]) ...
_IDENTITY_OWN_TOLERANCE = 0.05
#: ... and "looks like" another registered dataset of the same shape within this of its mean.
_IDENTITY_MATCH_TOLERANCE = 0.02


def _check_identity(spec: DataSpec, train: ImageData, root: Path | None) -> None:
    """Refuse one dataset's files loaded under another's name.

    MNIST and Fashion-MNIST share the IDX format, the sizes and the file names, so
    `--dataset mnist --data-dir <fashion-mnist files>` would otherwise train and report on the
    wrong data under the right name. The training images' mean brightness tells them apart
    (0.131 against 0.286): when it is far from the requested dataset's registered mean and close
    to another registered dataset of the same image shape, the load fails and names that dataset.
    """
    if len(train) < _IDENTITY_MIN_IMAGES:
        return
    sample = train.images[:5000]
    dims = [0, 2, 3] if sample.dim() == 4 else [0]
    mean = to_float(sample).mean(dim=dims).tolist()

    def distance(other: DataSpec) -> float:
        return max(abs(a - b) for a, b in zip(mean, other.mean, strict=True))

    if distance(spec) <= _IDENTITY_OWN_TOLERANCE:
        return
    lookalikes = [
        entry.spec.name
        for entry in _DATASETS.values()
        if entry.spec.name != spec.name
        and entry.spec.image_shape == spec.image_shape
        and distance(entry.spec) <= _IDENTITY_MATCH_TOLERANCE
    ]
    if lookalikes:
        where = f" under {root}" if root else ""
        shown = ", ".join(f"{v:.3f}" for v in mean)
        expected = ", ".join(f"{v:.3f}" for v in spec.mean)
        raise DatasetCorruptError(
            f"Dataset {spec.name!r}: the files found{where} look like {lookalikes[0]!r}, not "
            f"{spec.name!r} (mean brightness {shown}; {spec.name}'s is {expected}). Pass "
            f"--dataset {lookalikes[0]}, or point --data-dir at {spec.name}'s own files."
        )


# --- readers ---------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not; a damaged file is named, never a traceback."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetCorruptError(f"Cannot read dataset file {path} ({exc}); {_REINSTALL}") from None
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if len(data) < 4 or magic >> 8 != 0x08 or ndim not in (1, 3) or len(data) < 4 + 4 * ndim:
        raise DatasetCorruptError(f"Dataset file {path} is not an IDX file of bytes; {_REINSTALL}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetCorruptError(
            f"Dataset file {path} is damaged ({len(data)} bytes, its header promises {expected}); "
            f"{_REINSTALL}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


_REINSTALL = (
    "reinstall it (`apt-get install --reinstall dataset-fashion-mnist` for the embedded copy) or "
    "point --data-dir at an intact copy."
)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    return None


def _idx_pair(folder: Path, prefix: str) -> ImageData | None:
    img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lbl = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img is None or lbl is None:
        return None
    images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl).astype(np.int64))
    return ImageData(images, labels)


def _mnist_like(
    folders: list[Path], tv_name: str, root: Path | None, download: bool
) -> tuple[ImageData, ImageData]:
    for folder in folders:
        train, test = _idx_pair(folder, "train"), _idx_pair(folder, "t10k")
        if train is not None and test is not None:
            return train, test
    if root is None:
        if not folders:
            raise DatasetNotFoundError("no --data-dir given, and bdtk has no built-in copy of it")
        looked = ", ".join(str(f) for f in folders)
        raise DatasetNotFoundError(f"no IDX files in {looked}, and no --data-dir given")
    import torchvision.datasets as tvd

    cls = getattr(tvd, tv_name)
    tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
    return (
        ImageData(tr.data.unsqueeze(1).clone(), tr.targets.long().clone()),
        ImageData(te.data.unsqueeze(1).clone(), te.targets.long().clone()),
    )


_GRAY = ((0.5,), (0.5,))


@_register(
    DataSpec("fashion-mnist", 10, 1, 28, 28, (0.2860,), (0.3530,), hflip=True),
    "Install it with `apt-get install dataset-fashion-mnist` (files in "
    "/usr/share/datasets/fashion-mnist), or pass --data-dir to a torchvision root "
    "(add --download where a network is reachable).",
)
def _fashion_mnist(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    # a root the user names is the data they asked for: the embedded copy is the default only, not
    # a fallback for a root that lacks the files (that would report on other data in silence)
    folders = [root, root / "FashionMNIST" / "raw"] if root is not None else [DEBIAN_FASHION_MNIST]
    return _mnist_like(folders, "FashionMNIST", root, download)


@_register(
    DataSpec("mnist", 10, 1, 28, 28, (0.1307,), (0.3081,), hflip=False),
    "Pass --data-dir to a folder with the MNIST IDX files or a torchvision root "
    "(add --download where a network is reachable).",
)
def _mnist(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    folders = [root, root / "MNIST" / "raw"] if root is not None else []
    return _mnist_like(folders, "MNIST", root, download)


def _require_root(root: Path | None) -> Path:
    if root is None:
        raise DatasetNotFoundError("no data directory given (use --data-dir)")
    return root


def _hwc_to_chw(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


_TV_HINT = "Pass --data-dir to its torchvision root (add --download where a network is reachable)."


@_register(
    DataSpec("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    _TV_HINT,
)
def _cifar10(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from torchvision.datasets import CIFAR10

    r = _require_root(root)
    tr, te = CIFAR10(r, train=True, download=download), CIFAR10(r, train=False, download=download)
    return (
        ImageData(_hwc_to_chw(tr.data), torch.tensor(tr.targets)),
        ImageData(_hwc_to_chw(te.data), torch.tensor(te.targets)),
    )


@_register(
    DataSpec("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    _TV_HINT,
)
def _cifar100(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from torchvision.datasets import CIFAR100

    r = _require_root(root)
    tr = CIFAR100(r, train=True, download=download)
    te = CIFAR100(r, train=False, download=download)
    return (
        ImageData(_hwc_to_chw(tr.data), torch.tensor(tr.targets)),
        ImageData(_hwc_to_chw(te.data), torch.tensor(te.targets)),
    )


@_register(
    DataSpec("svhn", 10, 3, 32, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    _TV_HINT,
)
def _svhn(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from torchvision.datasets import SVHN

    r = _require_root(root)
    tr = SVHN(r, split="train", download=download)
    te = SVHN(r, split="test", download=download)
    return (
        ImageData(torch.from_numpy(tr.data.copy()), torch.from_numpy(tr.labels.astype(np.int64))),
        ImageData(torch.from_numpy(te.data.copy()), torch.from_numpy(te.labels.astype(np.int64))),
    )


@_register(
    DataSpec("gtsrb", 43, 3, 32, 32, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), False),
    _TV_HINT + " Images are resized to 32×32.",
)
def _gtsrb(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from torchvision import transforms
    from torchvision.datasets import GTSRB

    r = _require_root(root)
    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()])

    def read(split: str) -> ImageData:
        ds = GTSRB(r, split=split, transform=tf, download=download)
        pairs = [ds[i] for i in range(len(ds))]
        return ImageData(torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))

    return read("train"), read("test")


def stratified_subset(
    data: ImageData,
    size: int | None,
    num_classes: int,
    seed: int,
    *,
    what: str = "A subset of",
    split: str = "images in this split",
) -> ImageData:
    """A class-stratified random subset of `size` images (all of them when size is None or equal).

    A size larger than `data` is an error rather than all of it: results are recorded under the
    size asked for, so a silently smaller subset would file the same run as a separate setting.
    `what` and `split` name the size and the images in that message ("--train-size", "training
    images of fashion-mnist").
    """
    if size is not None and size > len(data):
        raise BdtkError(
            f"{what} {size} is more than the {len(data):,} {split}; give at most {len(data)}, or leave "
            "it out to use them all."
        )
    if size is None or size == len(data):
        return data
    return data.subset(stratified_index(data.labels, size, num_classes, seed))


def stratified_index(labels: Tensor, size: int, num_classes: int, seed: int) -> Tensor:
    """The sorted positions of `stratified_subset`'s images, so a caller can also name the rest."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    ordered = labels[order]
    pools = [order[ordered == c] for c in range(num_classes)]
    quotas = _stratified_quotas([int(p.numel()) for p in pools], size)
    return torch.cat([p[:q] for p, q in zip(pools, quotas, strict=True)]).sort().values


# --- splits ----------------------------------------------------------------------------------


@dataclass
class DefenseData:
    """The defender's clean budget, drawn from the training split only.

    `train` is what a defense may learn from; `val` is held out from the same budget for choosing
    thresholds, pruning ratios and epochs. `index_train`/`index_val` are positions in the
    original training set, recorded so a run can be audited and repeated.
    """

    spec: DataSpec
    train: ImageData
    val: ImageData
    index_train: Tensor
    index_val: Tensor

    def require_val(self, who: str, why: str) -> None:
        """Refuse to run `who` (a defense and its option) when the val part is empty.

        With `val_fraction` 0 there is nothing to choose on: an accuracy of no images is NaN, every
        comparison with NaN is False, and a search that stops when val accuracy falls too far would
        never stop (pruning its maximum while reporting that it stayed within budget). `why` says
        what the val part decides, for the message.
        """
        if len(self.val) == 0:
            raise ConfigError(
                f"{who} {why} on the defender's val split, which is empty here (val_fraction 0); give "
                "the run a val split (val_fraction > 0)."
            )


def budget_exclusions(poisoned_index: Tensor, clean_label: bool) -> Tensor:
    """The training positions the defender's clean budget must avoid, given the attack's poisoning.

    A dirty-label attack relabelled its poisoned images, so the budget stays disjoint from them. A
    clean-label attack (SIG) poisoned images of the target class under their true labels: their
    clean originals are ordinary clean images of that class, and avoiding them would starve the
    budget of the target class (at SIG's 5 % rate, about half its share; at 10 %, all of it), so
    nothing is avoided. BackdoorBench draws from the clean originals of every image.
    """
    if clean_label:
        return torch.empty(0, dtype=torch.long)
    return poisoned_index


def budget_split(n: int, clean_ratio: float, val_fraction: float) -> tuple[int, int]:
    """(train, val) sizes of the defender's clean budget drawn from `n` training images."""
    budget = round(clean_ratio * n)
    n_val = max(1, round(val_fraction * budget)) if val_fraction > 0 else 0
    return budget - n_val, n_val


#: Below this many val images per class, what a defense chooses on its val part is mostly noise.
SMALL_VAL_PER_CLASS = 5


def small_val_warning(spec: DataSpec, n: int, clean_ratio: float, val_fraction: float) -> str | None:
    """A warning when the defender's val part is too small to choose anything on, else None.

    A smoke grid (2,000 training images, a 5 % budget) leaves 20 val images for 10 classes: a
    defense's early stop, threshold or pruning budget then follows single images, and an author
    could read meaning into its choices. `bdtk purify` says the same of a user's own folder.
    """
    n_val = budget_split(n, clean_ratio, val_fraction)[1]
    k = spec.num_classes
    if n_val == 0 or n_val >= SMALL_VAL_PER_CLASS * k:
        return None  # none at all is refused by the defenses that need one
    return (
        f"The defender's val part holds {n_val} images for {spec.name}'s {k} classes (one image is "
        f"{100 / n_val:.1f} points of val accuracy): what defenses choose on it (early stops, "
        "thresholds, pruning budgets) follows single images at this size. Such a grid checks that "
        "plugins run, not what they choose; raise --train-size or --clean-ratio for numbers."
    )


def check_budget_size(spec: DataSpec, n: int, clean_ratio: float, val_fraction: float) -> None:
    """Refuse, before anything trains, a clean budget with fewer training images than classes.

    Such a budget still "works" — every defense runs — but fine-tuning on one or two images
    collapses the model to one class, which then reads as ASR 100 % and a meaningless DER. The
    message gives the smallest --clean-ratio that leaves one training image per class.
    """
    n_train, n_val = budget_split(n, clean_ratio, val_fraction)
    n_train = max(n_train, 0)  # a ratio rounding to no image at all is "0 to train"
    k = spec.num_classes
    if n_train >= k:
        return
    needed = next(
        (r / 10_000 for r in range(1, 5001) if budget_split(n, r / 10_000, val_fraction)[0] >= k), None
    )
    hint = (
        f"raise --clean-ratio to at least {needed:g}"
        if needed is not None
        else "use more training images (--train-size) or a smaller --val-fraction"
    )
    raise BdtkError(
        f"clean_ratio={clean_ratio:g} gives the defender {n_train + n_val} clean image(s) of {n:,} "
        f"({n_train} to train, {n_val} to validate), fewer training images than {spec.name}'s {k} "
        f"classes: a defense cannot learn from that; {hint}."
    )


def draw_defense_data(
    dataset: Dataset,
    excluded: Tensor,
    clean_ratio: float,
    val_fraction: float,
    seed: int,
) -> DefenseData:
    """Draw `clean_ratio` of the training set, avoiding `excluded` (the poisoned indices).

    The budget is stratified by class so a small budget still covers every class.
    """
    n = len(dataset.train)
    budget = round(clean_ratio * n)
    if budget < 2:
        raise BdtkError(f"clean_ratio={clean_ratio} leaves fewer than 2 images of {n}.")
    allowed = torch.ones(n, dtype=torch.bool)
    allowed[excluded] = False
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.nonzero(allowed).squeeze(1)
    if candidates.numel() < budget:
        raise BdtkError(
            f"Only {candidates.numel()} clean training images remain; clean_ratio={clean_ratio} "
            f"asks for {budget}."
        )
    order = candidates[torch.randperm(candidates.numel(), generator=gen)]
    labels = dataset.train.labels[order]
    k = dataset.spec.num_classes
    per_class = [order[labels == c] for c in range(k)]
    quotas = _stratified_quotas([int(p.numel()) for p in per_class], budget)
    index = torch.cat([pool[:quota] for pool, quota in zip(per_class, quotas, strict=True)])
    index = index[torch.randperm(index.numel(), generator=gen)]
    n_val = max(1, round(val_fraction * budget)) if val_fraction > 0 else 0
    index_val, index_train = index[:n_val], index[n_val:]
    return DefenseData(
        dataset.spec,
        dataset.train.subset(index_train),
        dataset.train.subset(index_val),
        index_train,
        index_val,
    )


def _stratified_quotas(available: list[int], total: int) -> list[int]:
    """Split `total` over classes in proportion to availability, never above it."""
    size = sum(available)
    quotas = [min(a, int(total * a / size)) for a in available]
    remainder = total - sum(quotas)
    for i in sorted(range(len(available)), key=lambda j: -available[j]):
        if remainder == 0:
            break
        if quotas[i] < available[i]:
            quotas[i] += 1
            remainder -= 1
    return quotas

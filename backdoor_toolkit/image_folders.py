"""Image folders as bdtk data: `--data folder:PATH`, a defender's own clean images.

The layout is torchvision's `ImageFolder`: one sub-folder per class, class names sorted to give the
labels 0, 1, …, image files found recursively inside each (the same extensions). A model trained
with `ImageFolder` on the same class folders therefore gets the labels it was trained with.

Images are decoded with PIL, converted to the model's channel count (L, RGB or RGBA), resized to
one size and stored as uint8 (N, C, H, W) like every bdtk dataset. Which size: the caller's
(`--image-size`), else the one every image already has; images of several sizes with no size given
are an error, since guessing the model's input size wrong would quietly ruin every number.

Symbolic links are followed as `ImageFolder` follows them, with two exceptions that keep every
image counted once under its own class: a linked folder or file that resolves inside the image
folder itself (a loop such as `cat/up -> ..`, or a second path to another class's images) and a
second path to a folder or file already read are not followed; they are listed in `ignored`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataSpec, ImageData
from .errors import BdtkError

#: Written before a path: `--data folder:clean/`.
FOLDER_PREFIX = "folder:"
#: torchvision's `IMG_EXTENSIONS`, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
#: 16-bit greyscale modes: PIL's convert("L") clips their values at 255 instead of rescaling
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(ValueError):
    """A file that cannot be decoded as an image (the message says why)."""


def decode_image(path: Path, mode: str | None) -> Any:
    """The image at `path`, decoded, as a PIL image in `mode` ("L", "RGB", "RGBA"; None: "L" for
    a greyscale image, with or without alpha, and "RGB" for any other).

    Every reader of user or third-party images goes through here, so all refuse the same files:
    past PIL's MAX_IMAGE_PIXELS (a decompression bomb, which PIL only warns about and whose decoding
    could exhaust memory) and anything PIL cannot read raise `UnreadableImage`. A 16-bit greyscale
    image is rescaled to 8 bits (PIL's convert would clip every value above 255 to white), as is
    mode "I" (32-bit, how PIL opens some 16-bit PNGs) when it holds values above 255.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if mode is None:
                    mode = "L" if img.getbands()[0] in ("L", "I", "F", "1") and img.mode != "P" else "RGB"
                if img.mode in _SIXTEEN_BIT or img.mode == "I":
                    wide = np.asarray(img, dtype=np.float64)
                    top = 65535.0 if img.mode in _SIXTEEN_BIT or wide.max(initial=0) > 255 else 255.0
                    scaled = np.clip(np.rint(wide * 255.0 / top), 0, 255).astype(np.uint8)
                    return Image.fromarray(scaled, mode="L").convert(mode)
                return img.convert(mode)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise UnreadableImage(" ".join(str(exc).split())[:160]) from None


@dataclass
class FolderImages:
    """The readable images of a class-folder tree, their labels and class names."""

    root: Path
    classes: list[str]
    data: ImageData
    #: Files with an image extension that PIL could not read (or that are too large to decode
    #: safely: PIL's decompression-bomb limit), each with why, so a user can fix the file instead
    #: of guessing.
    skip_reasons: dict[Path, str] = field(default_factory=dict)
    #: Linked folders and files not followed because they loop back into the image folder or reach
    #: images already counted (see the module docstring).
    ignored: list[Path] = field(default_factory=list)

    @property
    def skipped(self) -> list[Path]:
        """The skipped files, in the order they were met."""
        return list(self.skip_reasons)

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.data.images.shape[2]), int(self.data.images.shape[3]))

    def spec(self, mean: tuple[float, ...], std: tuple[float, ...], hflip: bool = False) -> DataSpec:
        """A DataSpec for these images: horizontal flips stay off unless the caller knows they keep
        labels (digits and text do not survive a mirror)."""
        c, h, w = (int(s) for s in self.data.images.shape[1:])
        return DataSpec(f"{FOLDER_PREFIX}{self.root}", len(self.classes), c, h, w, mean, std, hflip)


def folder_path(source: str) -> Path | None:
    """The path of `folder:PATH`, None for anything else (a dataset name)."""
    if not source.startswith(FOLDER_PREFIX):
        return None
    text = source.removeprefix(FOLDER_PREFIX)
    if not text:
        raise BdtkError("folder: needs a path, e.g. --data folder:clean_images/.")
    return Path(text).expanduser()


def parse_image_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """`32`, `"32"` or `"32x48"` (height × width) as (height, width)."""
    if text is None:
        return None
    if isinstance(text, tuple):
        size = text
    elif isinstance(text, int):
        size = (text, text)
    else:
        parts = text.lower().replace("×", "x").split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise BdtkError(f"--image-size expects N or HxW (e.g. 32 or 64x48), got {text!r}.") from None
        if len(numbers) not in (1, 2):
            raise BdtkError(f"--image-size expects N or HxW (e.g. 32 or 64x48), got {text!r}.")
        size = (numbers[0], numbers[-1])
    if not all(1 <= s <= 4096 for s in size):
        raise BdtkError(f"--image-size {size[0]}x{size[1]} is out of range (1 to 4096 pixels a side).")
    return size


def shown_classes(names: list[str], limit: int = 12) -> str:
    """Class names for a one-line message: a name with a newline or another control character in it
    is escaped (repr), and past `limit` names an ellipsis."""
    shown = [name if name.isprintable() else repr(name) for name in names[:limit]]
    return ", ".join(shown) + (", …" if len(names) > limit else "")


def find_classes(root: Path) -> list[str]:
    """Sorted names of `root`'s sub-folders, as `ImageFolder` labels them, hidden ones left out: a
    `.ipynb_checkpoints` or `.git` beside the class folders would otherwise shift every label."""
    if not root.exists():
        raise BdtkError(f"Image folder {root} does not exist.")
    if not root.is_dir():
        raise BdtkError(f"Image folder {root} is not a folder.")
    classes = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise BdtkError(
            f"Image folder {root} has no class sub-folders; put each class's images in a folder "
            "named after it (root/CLASS/IMAGE.png)."
        )
    return classes


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def image_files(root: Path, classes: list[str]) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Every image file under each class folder (recursively, sorted) with its label, and the links
    not followed (and the paths that are not regular files: a FIFO, a device, a broken link).

    A link is followed only when it leads out of the image folder to something not yet read:
    following `cat/up -> ..` would walk forever (and label every class's images `cat`), and a link
    to another class's folder would count its images twice under two labels. A file reached by a
    second path is counted once, so a sample never weighs double in a split.
    """
    real_root = os.path.realpath(root)
    found: list[tuple[Path, int]] = []
    ignored: list[Path] = []
    seen_folders: set[str] = set()
    seen_files: set[str] = set()
    for label, name in enumerate(classes):
        top = root / name
        seen_folders.add(os.path.realpath(top))
        walked = []
        for folder, dirs, files in os.walk(top, followlinks=True):
            for sub in sorted(dirs):
                path = os.path.join(folder, sub)
                real = os.path.realpath(path)
                if real in seen_folders or (os.path.islink(path) and _inside(real, real_root)):
                    dirs.remove(sub)
                    ignored.append(Path(path))
                else:
                    seen_folders.add(real)
            walked.append((folder, files))
        for folder, files in sorted(walked):
            for file in sorted(files):
                if not file.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(folder, file)
                real = os.path.realpath(path)
                # a file inside the image folder belongs to the class folder it really lies in
                inside = _inside(real, real_root)
                owner = os.path.relpath(real, real_root).split(os.sep)[0] if inside else name
                # a FIFO or device named like an image would block the read forever: not an image
                if real in seen_files or owner != name or not os.path.isfile(real):
                    ignored.append(Path(path))
                    continue
                seen_files.add(real)
                found.append((Path(path), label))
    return found, ignored


#: The largest side kept as it is: --image-size accepts up to this, and a larger image would be
#: fed to the model at full size (a crafted 9000x9000 PNG of 88 bytes decodes to 81 MB).
MAX_UNRESIZED_SIDE = 4096
#: The most memory a folder's decoded images may take (uint8); past it, one line says how to shrink
#: them instead of the process being killed for memory with no message.
MAX_FOLDER_BYTES = 8 * 2**30


def _check_unresized(root: Path, sizes: dict[tuple[int, int], Path], path: Path) -> None:
    """Without --image-size every image is kept as it is: they must share one size, no side past
    MAX_UNRESIZED_SIDE. Checked image by image, so a bad folder stops at its first bad image
    instead of after decoding all of them."""
    if len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise BdtkError(
            f"Images in {root} have different sizes ({a[0]}x{a[1]} in {first.name}, {b[0]}x{b[1]} in "
            f"{second.name}); give the model's input size with --image-size (e.g. 32 or 224)."
        )
    (height, width), _ = next(iter(sizes.items()))
    if max(height, width) > MAX_UNRESIZED_SIDE:
        raise BdtkError(
            f"Images in {root} are {height}x{width} ({path.name}); past {MAX_UNRESIZED_SIDE} a side "
            "give the model's input size with --image-size (e.g. 224), and they are resized to it."
        )


def _check_memory(root: Path, count: int, bytes_each: int) -> None:
    if count * bytes_each > MAX_FOLDER_BYTES:
        need = count * bytes_each / 2**30
        raise BdtkError(
            f"Image folder {root}: {count} images of {bytes_each:,} bytes each would take {need:.1f} GiB "
            f"in memory (at most {MAX_FOLDER_BYTES / 2**30:.0f}); give a smaller --image-size or "
            "fewer images."
        )


def load_image_folder(
    root: str | Path,
    *,
    channels: int | None,
    image_size: tuple[int, int] | None = None,
    classes: list[str] | None = None,
) -> FolderImages:
    """Read an `ImageFolder` tree as uint8 images of `channels` channels and one size.

    `channels` None (a model whose input channels cannot be read off its first convolution, say
    an MLP): as the images are, one channel when all are greyscale, else three.

    `image_size` (height, width): None keeps the size the images share (an error when they do
    not). `classes`: the class names another folder had (a test folder must match the clean
    one's, or its labels would mean other classes). No images, or none readable, is an error;
    unreadable files are skipped and listed in `skipped`, among them images over PIL's
    decompression-bomb limit: one hostile file must cost a skip, not the run (or the memory).
    """
    from PIL import Image

    root = Path(root).expanduser()
    if channels is not None and channels not in _MODES:
        raise BdtkError(f"Images with {channels} channels are not supported (1, 3 or 4).")
    names = find_classes(root)
    if classes is not None and names != classes:
        raise BdtkError(
            f"Image folder {root} has classes {names}, but the clean data has {classes}; the two must "
            "name the same classes."
        )
    files, ignored = image_files(root, names)
    if not files:
        raise BdtkError(
            f"Image folder {root} has no images (looked for {', '.join(IMAGE_EXTENSIONS)} files in "
            f"{len(names)} class folders)."
        )
    empty = sorted(set(names) - {names[label] for _, label in files})
    if empty:
        raise BdtkError(
            f"Image folder {root}: class folder {empty[0]!r} has no images; every class folder needs "
            "some, or the labels would shift."
        )
    resample = getattr(Image, "Resampling", Image).BILINEAR
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: dict[Path, str] = {}
    sizes: dict[tuple[int, int], Path] = {}
    for path, label in files:
        try:
            picture = decode_image(path, None if channels is None else _MODES[channels])
        except UnreadableImage as exc:
            skipped[path] = str(exc) or "unreadable"
            continue
        size = (picture.height, picture.width)
        sizes.setdefault(size, path)
        if image_size is None:
            _check_unresized(root, sizes, path)
        elif size != image_size:
            picture = picture.resize((image_size[1], image_size[0]), resample)
        if not images:  # the first image tells what all of them will hold in memory
            kept = image_size or size
            _check_memory(root, len(files), kept[0] * kept[1] * len(picture.getbands()))
        array = np.asarray(picture, dtype=np.uint8)
        images.append(array[:, :, None] if array.ndim == 2 else array)
        labels.append(label)
    if not images:
        first, why = next(iter(skipped.items()))
        raise BdtkError(
            f"Image folder {root}: none of its {len(files)} image files could be read ({first.name}: {why})."
        )
    if channels is None and len({array.shape[2] for array in images}) > 1:  # greyscale beside colour
        images = [np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array for array in images]
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    data = ImageData(tensor, torch.tensor(labels, dtype=torch.long))
    return FolderImages(root, names, data, skipped, ignored)

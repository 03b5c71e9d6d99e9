"""Image sources: where images come from, as a list of (key, label) items plus a reader.

Every source resolves to ``ImageSource(keys, labels, classes, read)``; ``read(key)`` returns an
RGB PIL image. Keys are stable strings (relative paths, zip members, dataset indices) so the
chosen subset can be written to the run folder and reused by evaluation.
"""
from __future__ import annotations

import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from glsd.config import ConfigError, DataConfig
from glsd.data.image_file import decode_image, read_deadline, read_image_file, to_rgb  # noqa: F401 - to_rgb: its old home
from glsd.errors import DataError, MissingSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")
# Photo formats Pillow cannot decode without a plug-in: named when a folder holds only those.
UNREADABLE_EXTENSIONS = (".heic", ".heif", ".dng", ".cr2", ".nef", ".arw", ".raw")
# Folders that copying tools and NAS boxes add beside photos (resource forks, thumbnails).
JUNK_FOLDERS = ("__MACOSX", "@eaDir", "#recycle", "$RECYCLE.BIN", "System Volume Information")
# Sub-folder names that mark an ImageNet-style split layout (root/<split>/<class>/*).
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing", "eval",
               "evaluation", "unlabeled")
TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "fashion_mnist")


@dataclass(frozen=True)
class Unreadable:
    """A file skipped under data.on_error=skip: its key and the decoder's first line."""
    key: str
    reason: str


@dataclass
class ImageSource:
    name: str
    keys: list[str]
    labels: list[int]  # -1 when unlabeled
    classes: list[str]
    read: Callable[[str], Image.Image]
    read_timeout_s: float = 0.0  # 0: no limit (data.read_timeout_s)
    # (key, min_size) -> the image, a JPEG decoded at reduced scale (image_file.decode_image);
    # None where reading is not decoding a file (torchvision datasets, synthetic images).
    read_reduced: Optional[Callable[[str, int], Image.Image]] = field(default=None, repr=False,
                                                                      compare=False)
    # The images' resolved place (real path, and split where the path holds several): two
    # sources with the same one are the same images however their paths were written.
    location: str = ""

    @property
    def identity(self) -> str:
        return self.location or self.name

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, key: str, on_error: str = "skip", min_size: int = 0) -> Optional[Image.Image]:
        """The image, or None for an unreadable file under ``on_error="skip"``; a read that
        takes over ``read_timeout_s`` counts as unreadable. ``min_size``: a JPEG file may be
        decoded at reduced scale, keeping both sides at least this."""
        image = self.load_or_why(key, on_error, min_size)
        return None if isinstance(image, Unreadable) else image

    def load_or_why(self, key: str, on_error: str = "skip", min_size: int = 0):
        """:meth:`load`, an unreadable file under ``on_error="skip"`` as :class:`Unreadable`
        (which file, and why), for whoever names it: a loader worker has no log of its own."""
        try:
            with read_deadline(self.read_timeout_s):
                if min_size and self.read_reduced is not None:
                    return self.read_reduced(key, min_size)
                return self.read(key)
        except Exception as e:  # noqa: BLE001 - any decoder error means the same: a bad file
            if on_error == "fail":
                raise DataError(f"cannot read image {key!r} from {self.name}: {e}. "
                                "Fix or remove it, or set data.on_error=skip") from None
            return Unreadable(key, str(e).splitlines()[0] if str(e) else type(e).__name__)

    def subset(self, keys: list[str]) -> "ImageSource":
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise ConfigError(
                f"{len(missing)} images the run recorded in its subset.json (e.g. {missing[0]!r}) "
                f"are no longer in {self.name}: the data changed since the run. Put them back; "
                "or, to pretrain on the data as it is now, start afresh (train.resume=false moves "
                "the old run aside, or use a new output_dir); or, to evaluate on the whole train "
                "split as it is now, delete RUN_DIR/subset.json")
        return ImageSource(self.name, list(keys), [self.labels[index[k]] for k in keys],
                           self.classes, self.read, self.read_timeout_s, read_reduced=self.read_reduced,
                           location=self.location)


def open_source(cfg: DataConfig, split: Optional[str] = None) -> ImageSource:
    """Build the source named by the config; every misuse is a clear error, raised here."""
    source = _open_source(cfg, cfg.split if split is None else split)
    source.read_timeout_s = cfg.read_timeout_s
    return source


def _open_source(cfg: DataConfig, split: str) -> ImageSource:
    kind = cfg.source
    if kind == "auto":
        kind = _detect_kind(cfg.root)
    if kind == "sample":
        from glsd.data.sample import sample_root

        return imagefolder_source(sample_root(), split)
    if kind == "synthetic":
        return synthetic_source(cfg.synthetic_num_images, cfg.synthetic_image_size,
                                cfg.synthetic_num_classes, seed=0 if split == "train" else 1)
    if kind in TORCHVISION_SOURCES:
        return torchvision_source(kind, cfg.root or "data", split, cfg.download)
    root = Path(cfg.root).expanduser()  # data.root=~/photos: a shell leaves that ~ alone
    if not root.exists():
        raise ConfigError(f"data.root={cfg.root!r} does not exist; point it at an image folder or zip")
    if kind == "zip":
        return zip_source(root, split)
    if kind == "imagefolder":
        return imagefolder_source(root, split)
    return flat_folder_source(root)


# The rule data.source=auto applies to a folder; stated in its messages and the start summary.
FOLDER_RULE = ("a folder whose non-hidden sub-folders hold the images (none at its top level) is an "
               "ImageFolder (one class per sub-folder); any other folder is unlabelled and read "
               "recursively; hidden folders (.name) are ignored; data.source=imagefolder|folder forces either")


def _detect_kind(root: str) -> str:
    return detect_kind(root)[0]


def detect_kind(root: str) -> tuple[str, str]:
    """(kind, why) for data.source=auto."""
    if not root:
        raise ConfigError("data.root is empty: the config names no images. Pass data.root=PATH (a "
                          "folder of images, an ImageFolder tree root/<class>/*, or a .zip of one), or "
                          "data.source=sample (the small sample shipped with glsd), or "
                          "data.source=cifar10 data.download=true (other sources: imagefolder, folder, "
                          f"zip, {', '.join(TORCHVISION_SOURCES)}, synthetic)")
    path = Path(root).expanduser()
    if path.suffix.lower() == ".zip":
        return "zip", "a .zip file"
    if not path.is_dir():
        return "folder", "not a folder"
    entries = _list_folder(path)
    subdirs = [p.name for p in entries if p.is_dir() and not _hidden(p.name)]
    top_images = sum(1 for p in entries if p.is_file() and _is_image(p.name) and not _hidden(p.name))
    if subdirs and not top_images:
        return "imagefolder", f"{len(subdirs)} sub-folders and no images at the top level"
    why = f"{top_images} images at the top level" if top_images else "no sub-folders"
    return "folder", why


def _hidden(name: str) -> bool:
    """Hidden files and folders (.name, macOS's ._name resource forks) and the folders that
    copying tools and NAS boxes add: never images of the dataset."""
    return name.startswith(".") or name in JUNK_FOLDERS


def _list_folder(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot list {path}: {e.strerror or e}; check its permissions") from None


def _walk_images(base: Path) -> list[str]:
    """Image paths under ``base`` relative to it, sorted, skipping hidden files and folders.
    Linked sub-folders are followed (each real folder once, so a link loop ends)."""
    keys, seen = [], set()

    def refuse(error: OSError):
        raise ConfigError(f"cannot read the folder {error.filename}: {error.strerror or error}; "
                          "check its permissions") from None

    for dirpath, dirnames, files in os.walk(base, onerror=refuse, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # a linked folder: its first path
        keys += [str(Path(dirpath, f).relative_to(base)) for f in files if _is_image(f) and not _hidden(f)]
    return sorted(keys)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def no_images_error(where: str, names) -> ConfigError:
    """No readable image under ``where``: say which formats were looked for, and name the photo
    formats that were there but need converting (an iPhone's HEIC, raw files)."""
    found = sorted({os.path.splitext(n)[1].lower() for n in names} & set(UNREADABLE_EXTENSIONS))
    hint = (f"; it holds {', '.join(found)} files, which glsd cannot decode: convert them to JPEG "
            "or PNG" if found else "")
    return ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {where}{hint}")


def _all_names(base: Path) -> list[str]:
    """Every non-hidden file name under ``base`` (for the error above; only when nothing was found)."""
    return [f for _, dirnames, files in os.walk(base) for f in files if not _hidden(f)]


def imagefolder_source(root: Path, split: str) -> ImageSource:
    """``root/<class>/*`` or ``root/<split>/<class>/*`` (ImageNet layout)."""
    base = root / split if (root / split).is_dir() else root
    if base == root:  # a split layout without the asked split must not pass as classes
        splits = sorted(d.name for d in _list_folder(root) if d.is_dir() and d.name.lower() in SPLIT_NAMES
                        and any(p.is_dir() for p in _list_folder(d)))
        if splits:
            raise MissingSplit(split, str(root), splits)
    classes = sorted(d.name for d in _list_folder(base) if d.is_dir() and not _hidden(d.name))
    if not classes:
        # Point at the split's own folder: data.source=folder on the root would read every
        # split, the test images included.
        raise ConfigError(f"{base} has no class sub-folders; for unlabelled images there use "
                          f"data.source=folder data.root={base} (rule of data.source=auto: {FOLDER_RULE})")
    keys, labels = [], []
    for label, cls in enumerate(classes):
        found = _walk_images(base / cls)
        keys += [str(Path(cls, k)) for k in found]
        labels += [label] * len(found)
    if not keys:
        raise no_images_error(str(base), _all_names(base))
    reader = _FileReader(base)
    return ImageSource(f"imagefolder:{base}", keys, labels, classes, reader, read_reduced=reader,
                       location=os.path.realpath(base))


def flat_folder_source(root: Path) -> ImageSource:
    """Every image under ``root`` (recursively), unlabeled."""
    if root.is_file():
        raise ConfigError(f"data.root={root} is a file; give a folder of images or a .zip")
    keys = _walk_images(root)
    if not keys:
        raise no_images_error(str(root), _all_names(root))
    reader = _FileReader(root)
    return ImageSource(f"folder:{root}", keys, [-1] * len(keys), [], reader, read_reduced=reader,
                       location=os.path.realpath(root))


def _escapes(member: str) -> bool:
    """An absolute or drive path, or one with a '..' part (checked before anything is skipped)."""
    return (member.startswith(("/", "\\")) or ".." in member.replace("\\", "/").split("/")
            or (len(member) > 1 and member[1] == ":"))


def _wrapper_folder(names: list[str]) -> Optional[str]:
    """The one folder every member sits in, when it is neither a split nor a class folder
    (its members are in sub-folders of it), else None."""
    tops = {n.split("/")[0] for n in names}
    if len(tops) != 1 or not all(n.count("/") >= 2 for n in names):
        return None
    top = tops.pop()
    return None if top.lower() in SPLIT_NAMES else top


class _FileReader:
    """Files under a folder, by relative key. A class, not a closure: loader workers started by
    spawn or forkserver (macOS; Linux from Python 3.14) receive the source pickled."""

    def __init__(self, base: Path):
        self.base = base

    def __call__(self, key: str, min_size: int = 0) -> Image.Image:
        return read_image_file(self.base / key, min_size)


class _ZipReader:
    """Random access to zip members; one handle per process (handles do not survive fork)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: Optional[zipfile.ZipFile] = None
        self._pid = -1

    def __call__(self, member: str, min_size: int = 0) -> Image.Image:
        if self._handle is None or self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        with self._handle.open(member) as f:
            return decode_image(f, min_size)

    def __getstate__(self):
        return {"path": self.path, "_handle": None, "_pid": -1}


def zip_source(path: Path, split: str) -> ImageSource:
    """A zip holding ``<split>/<class>/*`` (or ``<class>/*``), read in place."""
    try:
        with zipfile.ZipFile(path) as zf:
            every = zf.namelist()
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{path} is not a readable zip file ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror or e}") from None
    unsafe = [n for n in every if _is_image(n) and _escapes(n)]
    if unsafe:
        raise ConfigError(f"zip {path} has members with '..' or absolute paths (e.g. {unsafe[0]!r}); "
                          "they would escape its class folders. Rebuild the zip with relative names")
    members = [n for n in every if not any(_hidden(part) for part in n.split("/"))]
    names = [n for n in members if _is_image(n)]
    if not names:
        raise no_images_error(f"zip {path}", members)
    # A zip of a folder (Finder, Explorer: mydata/<class>/*) holds the layout one level down.
    wrapper = _wrapper_folder(names)
    depth = 1 if wrapper else 0
    tops = sorted({n.split("/")[depth] for n in names if n.count("/") >= depth + 2})
    if tops:
        if split not in tops:
            raise MissingSplit(split, str(path), tops)
        names = [n for n in names if n.split("/")[depth] == split]
        depth += 1
    classes = sorted({n.split("/")[depth] for n in names if n.count("/") > depth})
    index = {c: i for i, c in enumerate(classes)}
    names.sort()
    labels = [index[n.split("/")[depth]] if n.count("/") > depth else -1 for n in names]
    # Without split folders every split is the same images: one name, so that evaluation
    # refuses them as train and test (as a folder without split sub-folders is).
    name = f"zip:{path}:{split}" if tops else f"zip:{path}"
    reader = _ZipReader(path)
    location = os.path.realpath(path) + (f":{split}" if tops else "")
    return ImageSource(name, names, labels, classes, reader, read_reduced=reader, location=location)


def torchvision_source(kind: str, root: str, split: str, download: bool) -> ImageSource:
    from torchvision import datasets

    ctor = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
            "fashion_mnist": datasets.FashionMNIST}
    try:
        if kind == "stl10":
            splits = ("train", "test", "unlabeled", "train+unlabeled")
            if split not in splits:
                raise ConfigError(f"split '{split}' is not an STL-10 split; use one of {splits}")
            ds = datasets.STL10(root, split=split, download=download)
        else:
            if split not in ("train", "test"):
                raise ConfigError(f"split '{split}' is not valid for {kind}; use train or test")
            ds = ctor[kind](root, train=split == "train", download=download)
    except RuntimeError as e:
        raise ConfigError(f"{kind} not found under data.root={root!r} ({e}); "
                          "add data.download=true to download it") from None
    labels = [int(x) for x in (ds.targets if hasattr(ds, "targets") else ds.labels)]
    classes = list(getattr(ds, "classes", [])) or [str(c) for c in sorted(set(labels))]

    return ImageSource(f"{kind}:{split}", [str(i) for i in range(len(ds))], labels, classes,
                       _DatasetReader(ds))


class _DatasetReader:
    """Items of an in-memory dataset (torchvision's), by index key; picklable like _FileReader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, key: str) -> Image.Image:
        return to_rgb(self.dataset[int(key)][0])


SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars", "checker", "diamond")


def synthetic_image(index: int, size: int, num_classes: int, seed: int = 0) -> tuple[Image.Image, int]:
    """A deterministic image: a coloured shape (the class) at a random place on noise."""
    rng = random.Random(seed * 1_000_003 + index)
    label = index % num_classes
    noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 80, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    color = tuple(rng.randrange(120, 256) for _ in range(3))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = SHAPES[label % len(SHAPES)]
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=color)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(1, int(r / 3)))
    elif shape == "bars":
        for k in range(3):
            x = cx - r + k * r * 0.8
            draw.rectangle((x, cy - r, x + r / 3, cy + r), fill=color)
    elif shape == "checker":
        h = r / 2
        for a in range(4):
            for b in range(4):
                if (a + b) % 2 == 0:
                    draw.rectangle((cx - r + a * h, cy - r + b * h, cx - r + (a + 1) * h, cy - r + (b + 1) * h), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    return img, label


def synthetic_source(num_images: int, size: int, num_classes: int, seed: int = 0) -> ImageSource:
    return ImageSource(f"synthetic:{seed}", [str(i) for i in range(num_images)],
                       [i % num_classes for i in range(num_images)],
                       list(SHAPES[:num_classes]), _SyntheticReader(size, num_classes, seed))


class _SyntheticReader:
    """:func:`synthetic_image` by index key; picklable like _FileReader."""

    def __init__(self, size: int, num_classes: int, seed: int):
        self.size, self.num_classes, self.seed = size, num_classes, seed

    def __call__(self, key: str) -> Image.Image:
        return synthetic_image(int(key), self.size, self.num_classes, self.seed)[0]


def balanced_subset(source: ImageSource, fraction: float = 1.0, num_images: Optional[int] = None,
                    seed: int = 0) -> list[str]:
    """Keys of a class-balanced, seeded subset (classes keep their proportions)."""
    n = len(source)
    target = num_images if num_images is not None else max(1, round(fraction * n))
    if target >= n:
        return list(source.keys)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(source.labels):
        by_class.setdefault(label, []).append(i)
    quotas = {c: len(ix) * target // n for c, ix in by_class.items()}
    # Hand out the remainder to the classes with the largest fractional share.
    leftover = target - sum(quotas.values())
    order = sorted(by_class, key=lambda c: -(len(by_class[c]) * target % n))
    for c in order[:leftover]:
        quotas[c] += 1
    chosen = []
    for c, ix in sorted(by_class.items()):
        ix = list(ix)
        rng.shuffle(ix)
        chosen += ix[:quotas[c]]
    return [source.keys[i] for i in sorted(chosen)]

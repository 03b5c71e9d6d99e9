"""Image sources: where images come from, as a list of (key, label) items plus a reader.

Every source resolves to ``ImageSource(keys, labels, classes, read)``; ``read(key)`` returns an
RGB PIL image. Keys are stable strings (relative paths, zip members, dataset indices) so the
chosen subset can be written to the run folder and reused by evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from glsd.config import ConfigError, DataConfig
from glsd.data.image_file import (bomb_reason, decode_image, pixel_limit, read_deadline,  # noqa: F401
                                   read_image_file, to_rgb)  # to_rgb: re-exported from its old home
from glsd.data.layout import (FOLDER_RULE, TORCHVISION_SOURCES, all_names, detect_kind,
                               escapes, hidden, is_image, is_split_name, list_folder, no_images_error,
                               undecodable_photos, walk_images, wrapper_folder)
from glsd.errors import DataError, MissingSplit



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
    max_image_pixels: Optional[int] = None  # data.max_image_pixels (None: PIL's limit)
    # (key, min_size) -> the image, a JPEG decoded at reduced scale (image_file.decode_image);
    # None where reading is not decoding a file (torchvision datasets, synthetic images).
    read_reduced: Optional[Callable[[str, int], Image.Image]] = field(default=None, repr=False,
                                                                      compare=False)
    # The images' resolved place (real path, and split where the path holds several): two
    # sources with the same one are the same images however their paths were written.
    location: str = ""
    # The split the images are: None where the data has no split folders, so that every
    # data.split reads these same images (a caller that asked for one can say so).
    split: Optional[str] = None
    # Photos beside the images that cannot be decoded (HEIC, raw), by extension: left out, said.
    undecodable: Counter = field(default_factory=Counter, repr=False, compare=False)

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
            with read_deadline(self.read_timeout_s), pixel_limit(self.max_image_pixels):
                if min_size and self.read_reduced is not None:
                    return self.read_reduced(key, min_size)
                return self.read(key)
        except Exception as e:  # noqa: BLE001 - any decoder error means the same: a bad file
            why = ("out of memory" if isinstance(e, MemoryError) else bomb_reason(e)
                   if isinstance(e, Image.DecompressionBombError) else (str(e) or type(e).__name__))
            if on_error == "fail":
                raise DataError(f"cannot read image {key!r} from {self.name}: {why}. "
                                "Fix or remove it, or set data.on_error=skip") from None
            return Unreadable(key, why.splitlines()[0])

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
        # every other setting (the read limits, the place) is the whole source's
        return dataclasses.replace(self, keys=list(keys), labels=[self.labels[index[k]] for k in keys])


def open_source(cfg: DataConfig, split: Optional[str] = None) -> ImageSource:
    """Build the source named by the config; every misuse is a clear error, raised here."""
    source = _open_source(cfg, cfg.split if split is None else split)
    source.read_timeout_s = cfg.read_timeout_s
    source.max_image_pixels = cfg.max_image_pixels
    return source


def _open_source(cfg: DataConfig, split: str) -> ImageSource:
    kind = cfg.source
    if kind == "auto":
        kind = _detect_kind(cfg.root)
    if kind == "sample":
        from glsd.data.sample import sample_root

        return imagefolder_source(sample_root(), split)
    if kind == "synthetic":
        from glsd.data import synthetic

        source = synthetic.synthetic_source(cfg.synthetic_num_images, cfg.synthetic_image_size,
                                            cfg.synthetic_num_classes, seed=0 if split == "train" else 1)
        source.split = split
        return source
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


def _detect_kind(root: str) -> str:
    return detect_kind(root)[0]


def imagefolder_source(root: Path, split: str) -> ImageSource:
    """``root/<class>/*`` or ``root/<split>/<class>/*`` (ImageNet layout)."""
    base = root / split if (root / split).is_dir() else root
    if base == root:  # a split layout without the asked split must not pass as classes
        splits = sorted(d.name for d in list_folder(root) if d.is_dir() and is_split_name(d.name)
                        and any(p.is_dir() for p in list_folder(d)))
        if splits:
            raise MissingSplit(split, str(root), splits)
    classes = sorted(d.name for d in list_folder(base) if d.is_dir() and not hidden(d.name))
    if not classes:
        # Point at the split's own folder: data.source=folder on the root would read every
        # split, the test images included.
        unlabelled = f"data.source=folder data.root={base} (rule of data.source=auto: {FOLDER_RULE})"
        if base != root:  # e.g. ImageNet's val/ as distributed: 50,000 images in one folder
            raise ConfigError(f"split {split!r} ({base}) has no class sub-folders, so its images "
                              f"have no labels: for k-NN / linear evaluation sort them into "
                              f"{base}/<class>/ with the training split's class names (ImageNet's "
                              f"val/: from LOC_val_solution.csv or the devkit's ground truth); to "
                              f"read them as unlabelled images use {unlabelled}")
        raise ConfigError(f"{base} has no class sub-folders; for unlabelled images there use {unlabelled}")
    keys, labels, undecodable = [], [], Counter()
    class_folders = [os.path.realpath(base / c) for c in classes]  # a link into another is skipped
    same = sorted({c for c, r in zip(classes, class_folders) if class_folders.count(r) > 1})
    if same:  # kitty -> cat: the same images under two labels
        raise ConfigError(f"class folders {', '.join(same)} of {base} are one folder (linked): their "
                          "images would be listed under each label. Remove the link, or merge the classes")
    for label, cls in enumerate(classes):
        found, left_out = walk_images(base / cls, elsewhere=class_folders)
        undecodable += left_out
        keys += [str(Path(cls, k)) for k in found]
        labels += [label] * len(found)
    if not keys:
        raise no_images_error(str(base), all_names(base))
    reader = _FileReader(base)
    return ImageSource(f"imagefolder:{base}", keys, labels, classes, reader, read_reduced=reader,
                       location=os.path.realpath(base), split=split if base != root else None,
                       undecodable=undecodable)


def flat_folder_source(root: Path) -> ImageSource:
    """Every image under ``root`` (recursively), unlabeled."""
    if root.is_file():
        raise ConfigError(f"data.root={root} is a file; give a folder of images or a .zip")
    keys, undecodable = walk_images(root)
    if not keys:
        raise no_images_error(str(root), all_names(root))
    reader = _FileReader(root)
    return ImageSource(f"folder:{root}", keys, [-1] * len(keys), [], reader, read_reduced=reader,
                       location=os.path.realpath(root), undecodable=undecodable)


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
    """A zip holding ``<split>/<class>/*`` (or ``<class>/*``), read in place; images not in a
    class folder (``<split>/*``, or at the top) are unlabelled."""
    try:
        with zipfile.ZipFile(path) as zf:
            every = zf.namelist()
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{path} is not a readable zip file ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror or e}") from None
    unsafe = [n for n in every if is_image(n) and escapes(n)]
    if unsafe:
        raise ConfigError(f"zip {path} has members with '..' or absolute paths (e.g. {unsafe[0]!r}); "
                          "they would escape its class folders. Rebuild the zip with relative names")
    members = [n for n in every if not any(hidden(part) for part in n.split("/"))]
    names = list(dict.fromkeys(n for n in members if is_image(n)))
    repeated = sum(map(is_image, members)) - len(names)
    if repeated:  # a zip appended to: each name reads its last member, and counts once
        logging.getLogger("glsd").warning("zip %s holds %d image names twice or more; each is read "
                                          "from its last copy", path, repeated)
    if not names:
        raise no_images_error(f"zip {path}", members)
    # A zip of a folder (Finder, Explorer: mydata/<class>/*) holds the layout one level down.
    wrapper = wrapper_folder(names)
    depth = 1 if wrapper else 0
    # Split folders by the folder rule: the asked split, or folders named like splits (not any
    # folder two levels deep: photos by year/month, or classes with sub-folders, are not splits).
    folders = sorted({n.split("/")[depth] for n in names if n.count("/") > depth})
    is_split = split in folders
    if is_split:
        names = [n for n in names if n.split("/")[depth] == split]
        depth += 1
    elif any(is_split_name(f) for f in folders):
        raise MissingSplit(split, str(path), [f for f in folders if is_split_name(f)])
    classes = sorted({n.split("/")[depth] for n in names if n.count("/") > depth})
    index = {c: i for i, c in enumerate(classes)}
    names.sort()
    labels = [index[n.split("/")[depth]] if n.count("/") > depth else -1 for n in names]
    # Without split folders every split is the same images: one name, so that evaluation
    # refuses them as train and test (as a folder without split sub-folders is).
    name = f"zip:{path}:{split}" if is_split else f"zip:{path}"
    reader = _ZipReader(path)
    location = os.path.realpath(path) + (f":{split}" if is_split else "")
    in_split = [m for m in members if not is_split or m.split("/")[depth - 1:depth] == [split]]
    return ImageSource(name, names, labels, classes, reader, read_reduced=reader, location=location,
                       split=split if is_split else None, undecodable=undecodable_photos(in_split))


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
                       _DatasetReader(ds), split=split)


class _DatasetReader:
    """Items of an in-memory dataset (torchvision's), by index key; picklable like _FileReader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, key: str) -> Image.Image:
        return to_rgb(self.dataset[int(key)][0])


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

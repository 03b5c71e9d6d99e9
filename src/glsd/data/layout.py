"""How a folder or a zip of images is read: which files are images, which folders are
classes or splits, and what is never part of a dataset (hidden files, the folders that
copying tools and NAS boxes add). Pure paths and names: no image is opened here.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from glsd.config import ConfigError

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

# The rule data.source=auto applies to a folder; stated in its messages and the start summary.
FOLDER_RULE = ("a folder whose non-hidden sub-folders hold the images (none at its top level), or "
               "that holds split folders (train/, test/, ...) of class folders, is an ImageFolder "
               "(one class per sub-folder); any other folder is unlabelled and read recursively; "
               "hidden folders (.name) are ignored; data.source=imagefolder|folder forces either")


def is_split_name(name: str) -> bool:
    """A folder named like a split (``train``, ``Testing``, ...), in any case."""
    return name.lower() in SPLIT_NAMES


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
    entries = list_folder(path)
    subdirs = [p.name for p in entries if p.is_dir() and not hidden(p.name)]
    top_images = sum(1 for p in entries if p.is_file() and is_image(p.name) and not hidden(p.name))
    if subdirs and not top_images:
        return "imagefolder", f"{len(subdirs)} sub-folders and no images at the top level"
    # A split layout with a stray image beside it (a preview, a README figure): read as one
    # unlabelled pile it would pretrain on the test split too.
    splits = [d for d in subdirs if is_split_name(d)
              and any(p.is_dir() and not hidden(p.name) for p in list_folder(path / d))]
    if splits:
        return "imagefolder", (f"split folders ({', '.join(sorted(splits))}) of class folders; the "
                               f"{top_images} images at the top level are not read")
    why = f"{top_images} images at the top level" if top_images else "no sub-folders"
    return "folder", why


def hidden(name: str) -> bool:
    """Hidden files and folders (.name, macOS's ._name resource forks) and the folders that
    copying tools and NAS boxes add: never images of the dataset."""
    return name.startswith(".") or name in JUNK_FOLDERS


def list_folder(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot list {path}: {e.strerror or e}; check its permissions") from None


def walk_images(base: Path, elsewhere: Sequence[str] = ()) -> tuple[list[str], Counter]:
    """Image paths under ``base`` relative to it, sorted, skipping hidden files and folders;
    and the photos left out because glsd cannot decode them (HEIC, raw), by extension.
    Linked sub-folders are followed (each real folder once, so a link loop ends), except a link
    to ``base`` itself or a folder above it: it would pull in the images beside ``base`` (a
    link to ``..`` or to the home folder), never what was meant; it is skipped, and named. So
    is a link into one of the folders ``elsewhere`` (real paths; the other classes: its images
    would be listed twice, under two labels)."""
    keys, seen, undecodable = [], set(), Counter()
    above = _base_and_its_parents(base)
    others = [p for p in elsewhere if p != os.path.realpath(base)]

    def refuse(error: OSError):
        raise ConfigError(f"cannot read the folder {error.filename}: {error.strerror or error}; "
                          "check its permissions") from None

    try:
        for dirpath, dirnames, files in os.walk(base, onerror=refuse, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not hidden(d) and not _links_out(dirpath, d, above, others))
            keys += [str(Path(dirpath, f).relative_to(base)) for f in files if is_image(f) and not hidden(f)]
            undecodable += undecodable_photos(f for f in files if not hidden(f))
    except RecursionError:  # os.walk recurses (Python < 3.12)
        raise ConfigError(f"{base} nests folders deeper than Python can walk (about "
                          f"{sys.getrecursionlimit()} levels); move the images into a shallower tree") from None
    return sorted(keys), undecodable


def _base_and_its_parents(base: Path) -> set[str]:
    real = Path(os.path.realpath(base))
    return {str(real), *map(str, real.parents)}


def _links_out(dirpath: str, name: str, above: set[str], others: Sequence[str]) -> bool:
    """A linked folder leading to the image folder, a folder above it, or into another class."""
    path = os.path.join(dirpath, name)
    target = os.path.realpath(path) if os.path.islink(path) else None
    if target is None:
        return False
    if target in above:
        where = "the image folder itself or a folder above it"
    elif any(target == o or target.startswith(o + os.sep) for o in others):
        where = "another class's folder (its images would be listed twice, under two labels)"
    else:
        return False
    logging.getLogger("glsd").warning("skipping the linked folder %s: it leads to %s, %s", path, target, where)
    return True


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def no_images_error(where: str, names) -> ConfigError:
    """No readable image under ``where``: say which formats were looked for, and name the photo
    formats that were there but need converting (an iPhone's HEIC, raw files)."""
    found = sorted(undecodable_photos(names))
    hint = (f"; it holds {', '.join(found)} files, which glsd cannot decode: convert them to JPEG "
            "or PNG" if found else "")
    return ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {where}{hint}")


def undecodable_photos(names) -> Counter:
    """How many of ``names`` are photos of a format glsd cannot decode, by extension."""
    return Counter(ext for ext in (os.path.splitext(n)[1].lower() for n in names)
                   if ext in UNREADABLE_EXTENSIONS)


def left_out_note(where: str, undecodable: Counter) -> Optional[str]:
    """The sentence a run or an embedding says when photos among the images are left out."""
    if not undecodable:
        return None
    kinds = ", ".join(f"{n:,} {ext}" for ext, n in sorted(undecodable.items()))
    total = sum(undecodable.values())
    return (f"{where} holds {total:,} photo{'s' if total > 1 else ''} glsd cannot decode ({kinds}), "
            "left out: convert them to JPEG or PNG to use them")


def all_names(base: Path) -> list[str]:
    """Every non-hidden file name under ``base`` (for the error above; only when nothing was found)."""
    return [f for _, dirnames, files in os.walk(base) for f in files if not hidden(f)]


def escapes(member: str) -> bool:
    """An absolute or drive path, or one with a '..' part (checked before anything is skipped)."""
    return (member.startswith(("/", "\\")) or ".." in member.replace("\\", "/").split("/")
            or (len(member) > 1 and member[1] == ":"))


def wrapper_folder(names: list[str]) -> Optional[str]:
    """The one folder every member sits in, when it is neither a split nor a class folder
    (its members are in sub-folders of it), else None."""
    tops = {n.split("/")[0] for n in names}
    if len(tops) != 1 or not all(n.count("/") >= 2 for n in names):
        return None
    top = tops.pop()
    return None if is_split_name(top) else top

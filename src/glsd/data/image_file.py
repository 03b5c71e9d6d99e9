"""One image file, read safely: regular files only, a read deadline, EXIF orientation, and
every mode (16-bit, palette, RGBA, ...) converted to 8-bit RGB."""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from glsd.errors import DataError


class ReadTimedOut(Exception):
    pass


@contextlib.contextmanager
def pixel_limit(max_pixels: Optional[int]):
    """PIL's decompression-bomb limit for the block (``data.max_image_pixels``; None: PIL's),
    given back after: the limit is global to the process, a library must not leave it changed."""
    if max_pixels is None:
        yield
        return
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels // 2  # PIL refuses at 2x
    try:
        with warnings.catch_warnings():  # under a limit the user set, PIL's warning at half of it is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def bomb_reason(e: Exception) -> str:
    """An image over the pixel limit, said with the key that raises it."""
    return (f"{str(e).split(',')[0]}: more pixels than the decompression-bomb guard allows; if "
            "the file is trusted, raise data.max_image_pixels")


@contextlib.contextmanager
def read_deadline(seconds: float):
    """Interrupt the block with ReadTimedOut after ``seconds`` (SIGALRM: main thread of a
    process, e.g. each DataLoader worker, on POSIX); elsewhere, or for 0, no limit."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise ReadTimedOut(f"the read took over data.read_timeout_s={seconds:g} s (a hung file "
                           "system or a special file?)")

    previous = signal.signal(signal.SIGALRM, expired)
    start = time.monotonic()
    earlier, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if earlier:  # the program's own timer (a watchdog): given back what it had left
            signal.setitimer(signal.ITIMER_REAL, max(earlier - (time.monotonic() - start), 1e-3), interval)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA -> RGB; alpha is dropped, transparent pixels keep the colour
    they store (as torchvision's and timm's loaders do). 16-bit grayscale is scaled to 8 bits
    (PIL's own conversion would clip it at 255); a 32-bit "I" image only when its values go
    past 255, since PIL also opens 8-bit data as "I"."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.getextrema()[1] > 255):
        # In integers ((v + 128) // 257 is round(v / 257) for integer v): a float64 copy of
        # a 9000 x 9000 scan took 2.8 GB
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        arr += 128
        arr //= 257
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_regular(path: Path):
    """A binary file object for ``path``, refusing anything but a regular file: a FIFO, device
    or socket named like an image would block a reader forever. O_NONBLOCK makes opening a
    FIFO return at once, and fstat of the opened descriptor leaves no race. (Windows has
    neither FIFOs nor O_NONBLOCK, and needs O_BINARY: its os.open is text mode otherwise.)"""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder"
                    if stat.S_ISDIR(mode) else "not a regular file")
            raise DataError(f"{path} is {kind}, not an image file")
        if hasattr(os, "O_NONBLOCK"):  # on Windows set_blocking takes pipes only
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored); a broken EXIF block reads as 1."""
    try:
        return img.getexif().get(0x0112, 1) or 1
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        return 1


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a rotation tag)."""
    return ImageOps.exif_transpose(img) if orientation(img) != 1 else img


ORIGINAL_SIZE = "glsd_original_size"  # img.info key: (w, h) before a reduced decode


def decode_image(f, min_size: int = 0) -> Image.Image:
    """An RGB image, upright. With ``min_size`` a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4 or 1/8) that keeps both sides at least ``min_size``: a 12-megapixel photo cut to
    a 256 px square decodes several times faster. Its full size, upright, is then in
    ``img.info[ORIGINAL_SIZE]``, so that crop geometry stays in original-image pixels."""
    with Image.open(f) as img:
        full, turn = img.size, orientation(img)
        drafted = None
        if min_size and isinstance(img, JpegImageFile):  # MPO (multi-picture phone JPEGs) too
            drafted = img.draft(None, (min_size, min_size))
        img.load()
        reduced = img.size
        out = img
        if drafted is not None and tuple(drafted[1][2:]) != img.size:
            # A side that the scale does not divide decodes to ceil(side / scale) pixels, of
            # which side / scale are picture: resample the picture alone onto the whole frame,
            # so that the frame spans the original image exactly (crop geometry stays exact).
            box = drafted[1]
            out = img.resize((max(1, round(box[2])), max(1, round(box[3]))), Image.Resampling.BICUBIC, box=box)
        out = to_rgb(upright(out))
    if reduced != full:
        out.info[ORIGINAL_SIZE] = full[::-1] if turn in TRANSPOSING else full
    return out


def read_image_file(path: Path, min_size: int = 0) -> Image.Image:
    with open_regular(path) as f:
        try:
            return decode_image(f, min_size)
        except UnidentifiedImageError:  # PIL would name the descriptor, not the file
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None

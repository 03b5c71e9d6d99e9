"""Timing helpers and the environment record shared by every bench section."""
from __future__ import annotations

import glob
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from glsd.utils.io import atomic_write_text


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds per call, ``reps`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def ratio(a: float, b: float) -> float:
    return float(a / b) if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def allocator_info() -> dict:
    """Which malloc this process uses: LD_PRELOAD and the libraries mapped into it."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    tcmalloc = "tcmalloc" in maps or "tcmalloc" in preload
    jemalloc = "jemalloc" in maps or "jemalloc" in preload
    return {
        "ld_preload": preload,
        "tcmalloc_loaded": tcmalloc,
        "jemalloc_loaded": jemalloc,
        "allocator": "tcmalloc" if tcmalloc else "jemalloc" if jemalloc else "glibc malloc",
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        # Installed (whether preloaded or not); the bench installs nothing.
        "tcmalloc_available": _library_files("libtcmalloc"),
        "jemalloc_available": _library_files("libjemalloc"),
    }


def _library_files(stem: str) -> list[str]:
    found: list[str] = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib"):
        found += glob.glob(f"{d}/{stem}*.so*") + glob.glob(f"{d}/*/{stem}*.so*")
    return sorted(set(found))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # Windows has no getloadavg
        return []


def environment(device: torch.device) -> dict:
    import timm
    import torchvision

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__,
        "device": str(device), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_avg": load_avg(),
        "allocator": allocator_info(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu_model"]
    return env




def finite(obj):
    """NaN / inf -> None so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(result: dict, path: Optional[str]) -> str:
    text = json.dumps(result, indent=2, allow_nan=False)
    if path:
        atomic_write_text(Path(path), text + "\n")
    return text

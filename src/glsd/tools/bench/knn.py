"""k-NN section: throughput and peak memory of :func:`glsd.eval.knn.knn_classify`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from glsd.tools.bench.common import median, ratio, time_calls


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _max_rss_kib() -> Optional[float]:
    """Peak resident memory of this process in KiB (bytes on macOS), None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_knn(device: torch.device, quick: bool) -> dict:
    from glsd.eval.knn import SIM_BUDGET, auto_chunk, knn_classify

    n_train, n_test, dim, classes = (4000, 1000, 128, 10) if quick else (50000, 10000, 128, 10)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, dim, generator=g).to(device)
    test = torch.randn(n_test, dim, generator=g).to(device)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    run = lambda: knn_classify(train, y_train, test, y_test, classes)  # noqa: E731
    run_small = lambda: knn_classify(train[:1000], y_train[:1000], test[:100], y_test[:100], classes)  # noqa: E731
    run_small()  # warm-up (allocator, kernels) on a small slice: the timed run is the real size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    maxrss0 = _max_rss_kib()
    times = time_calls(run, reps=1 if quick else 2, warmup=0, device=device)
    hwm = _rss_kib("VmHWM")
    maxrss1 = _max_rss_kib()
    if reset and hwm is not None and rss0 is not None:
        # The reset sets VmHWM to the RSS of that instant, which can sit a page or two below the
        # VmRSS read just after it: a run that reuses freed memory then reads slightly negative.
        peak_mib, method = max(hwm - rss0, 0) / 1024, "VmHWM after clear_refs reset - VmRSS before"
    elif maxrss0 is not None:
        peak_mib, method = (maxrss1 - maxrss0) / 1024, "ru_maxrss delta (0 if an earlier peak was higher)"
    else:
        peak_mib, method = None, "not measured (no /proc, no resource module)"
    secs = median(times)
    chunk = auto_chunk(n_train, n_test)
    out = {"n_train": n_train, "n_test": n_test, "dim": dim, "num_classes": classes,
           "ks": [10, 20, 100, 200], "seconds": secs, "test_features_per_s": ratio(n_test, secs),
           "similarities_per_s": ratio(n_train * n_test, secs),
           "peak_rss_delta_mib": peak_mib, "peak_method": method,
           "chunk_rows": chunk, "chunk_similarity_mib": chunk * n_train * 4 / 2 ** 20,
           "sim_budget_mib": SIM_BUDGET * 4 / 2 ** 20}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out

"""data.download under torchrun: one rank downloads at a time (rank 0, then the first rank of
each other node, then the rest), and a rank whose download fails does not leave the others
waiting at a barrier."""
import threading
import time

import pytest

import glsd.data.download as download_mod
from glsd.config import load_config
from glsd.utils.distributed import DistInfo

# 4 ranks on 2 nodes of 2: (rank, local rank)
RANKS = [(0, 0), (1, 1), (2, 0), (3, 1)]


def _run_ranks(monkeypatch, open_fn, download=True):
    barrier = threading.Barrier(len(RANKS), timeout=10)
    monkeypatch.setattr(download_mod, "barrier", barrier.wait)
    cfg = load_config(None, ["data.source=cifar10", f"data.download={str(download).lower()}"]).data
    results = {}

    def rank(r, local):
        try:
            results[r] = download_mod.open_source_downloading_once(
                cfg, DistInfo(r, local, len(RANKS)), open_fn=lambda c: open_fn(r))
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[r] = e

    threads = [threading.Thread(target=rank, args=ranks) for ranks in RANKS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
    return results


def test_ranks_open_in_stages_never_two_at_once(monkeypatch):
    spans, lock = {}, threading.Lock()

    def slow_open(r):
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans[r] = (start, time.monotonic())
        return f"source of rank {r}"

    results = _run_ranks(monkeypatch, slow_open)
    assert results == {r: f"source of rank {r}" for r, _ in RANKS}
    order = sorted(spans, key=lambda r: spans[r][0])
    assert order[0] == 0 and order[1] == 2  # rank 0, then node 1's first rank
    assert spans[0][1] <= spans[2][0] <= spans[2][1] <= min(spans[1][0], spans[3][0])


def test_a_failed_download_on_rank_0_does_not_hang_the_others(monkeypatch):
    def failing_open(r):
        raise RuntimeError(f"no network on rank {r}")

    results = _run_ranks(monkeypatch, failing_open)
    assert {r: str(results[r]) for r, _ in RANKS} == {r: f"no network on rank {r}" for r, _ in RANKS}


def test_without_download_every_rank_opens_at_once(monkeypatch):
    monkeypatch.setattr(download_mod, "barrier", lambda: pytest.fail("no barrier without download"))
    cfg = load_config(None, ["data.source=synthetic"]).data
    assert download_mod.open_source_downloading_once(cfg, DistInfo(1, 1, 4), open_fn=lambda c: "s") == "s"

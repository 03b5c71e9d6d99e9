"""Opening a data source under torchrun when it may download: one download per file, never
two processes writing it at once."""
from __future__ import annotations

from glsd.data.sources import open_source
from glsd.utils.distributed import DistInfo, barrier


def open_source_downloading_once(data_cfg, dinfo: DistInfo, open_fn=open_source):
    """open_source on every rank; with data.download under torchrun, rank 0 first, then the
    first rank of each node (no shared disk), then the rest: never two downloads of one file
    at once. A rank whose open fails still passes every barrier before it raises, so no rank
    waits forever: the others then fail on their own open."""
    if not (dinfo.enabled and data_cfg.download):
        return open_fn(data_cfg)
    stage = 0 if dinfo.rank == 0 else 1 if dinfo.local_rank == 0 else 2
    source, error = None, None
    for turn in range(3):
        if turn == stage:
            try:
                source = open_fn(data_cfg)
            except Exception as e:  # noqa: BLE001 - raised after the last barrier
                error = e
        barrier()
    if error is not None:
        raise error
    return source

"""Which images a run pretrains on: the class-balanced seeded subset, recorded in the run
folder's ``subset.json`` so that reruns and evaluation read exactly the same images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from glsd.config import Config, ConfigError
from glsd.data.sources import ImageSource, balanced_subset, open_source
from glsd.utils.io import atomic_write

SUBSET_FILE = "subset.json"


def select_images(cfg: Config, run_dir: Optional[Path],
                  source: Optional[ImageSource] = None) -> ImageSource:
    """The pretraining subset of ``source`` (default: the one ``cfg.data`` names). A recorded
    subset in the run folder wins, so reruns and evaluation use exactly the same images."""
    source = open_source(cfg.data) if source is None else source
    record = run_dir / SUBSET_FILE if run_dir is not None else None
    recorded = read_subset(record) if record is not None else None
    if recorded is not None:
        keys = recorded["keys"]
    else:
        keys = balanced_subset(source, cfg.data.fraction, cfg.data.num_images, cfg.data.subset_seed)
    return source.subset(keys)


def read_subset(path: Path) -> Optional[dict]:
    """A run's ``subset.json`` as a dict, None if absent; a malformed file is an error (its
    images could not be known, and guessing would pretrain or evaluate on others)."""
    if not path.is_file():
        return None
    fix = ("delete it: pretraining then draws its subset afresh (data.fraction, "
           "data.subset_seed) and evaluation uses the whole train split")
    try:
        subset = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # bad JSON, bad UTF-8, unreadable
        raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(subset, dict) or not isinstance(subset.get("keys"), list):
        raise ConfigError(f"{path} has no 'keys' list; {fix}")
    return subset


def write_subset(path: Path, subset: ImageSource, split: str) -> None:
    payload = {"source": subset.name, "split": split, "n_images": len(subset),
               "classes": subset.classes, "keys": subset.keys, "labels": subset.labels}
    data = json.dumps(payload).encode()
    # Atomic: other ranks (and reruns) may read it while it is written.
    atomic_write(Path(path), lambda f: f.write(data))

"""What a run changes process-wide, given back to the caller: ``glsd.pretrain`` is a library
call. A run seeds the random generators (``train.seed``), may turn on deterministic
algorithms, sets the "glsd" logger's level for train.log and the current GPU. Runs may
overlap in threads of one process: the first to start saves that state, the last to end
restores it, so a run ending never resets another one's mid-run.
"""
from __future__ import annotations

import contextlib
import random
import threading

import torch

from glsd.train.run_folder import LOG


_RUNS = {"active": 0, "saved": None}  # runs may overlap in threads: the first saves, the last restores
_RUNS_LOCK = threading.Lock()


@contextlib.contextmanager
def caller_state_kept():
    with _RUNS_LOCK:
        if _RUNS["active"] == 0:
            _RUNS["saved"] = _process_state()
        _RUNS["active"] += 1
    try:
        yield
    finally:
        with _RUNS_LOCK:
            _RUNS["active"] -= 1
            if _RUNS["active"] == 0:
                _restore_process_state(_RUNS.pop("saved"))


def _process_state() -> dict:
    cuda = torch.cuda.is_initialized()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else None,
            "cuda_device": torch.cuda.current_device() if cuda else None,
            "deterministic": (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()),
            "log_level": LOG.level}


def _restore_process_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
        torch.cuda.set_device(state["cuda_device"])
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    LOG.setLevel(state["log_level"])

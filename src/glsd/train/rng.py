"""Random state of a process: seeding, and the per-rank RNG states a checkpoint keeps so that
a resume gives each rank its own drop-path and augmentation streams back."""
from __future__ import annotations

import random

import torch

from glsd.data.view_params import sample_seed
from glsd.train.run_folder import LOG


def rank_state(ckpt: dict, rank: int, world_size: int) -> tuple[dict, int]:
    """(RNG state, skipped images) of this rank from a checkpoint. Under the world size that
    wrote it, each rank gets its own; under another one there is no own state to take: every
    rank takes rank 0's RNG and rank 0 the whole skip count."""
    per_rank = ckpt.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank], ckpt["skipped_per_rank"][rank]
    if world_size > 1:
        LOG.warning("checkpoint written by %s processes, resumed by %d: every rank restarts from "
                    "rank 0's random state", len(per_rank) if per_rank else "an unknown number of",
                    world_size)
    total = sum(ckpt.get("skipped_per_rank") or [ckpt.get("skipped_images", 0)])
    return ckpt["rng"], total if rank == 0 else 0


def restore_rank_rng(ckpt: dict, rank: int, world_size: int) -> int:
    """Set this rank's random state from a checkpoint; return its skipped-image count. Under
    another world size rank 0 takes rank 0's state and every other rank a stream of its own,
    seeded by (train seed, rank, step): one shared state would give every rank the same
    drop-path masks."""
    state, skipped = rank_state(ckpt, rank, world_size)
    set_rng_state(state)
    per_rank = ckpt.get("rng_per_rank")
    if rank and not (per_rank is not None and len(per_rank) == world_size):
        seed_everything(sample_seed("rank", ckpt["config"]["train"]["seed"], rank, ckpt["step"]),
                        deterministic=False)
    return skipped


def rng_state() -> dict:
    """This process's random state. Of the GPUs only its own device's: a rank sees every GPU
    of its node, and a list of all of them could not be restored on a node with fewer."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0]}
    # Initialised, not just available: a device=cpu rank on a GPU node would otherwise open a
    # CUDA context (all on GPU 0) only to save a stream it never used.
    if torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if not torch.cuda.is_initialized():
        return  # a GPU checkpoint resumed on a CPU (the networks are on their device by now)
    device = torch.cuda.current_device()
    own = state.get("cuda_device")
    if own is None and state.get("cuda"):  # checkpoints before 2026-12: every visible GPU's
        every = state["cuda"]
        own = every[device] if device < len(every) else every[0]
    if own is not None:
        torch.cuda.set_rng_state(own, device)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

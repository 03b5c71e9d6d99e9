"""DINO's weighted k-nearest-neighbour classifier on frozen features.

Features are L2-normalised; each test image takes the k training images of highest cosine
similarity, and each neighbour votes for its class with weight ``exp(sim / T)``. The top
``max(k)`` neighbours are found once per test chunk and every k reads a prefix of them, so
all k cost one similarity pass. Test rows are processed in chunks so memory stays bounded
by ``chunk_size * n_train`` similarities (not ``n_test * n_train``). Under a process group the
bank may stay sharded: each rank finds its shard's nearest neighbours and only those are
gathered (``max(k)`` per test image and rank), never the bank itself.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from glsd.config import ConfigError
from glsd.utils.distributed import all_gather_cat, max_over_ranks, rank_world, sum_over_ranks

# Similarities held at once (float32): 2**26 of them is 256 MiB, whatever n_train is.
SIM_BUDGET = 2 ** 26


def auto_chunk(n_train: int, n_test: int) -> int:
    """Test rows per chunk so one chunk's ``(rows, n_train)`` similarity fits SIM_BUDGET."""
    return max(1, min(n_test, SIM_BUDGET // max(n_train, 1)))


def check_labels(labels: torch.Tensor, num_classes: int, what: str, over_ranks: bool = False) -> None:
    """Labels in ``[0, num_classes)``; ``over_ranks``: every rank's labels (each rank calls it,
    so that all raise together rather than one rank leaving the others waiting)."""
    lowest = int(labels.min()) if labels.numel() else 0
    highest = int(labels.max()) if labels.numel() else 0
    if over_ranks:
        lowest, highest = -int(max_over_ranks(-lowest)), int(max_over_ranks(highest))
    if lowest < 0:
        raise ConfigError(f"{what} has unlabeled images (label -1); k-NN and linear probes need "
                          "a labelled source (an image folder with class sub-folders, a dataset)")
    if highest >= num_classes:
        raise ValueError(f"{what} has label {highest} >= num_classes={num_classes}")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, chunk_size: Optional[int] = None,
                 sharded: bool = False) -> dict:
    """Weighted k-NN top-1 / top-5 accuracy (in %) for every k in one pass.

    Args:
        train_feats: ``(Nt, D)``; train_labels: ``(Nt,)`` in ``[0, num_classes)``.
        test_feats: ``(Nq, D)``; test_labels: ``(Nq,)``. Computed on train_feats' device.
        ks: neighbour counts; a k above Nt is clamped to Nt (reported as ``k_effective``).
        temperature: T in the vote weight ``exp(sim / T)``.
        chunk_size: test rows per chunk (None: :func:`auto_chunk`); results do not depend on it.
        sharded: train_feats / train_labels are this rank's shard of the bank (every rank of
            the process group calls it, with the same test set; a shard may be empty): the
            neighbours are merged over the ranks and every rank returns the result of the whole
            bank (up to the order of neighbours of exactly equal similarity).
    Returns:
        ``{"temperature", "num_classes", "n_train", "n_test", "per_k": {str(k): {"k",
        "k_effective", "top1", "top5"}}}``. Top-1 is the arg-max of the votes (ties: lowest
        class index). Top-5 counts the label if fewer than 5 classes got strictly more votes
        and the label got any vote at all: a class no neighbour voted for is never a hit,
        even when fewer than 5 classes were voted for.
    """
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    sharded = sharded and rank_world()[1] > 1
    if sharded:
        n_train = int(sum_over_ranks(n_train))
    if n_train == 0 or n_test == 0:
        raise ConfigError(f"k-NN needs training and test images (got {n_train} and {n_test})")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={tuple(ks)} must be positive neighbour counts")
    check_labels(train_labels, num_classes, "the k-NN training set", over_ranks=sharded)
    check_labels(test_labels, num_classes, "the k-NN test set")
    device = train_feats.device
    train = F.normalize(train_feats.float(), dim=1)
    train_y = train_labels.to(device).long()
    effective = [min(int(k), n_train) for k in ks]
    # Sharded, each chunk also gathers every rank's (chunk, max k) neighbours: bounded too.
    gathered = rank_world()[1] * max(effective) if sharded else 0
    chunk = chunk_size or auto_chunk(max(n_train, gathered), n_test)
    hits1 = torch.zeros(len(ks), dtype=torch.long, device=device)
    hits5 = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, n_test, chunk):
        query = F.normalize(test_feats[start:start + chunk].to(device).float(), dim=1)
        y = test_labels[start:start + chunk].to(device).long()
        h1, h5 = _chunk_hits(query, y, train, train_y, num_classes, effective, temperature, sharded)
        hits1 += h1
        hits5 += h5
    per_k = {str(k): {"k": int(k), "k_effective": e, "top1": 100.0 * int(a) / n_test,
                      "top5": 100.0 * int(b) / n_test}
             for k, e, a, b in zip(ks, effective, hits1.tolist(), hits5.tolist())}
    return {"temperature": float(temperature), "num_classes": int(num_classes),
            "n_train": n_train, "n_test": n_test, "per_k": per_k}


def _chunk_hits(query: torch.Tensor, y: torch.Tensor, train: torch.Tensor, train_y: torch.Tensor,
                num_classes: int, ks: list[int], temperature: float,
                sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 / top-5 hit counts ``(len(ks),)`` of one chunk of normalised queries ``(c, D)``."""
    top_sim, neighbour_y = _nearest(query, train, train_y, max(ks))  # (c, kmax), sorted
    if sharded:
        top_sim, neighbour_y = _merge_over_ranks(top_sim, neighbour_y, max(ks))
    # Subtracting each row's best similarity rescales that row's votes by one constant, so
    # predictions are unchanged, but exp cannot overflow for small T.
    weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (c, kmax); 0 for padding
    hits1, hits5 = [], []
    for k in ks:
        votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, neighbour_y[:, :k], weights[:, :k])  # (c, C)
        own = votes.gather(1, y[:, None])  # (c, 1)
        rank = (votes > own).sum(dim=1)  # classes strictly ahead of the label
        hits1.append((votes.argmax(dim=1) == y).sum())
        hits5.append(((rank < 5) & (own[:, 0] > 0)).sum())
    return torch.stack(hits1), torch.stack(hits5)


def _nearest(query: torch.Tensor, train: torch.Tensor, train_y: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar rows of ``train`` per query, sorted: similarities and labels
    ``(c, k)``. A bank of fewer than k rows is padded with similarity -inf (vote weight 0)."""
    found = min(k, train.shape[0])  # 0: an empty shard (fewer images than ranks, or all unreadable)
    top_sim, top_idx = (query @ train.T).topk(found, dim=1)
    labels = train_y[top_idx]
    if found < k:
        top_sim = torch.cat([top_sim, top_sim.new_full((query.shape[0], k - found), float("-inf"))], 1)
        labels = torch.cat([labels, labels.new_zeros(query.shape[0], k - found)], 1)
    return top_sim, labels


def _merge_over_ranks(top_sim: torch.Tensor, labels: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(c, k)`` nearest neighbours -> the k nearest of all, sorted."""
    world = rank_world()[1]
    sims = all_gather_cat(top_sim[None]).permute(1, 0, 2).reshape(top_sim.shape[0], world * k)
    ys = all_gather_cat(labels[None]).permute(1, 0, 2).reshape(labels.shape[0], world * k)
    best, pick = sims.topk(k, dim=1)
    return best, ys.gather(1, pick)

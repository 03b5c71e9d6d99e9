"""DINO's weighted k-nearest-neighbour classifier on frozen features.

Features are L2-normalised; each test image takes the k training images of highest cosine
similarity, and each neighbour votes for its class with weight ``exp(sim / T)``. The top
``max(k)`` neighbours are found once per test chunk and every k reads a prefix of them, so
all k cost one similarity pass. Test rows are processed in chunks so memory stays bounded
by ``chunk_size * n_train`` similarities (not ``n_test * n_train``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from glsd.config import ConfigError

# Similarities held at once (float32): 2**26 of them is 256 MiB, whatever n_train is.
SIM_BUDGET = 2 ** 26


def auto_chunk(n_train: int, n_test: int) -> int:
    """Test rows per chunk so one chunk's ``(rows, n_train)`` similarity fits SIM_BUDGET."""
    return max(1, min(n_test, SIM_BUDGET // max(n_train, 1)))


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and int(labels.min()) < 0:
        raise ConfigError(f"{what} has unlabeled images (label -1); k-NN and linear probes need "
                          "a labelled source (an image folder with class sub-folders, a dataset)")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"{what} has label {int(labels.max())} >= num_classes={num_classes}")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, chunk_size: Optional[int] = None) -> dict:
    """Weighted k-NN top-1 / top-5 accuracy (in %) for every k in one pass.

    Args:
        train_feats: ``(Nt, D)``; train_labels: ``(Nt,)`` in ``[0, num_classes)``.
        test_feats: ``(Nq, D)``; test_labels: ``(Nq,)``. Computed on train_feats' device.
        ks: neighbour counts; a k above Nt is clamped to Nt (reported as ``k_effective``).
        temperature: T in the vote weight ``exp(sim / T)``.
        chunk_size: test rows per chunk (None: :func:`auto_chunk`); results do not depend on it.
    Returns:
        ``{"temperature", "num_classes", "n_train", "n_test", "per_k": {str(k): {"k",
        "k_effective", "top1", "top5"}}}``. Top-1 is the arg-max of the votes (ties: lowest
        class index). Top-5 counts the label if fewer than 5 classes got strictly more votes
        and the label got any vote at all: a class no neighbour voted for is never a hit,
        even when fewer than 5 classes were voted for.
    """
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if n_train == 0 or n_test == 0:
        raise ConfigError(f"k-NN needs training and test images (got {n_train} and {n_test})")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={tuple(ks)} must be positive neighbour counts")
    check_labels(train_labels, num_classes, "the k-NN training set")
    check_labels(test_labels, num_classes, "the k-NN test set")
    device = train_feats.device
    train = F.normalize(train_feats.float(), dim=1)
    train_y = train_labels.to(device).long()
    effective = [min(int(k), n_train) for k in ks]
    chunk = chunk_size or auto_chunk(n_train, n_test)
    hits1 = torch.zeros(len(ks), dtype=torch.long, device=device)
    hits5 = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, n_test, chunk):
        query = F.normalize(test_feats[start:start + chunk].to(device).float(), dim=1)
        y = test_labels[start:start + chunk].to(device).long()
        h1, h5 = _chunk_hits(query, y, train, train_y, num_classes, effective, temperature)
        hits1 += h1
        hits5 += h5
    per_k = {str(k): {"k": int(k), "k_effective": e, "top1": 100.0 * int(a) / n_test,
                      "top5": 100.0 * int(b) / n_test}
             for k, e, a, b in zip(ks, effective, hits1.tolist(), hits5.tolist())}
    return {"temperature": float(temperature), "num_classes": int(num_classes),
            "n_train": n_train, "n_test": n_test, "per_k": per_k}


def _chunk_hits(query: torch.Tensor, y: torch.Tensor, train: torch.Tensor, train_y: torch.Tensor,
                num_classes: int, ks: list[int], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 / top-5 hit counts ``(len(ks),)`` of one chunk of normalised queries ``(c, D)``."""
    sim = query @ train.T  # (c, Nt)
    top_sim, top_idx = sim.topk(max(ks), dim=1)  # (c, kmax), sorted: every k is a prefix
    del sim
    # Subtracting each row's best similarity rescales that row's votes by one constant, so
    # predictions are unchanged, but exp cannot overflow for small T.
    weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (c, kmax)
    neighbour_y = train_y[top_idx]  # (c, kmax)
    hits1, hits5 = [], []
    for k in ks:
        votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, neighbour_y[:, :k], weights[:, :k])  # (c, C)
        own = votes.gather(1, y[:, None])  # (c, 1)
        rank = (votes > own).sum(dim=1)  # classes strictly ahead of the label
        hits1.append((votes.argmax(dim=1) == y).sum())
        hits5.append(((rank < 5) & (own[:, 0] > 0)).sum())
    return torch.stack(hits1), torch.stack(hits5)

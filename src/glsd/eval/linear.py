"""Linear probe on frozen, cached features.

Features are extracted once; the probe (one ``nn.Linear``) trains on the cached tensor, so an
epoch costs a few matrix products instead of a pass of the backbone over the images. The
features are standardised with the training set's mean and std so one learning rate suits
any backbone's feature scale.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from glsd.config import ConfigError
from glsd.eval.knn import check_labels

OPTIMIZERS = ("adamw", "sgd")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows of ``scores (N, C)`` whose label ``(N,)`` is among the k highest scores."""
    k = min(k, scores.shape[1])
    return int((scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 1e-3,
                 batch_size: Optional[int] = 256, optimizer: str = "adamw",
                 weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Train a linear classifier on ``(Nt, D)`` features; accuracy on ``(Nq, D)`` test features.

    Args:
        train_labels: ``(Nt,)``, test_labels: ``(Nq,)`` in ``[0, num_classes)``.
        epochs: passes over the training features; lr follows a cosine decay to 0.
        batch_size: minibatch size; None (or >= Nt) is full-batch.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        seed: seeds the probe's initialisation and the minibatch order.
    Returns:
        ``{"top1", "top5", "train_top1"}`` in %, ``final_loss`` (mean training loss of the
        last epoch) and the settings used. Runs on train_feats' device.
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ConfigError("the linear probe needs training and test images")
    check_labels(train_labels, num_classes, "the linear-probe training set")
    check_labels(test_labels, num_classes, "the linear-probe test set")
    scores, loss = fit_probe(train_feats, train_labels, num_classes, epochs, lr, batch_size,
                             optimizer, weight_decay, seed)
    y_train, y_test = train_labels.to(train_feats.device).long(), test_labels.to(train_feats.device).long()
    test_scores, train_scores = scores(test_feats), scores(train_feats)
    n_test, n_train = test_feats.shape[0], train_feats.shape[0]
    return {"top1": 100.0 * topk_hits(test_scores, y_test, 1) / n_test,
            "top5": 100.0 * topk_hits(test_scores, y_test, 5) / n_test,
            "train_top1": 100.0 * topk_hits(train_scores, y_train, 1) / n_train,
            "final_loss": loss, "epochs": epochs, "lr": lr,
            "batch_size": batch_size if batch_size and batch_size < n_train else n_train,
            "optimizer": optimizer, "weight_decay": weight_decay,
            "n_train": n_train, "n_test": n_test}


def fit_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
              epochs: int = 100, lr: float = 1e-3, batch_size: Optional[int] = 256,
              optimizer: str = "adamw", weight_decay: float = 0.0,
              seed: int = 0) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Train the probe on ``(Nt, D)`` features (standardised by their mean and std).

    Returns ``(scores, final_loss)``: ``scores`` maps ``(N, D)`` features to ``(N, C)``
    logits (same standardisation, no grad), on train_feats' device.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"linear probe optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    device = train_feats.device
    mean = train_feats.float().mean(dim=0)
    std = train_feats.float().std(dim=0, unbiased=False).clamp_min(1e-6)  # constant dims stay 0
    x_train = (train_feats.float() - mean) / std  # (Nt, D)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x_train.shape[1], num_classes).to(device)
    loss = _train(probe, x_train, train_labels.to(device).long(), epochs, lr, batch_size,
                  optimizer, weight_decay, seed)

    @torch.no_grad()
    def scores(feats: torch.Tensor) -> torch.Tensor:
        return probe((feats.to(device).float() - mean) / std)

    return scores, loss


def _train(probe: nn.Linear, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           batch_size: Optional[int], optimizer: str, weight_decay: float, seed: int) -> float:
    """Minibatch training of ``probe`` on ``x (N, D)``, ``y (N,)``; last epoch's mean loss."""
    n = x.shape[0]
    batch = n if not batch_size or batch_size >= n else batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = max(1, epochs * steps_per_epoch)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    epoch_loss = float("nan")
    with torch.enable_grad():  # callers may sit in no_grad (e.g. an eval loop)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            total_loss = torch.zeros((), device=x.device)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                loss = F.cross_entropy(probe(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.detach() * idx.numel()
            epoch_loss = float(total_loss) / n  # one sync per epoch, not per step
    return epoch_loss

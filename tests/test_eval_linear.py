"""Linear probe on cached features (glsd.eval.linear)."""
import pytest
import torch

from glsd.config import ConfigError
from glsd.eval.linear import linear_probe, topk_hits


def _separable(n, dim=20, num_classes=5, seed=0):
    """Clusters around fixed, well separated centres, with an unhelpful offset and scale."""
    centres = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g)
    # Large offset and scale: standardisation must undo them.
    return 50.0 + 30.0 * x, y


@pytest.mark.parametrize("batch_size, optimizer, lr", [(64, "adamw", 1e-2), (None, "adamw", 5e-2),
                                                       (64, "sgd", 0.1)])
def test_reaches_near_perfect_accuracy_on_separable_features(batch_size, optimizer, lr):
    train_x, train_y = _separable(600)
    test_x, test_y = _separable(200, seed=1)
    res = linear_probe(train_x, train_y, test_x, test_y, 5, epochs=20, lr=lr,
                       batch_size=batch_size, optimizer=optimizer)
    assert res["train_top1"] >= 99.0
    assert res["top1"] >= 99.0
    assert res["top5"] == 100.0
    assert res["optimizer"] == optimizer and res["n_train"] == 600 and res["n_test"] == 200


def test_seeded_and_reproducible():
    x, y = _separable(100)
    a = linear_probe(x, y, x, y, 5, epochs=3, batch_size=32, seed=7)
    b = linear_probe(x, y, x, y, 5, epochs=3, batch_size=32, seed=7)
    assert a == b
    other = linear_probe(x, y, x, y, 5, epochs=3, batch_size=32, seed=8)
    assert other["final_loss"] != a["final_loss"]  # the seed draws the init and the order


def test_topk_hits_and_errors():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    assert topk_hits(scores, torch.tensor([1, 2]), 1) == 1
    assert topk_hits(scores, torch.tensor([1, 2]), 2) == 2
    assert topk_hits(scores, torch.tensor([2, 1]), 5) == 2  # k above C covers every class
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="optimizer"):
        linear_probe(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 2,
                     optimizer="lbfgs")
    with pytest.raises(ConfigError, match="unlabeled"):
        linear_probe(x, torch.full((4,), -1), x, torch.zeros(4, dtype=torch.long), 2)

"""Weighted k-NN (glsd.eval.knn): known answers, the vote maths, chunking, clamping."""
import math

import pytest
import torch
import torch.nn.functional as F

from glsd.config import ConfigError
from glsd.eval.knn import auto_chunk, knn_classify


def _angles(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def _hand_built():
    """Class 0 near 0 deg, class 1 near 90 deg, plus one class-1 point at 45 deg.

    The test point at 40 deg (class 0) has that 45 deg point as its nearest neighbour, then
    the class-0 points at 20 and 10 deg.
    """
    train = _angles([0, 10, 20, 45, 80, 90])
    train_y = torch.tensor([0, 0, 0, 1, 1, 1])
    test = _angles([40, 5, 85])
    test_y = torch.tensor([0, 0, 1])
    return train, train_y, test, test_y


def test_hand_built_known_answer():
    train, train_y, test, test_y = _hand_built()
    # T=1: votes are nearly even, so k=3 outvotes the one wrong nearest neighbour.
    res = knn_classify(train, train_y, test, test_y, 2, ks=(1, 3), temperature=1.0)
    assert res["per_k"]["1"]["top1"] == pytest.approx(200 / 3)
    assert res["per_k"]["3"]["top1"] == pytest.approx(100.0)
    # T=0.07: exp(cos/T) makes the nearest neighbour (cos 5 deg) outweigh two at 20 and 30 deg.
    res = knn_classify(train, train_y, test, test_y, 2, ks=(3,), temperature=0.07)
    assert res["per_k"]["3"]["top1"] == pytest.approx(200 / 3)
    assert res["per_k"]["3"]["top5"] == pytest.approx(100.0)  # two classes: both in the top 5
    assert res["n_train"] == 6 and res["n_test"] == 3 and res["num_classes"] == 2


def _naive(train, train_y, test, test_y, num_classes, k, temperature):
    """One test row at a time, in float64, with plain Python votes."""
    train = F.normalize(train.double(), dim=1)
    test = F.normalize(test.double(), dim=1)
    hit1 = hit5 = 0
    for q, y in zip(test, test_y.tolist()):
        sims = (train @ q).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        hit1 += max(range(num_classes), key=lambda c: (votes[c], -c)) == y
        ahead = sum(v > votes[y] for v in votes)
        hit5 += ahead < 5 and votes[y] > 0
    n = len(test_y)
    return 100.0 * hit1 / n, 100.0 * hit5 / n


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_naive_loop(temperature):
    g = torch.Generator().manual_seed(1)
    num_classes = 12
    centres = torch.randn(num_classes, 16, generator=g)
    train_y = torch.randint(0, num_classes, (300,), generator=g)
    test_y = torch.randint(0, num_classes, (60,), generator=g)
    train = centres[train_y] + 1.5 * torch.randn(300, 16, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(60, 16, generator=g)
    ks = (1, 5, 20, 100)
    res = knn_classify(train, train_y, test, test_y, num_classes, ks, temperature)
    for k in ks:
        top1, top5 = _naive(train, train_y, test, test_y, num_classes, k, temperature)
        assert res["per_k"][str(k)]["top1"] == pytest.approx(top1)
        assert res["per_k"][str(k)]["top5"] == pytest.approx(top5)


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(200, 8, generator=g), torch.randn(37, 8, generator=g)
    train_y, test_y = torch.randint(0, 7, (200,), generator=g), torch.randint(0, 7, (37,), generator=g)
    whole = knn_classify(train, train_y, test, test_y, 7, chunk_size=10_000)
    for chunk in (1, 5, 36):
        assert knn_classify(train, train_y, test, test_y, 7, chunk_size=chunk) == whole


def test_k_is_clamped_and_recorded():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(50, 4, generator=g), torch.randn(10, 4, generator=g)
    res = knn_classify(train, torch.arange(50) % 3, test, torch.arange(10) % 3, 3)
    assert [res["per_k"][k]["k_effective"] for k in ("10", "20", "100", "200")] == [10, 20, 50, 50]
    assert res["per_k"]["100"] == {**res["per_k"]["200"], "k": 100}


def test_small_temperature_is_nearest_neighbour_without_overflow():
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(80, 6, generator=g), torch.randn(30, 6, generator=g)
    train_y, test_y = torch.randint(0, 5, (80,), generator=g), torch.randint(0, 5, (30,), generator=g)
    nn1 = knn_classify(train, train_y, test, test_y, 5, ks=(1,))["per_k"]["1"]["top1"]
    res = knn_classify(train, train_y, test, test_y, 5, ks=(10, 50), temperature=1e-4)
    assert res["per_k"]["10"]["top1"] == nn1 and res["per_k"]["50"]["top1"] == nn1


def test_unlabeled_is_a_clear_error():
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="unlabeled"):
        knn_classify(x, torch.full((4,), -1), x, torch.zeros(4, dtype=torch.long), 2)


def test_auto_chunk_bounds_memory():
    # 50k train x 10k test: one chunk of similarities stays at 256 MiB.
    chunk = auto_chunk(50_000, 10_000)
    assert 1 <= chunk <= 10_000 and chunk * 50_000 * 4 <= 2 ** 28

"""The labelled dense probe (glsd.eval.seg): mosaic labels, perfect and random features, the CLI."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from glsd.config import ConfigError, load_config
from glsd.data.sources import ImageSource
from glsd.eval.seg import assemble, cell_labels, cell_scores, draw_mosaics, run_seg

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]
CFG = ["crops.global_size=16", "device=cpu", "data.num_workers=0", "eval.batch_size=64",
       "eval.seg_num_train=64", "eval.seg_num_test=48", "eval.seg_steps=200",
       "eval.linear_lr=0.02"]  # 3-D features move slowly at the default 1e-3: a larger step


def _solid_source(name: str, per_class: int) -> ImageSource:
    """Images of one solid colour per class (20 px: the eval transform resizes to 16)."""
    keys = [f"{c}/{i}" for c in range(len(COLOURS)) for i in range(per_class)]
    labels = [int(k.split("/")[0]) for k in keys]
    return ImageSource(name, keys, labels, [f"c{c}" for c in range(len(COLOURS))],
                       lambda key: Image.new("RGB", (20, 20), COLOURS[int(key.split("/")[0])]))


class _PoolNet(nn.Module):
    """Local features = the mean colour of each 8 x 8 px cell: they encode the tile's class."""

    def forward(self, x):
        return SimpleNamespace(local_feat=F.avg_pool2d(x, 8).permute(0, 2, 3, 1))


class _NoiseNet(nn.Module):
    """Local features that know nothing: seeded noise on the same grid."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        b, _, h, w = x.shape
        return SimpleNamespace(local_feat=torch.randn(b, h // 8, w // 8, 16, generator=self.gen))


def test_cell_labels_of_a_hand_worked_2x2_mosaic():
    tiles = torch.tensor([[0, 1], [2, 3]])
    # A 4x4 grid: two cells per tile side.
    assert cell_labels(tiles, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1],
                                                    [2, 2, 3, 3], [2, 2, 3, 3]]
    # A 3x3 grid on the 2x2 mosaic: centres at 1/6, 1/2 and 5/6 of the side; the middle one lies
    # on the tile edge and belongs to the lower / right tile.
    assert cell_labels(tiles, (3, 3)).tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]
    # A 1x5 grid (non-square): the row centre is on the edge (bottom tiles), column centres at
    # 0.1, 0.3, 0.5 (edge: right), 0.7, 0.9 of the side.
    assert cell_labels(tiles, (1, 5)).tolist() == [[2, 2, 3, 3, 3]]


def test_assemble_puts_tiles_in_row_major_order():
    tiles = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    mosaic = assemble(tiles)
    assert mosaic.shape == (3, 4, 4)
    assert mosaic[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_mosaics_take_different_classes_and_are_seeded():
    labels = [c for c in range(10) for _ in range(5)]
    mosaics = draw_mosaics(labels, 20, [2, 3], seed=0, stream="test")
    assert [len(m) for m in mosaics[:4]] == [4, 9, 4, 9]
    for m in mosaics:
        assert len({labels[i] for i in m}) == len(m)  # 10 classes >= 9 tiles: all different
    assert draw_mosaics(labels, 20, [2, 3], 0, "test") == mosaics
    assert draw_mosaics(labels, 20, [2, 3], 1, "test") != mosaics
    assert draw_mosaics(labels, 20, [2, 3], 0, "train") != mosaics
    few = draw_mosaics([0, 1, 2, 3], 10, [3], 0, "x")  # 4 classes, 9 tiles: each <= 3 times
    assert all(max(m.count(i) for i in m) <= 3 for m in few)


def test_cell_scores_accuracy_and_miou():
    true = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 2, 2])
    s = cell_scores(pred, true, 4)
    assert s["accuracy"] == pytest.approx(5 / 6)
    # IoU: class 0 = 2/3, class 1 = 1/2, class 2 = 1, class 3 absent from both.
    assert s["iou"][:3] == pytest.approx([2 / 3, 1 / 2, 1.0]) and s["iou"][3] is None
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_features_that_encode_the_class_score_100_percent():
    cfg = load_config(None, CFG)
    res = run_seg(_PoolNet(), _solid_source("train", 6), _solid_source("test", 3), cfg, "cpu")
    assert res["accuracy"] == 1.0 and res["miou"] == 1.0
    assert res["per_layout"]["2x2"]["grid"] == [4, 4] and res["per_layout"]["3x3"]["grid"] == [6, 6]
    assert res["n_test_cells"] == 24 * 16 + 24 * 36 and res["n_test_mosaics"] == 48
    assert 0.2 < res["chance_accuracy"] < 0.3


def test_random_features_score_near_chance():
    cfg = load_config(None, [*CFG, "eval.seg_num_test=96"])
    res = run_seg(_NoiseNet(), _solid_source("train", 6), _solid_source("test", 3), cfg, "cpu")
    # ~2,500 test cells: binomial std ~0.9 points; allow 5.
    assert res["n_test_cells"] > 2000
    assert abs(res["accuracy"] - 0.25) < 0.05
    assert res["miou"] < 0.2


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="eval.seg_tiles"):
        load_config(None, ["eval.seg_tiles=[]"])
    with pytest.raises(ConfigError, match="eval.seg_num_train"):
        load_config(None, ["eval.seg_num_train=0"])


def test_cli_end_to_end_on_the_sample(tmp_path, capsys):
    from glsd.cli import main
    from glsd.train.pretrain import pretrain
    from helpers_tiny import tiny_config

    run = tmp_path / "run"
    pretrain(tiny_config(run, "data.source=sample", "train.batch_size=16", "train.max_steps=2"))
    flags = ["eval.seg_num_train=16", "eval.seg_num_test=8", "eval.seg_steps=20", "--device", "cpu"]
    assert main(["eval", "seg", str(run), *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seg cell accuracy ") and "16 train / 8 test mosaics of 2x2, 3x3" in out
    settings = "seg_num_train16-seg_num_test8-seg_steps20"  # in the name: not the run's settings
    record = json.loads((run / "eval" / f"seg-{settings}.json").read_text())
    assert record["kind"] == "seg" and record["n_train"] == 96 and record["n_test"] == 32
    res = record["results"]
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["miou"] <= 1.0
    assert set(res["per_layout"]) == {"2x2", "3x3"}
    assert main(["eval", "seg", str(run / "backbone.safetensors"), "--random-init", *flags]) == 0
    assert (run / "eval" / f"seg-random-init-{settings}.json").is_file()
    assert "[random-init]" in capsys.readouterr().out


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_mosaic_tiles_are_decoded_as_knn_images_are(jpeg_draft):
    """Tiles read with the evaluation's reduced-decode size (data.jpeg_draft), as k-NN reads."""
    from glsd.eval.features import reduced_size
    from glsd.eval.seg import _read_mosaics

    cfg = load_config(None, CFG + [f"data.jpeg_draft={str(jpeg_draft).lower()}"])
    source = _solid_source("s", 4)
    asked = []
    read = source.read
    source.read_reduced = lambda key, size: asked.append(size) or read(key)
    transform = lambda img: torch.zeros(3, 16, 16)  # noqa: E731 - the tiles' pixels do not matter
    _read_mosaics(source, [[0, 4, 8, 12]], transform, cfg)
    assert asked == ([16] * 4 if jpeg_draft else []) and reduced_size(cfg) == (16 if jpeg_draft else 0)

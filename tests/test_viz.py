"""Pictures: show-matches, show-features, plot (valid, non-blank PNGs of the stated size), and
the pieces they rest on (matching of two views, CLS attention, PCA)."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from glsd.tools import viz  # noqa: E402
from glsd.config import load_config  # noqa: E402
from glsd.models.backbone import build_backbone  # noqa: E402
from glsd.train.pretrain import pretrain  # noqa: E402

from helpers_tiny import CONVNET, cli, tiny_config  # noqa: E402

# A random conv net from a shipped preset, shrunk: the --config (no run folder) path.
RANDOM_CONVNET = ["--config", "cifar10-lowdata-cpu", CONVNET[1]]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A 2-step tiny ViT run folder (config.yaml, metrics.jsonl, checkpoint, export)."""
    run = tmp_path_factory.mktemp("viz") / "vit-run"
    torch.manual_seed(0)
    pretrain(tiny_config(run, "train.max_steps=2", "data.synthetic_num_images=16", vit=True))
    return run


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A CIFAR-sized (32 px) picture with structure: a gradient, a square, a disc."""
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.stack([xx * 8, yy * 8, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    img[6:16, 4:14] = (250, 30, 30)
    img[((yy - 22) ** 2 + (xx - 22) ** 2) < 30] = (20, 20, 240)
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(img).save(path)
    return path


def assert_picture(path, figsize):
    """A readable PNG of figsize * DPI pixels that is not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == tuple(round(v * viz.DPI) for v in figsize)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0


def test_show_matches_run_and_random(vit_run, image_path, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert cli(["show-matches", "--image", str(image_path), str(vit_run), "--out", str(out), "--seed", "3"]) == 0
    assert_picture(out, viz.MATCHES_FIGSIZE)
    assert "wrote" in capsys.readouterr().out
    # No run folder: a random backbone of a preset, overrides after it, a second global view.
    out2 = tmp_path / "sub" / "m2.png"
    argv = ["show-matches", "--image", str(image_path), "--out", str(out2), *RANDOM_CONVNET,
            "loss.match_threshold=none", "--student-view", "global"]
    assert cli(argv) == 0
    assert_picture(out2, viz.MATCHES_FIGSIZE)


def test_show_matches_needs_a_backbone(image_path, tmp_path, capsys):
    assert cli(["show-matches", "--image", str(image_path), "--out", str(tmp_path / "m.png")]) == 2
    assert "--config" in capsys.readouterr().err
    argv = ["show-matches", "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "m.png"),
            *RANDOM_CONVNET]
    assert cli(argv) == 2
    assert "cannot read image" in capsys.readouterr().err
    # a run folder and --config: which backbone was meant is not clear; the run's was drawn
    assert cli(["show-matches", "--image", str(image_path), "--out", str(tmp_path / "m.png"),
                str(tmp_path), "--config", "cifar10-lowdata-cpu"]) == 2
    assert "not both" in capsys.readouterr().err
    # crops the training refuses (off the conv net's stride 4) are refused here too
    argv = ["show-matches", "--image", str(image_path), "--out", str(tmp_path / "m.png"),
            *RANDOM_CONVNET, "crops.local_size=18"]
    assert cli(argv) == 2
    assert "crops.local_size=18 is not a multiple of" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_show_features_vit_and_convnet(vit_run, image_path, tmp_path):
    out = tmp_path / "f.png"
    assert cli(["show-features", str(vit_run), "--image", str(image_path), "--out", str(out)]) == 0
    assert_picture(out, viz.FEATURES_FIGSIZE)
    # A non-square image through a conv net (no CLS attention: the norm panel instead).
    wide = tmp_path / "wide.png"
    Image.open(image_path).resize((48, 36)).save(wide)
    out2 = viz.show_features(None, wide, tmp_path / "f2.png", [CONVNET[1]], config="cifar10-lowdata-cpu")
    assert_picture(out2, viz.FEATURES_FIGSIZE)


def test_plot_runs_overlaid(vit_run, tmp_path):
    other = tmp_path / "other"  # a second run with online k-NN records
    other.mkdir()
    (other / "config.yaml").write_text("data: {num_images: 400}\nloss: {matching: similarity}\n")
    records = [{"step": s, "epoch": s / 3, "loss": 5.0 - s, "loss_global": 3.0, "loss_local": 2.0,
                "geo_valid_frac": 0.9, "sim_geo_agree": 0.1 * s, "sim_dist_cells": 2.0} for s in (1, 2, 3)]
    records.append({"step": 3, "epoch": 1, "knn_top1": 31.5})
    (other / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"step": 4, "lo')
    out = tmp_path / "plot.png"
    assert cli(["plot", str(vit_run), str(other), "--out", str(out)]) == 0
    assert_picture(out, viz.PLOT_FIGSIZE)
    assert viz.run_label(other, {"data": {"num_images": 400}, "loss": {"matching": "similarity"}}) \
        == "other: similarity, 400 images"
    assert viz.run_label("r", {"data": {"fraction": 0.05}, "loss": {"matching": "geometric"}}) \
        == "r: geometric, 5% of data"
    assert viz.curves._curve(viz.read_run(other)[0], "knn_top1") == ([3], [31.5])
    # by epoch: runs of other batch sizes, or resumed under another world size, line up
    assert viz.curves._curve(viz.read_run(other)[0], "loss", "epoch") == ([1 / 3, 2 / 3, 1.0], [4.0, 3.0, 2.0])
    assert cli(["plot", str(vit_run), str(other), "--x", "epoch", "--out", str(out)]) == 0
    assert_picture(out, viz.PLOT_FIGSIZE)


def test_plot_rejects_a_folder_without_metrics(tmp_path, capsys):
    assert cli(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path / "typo"), "--out", str(tmp_path / "p.png")]) == 2
    assert "typo does not exist: give a run folder" in capsys.readouterr().err


def test_plot_takes_a_runs_metrics_file_and_labels_the_current_folder(monkeypatch, tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 2.0}\n')
    assert viz.read_run(run / "metrics.jsonl")[0] == viz.read_run(run)[0]
    assert viz.run_label(run / "metrics.jsonl", {}).startswith("run-a: ")
    monkeypatch.chdir(run)
    assert viz.run_label(".", {}).startswith("run-a: ")
    # one run named three ways is one curve and one legend entry
    figures = []
    monkeypatch.setattr(viz.curves, "save", lambda fig, out: figures.append(fig) or Path(out))
    viz.plot_runs([run, run / "metrics.jsonl", "."], tmp_path / "p.png")
    legend = next(ax.get_legend() for ax in figures[0].axes if ax.get_legend())
    assert [t.get_text() for t in legend.get_texts()] == ["run-a: ?, 100% of data"]


def test_missing_matplotlib_names_the_extra(monkeypatch, vit_run, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(viz.MatplotlibMissing, match=r"\[viz\]"):
        viz.plot_runs([vit_run], tmp_path / "p.png")
    assert cli(["plot", str(vit_run), "--out", str(tmp_path / "p.png")]) == 2
    assert "pip install" in capsys.readouterr().err


def test_match_views_identical_views_match_themselves():
    cfg = load_config(None, ["model.backbone=glsd_convnet", CONVNET[1]])
    backbone = build_backbone(cfg.model, 32).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    teacher, _ = viz.sample_views(cfg, img, seed=1, student_view="global")
    m = viz.match_views(backbone, cfg, teacher, teacher)
    n = m.teacher_grid[0] * m.teacher_grid[1]
    assert torch.equal(m.geo_index, torch.arange(n)) and bool(m.geo_valid.all())
    assert torch.equal(m.sim_index, torch.arange(n)) and bool(m.agree.all())


def test_sample_views_seeded_and_leave_global_rng_alone():
    cfg = load_config(None, [])
    img = Image.new("RGB", (50, 40), (10, 20, 30))
    random.seed(7)
    torch.manual_seed(7)
    a = viz.sample_views(cfg, img, seed=5)
    after = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), torch.rand(1))
    assert after == expected
    b = viz.sample_views(cfg, img, seed=5)
    assert all(torch.equal(x.geometry, y.geometry) for x, y in zip(a, b))
    assert a[0].image.size == (32, 32) and a[1].image.size == (16, 16) and a[1].kind == "local"


def test_cls_attention_equals_timm_attention():
    """The recomputed attention is what timm's (non-fused) Attention itself computes."""
    cfg = load_config(None, ["model.patch_size=4", "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
                             "model.drop_path_rate=0"])
    backbone = build_backbone(cfg.model, 32).eval()
    attn = backbone.model.blocks[-1].attn
    attn.fused_attn = False  # the explicit path: softmax weights pass through attn_drop
    seen = {}
    attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.setdefault("probs", args[0]))
    x = torch.randn(1, 3, 32, 32)
    local, cls = viz.features_and_attention(backbone, x)
    assert local.shape == (8, 8, 32) and cls.shape == (8, 8)
    expected = seen["probs"][0, :, 0, 1:].mean(dim=0).reshape(8, 8)
    assert torch.allclose(cls, expected, atol=1e-6)
    assert float(cls.sum()) < 1.0  # the CLS token's attention to itself is left out


def test_pca_rgb_in_unit_range():
    rgb, var = viz.pca_rgb(torch.randn(4, 5, 16))
    assert rgb.shape == (4, 5, 3) and float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0
    assert len(var) == 3 and var[0] >= var[1] >= var[2] > 0
    rgb, _ = viz.pca_rgb(torch.randn(1, 2, 2))  # fewer cells/channels than 3 components
    assert rgb.shape == (1, 2, 3)

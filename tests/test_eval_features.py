"""Feature extraction (glsd.eval.features): feature kinds, transform, DDP sharding and gather."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glsd.config import ConfigError, load_config
from glsd.data.sources import open_source
from glsd.eval.features import eval_transform, extract_features
from glsd.models.backbone import build_backbone

CONV = ["data.source=synthetic", "data.synthetic_num_images=7", "data.synthetic_image_size=40",
        "data.num_workers=0", "crops.global_size=16", "model.backbone=glsd_convnet",
        "model.backbone_kwargs={widths: [4, 4, 8, 8]}", "eval.batch_size=3"]
VIT = ["data.source=synthetic", "data.synthetic_num_images=5", "data.num_workers=0",
       "crops.global_size=16", "crops.local_size=8", "model.backbone=vit_tiny_patch16_224",
       "model.patch_size=8", "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
       "eval.batch_size=4"]


def _setup(overrides, seed=0):
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model, cfg.crops.global_size).eval()
    return cfg, backbone, open_source(cfg.data, "train")


def test_transform_and_conv_features():
    cfg, backbone, source = _setup(CONV)
    assert eval_transform(cfg)(source.read("0")).shape == (3, 16, 16)
    backbone.train()
    feats, labels = extract_features(backbone, source, cfg, "cpu", "auto")
    assert backbone.training  # mode restored
    assert feats.shape == (7, 8) and feats.dtype == torch.float32
    assert labels.tolist() == source.labels
    # One image at a time, by hand: the same numbers (eval-mode BatchNorm, no batch effects).
    backbone.eval()
    with torch.no_grad():
        x = eval_transform(cfg)(source.read("5"))[None]
        ref = backbone(x).local_feat.mean(dim=(1, 2))
    assert torch.allclose(feats[5], ref[0], atol=1e-5)
    pooled, _ = extract_features(backbone, source, cfg, "cpu", "pooled")
    assert torch.allclose(pooled, feats)
    with pytest.raises(ConfigError, match="class token"):
        extract_features(backbone, source, cfg, "cpu", "cls")


def test_vit_cls_and_pooled():
    cfg, backbone, source = _setup(VIT)
    auto, _ = extract_features(backbone, source, cfg, "cpu", "auto")
    cls, _ = extract_features(backbone, source, cfg, "cpu", "cls")
    pooled, _ = extract_features(backbone, source, cfg, "cpu", "pooled")
    assert backbone.global_feature == "cls" and torch.allclose(auto, cls)
    assert pooled.shape == cls.shape == (5, 32) and not torch.allclose(pooled, cls)


def test_cls_token_of_a_pooled_vit_with_its_local_feature():
    # A ViT trained with the pooled feature, read at its class token: one forward gives the
    # token (as forward_features) and the mean of the local grid (as the training forward).
    from glsd.eval.features import embed
    cfg, backbone, _ = _setup(VIT + ["model.global_feature=pooled"])
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g, local = embed(backbone, images, "cls", local=True)
        want_g = backbone.model.forward_features(images)[:, 0]
        want_local = backbone(images).local_feat.mean(dim=(1, 2))
    assert backbone.global_feature == "pooled"
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local, want_local, rtol=1e-5, atol=1e-6)


def test_unreadable_images_are_skipped():
    cfg, backbone, source = _setup(CONV)
    good_read = source.read

    def read(key):
        if key == "2":
            raise OSError("truncated file")
        return good_read(key)

    source.read = read
    with pytest.warns(UserWarning, match=r"1 unreadable images of .* skipped \(2\)"):  # named
        feats, labels = extract_features(backbone, source, cfg, "cpu")
    assert feats.shape[0] == 6 and labels.tolist() == [y for i, y in enumerate(source.labels) if i != 2]


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, backbone, source = _setup(CONV)
        feats, labels = extract_features(backbone, source, cfg, "cpu")
        torch.save({"feats": feats, "labels": labels}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharding_and_uneven_gather(monkeypatch):
    """Two ranks simulated in one process: rank 1 runs first and its gather inputs are kept,
    rank 0's gather then returns its own tensors followed by rank 1's, as all_gather does."""
    import glsd.eval.features as features

    cfg, backbone, source = _setup(CONV)
    ref_f, ref_y = extract_features(backbone, source, cfg, "cpu")
    sent = []

    def gather_rank1(t):
        sent.append(t.clone())
        return torch.cat([t, t])

    monkeypatch.setattr(features, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(features, "all_gather_cat", gather_rank1)
    extract_features(backbone, source, cfg, "cpu")
    assert [t.shape[0] for t in sent] == [1, 4, 4] and int(sent[0]) == 4  # 4 of 7 images
    calls = iter(sent)
    monkeypatch.setattr(features, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(features, "all_gather_cat", lambda t: torch.cat([t, next(calls)]))
    feats, labels = extract_features(backbone, source, cfg, "cpu")
    assert torch.allclose(feats, ref_f, atol=1e-5) and torch.equal(labels, ref_y)


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s on a 2-core machine
def test_distributed_extraction_matches_single_process(tmp_path):
    cfg, backbone, source = _setup(CONV)
    ref_f, ref_y = extract_features(backbone, source, cfg, "cpu")
    # 7 images over 2 ranks: shards of 3 and 4, padded to 4 for the all-gather.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["feats"], ref_f, atol=1e-5)
        assert torch.equal(got["labels"], ref_y)

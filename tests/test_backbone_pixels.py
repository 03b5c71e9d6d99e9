"""The backbones' cells against the pixels they see, and the Swin preset's windowed grids in a
real training step.

Geometric matching trusts that cell (i, j) of a view's feature grid sits where
``cell_centers`` says in the original image. ``test_models`` checks the layout against the
model's own tokens; here it is checked against the input pixels: with every residual branch
zeroed, a ViT or Swin token depends only on its own patch (Swin: its merged 2 x 2 patches), so
the input gradient of cell (i, j) marks exactly the pixels it sees.
"""
import pytest
import torch

from glsd.config import load_config
from glsd.data.geometry import cell_centers, make_geometry
from glsd.models.backbone import build_backbone
from glsd.train.pretrain import pretrain

from helpers_tiny import load_last, read_metrics, tiny_config

VIT = ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
       "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]
SWIN = ["model.backbone=swin_tiny_patch4_window7_224",
        "model.backbone_kwargs={embed_dim: 16, depths: [2, 2], num_heads: [1, 2], window_size: 7}"]


def _without_residual_branches(model: torch.nn.Module) -> None:
    """Zero each block's attention and MLP output projections: tokens stop mixing."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attn.proj", "mlp.fc2")):
                module.weight.zero_()
                module.bias.zero_()


@pytest.mark.parametrize("family, size, cell_px", [
    ("vit", 32, 4), ("vit", 16, 4),     # the global size and a local one (dynamic_img_size)
    ("swin", 56, 8), ("swin", 24, 8),   # 7x7 = one window; 3x3 from a padded 6x6 stage
])
def test_each_cell_sees_the_pixels_its_centre_names(family, size, cell_px):
    crops = {"vit": ["crops.global_size=32", "crops.local_size=16"],
             "swin": ["crops.global_size=56", "crops.local_size=24"]}[family]
    cfg = load_config(None, [*(VIT if family == "vit" else SWIN), *crops])
    backbone = build_backbone(cfg.model, cfg.crops.global_size).eval()
    _without_residual_branches(backbone.model)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    cells = backbone(x).local_feat[0]  # (gh, gw, D)
    gh, gw = cells.shape[:2]
    assert (gh, gw) == (size // cell_px, size // cell_px)
    centres = cell_centers(make_geometry(0.0, 0.0, size, size, False), (gh, gw))  # (gh*gw, 2) y, x
    pixel_y, pixel_x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    probe = torch.randn(cells.shape[-1])  # a plain sum of a LayerNorm's output is constant
    for i in range(gh):
        for j in range(gw):
            (grad,) = torch.autograd.grad(cells[i, j] @ probe, x, retain_graph=True)
            seen = grad[0].abs().sum(0) > 0  # (size, size)
            block = torch.zeros_like(seen)
            block[i * cell_px:(i + 1) * cell_px, j * cell_px:(j + 1) * cell_px] = True
            assert torch.equal(seen, block), (i, j)
            centroid = torch.stack([pixel_y[seen].mean(), pixel_x[seen].mean()])
            torch.testing.assert_close(centroid, centres[i * gw + j])


def test_the_swin_preset_grids_train_in_a_real_step(tmp_path):
    """imagenet-swin-t's shape, scaled down: window 7, a 7x7 global grid (56 px) and a 3x3
    local one (24 px: its 6x6 first stage is padded to a window and shift-masked), geometric
    matching, bf16, stochastic depth, views made on the device. Every student parameter gets a
    finite gradient from the first step (the prototypes unfrozen), the teacher none."""
    import glsd.train.pretrain as pretrain_mod

    seen = {}
    real_step = pretrain_mod.train_step

    def step_and_look(ctx, batch, step, want_stats=True):
        terms = real_step(ctx, batch, step, want_stats)
        if step == 0:
            seen["grads"] = {n: p.grad for n, p in ctx.student.named_parameters() if p.requires_grad}
            seen["teacher"] = [p.requires_grad or p.grad is not None for p in ctx.teacher.parameters()]
        return terms

    mp = pytest.MonkeyPatch()
    mp.setattr(pretrain_mod, "train_step", step_and_look)
    try:
        run = tmp_path / "run"
        pretrain(tiny_config(run, *SWIN, "model.global_feature=pooled", "model.drop_path_rate=0.1",
                             "crops.global_size=56", "crops.local_size=24", "crops.num_local=2",
                             "loss.matching=geometric", "train.precision=bf16", "data.augment_on=device",
                             "train.freeze_last_layer_steps=0", "train.max_steps=2", "train.batch_size=4"))
    finally:
        mp.undo()
    missing = [n for n, g in seen["grads"].items() if g is None or not torch.isfinite(g).all()]
    assert not missing, missing
    assert not any(seen["teacher"])
    logged = [r for r in read_metrics(run) if "loss" in r]
    assert len(logged) == 2 and all(r["loss_local"] > 0 for r in logged)
    assert all(0 < r["geo_valid_frac"] <= 1 for r in logged)
    assert load_last(run)["step"] == 2


def test_swin_local_features_of_a_batch_are_those_of_its_images_alone():
    """Shifted-window masks are built per feature-map size, not per batch: a batch of padded
    24 px crops gives each image the features it has alone."""
    cfg = load_config(None, [*SWIN, "crops.global_size=56", "crops.local_size=24"])
    backbone = build_backbone(cfg.model, 56).eval()
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        together = backbone(x).local_feat
        alone = torch.cat([backbone(x[k:k + 1]).local_feat for k in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)

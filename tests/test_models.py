"""Backbones, DINO heads, student/teacher networks (glsd.models) on tiny models.

Tiny backbones used (all run 32 px global and 16 px local crops):
- glsd_convnet, widths 8-8-16-16, pools after layers 1 and 3: grids 8x8 / 4x4;
- ViT (vit_tiny_patch16_224, patch 4, embed 32, depth 1, 2 heads): grids 8x8 / 4x4;
- Swin (swin_tiny_patch4_window7_224, embed 24, two stages depths [1, 1], heads [1, 2],
  window 4): grids 4x4 / 2x2. timm also accepts four stages at 32 px, but their stride 32
  leaves a 1x1 grid for both crop sizes (16 px gets padded), so two stages are used;
- ResNet-18 (stride 32): grids 1x1 / 1x1; one BasicBlock per stage (timm's ``layers``
  override) except in the forward-only backbone test, to keep each test fast on 2 cores.
"""

import dataclasses

import pytest
import torch

from glsd.config import load_config
from glsd.data.geometry import make_geometry
from glsd.loss.dino import DINOGlobalLoss, DINOLocalLoss, view_pairs
from glsd.loss.matching import cosine_similarities, match_pairs
from glsd.models.backbone import build_backbone
from glsd.models.heads import DINOHead, build_network, build_teacher
from glsd.train.objective import GlobalLocalObjective

BACKBONES = {
    "convnet": (["model.backbone=glsd_convnet",
                 "model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}"],
                "nchw", 16, (8, 8), (4, 4)),
    "vit": (["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
             "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"],
            "tokens", 32, (8, 8), (4, 4)),
    "swin": (["model.backbone=swin_tiny_patch4_window7_224",
              "model.backbone_kwargs={embed_dim: 24, depths: [1, 1], num_heads: [1, 2], "
              "window_size: 4}"],
             "nhwc", 48, (4, 4), (2, 2)),
    "resnet": (["model.backbone=resnet18", "model.backbone_kwargs={layers: [1, 1, 1, 1]}"],
               "nchw", 512, (1, 1), (1, 1)),
}
# the full ResNet-18 only where it is cheap (forward); elsewhere one block per stage
ALL_BACKBONES = {**BACKBONES, "resnet18": (["model.backbone=resnet18"], "nchw", 512, (1, 1), (1, 1))}
HEAD = ["model.out_dim=12", "model.hidden_dim=16", "model.bottleneck_dim=8",
        "model.local_out_dim=10", "model.local_hidden_dim=12",
        "crops.global_size=32", "crops.local_size=16"]


def make_cfg(name, matching="geometric", extra=()):
    return load_config(None, ALL_BACKBONES[name][0] + HEAD + [f"loss.matching={matching}", *extra])


# ---------------------------------------------------------------------------------------
# backbones

@pytest.mark.parametrize("name", list(ALL_BACKBONES))
def test_backbone_outputs(name):
    _, layout, dim, g32, g16 = ALL_BACKBONES[name]
    bb = build_backbone(make_cfg(name).model, 32)
    assert bb.layout == layout and bb.embed_dim == dim
    bb.eval()
    for size, grid in ((32, g32), (16, g16)):
        x = torch.randn(2, 3, size, size)
        out = bb(x)
        assert out.global_feat.shape == (2, dim)
        assert out.local_feat.shape == (2, *grid, dim)
        if name == "vit":
            assert bb.global_feature == "cls"
            feats = bb.model.forward_features(x)
            torch.testing.assert_close(out.global_feat, feats[:, 0])
            # local tokens row-major after the class token
            torch.testing.assert_close(out.local_feat.reshape(2, -1, dim), feats[:, 1:])
        else:
            assert bb.global_feature == "pooled"
            torch.testing.assert_close(out.global_feat, out.local_feat.mean(dim=(1, 2)))


@pytest.mark.parametrize("name", ["convnet", "swin", "vit"])
def test_each_cell_is_its_image_position(name):
    """On a non-square image (a height/width swap changes the grid's shape) every cell of
    local_feat is the model's own feature at that row and column."""
    _, layout, dim, g32, _ = BACKBONES[name]
    bb = build_backbone(make_cfg(name).model, 32).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        local, feats = bb(x).local_feat, bb.model.forward_features(x)
    stride = 32 // g32[0]
    assert local.shape == (2, 32 // stride, 48 // stride, dim)
    by_position = {"nchw": lambda f: f.permute(0, 2, 3, 1), "nhwc": lambda f: f,
                   "tokens": lambda f: f[:, 1:].reshape(2, 32 // stride, 48 // stride, dim)}[layout]
    torch.testing.assert_close(local, by_position(feats))


def test_backbone_vit_pooled_global_feature():
    cfg = make_cfg("vit", extra=["model.global_feature=pooled"])
    bb = build_backbone(cfg.model, 32).eval()
    out = bb(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.global_feat, out.local_feat.mean(dim=(1, 2)))


def test_backbone_cls_needs_class_token():
    from glsd.config import ConfigError
    with pytest.raises(ConfigError, match="cls"):
        build_backbone(make_cfg("convnet", extra=["model.global_feature=cls"]).model, 32)


def test_unknown_backbone_suggests():
    from glsd.config import ConfigError
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224"):
        build_backbone(make_cfg("vit", extra=["model.backbone=vit_tiny_patch16_2244"]).model, 32)


def test_a_backbone_switch_with_the_old_kwargs_is_a_config_error():
    """The preset's kwargs of another backbone, or values its constructor asserts on: one
    message naming the fix, not a traceback."""
    from glsd.config import ConfigError, load_config
    from glsd.cli import main

    vit = load_config("cifar10-vit-tiny", ["data.source=sample"]).model
    with pytest.raises(ConfigError, match=r"glsd_convnet cannot be built .*'model.backbone_kwargs=\{\}'"):
        build_backbone(dataclasses.replace(vit, backbone="glsd_convnet"), 32)
    with pytest.raises(ConfigError, match="cannot be built .*AssertionError"):
        build_backbone(dataclasses.replace(vit, backbone_kwargs={**vit.backbone_kwargs, "num_heads": 5}), 32)
    with pytest.raises(ConfigError, match="unknown backbone model.backbone='glsd_convnet_wide'. Close names: glsd_convnet"):
        build_backbone(dataclasses.replace(vit, backbone="glsd_convnet_wide", backbone_kwargs={}), 32)
    assert main(["config", "cifar10-vit-tiny", "data.source=sample", "model.backbone=glsd_convnet"]) == 2


@pytest.mark.parametrize("name", list(BACKBONES))
def test_grid_size_agrees_with_forward(name):
    bb = build_backbone(make_cfg(name).model, 32).eval()  # batch of 1: BatchNorm needs eval
    for size in (32, 16):
        assert bb.grid_size((size, size)) == tuple(bb(torch.randn(1, 3, size, size)).local_feat.shape[1:3])


# ---------------------------------------------------------------------------------------
# heads

@pytest.mark.parametrize("layers", [1, 2, 3])
def test_dino_head_dims(layers):
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, num_layers=layers)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    assert linears[0].in_features == 8 and linears[-1].out_features == 4
    assert head(torch.randn(2, 3, 8)).shape == (2, 3, 10)
    assert head(torch.randn(5, 8)).shape == (5, 10)
    # prototypes start with unit norm
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_magnitude(norm_last_layer):
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, num_layers=2,
                    norm_last_layer=norm_last_layer)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.requires_grad is (not norm_last_layer)
    v0 = v.detach().clone()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=10.0)
    head(torch.randn(6, 8)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(v.detach(), v0)  # the directions did train
    norms = head.last_layer.weight.norm(dim=1)
    if norm_last_layer:
        assert g.grad is None
        torch.testing.assert_close(norms, torch.ones(10))
    else:
        assert g.grad is not None
        assert not torch.allclose(norms, torch.ones(10))


# ---------------------------------------------------------------------------------------
# networks

def _views(b=2, n_global=2, n_local=3):
    return [torch.randn(b, 3, 32, 32) for _ in range(n_global)] + \
           [torch.randn(b, 3, 16, 16) for _ in range(n_local)]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_network_forward_shapes(name):
    _, _, dim, g32, g16 = BACKBONES[name]
    net = build_network(make_cfg(name))
    groups = net(_views())
    assert len(groups) == 2
    for out, v, grid in zip(groups, (2, 3), (g32, g16)):
        n = grid[0] * grid[1]
        assert out.grid == grid
        assert out.global_logits.shape == (v, 2, 12)
        assert out.local_logits.shape == (v, 2, n, 10)
        assert out.local_feat.shape == (v, 2, n, dim)


def test_network_without_local_head():
    net = build_network(make_cfg("convnet", matching="none"))
    assert net.local_head is None
    (out,) = net(_views(n_local=0))
    assert out.local_logits is None and out.global_logits.shape == (2, 2, 12)


def test_network_group_matches_per_view():
    # views batched together give the same outputs as each view alone (eval mode)
    net = build_network(make_cfg("vit")).eval()
    views = _views(n_local=0)
    (out,) = net(views)
    for i, v in enumerate(views):
        (single,) = net([v])
        torch.testing.assert_close(out.global_logits[i], single.global_logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.local_logits[i], single.local_logits[0], rtol=1e-4, atol=1e-5)


def _drop_probs(net):
    return [float(getattr(m, "drop_prob", 0.0)) for m in net.modules()
            if type(m).__name__ == "DropPath"]


@pytest.mark.parametrize("name", ["convnet", "vit", "swin"])
def test_build_teacher(name):
    cfg = make_cfg(name, extra=["model.drop_path_rate=0.2"])
    student = build_network(cfg)
    teacher = build_teacher(cfg, student)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    for k in s_state:
        assert torch.equal(s_state[k], t_state[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())
    # same weights -> same outputs in eval mode; no storage shared with the student
    student.eval(), teacher.eval()
    views = _views(n_local=1)
    for s_out, t_out in zip(student(views), teacher(views)):
        torch.testing.assert_close(s_out.global_logits, t_out.global_logits)
        torch.testing.assert_close(s_out.local_logits, t_out.local_logits)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_teacher_has_no_drop_path(name):
    # depth 2 so that timm's linearly increasing per-block rate is > 0 somewhere
    depth = "model.backbone_kwargs.depth=2" if name == "vit" else "model.backbone_kwargs.depths=[1,1]"
    cfg = make_cfg(name, extra=["model.drop_path_rate=0.2", depth])
    student = build_network(cfg)
    assert any(p > 0 for p in _drop_probs(student))  # the student has stochastic depth
    teacher = build_teacher(cfg, student)
    assert all(p == 0 for p in _drop_probs(teacher)), _drop_probs(teacher)


def test_teacher_has_no_randomness_set_in_backbone_kwargs():
    # model.drop_path_rate=0 reaches timm, but a rate in backbone_kwargs wins over it; dropout too
    cfg = make_cfg("vit", extra=["model.backbone_kwargs.depth=2", "model.backbone_kwargs.drop_path_rate=0.5",
                                 "model.backbone_kwargs.proj_drop_rate=0.5"])
    student = build_network(cfg)
    assert any(p > 0 for p in _drop_probs(student))
    teacher = build_teacher(cfg, student).train()  # the teacher runs in train mode (BatchNorm)
    assert all(p == 0 for p in _drop_probs(teacher))
    assert all(m.p == 0 for m in teacher.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.backbone(x).local_feat, teacher.backbone(x).local_feat,
                                   rtol=0, atol=0)


def test_register_tokens_are_not_a_class_token():
    from glsd.config import ConfigError
    from glsd.export import _resolved_feature
    from glsd.models.backbone import meta_backbone

    # four prefix tokens, all registers: "auto" must pool the grid, not read register 0
    m = make_cfg("vit", extra=["model.backbone=vit_medium_patch16_reg4_gap_256",
                               "model.backbone_kwargs={}", "model.patch_size=null"]).model
    backbone = meta_backbone(m, 256)
    assert backbone.num_prefix_tokens == 4 and backbone.global_feature == "pooled"
    with pytest.raises(ConfigError, match="class token"):
        meta_backbone(dataclasses.replace(m, global_feature="cls"), 256)
    cfg = make_cfg("vit")
    assert _resolved_feature(backbone.model, cfg) == "pooled"
    assert _resolved_feature(meta_backbone(cfg.model, 32).model, cfg) == "cls"


def test_a_model_whose_output_is_not_its_last_stage_is_refused():
    from glsd.config import ConfigError, ModelConfig
    from glsd.models.backbone import meta_backbone
    from glsd.train.preflight import check_grids

    # EfficientNet's feature grid (320 channels) skips its 1280-channel head convolution
    cfg = make_cfg("convnet", extra=["model.backbone=efficientnet_b0", "model.backbone_kwargs={}",
                                     "crops.global_size=128", "crops.local_size=64"])
    with pytest.raises(ConfigError, match="320 channels.*head layer to 1280"):
        check_grids(cfg)  # new pretraining is refused
    # the bare backbone still builds (feature extraction, the listing's probe), refused only there
    assert meta_backbone(ModelConfig(backbone="efficientnet_b0"), 128).embed_dim == 1280


@pytest.mark.parametrize("backbone, dynamic", [
    ("vit_small_patch16_224", True), ("eva02_tiny_patch14_224", True),
    ("deit_tiny_distilled_patch16_224", True),  # its __init__ takes **kwargs: its parent's count
    ("beit_base_patch16_224", False), ("vit_relpos_small_patch16_224", False)])
def test_dynamic_size_goes_to_the_models_that_take_it(backbone, dynamic):
    from glsd.config import ModelConfig
    from glsd.models.backbone import meta_backbone, timm_kwargs

    kwargs = timm_kwargs(ModelConfig(backbone=backbone), 128)
    assert kwargs.get("dynamic_img_size", False) is dynamic
    assert kwargs["img_size"] == 128 and kwargs["drop_path_rate"] == ModelConfig().drop_path_rate
    meta_backbone(ModelConfig(backbone=backbone), 128)  # builds (the BEiTs failed on the keyword)


def test_families_that_never_had_drop_path_keep_timms_default():
    from glsd.config import ModelConfig
    from glsd.models.backbone import timm_kwargs

    # resnet18's family is "resnet18": stored ResNet runs were built without it
    assert "drop_path_rate" not in timm_kwargs(ModelConfig(backbone="resnet18"), 224)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_zero_drop_path_rate_means_none(name):
    # two blocks: timm's rates rise from 0 at the first block, so one block never drops
    deeper = {"vit": ["model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"], "swin": []}[name]
    # the key reaches the model: a rate gives DropPath modules, 0 none that drop anything
    assert any(p > 0 for p in _drop_probs(build_network(make_cfg(name, extra=[*deeper, "model.drop_path_rate=0.2"]))))
    student = build_network(make_cfg(name, extra=[*deeper, "model.drop_path_rate=0"]))
    assert all(p == 0 for p in _drop_probs(student)), _drop_probs(student)


def _geoms(n_views, b, size):
    out = []
    for _ in range(n_views):
        rows = []
        for _ in range(b):
            top, left = torch.rand(2).tolist()
            rows.append(make_geometry(top * 8, left * 8, size, size, bool(torch.rand(()) > 0.5)))
        out.append(torch.stack(rows))
    return torch.stack(out)  # (V, B, 5)


@pytest.mark.parametrize("matching", ["none", "geometric", "similarity", "soft_geometric", "hybrid"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_gradients_reach_every_student_parameter(name, matching):
    cfg = make_cfg(name, matching=matching)
    student = build_network(cfg)
    teacher = build_teacher(cfg, student)
    b, n_global, n_local = 2, 2, 2
    views = _views(b, n_global, n_local)
    s_groups = student(views)
    with torch.no_grad():
        (t_out,) = teacher(views[:n_global])
    s_global = torch.cat([g.global_logits for g in s_groups])
    loss = DINOGlobalLoss(12)(s_global, t_out.global_logits, 0.04)
    geoms = [_geoms(n_global, b, 24.0), _geoms(n_local, b, 10.0)]
    if matching != "none":
        t_geom = geoms[0]
        pairs, matches, logits = [], [], []
        first = 0
        for out, g in zip(s_groups, geoms):
            t_idx, s_idx = view_pairs(n_global, first, g.shape[0])
            first += g.shape[0]
            pm = match_pairs(matching, "half_diagonal", g[s_idx], out.grid, t_geom[t_idx], t_out.grid,
                             cosine_similarities(out.local_feat[s_idx].detach(), t_out.local_feat[t_idx]))
            pairs.append((t_idx, s_idx))
            matches.append(pm.matches)
            logits.append(out.local_logits)
        local = DINOLocalLoss(10)(logits, t_out.local_logits, pairs, matches, 0.04)
        assert torch.isfinite(local)
        loss = 0.5 * loss + 0.5 * local
    assert torch.isfinite(loss)
    # The training objective (pairing, geometry rows, weights) gives the loss built by hand.
    terms = GlobalLocalObjective.from_config(cfg)(s_groups, [t_out], torch.cat(geoms), 0.04)
    torch.testing.assert_close(terms.loss, loss, rtol=1e-5, atol=1e-6)
    # The objective's own loss trains the student as the hand-built one does, every parameter
    # (a local term detached in one mode would give its local head no gradient here).
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    by_hand = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    trained = torch.autograd.grad(terms.loss, [p for _, p in named], allow_unused=True)
    missing = [n for (n, _), g in zip(named, trained) if g is None]
    assert not missing, missing
    bad = [n for (n, _), g in zip(named, trained) if not torch.isfinite(g).all()]
    assert not bad, bad
    for (n, _), g, ref in zip(named, trained, by_hand):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=n)
    if matching != "none":
        local_head = [g for (n, _), g in zip(named, trained) if n.startswith("local_head.")]
        assert local_head and all(g.abs().sum() > 0 for g in local_head)
    # The teacher is no leaf of the graph: its outputs carry no history, its weights want none.
    assert t_out.local_feat.grad_fn is None and t_out.global_logits.grad_fn is None
    assert not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------
# declared output format (forward_intermediates, feature_info, num_prefix_tokens)

@pytest.mark.parametrize("name, stride", [("convnet", 4), ("vit", 4), ("swin", 8), ("resnet", 32)])
def test_declared_stride_and_meta_grid_match_the_real_forward(name, stride):
    from glsd.models.backbone import meta_backbone, probe_grid

    cfg = make_cfg(name)
    bb = build_backbone(cfg.model, 32).eval()
    meta = meta_backbone(cfg.model, 32)
    assert bb.stride == meta.stride == stride
    assert next(meta.model.parameters()).device.type == "meta"
    for size in (32, 16):
        assert probe_grid(meta, size) == bb.grid_size((size, size))


def test_convnet_implements_timms_intermediates_contract():
    from glsd.models.convnet import ConvNet

    net = ConvNet(widths=(8, 8, 16, 16, 24), pool_after=(1, 3)).eval()
    assert [(f["num_chs"], f["reduction"]) for f in net.feature_info] == [(8, 1), (16, 2), (24, 4)]
    x = torch.randn(2, 3, 32, 32)
    final, inter = net.forward_intermediates(x)
    torch.testing.assert_close(final, net.forward_features(x))
    assert [tuple(t.shape) for t in inter] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8)]
    (last,) = net.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(last, final)
    (first,) = net.forward_intermediates(x, indices=[0], intermediates_only=True)
    torch.testing.assert_close(first, inter[0])
    # the module layout (and so the exported state dict) is the plain Sequential of before
    assert all(k.startswith("features.") for k in net.state_dict())


def test_family_lists_have_one_home():
    import pathlib

    src = pathlib.Path(__file__).resolve().parents[1] / "src" / "glsd"
    hits = [p.name for p in src.rglob("*.py") if '"deit3"' in p.read_text()]
    assert hits == ["families.py"]


@pytest.mark.parametrize("extra, unused", [
    (["model.backbone=convnext_atto", "model.backbone_kwargs={dims: [8, 8, 8, 8], depths: [1, 1, 1, 1]}",
      "crops.global_size=64", "crops.local_size=32"], ["backbone.model.head.norm.weight", "backbone.model.head.norm.bias"]),
    (["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
      "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}"],
     ["backbone.model.fc_norm.weight", "backbone.model.fc_norm.bias"]),
    (BACKBONES["vit"][0], []), (BACKBONES["swin"][0], []), (BACKBONES["convnet"][0], []),
])
def test_parameters_no_output_uses_are_frozen_and_nothing_else_moves(extra, unused):
    """ConvNeXt's head.norm and an average-pool ViT's fc_norm are never called by
    forward_intermediates: frozen (DDP would wait for their gradients). The probe leaves the
    weights, the BatchNorm statistics and the random state as they were."""
    from glsd.models.heads import freeze_unused_parameters

    cfg = load_config(None, [*HEAD, *extra])
    net = build_network(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert freeze_unused_parameters(net, [cfg.crops.global_size, cfg.crops.local_size]) == unused
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert set(unused) <= set(frozen)


@pytest.mark.parametrize("preset", ["cpu-default", "cifar10-lowdata-cpu", "cifar10-vit-tiny"])
def test_the_presets_local_head_has_the_widths_they_name(preset):
    """local_hidden_dim / local_bottleneck_dim / local_out_dim reach the local head, each in its
    place (two swapped widths would still fit together and train): MLP in -> hidden -> hidden
    -> bottleneck, then the prototypes."""
    m = load_config(preset, ["data.source=synthetic"]).model
    net = build_network(load_config(preset, ["data.source=synthetic"]))
    linears = [(layer.in_features, layer.out_features) for layer in net.local_head.mlp
               if isinstance(layer, torch.nn.Linear)]
    hidden, bottleneck = m.local_hidden_dim or m.hidden_dim, m.local_bottleneck_dim or m.bottleneck_dim
    embed = net.backbone.embed_dim
    assert linears == [(embed, hidden), (hidden, hidden), (hidden, bottleneck)]
    assert tuple(net.local_head.last_layer.weight.shape) == (m.local_out_dim or m.out_dim, bottleneck)

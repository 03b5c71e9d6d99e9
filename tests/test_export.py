"""The exported backbone.safetensors: one call (glsd) or two lines (plain timm) rebuild the teacher."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from glsd.config import ConfigError, load_config, to_dict
from glsd.eval.features import load_backbone
from glsd.export import load_exported
from glsd.models.convnet import ConvNet
from glsd.train.checkpoint import CheckpointError, export_backbone
from glsd.train.pretrain import pretrain

TINY = ["data.source=synthetic", "data.synthetic_num_images=16", "data.num_workers=0",
        "crops.num_local=2", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
        "train.batch_size=8", "train.max_steps=2", "train.precision=fp32", "train.progress=false",
        "train.warmup_steps=0", "device=cpu"]
BACKBONES = {
    "convnet": ["model.backbone=glsd_convnet",
                "model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}"],
    "vit": ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
            "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"],
}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def tiny_run(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"export-{request.param}") / "run"
    torch.manual_seed(0)
    pretrain(load_config(None, [*TINY, *BACKBONES[request.param], f"output_dir={run}"]))
    return request.param, run


def test_load_exported_matches_checkpoint_teacher(tiny_run):
    name, run = tiny_run
    model = load_exported(run / "backbone.safetensors")
    assert not model.training
    # The checkpoint's teacher (load_backbone reads checkpoints/last.pt of a run folder).
    teacher, _, info = load_backbone(run, "teacher")
    assert info["checkpoint"].endswith("last.pt") and info["step"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), teacher.model.forward_features(x))
        student, _, _ = load_backbone(run, "student")
        assert not torch.allclose(model.forward_features(x), student.model.forward_features(x))


def test_plain_timm_one_liner(tiny_run):
    """The docstring's recipe: timm.create_model(name, num_classes=0, **kwargs) + load_file."""
    name, run = tiny_run
    if name != "vit":
        pytest.skip("glsd_convnet is not a timm model")
    import timm

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4,
                              embed_dim=32, depth=1, num_heads=2)
    model.load_state_dict(load_file(str(run / "backbone.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), load_exported(run / "backbone.safetensors")(x))


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_exported(tmp_path / "missing.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))  # no glsd metadata
    with pytest.raises(CheckpointError, match="no glsd config"):
        load_exported(bare)
    wrong = tmp_path / "wrong.safetensors"  # weights of one model, config of another
    export_backbone(wrong, ConvNet(widths=(8,), pool_after=()), to_dict(load_config(None, BACKBONES["vit"])))
    with pytest.raises(ConfigError, match="do not fit model.backbone='vit_tiny_patch16_224'"):
        load_exported(wrong)

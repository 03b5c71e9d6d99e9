"""The exported backbone.safetensors: one call (glsd) or two lines (plain timm) rebuild the teacher."""
import json
import os

import pytest
import glsd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from glsd.config import ConfigError, load_config, to_dict
from glsd.eval.features import load_backbone
from glsd.eval.runner import run_eval
from glsd.export import load_exported
from glsd.models.convnet import ConvNet
from glsd.train.checkpoint import CheckpointError, export_backbone
from glsd.train.lock import eval_output_dir
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


def test_a_run_starts_from_the_weights_it_is_given(tiny_run, tmp_path):
    """model.init_from: a run's exported backbone (or a hub file with a classifier head, left
    out) starts the next run's student and teacher; a file of another size is refused."""
    from glsd.train.pretrain import build_networks

    name, run = tiny_run
    given = load_file(str(run / "backbone.safetensors"))
    with_head = {**given, "head.weight": torch.zeros(10, 4), "head.bias": torch.zeros(10)}
    save_file(with_head, str(tmp_path / "hub.safetensors"))
    for path in (run / "backbone.safetensors", tmp_path / "hub.safetensors"):
        cfg = load_config(None, [*TINY, *BACKBONES[name], f"model.init_from={path}"])
        student, teacher = build_networks(cfg, torch.device("cpu"))
        for net in (student, teacher):
            own = net.backbone.model.state_dict()
            assert all(torch.equal(own[k], v) for k, v in given.items()), (name, path)
    fresh, _ = build_networks(load_config(None, [*TINY, *BACKBONES[name]]), torch.device("cpu"))
    assert not all(torch.equal(fresh.backbone.model.state_dict()[k], v) for k, v in given.items())
    other = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v for k, v in given.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    # A resumed run takes its weights from the checkpoint: the file is not read (nor needed).
    gone = load_config(None, [*TINY, *BACKBONES[name], f"model.init_from={tmp_path / 'deleted.safetensors'}"])
    build_networks(gone, torch.device("cpu"), initial_weights=False)
    with pytest.raises(CheckpointError, match="deleted.safetensors does not exist"):
        build_networks(gone, torch.device("cpu"))
    with pytest.raises(ConfigError, match="do not fit .*model.init_from"):
        build_networks(load_config(None, [*TINY, *BACKBONES[name], f"model.init_from={tmp_path / 'other.safetensors'}"]),
                       torch.device("cpu"))


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


# ----------------------------------------------------------------------------------------
# RUN_DIR/export/timm: plain timm loads it offline, with glsd's preprocessing

PRESET_TINY = ["data.source=synthetic", "data.synthetic_num_images=16", "data.num_workers=0",
               "crops.num_local=2", "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
               "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
               "model.local_out_dim=64", "model.local_hidden_dim=32", "train.batch_size=8",
               "train.max_steps=2", "train.precision=fp32", "train.progress=false",
               "train.warmup_steps=0", "device=cpu"]


@pytest.fixture(scope="module")
def vit_preset_run(tmp_path_factory):
    """The cifar10-vit-tiny preset (patch 4 on 32 px crops) at depth 1, two steps."""
    run = tmp_path_factory.mktemp("export-preset") / "run"
    torch.manual_seed(0)
    pretrain(load_config("cifar10-vit-tiny", [*PRESET_TINY, f"output_dir={run}"]))
    return run


def _plain_timm(folder):
    """Exactly the README's lines."""
    import json

    import timm

    cfg = json.load(open(f"{folder}/config.json"))
    # The ViT registry tags say custom_load=True (their .npz loader): timm 1.0.26-1.0.30 (the
    # declared floor and after) read the file with it unless the exported config turns it off.
    assert cfg["pretrained_cfg"]["custom_load"] is False
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{folder}/model.safetensors"),
                              **cfg["model_args"]).eval()
    return model, timm.data.resolve_data_config({}, model=model)


def test_timm_folder_gives_the_same_features_and_preprocessing(vit_preset_run):
    import json
    import stat

    import timm
    from PIL import Image

    from glsd.data.synthetic import synthetic_image
    from glsd.eval.features import eval_transform

    folder = vit_preset_run / "export" / "timm"
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["architecture"] == "vit_tiny_patch16_224"
    assert cfg_json["model_args"] == {"embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True,
                                      "img_size": 32, "patch_size": 4, "num_classes": 0}
    for path in (folder / "config.json", folder / "model.safetensors", vit_preset_run / "backbone.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    model, data_cfg = _plain_timm(folder)
    backbone, cfg, _ = load_backbone(vit_preset_run)  # the checkpoint's teacher
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}
    assert as_tuples == {"input_size": (3, 32, 32), "interpolation": "bicubic",
                        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                        "crop_pct": 1.0, "crop_mode": "center"}
    assert tuple(data_cfg["mean"]) == cfg.crops.mean and tuple(data_cfg["std"]) == cfg.crops.std
    img = synthetic_image(0, 48, 4)[0].resize((48, 40), Image.Resampling.BICUBIC)  # not square: the resize rule counts
    x_timm = timm.data.create_transform(**data_cfg)(img)
    x_glsd = eval_transform(cfg)(img)
    assert torch.allclose(x_timm, x_glsd, atol=1e-6)

    x = torch.stack([x_glsd, torch.randn(3, 32, 32)])
    with torch.no_grad():
        diff = (model(x) - backbone(x).global_feat).abs().max().item()
        one_line = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        diff_local_dir = (one_line(x) - backbone(x).global_feat).abs().max().item()
        fresh = timm.create_model("vit_tiny_patch16_224", **cfg_json["model_args"]).eval()
        assert not torch.allclose(fresh(x), model(x))  # the weights did come from the file
    print(f"plain timm vs glsd teacher: max abs diff {diff:.3g} (local-dir: {diff_local_dir:.3g})")
    assert diff < 1e-5 and diff_local_dir < 1e-5


def test_glsd_export_command_rewrites_the_folder(vit_preset_run, tmp_path):
    from helpers_tiny import cli

    out = tmp_path / "again"
    assert cli(["export", str(vit_preset_run), "--out", str(out)]) == 0
    first = vit_preset_run / "export" / "timm"
    assert (out / "config.json").read_text().replace(str(out), "") == \
        (first / "config.json").read_text().replace(str(first), "")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(first / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "pretrained_cfg_overlay" in (out / "README.md").read_text()
    assert cli(["export", str(vit_preset_run), "--out", str(out)]) == 0  # an export is replaced
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "README.md").write_text("my notes")
    assert cli(["export", str(vit_preset_run), "--out", str(photos)]) == 2  # never among other files
    assert (photos / "README.md").read_text() == "my notes" and not (photos / "config.json").exists()


def test_an_export_never_replaces_another_runs_own_export(vit_preset_run, tiny_run):
    """`glsd export RUN_A --out RUN_B/export/timm` would leave RUN_B's folder holding RUN_A's
    model (and a later `glsd eval RUN_B/export/timm` scoring the wrong one)."""
    from helpers_tiny import cli

    _, other = tiny_run
    theirs = other / "export" / "timm"
    before = (theirs / "model.safetensors").read_bytes()
    assert cli(["export", str(vit_preset_run), "--out", str(theirs)]) == 2
    assert (theirs / "model.safetensors").read_bytes() == before
    assert cli(["export", str(other)]) == 0  # its own run re-exports there


def test_convnet_folder_says_how_to_load_it(tiny_run):
    import json

    import glsd

    name, run = tiny_run
    if name != "convnet":
        pytest.skip("the ViT folder is checked with plain timm above")
    folder = run / "export" / "timm"
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["glsd"]["loader"] == "glsd" and "glsd.load_backbone" in cfg_json["glsd"]["note"]
    assert "glsd.load_backbone" in (folder / "README.md").read_text()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(glsd.load_backbone(folder)(x), load_exported(run / "backbone.safetensors")(x))


def test_eval_and_embed_take_the_export_folder(tiny_run, tmp_path):
    """What `glsd export` wrote is a valid input everywhere a backbone is: the folder or its
    model.safetensors load the teacher, and results go to the run, not into the export."""
    from helpers_tiny import cli

    name, run = tiny_run
    teacher, _, _ = load_backbone(run, "teacher")
    folder = run / "export" / "timm"
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="holds only the teacher"):
        glsd.load_backbone(folder, student=True)
    for path in (folder, folder / "model.safetensors"):
        backbone, _, info = load_backbone(path)
        assert info["run_dir"] == str(run) and info["model"] == "teacher"
        with torch.no_grad():
            assert torch.equal(backbone.model.forward_features(x), teacher.model.forward_features(x))
    out = tmp_path / "feats.npy"
    assert cli(["embed", str(folder), "synthetic", "data.synthetic_num_images=8", "--out", str(out)]) == 0
    assert out.is_file() and not list(folder.glob("eval*"))
    # Evaluated, the export is its run: the run's subset.json, the run's eval/ (and its lock).
    for path in (folder, folder / "model.safetensors"):
        assert eval_output_dir(path) == run / "eval"
        rec = run_eval("knn", path, ["eval.batch_size=8"], device="cpu", progress=False)
        assert rec["output"] == str(run / "eval" / "knn.json")
        assert rec["subset_file"] == str(run / "subset.json")
    assert not list(folder.glob("eval*"))


def test_an_earlier_checkpoint_never_replaces_the_final_models_records(tiny_run):
    """Evaluating or exporting checkpoints/epochNNNN.pt writes beside the final model's eval
    record and export folder, named after the checkpoint, not over them."""
    import shutil

    from glsd.export import export_run

    name, run = tiny_run
    earlier = run / "checkpoints" / "epoch0001.pt"
    shutil.copy(run / "checkpoints" / "last.pt", earlier)
    final = run_eval("knn", run, ["eval.batch_size=8"], device="cpu", progress=False)
    final_export = run / "export" / "timm" / "model.safetensors"
    written = final_export.stat().st_mtime_ns
    rec = run_eval("knn", earlier, ["eval.batch_size=8"], device="cpu", progress=False)
    assert rec["output"] == str(run / "eval" / "knn-epoch0001.json") and rec["checkpoint"] == str(earlier)
    assert final["output"] == str(run / "eval" / "knn.json")
    assert json.loads((run / "eval" / "knn.json").read_text())["checkpoint"] == final["checkpoint"]
    assert export_run(earlier) == run / "export" / "epoch0001"
    # The earlier export evaluated, or exported again, stays apart from the final model's too.
    rec = run_eval("knn", run / "export" / "epoch0001", ["eval.batch_size=8"], device="cpu", progress=False)
    assert rec["output"] == str(run / "eval" / "knn-epoch0001.json")
    assert export_run(run / "export" / "epoch0001") == run / "export" / "epoch0001"
    assert final_export.stat().st_mtime_ns == written
    assert json.loads((run / "eval" / "knn.json").read_text())["checkpoint"] == final["checkpoint"]
    earlier.unlink()


def test_checkpoints_outside_a_run_keep_their_exports_and_records_apart(tiny_run, tmp_path):
    """Two checkpoints copied into one folder (~/models/v1.pt, v2.pt) export to, and record their
    evaluations under, their own names; neither replaces the other's."""
    import shutil

    from glsd.export import export_run

    _, run = tiny_run
    for name in ("v1.pt", "v2.pt", "timm.pt"):
        shutil.copy(run / "checkpoints" / "last.pt", tmp_path / name)
    assert export_run(tmp_path / "v1.pt") == tmp_path / "export" / "v1"
    assert export_run(tmp_path / "v2.pt") == tmp_path / "export" / "v2"
    # not export/timm, which is where a run's final model goes
    assert export_run(tmp_path / "timm.pt") == tmp_path / "export" / "timm.pt"
    first = run_eval("knn", tmp_path / "v1.pt", ["eval.batch_size=8"], device="cpu", progress=False)
    second = run_eval("knn", tmp_path / "v2.pt", ["eval.batch_size=8"], device="cpu", progress=False)
    assert (first["output"], second["output"]) == (str(tmp_path / "eval" / "knn-v1.json"),
                                                   str(tmp_path / "eval" / "knn-v2.json"))


@pytest.mark.parametrize("name, extra", [
    ("vit pooled", ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4", "model.global_feature=pooled",
                    "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]),
    ("vit cls", ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4", "model.global_feature=cls",
                 "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]),
    ("swin", ["model.backbone=swin_tiny_patch4_window7_224",
              "model.backbone_kwargs={embed_dim: 24, depths: [1, 1], num_heads: [1, 2], window_size: 4}"]),
    ("convnext", ["model.backbone=convnext_atto", "crops.global_size=64",
                  "model.backbone_kwargs={dims: [8, 8, 8, 8], depths: [1, 1, 1, 1]}"]),
    ("resnet", ["model.backbone=resnet18", "model.backbone_kwargs={layers: [1, 1, 1, 1]}"]),
    ("vit avg-pool", ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4", "model.global_feature=pooled",
                      "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}"]),
    # trained on the class token, evaluated (and so reported) on the mean of the patch tokens
    ("vit cls, eval pooled", ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
                              "model.global_feature=cls", "eval.features=pooled",
                              "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]),
])
def test_the_export_readme_line_gives_glsds_global_feature(tmp_path, name, extra):
    """The `feats = ...` line of export/timm/README.md, run on the plain timm model, is the
    feature glsd evaluates (eval.features), for every layout (timm's own model(x) is not, for ConvNeXt or an
    average-pool ViT: it adds a norm glsd never trains)."""
    import re

    from glsd.eval.features import embed, resolve_feature
    from glsd.export import write_timm_export
    from glsd.models.backbone import build_backbone

    cfg = load_config(None, ["crops.global_size=32", *extra])
    size = cfg.crops.global_size
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, size).eval()
    write_timm_export(tmp_path, backbone.model, cfg)
    readme = (tmp_path / "README.md").read_text()
    line = re.search(r"^\s*feats = (.*?)(?:  #.*)?$", readme, re.M).group(1)
    model, _ = _plain_timm(tmp_path)
    x = torch.randn(2, 3, size, size)
    feature = resolve_feature(backbone, cfg.eval.features)
    with torch.no_grad():
        feats = eval(line, {"model": model, "x": x})
        expected = embed(backbone, x, feature)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # the README's whole snippet runs as written, on a photo
    Image.new("RGB", (50, 40), (120, 30, 200)).save(tmp_path / "photo.jpg")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(code, namespace)
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        expected = embed(backbone, namespace["x"], feature)
    torch.testing.assert_close(namespace["feats"], expected, rtol=1e-5, atol=1e-5)


def test_an_export_where_nothing_can_be_written_says_so_before_writing(tiny_run, tmp_path):
    from glsd.errors import NotWritable
    from glsd.export import export_run

    _, run = tiny_run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotWritable, match="cannot write the export in .*a part of that path is a file"):
        export_run(run, blocker / "export")
    assert blocker.read_text() == ""

"""glsd embed: one row per readable image, the backbone's features under the eval preprocessing."""
import csv
import json
import logging
import stat
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from glsd.config import load_config, to_dict
from glsd.data.synthetic import synthetic_image
from glsd.embedding import embed
from glsd.eval.features import eval_transform, load_backbone
from glsd.models.backbone import build_backbone
from glsd.train.checkpoint import export_backbone

from helpers_tiny import cli

CONVNET = ["model.backbone=glsd_convnet", "model.backbone_kwargs={widths: [8, 8, 16, 16]}",
           "data.num_workers=0", "device=cpu"]


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A random-init backbone.safetensors (embedding needs no training to be checked)."""
    path = tmp_path_factory.mktemp("model") / "backbone.safetensors"
    cfg = load_config(None, CONVNET)
    torch.manual_seed(3)
    export_backbone(path, build_backbone(cfg.model, cfg.crops.global_size).model, to_dict(cfg))
    return path


def _image_folder(root, per_class=3, classes=("cat", "dog"), size=40):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img, _ = synthetic_image(c * 10 + i, size, 4)
            img.save(root / name / f"{i}.png")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def _rows(csv_path):
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def test_embed_image_folder_cli(backbone_file, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "emb.safetensors"
    assert cli(["embed", str(backbone_file), str(data), "--out", str(out), "--local",
                "--batch-size", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "it/s" not in captured.err and "img/s" not in captured.err  # no bar off a terminal
    assert "embedded 6 images" in printed and "skipped 1 unreadable (cat/broken.jpg)" in printed

    tensors = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["skipped"] == "1" and json.loads(meta["classes"]) == ["cat", "dog"]
    assert tensors["global"].shape == (6, 16) and tensors["local"].shape == (6, 16)
    rows = _rows(tmp_path / "emb.csv")
    assert [r["row"] for r in rows] == [str(i) for i in range(6)]
    assert [r["path"] for r in rows] == ["cat/0.png", "cat/1.png", "cat/2.png",
                                         "dog/0.png", "dog/1.png", "dog/2.png"]
    assert [r["label"] for r in rows] == ["0"] * 3 + ["1"] * 3 == [str(int(y)) for y in tensors["labels"]]
    assert {r["class"] for r in rows} == {"cat", "dog"}
    for path in (out, tmp_path / "emb.csv"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

    # The same numbers as the backbone on the eval preprocessing, one image at a time.
    backbone, cfg, _ = load_backbone(backbone_file)
    transform = eval_transform(cfg)
    with torch.no_grad():
        for i, row in enumerate(rows):
            x = transform(Image.open(data / row["path"]).convert("RGB"))[None]
            ref = backbone(x)
            assert torch.allclose(tensors["global"][i], ref.global_feat[0], atol=1e-5)
            assert torch.allclose(tensors["local"][i], ref.local_feat[0].mean(dim=(0, 1)), atol=1e-5)


def test_embed_flat_folder_npy(backbone_file, tmp_path):
    data = tmp_path / "flat"
    (data / "sub").mkdir(parents=True)
    for i in range(3):
        synthetic_image(i, 36, 4)[0].save(data / f"{i}.jpg")
    synthetic_image(7, 36, 4)[0].save(data / "sub" / "deep.png")
    (data / "zero.png").write_bytes(b"")
    out = tmp_path / "feats.npy"
    res = embed(backbone_file, str(data), out, local=True, device="cpu", progress=False,
                overrides=["data.source=folder"])
    assert res.skipped == ["zero.png"] and res.keys == ["0.jpg", "1.jpg", "2.jpg", "sub/deep.png"]
    assert [p.name for p in res.files] == ["feats.npy", "feats.local.npy", "feats.csv"]
    assert np.array_equal(np.load(out), res.features.numpy())
    assert np.load(tmp_path / "feats.local.npy").shape == (4, 16)
    # Rerun without --local to the same name: the old local file (other rows) does not stay.
    embed(backbone_file, str(data), out, device="cpu", progress=False, overrides=["data.source=folder"])
    assert not (tmp_path / "feats.local.npy").exists()
    rows = _rows(tmp_path / "feats.csv")
    assert [r["label"] for r in rows] == [""] * 4 and rows[3]["path"] == "sub/deep.png"


def test_embed_zip_split_and_errors(backbone_file, tmp_path, capsys):
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, n in (("train", 2), ("test", 3)):
            for c in ("a", "b"):
                for i in range(n):
                    img, _ = synthetic_image(i, 32, 4)
                    path = tmp_path / "tmp.png"
                    img.save(path)
                    zf.write(path, f"{split}/{c}/{i}.png")
    res = embed(backbone_file, str(zpath), device="cpu", progress=False, overrides=["data.split=test"])
    assert len(res.keys) == 6 and res.keys[0] == "test/a/0.png" and res.files == []
    assert res.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert cli(["embed", str(backbone_file), str(zpath), "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors or .npy" in capsys.readouterr().err
    assert cli(["embed", str(backbone_file), str(tmp_path / "nowhere"), "--out",
                str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_only(backbone_file, tmp_path):
    """stderr on a pseudo-terminal gets the bar (off a terminal: test_embed_image_folder_cli)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from helpers_tiny import subprocess_env

    data = _image_folder(tmp_path / "data")
    cmd = [sys.executable, "-m", "glsd", "embed", str(backbone_file), str(data), "--out",
           str(tmp_path / "e.npy"), "--device", "cpu", "--batch-size", "2"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 0x0 tty gets no bar
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=subprocess_env())
    os.close(slave)
    tty_err = b""
    while True:  # read while it runs: the terminal's buffer is small
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other end is closed and drained
            break
        if not chunk:
            break
        tty_err += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0 and b"embedded 6 images" in proc.stdout.read()
    assert b"embed:" in tty_err and b"/7 [" in tty_err, tty_err


def test_embed_local_of_a_vit_is_the_mean_of_its_patches_not_its_class_token(tmp_path):
    """For the conv net the global feature is the mean of the local ones, so a --local file
    holding global features would pass unseen; a ViT's class token differs from its patches."""
    path = tmp_path / "vit.safetensors"
    cfg = load_config(None, ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
                             "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
                             "data.num_workers=0", "device=cpu"])
    torch.manual_seed(4)
    export_backbone(path, build_backbone(cfg.model, cfg.crops.global_size).model, to_dict(cfg))
    data = _image_folder(tmp_path / "data", per_class=2)
    res = embed(path, str(data), tmp_path / "e.safetensors", local=True, device="cpu", progress=False)
    tensors = load_file(str(tmp_path / "e.safetensors"))
    backbone, cfg, _ = load_backbone(path)
    x = eval_transform(cfg)(Image.open(data / res.keys[0]).convert("RGB"))[None]
    with torch.no_grad():
        out = backbone(x)
    assert torch.allclose(tensors["local"][0], out.local_feat[0].mean(dim=(0, 1)), atol=1e-5)
    assert not torch.allclose(tensors["local"][0], tensors["global"][0], atol=1e-3)


def test_embed_checks_its_output_folder_before_computing(backbone_file, tmp_path, monkeypatch):
    import glsd.embedding as embedding
    from glsd.errors import NotWritable

    (tmp_path / "file").write_bytes(b"x")
    monkeypatch.setattr(embedding, "iter_features", lambda *a, **k: pytest.fail("features computed"))
    with pytest.raises(NotWritable, match="cannot write --out e.npy .*a part of that path is a file"):
        embed(backbone_file, "synthetic", tmp_path / "file" / "e.npy", device="cpu", progress=False)


def test_embed_replaces_neither_its_model_nor_a_csv_it_did_not_write(backbone_file, tmp_path, monkeypatch):
    import shutil

    import glsd.embedding as embedding
    from glsd.config import ConfigError

    monkeypatch.setattr(embedding, "iter_features", lambda *a, **k: pytest.fail("features computed"))
    model = tmp_path / "backbone.safetensors"
    shutil.copy(backbone_file, model)
    with pytest.raises(ConfigError, match="would replace the model being embedded"):
        embed(model, "synthetic", model, device="cpu", progress=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(backbone_file, run / "backbone.safetensors")
    with pytest.raises(ConfigError, match="would replace the model being embedded"):
        embed(run, "synthetic", run / "backbone.safetensors", device="cpu", progress=False)
    (tmp_path / "train.csv").write_text("image,species\na.jpg,cat\n")  # the user's labels
    with pytest.raises(ConfigError, match=r"train.csv exists and is not a glsd embedding index"):
        embed(model, "synthetic", tmp_path / "train.npy", device="cpu", progress=False)
    assert (tmp_path / "train.csv").read_text().startswith("image,species")
    with pytest.raises(ConfigError, match="data.num_images choose the images a run pretrains on"):
        embed(model, "synthetic", None, overrides=["data.num_images=4"], device="cpu", progress=False)


def test_embed_replaces_no_weights_only_its_own_earlier_output(backbone_file, tmp_path):
    """A checkpoint's run is protected like the run folder; another model's weights, or an
    array nobody vouches for, are never replaced; an earlier embedding is."""
    import shutil

    from glsd.config import ConfigError
    from glsd.embedding import check_outputs

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    shutil.copy(backbone_file, run / "backbone.safetensors")
    with pytest.raises(ConfigError, match="would replace the model being embedded"):
        check_outputs(run / "backbone.safetensors", run / "checkpoints" / "last.pt")
    other = tmp_path / "other" / "backbone.safetensors"
    other.parent.mkdir()
    shutil.copy(backbone_file, other)
    with pytest.raises(ConfigError, match="exists and is not an embedding glsd wrote"):
        check_outputs(other, run)
    (tmp_path / "array.npy").write_bytes(b"someone's array")
    with pytest.raises(ConfigError, match="exists and is not an embedding glsd wrote"):
        check_outputs(tmp_path / "array.npy", run)
    check_outputs(run / "features.npy", run)  # a new file inside the run folder is fine
    for name in ("e.safetensors", "e.npy"):  # an earlier embedding is replaced by the new one
        embed(backbone_file, "synthetic", tmp_path / name, overrides=["data.synthetic_num_images=4"],
              device="cpu", progress=False)
        check_outputs(tmp_path / name, backbone_file)
        embed(backbone_file, "synthetic", tmp_path / name, overrides=["data.synthetic_num_images=4"],
              device="cpu", progress=False)


def test_a_class_token_feature_owns_its_memory_not_the_batch_of_tokens():
    """A CLS feature kept per batch must not be a view into the (B, 1 + N, D) tokens."""
    from glsd.eval.features import embed as embed_batch

    cfg = load_config(None, ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
                             "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
                             "model.global_feature=cls"])
    backbone = build_backbone(cfg.model, 32).eval()
    with torch.no_grad():
        for feature in ("cls", "auto"):
            g = embed_batch(backbone, torch.randn(3, 3, 32, 32), feature)
            assert g.shape == (3, 32) and g.untyped_storage().nbytes() == g.numel() * 4


def test_the_index_names_a_file_whose_name_is_not_utf8(tmp_path):
    """A name's bytes held as surrogates (os.fsdecode) are written as those bytes: the index
    names the file on disk, and nothing fails after the features are written."""
    import torch

    from glsd.embedding import EmbedResult, write_embeddings

    key = "b\udcff\udcfename.jpg"  # os.fsdecode(b"b\xff\xfename.jpg")
    result = EmbedResult(torch.zeros(2, 3), torch.tensor([0, -1]), ["a.jpg", key], ["cat"])
    files = write_embeddings(result, tmp_path / "e.npy", {})
    index = files[-1].read_bytes()
    assert b"1,b\xff\xfename.jpg,," in index and b"0,a.jpg,0,cat" in index


def test_a_size_the_model_cannot_take_is_one_line_before_any_image_is_read(backbone_file):
    """eval.image_size under a conv net's strides (a pooling error inside the model) or off a
    ViT's patch grid (timm's assertion) names the key instead of a traceback."""
    from glsd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="the model cannot take 3 px images .*set eval.image_size"):
        embed(backbone_file, "synthetic", None, overrides=["eval.image_size=3", "data.synthetic_num_images=4"],
              device="cpu", progress=False)
    with pytest.raises(ConfigError, match="eval.image_size=30 is not a multiple of the patch size"):
        load_config("cifar10-vit-tiny", ["eval.image_size=30"])


def test_a_split_the_data_does_not_have_is_named(backbone_file, tmp_path, caplog):
    """data.split=test on a folder without split folders reads every image: said before the
    features are computed, not silently; so is data.source=folder on a folder that has the
    split (it reads every split); a folder with the split reads only it, no note."""
    data = _image_folder(tmp_path / "data")
    (data / "dog" / "IMG_1.HEIC").write_bytes(b"a phone's photo")
    with caplog.at_level(logging.WARNING, logger="glsd"):
        res = embed(backbone_file, str(data), device="cpu", progress=False, overrides=["data.split=test"])
    assert len(res.keys) == 6
    assert "has no split folders (no test/ in it): data.split=test reads all 7 of its images" in caplog.text
    assert "holds 1 photo glsd cannot decode (1 .heic), left out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glsd"):
        embed(backbone_file, str(data), device="cpu", progress=False)
    assert "no split folders" not in caplog.text and "cannot decode" in caplog.text
    splits = tmp_path / "splits"
    _image_folder(splits / "train")
    _image_folder(splits / "test", per_class=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glsd"):
        res = embed(backbone_file, str(splits), device="cpu", progress=False, overrides=["data.split=test"])
        assert len(res.keys) == 2 and not caplog.text
        res = embed(backbone_file, str(splits), device="cpu", progress=False,
                    overrides=["data.split=test", "data.source=folder"])
    assert len(res.keys) == 8
    assert (f"is read as one folder (data.source=folder): all 10 images under it, every split folder's; "
            f"for the test split alone give DATA {splits / 'test'}") in caplog.text

"""glsd eval knn|linear RUN --train-data X --test-data Y: a run pretrained on unlabelled images,
evaluated on labelled folders; one headline line on stdout, the record in the file."""
import json
import re
import zipfile

import pytest
import torch

from glsd.config import dump_yaml, load_config, to_dict
from glsd.data.synthetic import synthetic_image
from glsd.eval.runner import clear_cache, run_eval
from glsd.models.backbone import build_backbone
from glsd.train.checkpoint import export_backbone

from helpers_tiny import cli

CLASSES = ("disc", "square", "triangle")


def _labelled(root, per_class, seed):
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            synthetic_image(c + len(CLASSES) * i, 32, len(CLASSES), seed=seed)[0].save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """A run folder pretrained on a flat (unlabelled) folder, with its subset.json."""
    base = tmp_path_factory.mktemp("other")
    flat = base / "photos"
    flat.mkdir()
    for i in range(5):
        synthetic_image(i, 32, 4, seed=9)[0].save(flat / f"p{i}.jpg")
    run = base / "run"
    cfg = load_config(None, ["data.source=folder", f"data.root={flat}", "data.num_workers=0",
                             "model.backbone=glsd_convnet", "model.backbone_kwargs={widths: [8, 8, 16, 16]}",
                             "eval.batch_size=8", "eval.linear_epochs=3", "device=cpu", f"output_dir={run}"])
    torch.manual_seed(5)
    run.mkdir()
    export_backbone(run / "backbone.safetensors", build_backbone(cfg.model, 32).model, to_dict(cfg))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "subset.json").write_text(json.dumps({"source": f"folder:{flat}", "split": "train",
                                                 "keys": [f"p{i}.jpg" for i in range(5)], "labels": [-1] * 5}))
    train = _labelled(base / "train", 4, seed=0)
    test = _labelled(base / "test", 3, seed=1)
    yield run, train, test
    clear_cache()


def test_unlabelled_run_names_the_fix(unlabelled_run, capsys):
    run, _, _ = unlabelled_run
    assert cli(["eval", "knn", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is unlabeled" in err and "--train-data X --test-data Y" in err
    assert "same images" not in err


def test_knn_on_another_set_prints_one_headline(unlabelled_run, capsys):
    run, train, test = unlabelled_run
    assert cli(["eval", "knn", str(run), "--train-data", str(train), "--test-data", str(test),
                "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    match = re.fullmatch(r"k-NN top-1 (\d+\.\d) % \(k=12: eval.k=20 > 12 train images, 12 train / 9 test\)", lines[0])
    assert match, lines[0]
    name = f"knn-on-{train.parent.name}_train-{test.parent.name}_test.json"
    record = json.loads((run / "eval" / name).read_text())
    assert lines[1] == f"full record: {run / 'eval' / name}"
    assert float(match.group(1)) == round(record["results"]["top1"], 1)
    assert record["train_data"] == str(train) and record["test_data"] == str(test)
    assert record["subset_file"] is None and (record["n_train"], record["n_test"]) == (12, 9)

    assert cli(["eval", "knn", str(run), "--train-data", str(train), "--test-data", str(test),
                "--device", "cpu", "--json", "eval.max_test_images=6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_test"] == 6 and printed["max_test_images"] == 6


def test_linear_and_max_test_images(unlabelled_run, capsys):
    run, train, test = unlabelled_run
    rec = run_eval("linear", run, ["eval.max_test_images=3"], device="cpu", train_data=str(train),
                   test_data=str(test), progress=False)
    assert rec["n_test"] == 3 and rec["n_train"] == 12
    assert cli(["eval", "linear", str(run), "--train-data", str(train), "--test-data", str(test),
                "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"linear top-1 \d+\.\d % \(3 epochs, 12 train / 9 test\)", out[0]), out[0]


def test_data_overrides_set_how_the_named_set_is_read(unlabelled_run, tmp_path):
    """data.jpeg_draft / data.on_error given with another set decide how its files are read
    (the record's config says what was used), and a bad file there is skipped, not fatal."""
    run, train, test = unlabelled_run
    broken = tmp_path / "test"
    for f in test.rglob("*.png"):
        (broken / f.parent.name).mkdir(parents=True, exist_ok=True)
        (broken / f.parent.name / f.name).write_bytes(f.read_bytes())
    (broken / CLASSES[0] / "bad.png").write_bytes(b"not an image")
    rec = run_eval("knn", run, ["data.jpeg_draft=false"], device="cpu", train_data=str(train),
                   test_data=str(broken), progress=False)
    assert rec["config"]["data"]["jpeg_draft"] is False and rec["config"]["data"]["on_error"] == "skip"
    assert rec["n_test"] == 9  # the bad file skipped
    with pytest.raises(Exception, match="bad.png"):
        run_eval("knn", run, ["data.on_error=fail"], device="cpu", train_data=str(train),
                 test_data=str(broken), progress=False)


def test_one_zip_with_train_and_test_splits(unlabelled_run, tmp_path):
    run, train, test = unlabelled_run
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, folder in (("train", train), ("test", test)):
            for f in sorted(folder.rglob("*.png")):
                zf.write(f, f"{split}/{f.relative_to(folder)}")
    rec = run_eval("knn", run, device="cpu", train_data=str(zpath), progress=False)
    assert rec["output"] == str(run / "eval" / "knn-on-set.zip.json")
    assert rec["train_source"].endswith(":train") and rec["test_source"].endswith(":test")
    assert (rec["n_train"], rec["n_test"], rec["num_classes"]) == (12, 9, 3)
    dense = run_eval("dense", run, ["eval.dense_num_images=4"], device="cpu", test_data=str(test),
                     progress=False)
    assert dense["test_data"] == str(test) and dense["results"]["n_images"] == 4


def test_a_zip_without_split_folders_is_not_its_own_test_set(unlabelled_run, tmp_path, capsys, monkeypatch):
    """A zip of <class>/* has no test split: its train and test are the same images, so k-NN
    refuses them (as it does a folder without split sub-folders) instead of scoring the
    images against themselves."""
    run, train, _ = unlabelled_run
    zpath = tmp_path / "classes.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(train.rglob("*.png")):
            zf.write(f, str(f.relative_to(train)))
    assert cli(["eval", "knn", str(run), "--train-data", str(zpath), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no 'test' split folder beside 'train' ones, so both read the same images" in err
    assert cli(["eval", "seg", str(run), "--train-data", str(zpath), "--device", "cpu"]) == 2
    assert "the labelled dense probe (seg) needs held-out labelled images" in capsys.readouterr().err
    # Written two ways (relative, and through a link), one labelled folder is still one set.
    (tmp_path / "link").symlink_to(train)
    monkeypatch.chdir(train.parent)
    assert cli(["eval", "knn", str(run), "--train-data", train.name, "--test-data",
                str(tmp_path / "link"), "--device", "cpu"]) == 2
    assert "read the same images" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="not held out"):  # dense on the pretraining images
        run_eval("dense", run, [f"data.root={zpath}", "data.source=auto", "eval.dense_num_images=2"],
                 device="cpu", progress=False)
    photos = run.parent / "photos"  # the run's own pretraining folder, named as the test set
    with pytest.warns(UserWarning, match=f"--test-data {photos} reads the pretraining images"):
        run_eval("dense", run, ["eval.dense_num_images=2"], device="cpu", test_data=str(photos),
                 progress=False)


def test_records_of_two_sets_laid_out_alike_do_not_overwrite_each_other():
    from glsd.eval.runner import data_slug

    a, b = data_slug("/d/a/train", "/d/a/test"), data_slug("/d/b/train/", "/d/b/test")
    assert (a, b) == ("-on-a_train-a_test", "-on-b_train-b_test")
    assert data_slug("/d/pets.zip", None) == "-on-pets.zip" and data_slug("/d/pets", None) == "-on-pets"
    assert data_slug(None, None) == ""
    assert data_slug("cifar10", None) == "-on-cifar10" and data_slug("train", "test") == "-on-train-test"
    # Y as the test set of the run's own images, or as both train and test: two records.
    assert data_slug(None, "/d/pets") == "-on-run-pets" != data_slug("/d/pets", None)
    assert data_slug(None, "/d/pets", labelled_train=False) == "-on-pets"  # dense: test images only


def test_dense_refuses_train_data_naming_test_data(unlabelled_run, capsys):
    run, train, _ = unlabelled_run
    assert cli(["eval", "dense", str(run), "--train-data", str(train), "--device", "cpu"]) == 2
    assert f"--test-data {train}" in capsys.readouterr().err


def test_the_headline_gives_the_k_it_used_and_a_split_folder_alone_names_test_data(unlabelled_run, capsys):
    run, train, test = unlabelled_run
    assert cli(["eval", "knn", str(run), "--train-data", str(train), "--test-data", str(test),
                "eval.k=100", "--device", "cpu"]) == 0
    assert "(k=12: eval.k=100 > 12 train images, 12 train / 9 test)" in capsys.readouterr().out
    assert cli(["eval", "knn", str(run), "--train-data", str(train), "--device", "cpu"]) == 2
    assert "--test-data Y" in capsys.readouterr().err


def test_a_stray_image_at_the_top_of_a_labelled_tree_is_named_as_the_reason(unlabelled_run, tmp_path, capsys):
    import shutil

    run, train, test = unlabelled_run
    stray = tmp_path / "labelled"
    shutil.copytree(train, stray)
    synthetic_image(0, 32, 3)[0].save(stray / "stray.jpg")
    assert cli(["eval", "knn", str(run), "--train-data", str(stray), "--test-data", str(test),
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "because of its 1 images at the top level" in err and "data.source=imagefolder" in err

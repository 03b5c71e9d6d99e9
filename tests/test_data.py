"""Data sources, image modes and subsets (the views and their geometry: test_views.py)."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from glsd.config import ConfigError, DataConfig
from glsd.data.layout import detect_kind
from glsd.data.sources import balanced_subset, open_source, to_rgb


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (10, 7))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (10, 7)


def test_palette_with_transparency_becomes_rgb():
    img = Image.new("P", (4, 4))
    img.info["transparency"] = 0
    assert to_rgb(img).mode == "RGB"


def _folder_tree(root, classes=("a", "b"), per_class=3, size=(12, 9), mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, color=i * 40).save(root / c / f"{i}.png")


def test_imagefolder_source_reads_rgb(tmp_path):
    _folder_tree(tmp_path / "data", mode="L")
    src = open_source(DataConfig(root=str(tmp_path / "data")))
    assert src.classes == ["a", "b"] and len(src) == 6 and src.labels == [0, 0, 0, 1, 1, 1]
    assert src.read(src.keys[0]).mode == "RGB"


def test_flat_folder_source_is_unlabelled(tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    src = open_source(DataConfig(root=str(tmp_path)))
    assert len(src) == 4 and set(src.labels) == {-1}


def test_zip_source_reads_in_place_and_checks_split(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                for i in range(2):
                    zf.writestr(f"{split}/{c}/{i}.png", _png(Image.new("RGBA", (6, 6))))
    src = open_source(DataConfig(root=str(path), split="test"))
    assert len(src) == 4 and src.classes == ["cat", "dog"]
    assert src.read(src.keys[-1]).mode == "RGB"
    with pytest.raises(ConfigError, match="available: test, train"):
        open_source(DataConfig(root=str(path), split="val"))


def test_a_zip_takes_split_folders_by_the_folder_rule_not_by_depth(tmp_path):
    """Photos by year/month are classes (as the same folder on disk is), not splits; a split
    zip without class folders is that split's images, unlabelled, never the test images too."""
    by_date = tmp_path / "photos.zip"
    with zipfile.ZipFile(by_date, "w") as zf:
        for year, month in (("2019", "01"), ("2019", "02"), ("2020", "03")):
            zf.writestr(f"{year}/{month}/a.png", _png(Image.new("RGB", (6, 6))))
    src = open_source(DataConfig(root=str(by_date)))
    assert src.classes == ["2019", "2020"] and len(src) == 3 and src.name == f"zip:{by_date}"
    unlabelled = tmp_path / "split.zip"
    with zipfile.ZipFile(unlabelled, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/a.png", _png(Image.new("RGB", (6, 6))))
    train = open_source(DataConfig(root=str(unlabelled)))
    assert train.keys == ["train/a.png"] and train.labels == [-1] and train.classes == []
    assert open_source(DataConfig(root=str(unlabelled), split="test")).keys == ["test/a.png"]
    with pytest.raises(ConfigError, match="split 'val' not in .*available: test, train"):
        open_source(DataConfig(root=str(unlabelled), split="val"))


def test_a_stray_image_beside_split_folders_does_not_make_them_one_pile(tmp_path):
    _folder_tree(tmp_path / "d" / "train")
    _folder_tree(tmp_path / "d" / "test")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "preview.jpg")
    kind, why = detect_kind(str(tmp_path / "d"))
    assert kind == "imagefolder" and "the 1 images at the top level are not read" in why
    src = open_source(DataConfig(root=str(tmp_path / "d")))
    assert src.classes == ["a", "b"] and all(not k.startswith("test") for k in src.keys)


def test_what_copying_tools_leave_beside_photos_is_not_read(tmp_path):
    # A Mac's ._ resource forks, a NAS's @eaDir thumbnails and .DS_Store are not the dataset's.
    _folder_tree(tmp_path / "data", per_class=2)
    (tmp_path / "data" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "data" / "a" / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / "data" / "._cover.png").write_bytes(b"\x00")  # not a top-level image: still classes
    _folder_tree(tmp_path / "data" / "@eaDir", classes=("0.png",), per_class=1)
    src = open_source(DataConfig(root=str(tmp_path / "data")))
    assert src.classes == ["a", "b"] and len(src) == 4 and "a/._0.png" not in src.keys
    flat = open_source(DataConfig(root=str(tmp_path / "data" / "a"), source="folder"))
    assert sorted(flat.keys) == ["0.png", "1.png"]


def test_a_zipped_folder_is_read_through_its_wrapper_and_without_macos_forks(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:  # what Finder's "Compress" makes of mydata/
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                zf.writestr(f"mydata/{split}/{c}/0.png", _png(Image.new("RGB", (6, 6))))
                zf.writestr(f"__MACOSX/mydata/{split}/{c}/._0.png", b"\x00\x05\x16\x07")
    src = open_source(DataConfig(root=str(path), split="test"))
    assert src.classes == ["cat", "dog"] and src.keys == ["mydata/test/cat/0.png", "mydata/test/dog/0.png"]
    assert src.labels == [0, 1] and src.read(src.keys[0]).size == (6, 6)
    assert open_source(DataConfig(root=str(path), split="train")).name != src.name
    classes_only = tmp_path / "c.zip"
    with zipfile.ZipFile(classes_only, "w") as zf:
        for c in ("cat", "dog"):
            zf.writestr(f"photos/{c}/0.png", _png(Image.new("RGB", (6, 6))))
    src = open_source(DataConfig(root=str(classes_only)))
    assert src.classes == ["cat", "dog"] and src.name == f"zip:{classes_only}"


def test_a_folder_of_photos_glsd_cannot_decode_says_so(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"not decodable here")
    with pytest.raises(ConfigError, match=r"holds \.heic files, which glsd cannot decode: convert"):
        open_source(DataConfig(root=str(tmp_path)))


def test_photos_glsd_cannot_decode_among_images_are_counted(tmp_path):
    """A phone folder of JPEGs and HEICs trains on the JPEGs; the HEICs are counted, by kind, in
    every layout (folder, class folders, a zip's split), so that a note can say so."""
    flat = tmp_path / "flat"
    (flat / "2024").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "a.jpg")
    for name in ("2024/b.HEIC", "2024/c.heic", "d.dng", ".hidden.heic", "notes.txt"):
        (flat / name).write_bytes(b"x")
    src = open_source(DataConfig(root=str(flat)))
    assert src.keys == ["a.jpg"] and src.undecodable == {".heic": 2, ".dng": 1}
    classes = tmp_path / "classes"
    for c in ("cat", "dog"):
        (classes / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(classes / c / "0.jpg")
        (classes / c / "1.heic").write_bytes(b"x")
    assert open_source(DataConfig(root=str(classes))).undecodable == {".heic": 2}
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split, extra in (("train", "x.heic"), ("test", "y.cr2")):
            zf.writestr(f"mydata/{split}/cat/0.png", _png(Image.new("RGB", (6, 6))))
            zf.writestr(f"mydata/{split}/cat/{extra}", b"x")
    assert open_source(DataConfig(root=str(path), split="test")).undecodable == {".cr2": 1}
    assert open_source(DataConfig(root=str(classes / "cat"), source="folder")).undecodable == {".heic": 1}


def test_split_folders_without_classes_point_at_the_split_not_the_root(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / split / "0.jpg")
    with pytest.raises(ConfigError, match=f"data.source=folder data.root={tmp_path / 'train'} "):
        open_source(DataConfig(root=str(tmp_path), source="imagefolder"))


def test_imagenets_flat_val_split_says_to_sort_it_into_class_folders(tmp_path):
    """ImageNet as distributed: train/<wnid>/, val/ flat. Evaluating on val/ must not only
    offer to read it unlabelled (which pretraining would take as "use val as training data")."""
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n01440764" / "a.JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ConfigError, match=r"split 'val' .* no labels: .* sort them into .*val/<class>/ .*"
                                          r"LOC_val_solution\.csv"):
        open_source(DataConfig(root=str(tmp_path), source="imagefolder"), "val")


def test_split_folders_named_otherwise_are_not_read_as_classes(tmp_path):
    # A Kaggle-style download: Training/ and Testing/, each with the class folders.
    _folder_tree(tmp_path / "Training")
    _folder_tree(tmp_path / "Testing")
    with pytest.raises(ConfigError, match="split 'train' not in .*available: Testing, Training "
                                          r"\(set data.split\)"):
        open_source(DataConfig(root=str(tmp_path)))
    assert open_source(DataConfig(root=str(tmp_path), split="Training")).classes == ["a", "b"]


def test_a_home_relative_root_is_expanded(tmp_path, monkeypatch):
    _folder_tree(tmp_path / "photos")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(open_source(DataConfig(root="~/photos"))) == 6


def test_linked_folders_are_read_once_even_in_a_loop(tmp_path):
    _folder_tree(tmp_path / "elsewhere", classes=("x",), per_class=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere" / "x")
    (tmp_path / "data" / "linked_again").symlink_to(tmp_path / "data")  # a loop
    src = open_source(DataConfig(root=str(tmp_path / "data"), source="folder"))
    assert src.keys == ["linked/0.png", "linked/1.png"]


def test_a_link_to_a_folder_above_the_root_is_skipped_and_named(tmp_path, caplog):
    """A link to '..' (or to the home folder) would pull in every image beside the root."""
    _folder_tree(tmp_path / "sibling", classes=("x",), per_class=3)
    _folder_tree(tmp_path / "data", classes=("a",), per_class=2)
    (tmp_path / "data" / "a" / "up").symlink_to(tmp_path)
    with caplog.at_level("WARNING", logger="glsd"):
        src = open_source(DataConfig(root=str(tmp_path / "data"), source="folder"))
    assert src.keys == ["a/0.png", "a/1.png"]
    assert "skipping the linked folder" in caplog.text and "a/up" in caplog.text


def test_a_link_from_one_class_into_another_is_skipped_and_named(tmp_path, caplog):
    """cat/more -> ../dog would list dog's images twice, once labelled cat; a link to a folder
    outside the classes is still followed."""
    _folder_tree(tmp_path / "data", classes=("cat", "dog"), per_class=2)
    _folder_tree(tmp_path / "extra", classes=("x",), per_class=1)
    (tmp_path / "data" / "cat" / "more").symlink_to(tmp_path / "data" / "dog")
    (tmp_path / "data" / "dog" / "outside").symlink_to(tmp_path / "extra" / "x")
    with caplog.at_level("WARNING", logger="glsd"):
        src = open_source(DataConfig(root=str(tmp_path / "data")))
    assert src.keys == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/outside/0.png"]
    assert src.labels == [0, 0, 1, 1, 1]
    assert "cat/more" in caplog.text and "another class's folder" in caplog.text


def test_a_class_folder_that_is_a_link_to_another_is_refused(tmp_path):
    _folder_tree(tmp_path / "data", classes=("cat", "dog"), per_class=1)
    (tmp_path / "data" / "kitty").symlink_to(tmp_path / "data" / "cat")
    with pytest.raises(ConfigError, match="class folders cat, kitty of .* are one folder"):
        open_source(DataConfig(root=str(tmp_path / "data")))


def test_balanced_subset_keeps_class_proportions_and_is_seeded():
    src = open_source(DataConfig(source="synthetic", synthetic_num_images=100, synthetic_num_classes=4))
    keys = balanced_subset(src, fraction=0.2, seed=3)
    labels = [src.labels[src.keys.index(k)] for k in keys]
    assert len(keys) == 20 and all(labels.count(c) == 5 for c in range(4))
    assert keys == balanced_subset(src, fraction=0.2, seed=3)
    assert keys != balanced_subset(src, fraction=0.2, seed=4)
    assert len(balanced_subset(src, num_images=7, seed=0)) == 7


@pytest.mark.parametrize("text", ["{not json", '{"source": "x"}', "[1, 2]", b'{"keys": ["\xff\xfe"]}'])
def test_a_damaged_subset_record_is_a_config_error(tmp_path, text):
    """The run's subset.json decides which images a resumed run and its evaluation use: a
    damaged one is refused with the fix, never a traceback or a silently other subset."""
    from glsd.config import ConfigError, load_config
    from glsd.data.subset import SUBSET_FILE, select_images

    record = tmp_path / SUBSET_FILE
    record.write_bytes(text) if isinstance(text, bytes) else record.write_text(text)  # bytes: not UTF-8
    cfg = load_config(None, ["data.source=synthetic", "data.synthetic_num_images=16"])
    with pytest.raises(ConfigError, match="subset.json.*delete it"):
        select_images(cfg, tmp_path)


def test_epoch_orders_of_study_seeds_are_unrelated():
    """Seeds pick a study's subsets and initialisations; their epoch orders must not be each
    other's shifted copies, as ``seed + epoch`` made them (rule 1, kept for old checkpoints)."""
    from glsd.data.loader import ResumableSampler

    def order(seed, epoch, rule):
        sampler = ResumableSampler(64, 8, seed, order_rule=rule)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler._my_samples()]

    assert order(1, 0, rule=1) == order(0, 1, rule=1)  # the old rule's overlap
    assert order(1, 0, rule=2) != order(0, 1, rule=2)
    assert order(0, 0, rule=2) != order(0, 1, rule=2) and order(3, 2, rule=2) == order(3, 2, rule=2)
    assert sorted(order(1, 0, rule=2)) == list(range(64))


def test_a_checkpoint_resumes_under_the_epoch_order_it_was_trained_on(tmp_path, monkeypatch):
    """New runs record rule 2; a checkpoint without the key (made before it) resumes under
    rule 1, so its remaining epochs see the orders an uninterrupted run would have seen."""
    import glsd.train.pretrain as pretrain_mod
    from glsd.train.checkpoint import load_checkpoint, save_checkpoint
    from helpers_tiny import tiny_config

    seen = []
    real_loop = pretrain_mod.train_loop

    def loop(ctx, state, stop):
        seen.append(ctx.sampler.order_rule)
        return real_loop(ctx, state, stop)

    monkeypatch.setattr(pretrain_mod, "train_loop", loop)
    pretrain_mod.pretrain(tiny_config(tmp_path / "run", "train.max_steps=2"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["order_rule"] == 2
    del ckpt["order_rule"]
    save_checkpoint(last, ckpt)
    pretrain_mod.pretrain(tiny_config(tmp_path / "run", "train.max_steps=3"))
    assert seen == [2, 1] and load_checkpoint(last)["order_rule"] == 1


def test_an_unknown_epoch_order_rule_is_refused(tmp_path):
    from glsd.errors import CheckpointError
    from glsd.train.checkpoint import load_checkpoint, save_checkpoint
    from glsd.train.pretrain import pretrain
    from helpers_tiny import tiny_config
    pretrain(tiny_config(tmp_path / "run", "train.max_steps=1"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["order_rule"] = 7
    save_checkpoint(last, ckpt)
    with pytest.raises(CheckpointError, match="epoch order rule 7"):
        pretrain(tiny_config(tmp_path / "run", "train.max_steps=2"))


def test_packed_strings_give_back_every_key_exactly():
    from glsd.data.packed import PackedStrings

    keys = ["cat/a.jpg", "", "chien/été.png", "bad/\udcff\udcfe.jpg", "x" * 300]  # a non-UTF-8 name
    packed = PackedStrings(keys)
    assert len(packed) == 5 and [packed[i] for i in range(5)] == keys
    assert packed[-1] == keys[-1] and packed[np.int64(2)] == keys[2]
    with pytest.raises(IndexError):
        packed[5]
    assert len(PackedStrings([])) == 0


def test_the_training_dataset_holds_no_python_object_per_image(tmp_path):
    """A forked loader worker reading a list[str] copies its pages (reference counts); the
    dataset keeps keys and labels packed, and the source it reads through without its lists."""
    import pickle

    from glsd.data.multicrop import DecodeToSquare, MultiCropDataset

    _folder_tree(tmp_path / "data")
    source = open_source(DataConfig(root=str(tmp_path / "data")))
    dataset = MultiCropDataset(source, DecodeToSquare(16))
    assert dataset.source.keys == [] and dataset.source.labels == [] and len(dataset) == len(source) > 1
    for i in range(len(source)):
        assert dataset[i][2] == source.labels[i] and dataset[(3, 7, i)][3:] == (i, 3, 7)
    state = pickle.dumps(dataset)  # what a spawned worker receives
    assert not any(key.encode() in state.replace(dataset.keys._buffer, b"") for key in source.keys)


def test_a_zip_with_a_name_twice_counts_it_once_and_says_so(tmp_path, caplog):
    import warnings

    path = tmp_path / "dup.zip"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for name in ("a/0.png", "a/1.png", "b/0.png", "a/1.png"):
            zf.writestr(name, buf.getvalue())
    src = open_source(DataConfig(root=str(path)))
    assert src.keys == ["a/0.png", "a/1.png", "b/0.png"] and src.labels == [0, 0, 1]
    assert "holds 1 image names twice or more; each is read from its last copy" in caplog.text

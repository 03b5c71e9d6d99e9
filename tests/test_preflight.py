"""Pre-flight checks (glsd.train.preflight): degenerate or failing set-ups are refused before
the first step, naming the fix; a warm-up longer than the run is scaled and said so; a resume
under a changed schedule is refused unless train.extend=true. Folder detection's rule."""
import dataclasses

import pytest
from PIL import Image

from glsd.config import ConfigError, load_config
from glsd.data.sources import detect_kind, open_source
from glsd.train.preflight import check_grids, preflight, scale_warmup, short_run_notes
from glsd.train.schedules import teacher_temperature, warmup_steps
from helpers_tiny import CONVNET, read_metrics, tiny_config

SWIN = ["model.backbone=swin_tiny_patch4_window7_224",
        "model.backbone_kwargs={embed_dim: 24, depths: [1, 1], num_heads: [1, 2], window_size: 4}"]


def _cfg(*overrides):
    return load_config(None, ["crops.global_size=32", "crops.local_size=16", *overrides])


def test_grids_of_the_tiny_backbones():
    assert check_grids(_cfg(*CONVNET)) == ({"global 32 px": (8, 8), "local 16 px": (4, 4)}, 4)
    assert check_grids(_cfg(*SWIN)) == ({"global 32 px": (4, 4), "local 16 px": (2, 2)}, 8)
    vit = ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4"]
    assert check_grids(_cfg(*vit))[0] == {"global 32 px": (8, 8), "local 16 px": (4, 4)}


def test_resnet18_at_32_16_px_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        check_grids(_cfg("model.backbone=resnet18", "model.backbone_kwargs={}"))
    msg = str(e.value)
    assert "crops.global_size=32 gives a 1x1 feature grid with resnet18 (stride 32)" in msg
    assert "loss.matching=none" in msg and "at least 64 px" in msg
    assert "crops.local_size=16 is not a multiple of resnet18's stride 32" in msg
    # without a local loss a 1x1 grid is fine; the off-stride local crop is still refused
    with pytest.raises(ConfigError) as e:
        check_grids(_cfg("model.backbone=resnet18", "loss.matching=none"))
    assert "1x1" not in str(e.value) and "nearest valid sizes: 32" in str(e.value)
    assert check_grids(_cfg("model.backbone=resnet18", "loss.matching=none", "crops.local_size=32"))[1] == 32


@pytest.mark.parametrize("extra, key, valid", [
    (CONVNET + ["crops.global_size=30"], "crops.global_size=30", "28 or 32"),
    (SWIN + ["crops.local_size=20"], "crops.local_size=20", "16 or 24"),
    (["model.backbone=resnet18", "crops.global_size=80", "crops.local_size=64"], "crops.global_size=80", "64 or 96"),
])
def test_crop_sizes_off_the_stride_name_the_nearest_valid_sizes(extra, key, valid):
    with pytest.raises(ConfigError) as e:
        check_grids(_cfg(*extra))
    assert key in str(e.value) and f"nearest valid sizes: {valid}" in str(e.value)


def test_a_crop_the_backbone_cannot_take_names_the_minimum_size():
    with pytest.raises(ConfigError) as e:
        check_grids(_cfg("model.backbone=convnext_atto", "loss.matching=none"))
    msg = str(e.value)
    assert "convnext_atto cannot take crops.local_size=16" in msg and "its minimum is 32 px" in msg
    assert "Traceback" not in msg


def test_a_backbone_fixed_at_one_size_is_named_as_such():
    # BEiT takes no dynamic input size: "raise crops.local_size to 224" would be no fix
    cfg = load_config("imagenet-swin-t", ["model.backbone=beit_base_patch16_224", "model.backbone_kwargs={}"])
    with pytest.raises(ConfigError, match=r"beit_base_patch16_224 takes only 224 px crops.*crops.local_size=96"):
        check_grids(cfg)
    small = load_config("cifar10-vit-tiny", ["model.backbone=beit_base_patch16_224", "model.backbone_kwargs={}",
                                              "model.patch_size=16", "crops.global_size=64", "crops.local_size=32"])
    with pytest.raises(ConfigError, match=r"takes only 64 px crops.*crops.local_size=32"):
        check_grids(small)  # built for the global crop, whatever it is


def test_warmup_longer_than_the_run_is_scaled_and_said():
    cfg = tiny_config("unused", "train.epochs=5", "train.warmup_epochs=10", "train.warmup_steps=null")
    scaled, note = scale_warmup(cfg, steps_per_epoch=4)  # 20 steps, warm-up 40
    assert scaled.train.warmup_steps is None and scaled.train.warmup_epochs == 0.5
    assert warmup_steps(scaled, 4) == 2 and "train.warmup_epochs=10 (40 steps)" in note
    assert "longer than the run (20 steps)" in note and "scaled to 2 steps (train.warmup_epochs=0.5" in note
    # Recorded in epochs: another world size (here half the steps per epoch) scales it the same.
    assert scale_warmup(cfg, steps_per_epoch=2)[0] == scaled
    same, none = scale_warmup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=50)), 4)
    assert none is None and same.train.warmup_steps is None


def test_a_short_run_is_told_what_it_never_gets_past():
    base = ("train.max_steps=null", "train.epochs=2", "train.freeze_last_layer_epochs=1",
            "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
            "loss.warmup_teacher_temp_epochs=30", "train.warmup_steps=4")
    notes = short_run_notes(tiny_config("unused", *base), steps_per_epoch=4)  # 8 steps
    assert notes == ["the teacher temperature's warm-up (120 steps) is longer than the run (8), "
                     "so it is spread over the whole run: the teacher reaches loss.teacher_temp=0.07 "
                     "only at the last step; lower loss.warmup_teacher_temp_epochs"]  # frozen 4 of 8: not said
    temps = teacher_temperature(0.04, 0.07, warmup_steps=120, total_steps=8)  # what the note says
    assert len(temps) == 8 and temps[-1] == pytest.approx(0.07) and (temps[:-1] < 0.07).all()
    stopped = short_run_notes(tiny_config("unused", *base, "train.max_steps=5"), steps_per_epoch=4)
    assert stopped == ["the run stops at step 5, inside the teacher temperature's 8-step warm-up: it "
                       "never reaches loss.teacher_temp=0.07; lower loss.warmup_teacher_temp_epochs"]
    frozen = short_run_notes(tiny_config("unused", *base, "train.freeze_last_layer_epochs=2"), 4)
    assert frozen[0].startswith("the prototypes are frozen for 8 steps, the whole run (8): they never train")
    smoke = short_run_notes(tiny_config("unused", "train.epochs=100", "train.warmup_steps=40",
                                        "train.max_steps=5", "train.freeze_last_layer_steps=0",
                                        "loss.warmup_teacher_temp_epochs=0"), 4)
    assert smoke == ["train.max_steps=5 stops inside the learning-rate warm-up (40 steps of the "
                     "400-step schedule): the learning rate stays near 0 (a smoke test; for a "
                     "short real run lower train.epochs instead)"]
    assert short_run_notes(tiny_config("unused", "train.epochs=100", "train.warmup_steps=40",
                                       "train.max_steps=null"), 4) == []  # a long run: silent


def test_scaled_warmup_is_what_the_run_records(tmp_path, capsys):
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.epochs=1", "train.warmup_steps=null", "train.warmup_epochs=10",
                         "train.max_steps=1"))
    assert "warm-up train.warmup_epochs=10 (40 steps) is longer than the run" in capsys.readouterr().err
    assert "warmup_epochs: 0.1" in (run / "config.yaml").read_text()


def test_resume_under_a_changed_schedule_is_refused_or_extended(tmp_path, capsys):
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.epochs=1", "train.max_steps=null"))  # 4 steps: finished
    pretrain(tiny_config(run, "train.epochs=1", "train.max_steps=null"))  # the same: nothing to do
    assert "nothing to train: the run is already at step 4" in capsys.readouterr().err
    with pytest.raises(ConfigError) as e:
        pretrain(tiny_config(run, "train.epochs=2", "train.batch_size=4", "train.max_steps=null"))
    msg = str(e.value)
    assert "train.epochs: 1 -> 2" in msg and "train.batch_size: 8 -> 4" in msg and "train.extend=true" in msg
    pretrain(tiny_config(run, "train.epochs=2", "train.extend=true", "train.max_steps=null"))
    err = capsys.readouterr().err
    assert "resumed at step 4" in err and "continues under the new schedule (train.epochs: 1 -> 2)" in err
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 8


def test_a_warmup_the_run_scaled_is_named_as_scaled_in_a_schedule_change(tmp_path):
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    # warm-up of 10 epochs in a 1-epoch run: scaled to 0.1 epochs, then to 0.2 in a 2-epoch one
    pretrain(tiny_config(run, "train.epochs=1", "train.max_steps=null", "train.warmup_steps=null",
                         "train.warmup_epochs=10"))
    with pytest.raises(ConfigError, match=r"train.warmup_epochs: 0.1 -> 0.2 \(scaled with the run length\)"):
        pretrain(tiny_config(run, "train.epochs=2", "train.max_steps=null", "train.warmup_steps=null",
                             "train.warmup_epochs=10"))


def test_a_run_recorded_before_the_clipping_keys_resumes_under_its_own_rule(tmp_path):
    """A config.yaml without train.clip_grad_mode was trained with a global norm and an
    undecayed weight-norm magnitude: today's defaults would change that mid-run."""
    import yaml

    from glsd.train.pretrain import pretrain

    old_rule = ["train.clip_grad_mode=global", "train.decay_weightnorm_magnitude=false"]
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=1", *old_rule))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("clip_grad_mode", "decay_weightnorm_magnitude"):
        del raw["train"][key]
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    # The optimizer's parameter groups follow the magnitude's decay: refused even with extend.
    with pytest.raises(ConfigError, match="Resume with train.decay_weightnorm_magnitude=false"):
        pretrain(tiny_config(run, "train.max_steps=2", "train.extend=true"))
    with pytest.raises(ConfigError, match="train.clip_grad_mode: 'global' -> 'per_param'"):
        pretrain(tiny_config(run, "train.max_steps=2", "train.decay_weightnorm_magnitude=false"))
    pretrain(tiny_config(run, "train.max_steps=2", *old_rule))
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 2


# ---------------------------------------------------------------------------------------
# folder detection

def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_flat_folder_with_a_hidden_subfolder_keeps_every_image(tmp_path):
    for name in ("a.jpg", "b.png", "trip/c.jpg", "trip/deeper/d.jpg", ".thumbs/a.jpg"):
        _image(tmp_path / name)
    kind, why = detect_kind(str(tmp_path))
    assert kind == "folder" and "2 images at the top level" in why
    cfg = load_config(None, [f"data.root={tmp_path}"])
    src = open_source(cfg.data)
    assert src.keys == ["a.jpg", "b.png", "trip/c.jpg", "trip/deeper/d.jpg"] and src.classes == []
    forced = open_source(load_config(None, [f"data.root={tmp_path}", "data.source=imagefolder"]).data)
    assert forced.classes == ["trip"] and forced.keys == ["trip/c.jpg", "trip/deeper/d.jpg"]


def test_class_folders_are_an_imagefolder_and_folder_forces_unlabelled(tmp_path):
    for name in ("cat/1.jpg", "cat/sub/2.jpg", "dog/3.jpg", ".cache/x.jpg"):
        _image(tmp_path / name)
    assert detect_kind(str(tmp_path)) == ("imagefolder", "2 sub-folders and no images at the top level")
    src = open_source(load_config(None, [f"data.root={tmp_path}"]).data)
    assert src.classes == ["cat", "dog"] and src.labels == [0, 0, 1]
    flat = open_source(load_config(None, [f"data.root={tmp_path}", "data.source=folder"]).data)
    assert flat.labels == [-1, -1, -1] and "cat/sub/2.jpg" in flat.keys


def test_the_detection_rule_is_stated(tmp_path):
    (tmp_path / ".hidden").mkdir()
    _image(tmp_path / ".hidden" / "x.jpg")
    with pytest.raises(ConfigError) as e:
        open_source(load_config(None, [f"data.root={tmp_path}", "data.source=imagefolder"]).data)
    assert "hidden folders (.name) are ignored" in str(e.value)


def test_preflight_plan_counts_the_subset(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.num_images=16")
    cfg, plan = preflight(cfg, open_source(cfg.data))
    assert (plan.num_images, plan.steps_per_epoch, plan.total_steps) == (16, 2, 200)


def test_photos_left_out_are_said_before_the_run(tmp_path):
    for i in range(16):
        _image(tmp_path / "photos" / f"{i}.jpg")
    (tmp_path / "photos" / "raw").mkdir()
    for name in ("IMG_1.HEIC", "IMG_2.heic", "raw/IMG_3.CR2"):
        (tmp_path / "photos" / name).write_bytes(b"a photo PIL cannot decode")
    cfg = tiny_config(tmp_path / "run", f"data.root={tmp_path / 'photos'}", "data.source=auto")
    notes = preflight(cfg, open_source(cfg.data))[1].notes
    assert any(f"data.root={tmp_path / 'photos'} holds 3 photos glsd cannot decode (1 .cr2, 2 .heic), "
               "left out: convert them to JPEG or PNG" in n for n in notes), notes
    for name in ("IMG_1.HEIC", "IMG_2.heic", "raw/IMG_3.CR2"):
        (tmp_path / "photos" / name).unlink()
    assert not any("cannot decode" in n for n in preflight(cfg, open_source(cfg.data))[1].notes)


def test_images_added_to_a_resumed_runs_folder_are_said_unused(tmp_path):
    """Counted against the run's own subset.json (not by the difference of two counts), and only
    for a run that chose the whole folder in its config.yaml (not this command's)."""
    import json

    from glsd.train.preflight import added_images_notes, recorded_subset

    photos = tmp_path / "photos"
    for i in range(12):
        _image(photos / f"{i}.jpg")
    cfg = tiny_config(tmp_path / "run", f"data.root={photos}", "data.source=auto")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")

    def record(keys, data):
        (run / "subset.json").write_text(json.dumps({"keys": keys}))
        (run / "config.yaml").write_text(json.dumps({"data": data}))

    record([f"{i}.jpg" for i in range(12)], {"fraction": 1.0})
    assert added_images_notes(cfg, open_source(cfg.data), recorded_subset(cfg)) == []
    for i in range(3):  # 3 removed, 3 added: the counts agree, the lists do not
        (photos / f"{i}.jpg").rename(photos / f"new-{i}.jpg")
    assert added_images_notes(cfg, open_source(cfg.data), recorded_subset(cfg)) == [
        "3 images added to the data since the run started are not used: a resumed run pretrains on "
        "the list in its subset.json; to use them, start afresh (train.resume=false moves this run "
        "aside, or a new output_dir)"]
    # a run that chose a subset (data.num_images) resumed by a command without it: nothing added
    record([f"{i}.jpg" for i in range(3, 7)], {"fraction": 1.0, "num_images": 4})
    assert added_images_notes(cfg, open_source(cfg.data), recorded_subset(cfg)) == []
    # a run that starts afresh has no list to compare with
    (run / "checkpoints" / "last.pt").unlink()
    record([f"{i}.jpg" for i in range(3, 12)], {"fraction": 1.0})
    assert added_images_notes(cfg, open_source(cfg.data), recorded_subset(cfg)) == []


def test_class_folders_found_by_the_rule_are_named(tmp_path):
    """Photos sorted by year are read as classes by data.source=auto: the summary names them
    and says what that means, and how to read them as one unlabelled folder."""
    from glsd.train.console import folder_reading

    for year in ("2023", "2024"):
        _image(tmp_path / "photos" / year / "0.jpg")
    cfg = tiny_config(tmp_path / "run", f"data.root={tmp_path / 'photos'}", "data.source=auto")
    lines = folder_reading(cfg.data, open_source(cfg.data))
    assert lines[0].startswith("read as imagefolder (2 sub-folders")
    assert lines[1].startswith("its class folders 2023, 2024 are read as labels: pretraining does not use them")
    assert lines[1].endswith("data.source=folder")


def test_a_floor_above_the_peak_learning_rate_is_said(tmp_path):
    # the peak is train.lr x global batch / 256: 1e-4 x 8 / 256 = 3.1e-6 < min_lr 1e-5
    cfg = tiny_config(tmp_path / "run", "train.lr=1e-4", "train.min_lr=1e-5", "data.synthetic_num_images=64")
    notes = preflight(cfg, open_source(cfg.data))[1].notes
    assert any("train.min_lr=1e-05 is above the peak learning rate 3.13e-06" in n for n in notes), notes
    _, plan = preflight(cfg, open_source(cfg.data), world_size=8)  # 64 images a step: 2.5e-5
    assert not any("min_lr" in n for n in plan.notes)


def test_another_run_is_refused_for_its_identity_first(tmp_path):
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=1"))
    with pytest.raises(ConfigError) as e:
        pretrain(tiny_config(run, "train.max_steps=2", "model.out_dim=32", "train.lr=1e-4"))
    assert "holds a run of another config" in str(e.value) and "model.out_dim" in str(e.value)


def test_freeze_last_layer_steps_overrides_the_epochs_rule():
    from glsd.train.schedules import Schedules
    by_epochs = Schedules(_cfg("train.freeze_last_layer_epochs=1", "train.epochs=4"), 781, 64)
    by_steps = Schedules(_cfg("train.freeze_last_layer_epochs=1", "train.freeze_last_layer_steps=39",
                              "train.epochs=4"), 781, 64)
    assert (by_epochs.freeze_last_layer_steps, by_steps.freeze_last_layer_steps) == (781, 39)


def test_the_imagenet_preset_checks_its_online_knn_on_val(tmp_path):
    """ImageNet's layout is train/ + val/: the paper preset's online k-NN (every 10 epochs)
    reads val, and a folder without it is refused naming eval.test_split, not data.split
    (which would pretrain on the held-out images)."""
    from glsd.eval.online import check_online_knn
    from glsd.eval.runner import clear_cache

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (60 * i, 90, 30)).save(tmp_path / split / c / f"{i}.JPEG")
    clear_cache()
    check_online_knn(load_config("imagenet-swin-t", [f"data.root={tmp_path}"]))
    clear_cache()
    with pytest.raises(ConfigError, match=r"split 'test' not in .*available: train, val \(set eval.test_split\)"):
        check_online_knn(load_config("imagenet-swin-t", [f"data.root={tmp_path}", "eval.test_split=test"]))
    clear_cache()


def test_a_scaled_warm_up_resumes_under_another_world_size(tmp_path):
    """The warm-up of a short run is scaled; rerun under 2 processes (half the steps per
    epoch) the same command must resume, not be refused as a changed schedule."""
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    args = ("train.epochs=3", "train.warmup_steps=null", "train.warmup_epochs=10", "train.batch_size=4")
    pretrain(tiny_config(run, *args, "train.max_steps=3"))
    cfg = tiny_config(run, *args, "train.max_steps=null")
    _, plan = preflight(cfg, open_source(cfg.data), world_size=2)
    assert plan.steps_per_epoch == 4 and any("scaled to" in n for n in plan.notes)


def test_a_resumed_run_counts_its_recorded_images_not_the_folder(tmp_path):
    """Photos added to the folder after the run started do not join it (its subset.json
    holds the images): the plan and the batch check count the recorded ones."""
    from glsd.train.pretrain import pretrain

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(16):
        Image.new("RGB", (40, 40), (10 * i, 80, 40)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    data = ("data.source=folder", f"data.root={folder}")
    pretrain(tiny_config(run, *data, "train.max_steps=1"))
    for i in range(16, 40):
        Image.new("RGB", (40, 40), (5 * i, 20, 90)).save(folder / f"{i}.png")
    cfg = tiny_config(run, *data, "train.max_steps=2")
    _, plan = preflight(cfg, open_source(cfg.data))
    assert plan.num_images == 16 and plan.steps_per_epoch == 2
    fresh = tiny_config(tmp_path / "other", *data)
    assert preflight(fresh, open_source(fresh.data))[1].num_images == 40
    # Without a checkpoint nothing resumes (the folder is moved aside): the images of now count.
    (run / "checkpoints" / "last.pt").unlink()
    assert preflight(cfg, open_source(cfg.data))[1].num_images == 40


def test_a_file_without_a_preset_is_told_it_runs_on_the_bare_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train: {batch_size: 8}\n")
    with pytest.raises(ConfigError, match=r"names no preset.*`preset: NAME`"):
        check_grids(load_config(str(path)))
    path.write_text("preset: cifar10-vit-tiny\ntrain: {batch_size: 8}\n")
    check_grids(load_config(str(path)))


def test_images_much_smaller_than_the_crops_are_said(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 30), (20 * i, 60, 90)).save(folder / f"{i}.png")
    data = ("data.source=folder", f"data.root={folder}", "train.batch_size=2")
    cfg = tiny_config(tmp_path / "r", *data, "crops.global_size=64", "crops.local_size=32")
    notes = preflight(cfg, open_source(cfg.data))[1].notes
    assert any("median short side of 30 px (of 6 read) under crops.global_size=64" in n for n in notes)
    fits = tiny_config(tmp_path / "r", *data)  # 32 px crops of 30 px images: no note
    assert not any("small for the crops" in n for n in preflight(fits, open_source(fits.data))[1].notes)


def test_a_teacher_no_sharper_than_the_student_is_said_not_refused():
    from glsd.train.preflight import temperature_notes

    assert temperature_notes(tiny_config("unused")) == []
    hot = temperature_notes(tiny_config("unused", "loss.teacher_temp=0.2", "loss.warmup_teacher_temp=0.2"))
    assert len(hot) == 1 and "loss.teacher_temp=0.2" in hot[0] and "loss.student_temp=0.1" in hot[0]


def test_keys_a_run_does_not_read_are_said_not_refused():
    """A stored run that has them (an older README's Swin override kept patch_size) stays
    loadable: they are start notes, not errors."""
    from glsd.train.preflight import ignored_key_notes

    swin = tiny_config("unused", "model.backbone=swin_tiny_patch4_window7_224", "model.patch_size=2",
                       "model.backbone_kwargs={}", "data.fraction=0.5", "data.num_images=10")
    notes = ignored_key_notes(swin)
    assert "model.patch_size=2 is ignored" in notes[0] and "data.fraction=0.5 is ignored" in notes[1]
    assert ignored_key_notes(tiny_config("unused")) == []

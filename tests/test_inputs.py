"""Issue 14, findings 5-8 and issue 15 item 4: leftovers, full disks, odd files, validation,
silent conversions, exit codes and signals."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from glsd.config import ConfigError, dump_yaml, load_config
from glsd.data.image_file import read_image_file, to_rgb
from glsd.data.sources import ImageSource, open_source, zip_source
from glsd.errors import DataError, DiskFull, NotWritable
from glsd.train.checkpoint import load_checkpoint, save_checkpoint
from glsd.train.pretrain import pretrain

from helpers_tiny import (cli, load_last, start_pretrain, tiny_config, wait_for_step,
                          write_config)


# ----------------------------------------------------------------------------------------
# 5. Leftovers, failed starts, full disks, unwritable eval folders

def test_temp_files_are_swept_and_unsaved_restarts_leave_no_archive(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_steps=1")
    # What a kill before the first checkpoint leaves (on main each restart archived it).
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / ".last.pt.tmp-999999").write_bytes(b"torn" * 1000)
    (run / ".backbone.safetensors.tmp-4242").write_bytes(b"torn")
    pretrain(cfg)
    assert not list(run.glob("previous-*"))
    assert [p for p in run.rglob("*") if ".tmp-" in p.name] == []
    assert load_last(run)["step"] == 1


def test_failed_start_leaves_no_folder_or_a_marked_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["pretrain", str(write_config(tiny_config(run, "model.backbone=nope",
                                                         "model.backbone_kwargs={}"), tmp_path / "c.yaml"))]) == 2
    assert not run.exists()  # the lock made the folder; nothing else was written: removed
    root = tmp_path / "images"
    for c in "ab":  # one bad file among good ones: past the checks before the run, read in it
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(root / c / f"{i}.jpg")
    (root / "a" / "0.jpg").write_text("not a JPEG")
    cfg = tiny_config(run, "data.source=auto", f"data.root={root}", "data.on_error=fail")
    capsys.readouterr()
    assert cli(["pretrain", str(write_config(cfg, tmp_path / "d.yaml"))]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("glsd:")]  # (the console's
    assert len(errors) == 1 and "cannot read image" in errors[0], err  # start summary aside)
    assert "Traceback" not in err, err
    assert "failed before its first checkpoint" in (run / "failed.txt").read_text()


def test_faked_enospc_is_disk_full_with_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(10), "step": 1})
    real = torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull, match=r"disk full while writing .*last.pt; the previous last.pt is intact"):
        save_checkpoint(path, {"w": torch.zeros(10), "step": 2})
    monkeypatch.setattr(torch, "save", real)
    assert load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob(".*tmp*"))


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root and a mount namespace that allows it; else skipped)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_is_disk_full_with_the_previous_checkpoint_intact(small_fs):
    path = small_fs / "checkpoints" / "last.pt"
    save_checkpoint(path, {"w": torch.ones(250_000), "step": 1})  # 1 MB
    with pytest.raises(DiskFull, match="disk full while writing .*the previous last.pt is intact"):
        save_checkpoint(path, {"w": torch.ones(1_000_000), "step": 2})  # 4 MB
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_eval_on_a_read_only_run_fails_before_computing(small_fs, monkeypatch):
    import glsd.eval.runner as runner

    run = small_fs / "run"
    pretrain(tiny_config(run, "train.max_steps=1"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)

    def no_compute(*a, **k):
        raise AssertionError("features were computed before the write check")

    monkeypatch.setattr(runner, "load_backbone", no_compute)
    with pytest.raises(NotWritable, match="cannot write in .*eval.*nothing was computed"):
        runner.run_eval("knn", run, device="cpu")


def test_eval_in_an_unwritable_folder_fails_before_computing(tmp_path, monkeypatch):
    """The same check without root or a mount: the lock file's open is the first write of an
    evaluation, and it is refused as a folder without write permission refuses it."""
    import glsd.eval.runner as runner
    import glsd.train.lock as lock

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)  # the write check needs no trained run: it comes first
    real_open = os.open

    def refuse_lock(path, flags, *a, **k):
        if os.path.basename(path) == lock.LOCK_NAME:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    def no_compute(*a, **k):
        raise AssertionError("features were computed before the write check")

    monkeypatch.setattr(lock.os, "open", refuse_lock)
    monkeypatch.setattr(runner, "load_backbone", no_compute)
    with pytest.raises(NotWritable, match="cannot write in .*eval.*nothing was computed") as e:
        runner.run_eval("knn", run, device="cpu")
    assert e.value.errno == errno.EACCES and "Permission denied" in str(e.value)
    # A folder the lock had to create is not left behind empty when the lock file fails.
    fresh = tmp_path / "fresh"
    with pytest.raises(NotWritable):
        lock.acquire(fresh / "eval")
    assert not (fresh / "eval").exists()
    monkeypatch.undo()
    (tmp_path / "photo.jpg").write_bytes(b"x")  # output_dir=photo.jpg/run: a file on the path
    with pytest.raises(NotWritable, match="A part of that path is a file, not a folder"):
        lock.acquire(tmp_path / "photo.jpg" / "run")


# ----------------------------------------------------------------------------------------
# 6. Odd files, study records, decompression bombs

def _finishes(fn, timeout=20.0):
    """Run fn in a thread; (finished, exception). A FIFO read on main blocked forever."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out["e"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("e")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    from glsd.tools import viz

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "ok.png")
    os.mkfifo(root / "a" / "stuck.jpg")
    source = open_source(load_config(None, ["data.source=imagefolder", f"data.root={root}"]).data)
    done, e = _finishes(lambda: source.load("a/stuck.jpg", on_error="fail"))
    assert done, "reading a FIFO blocked"
    assert isinstance(e, DataError) and "is a FIFO, not an image file" in str(e)
    assert source.load("a/stuck.jpg") is None and source.load("a/ok.png") is not None
    done, e = _finishes(lambda: viz.read_image(root / "a" / "stuck.jpg"))
    assert done and isinstance(e, viz.VizError) and "FIFO" in str(e)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    from glsd.tools import viz

    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 px is then a bomb
    with pytest.raises(viz.VizError, match="more pixels than PIL allows"):
        viz.read_image(path)


def test_a_torn_cell_file_is_redone_and_the_grid_goes_on(tmp_path, monkeypatch):
    import glsd.train.pretrain as pretrain_mod
    from glsd.tools.study import Cell, run_cell, run_study

    config = write_config(tiny_config(tmp_path / "unused"), tmp_path / "c.yaml")
    out = tmp_path / "study"
    cell = Cell(0.5, "none", 0)
    (out / cell.name).mkdir(parents=True)
    (out / cell.name / "cell.json").write_text('{"name": "f0.5-none-s0", "stat')  # torn
    # --report-only collects around it (on main: JSONDecodeError, the study crashed).
    result = run_study(str(config), out, fractions=[0.5], matchings=["none", "geometric"],
                       seeds=[0], report_only=True)
    assert [r["status"] for r in result["records"]] == ["not run", "not run"]
    assert json.loads((out / "results.json").read_text())[0]["status"] == "not run"

    def retrained(cfg):
        raise RuntimeError("retrained")

    monkeypatch.setattr(pretrain_mod, "pretrain", retrained)
    record = run_cell(str(config), [], cell, out, ["knn"], "cpu")
    assert record["status"] == "failed" and "retrained" in record["error"]  # it was redone
    assert not (out / cell.name / "cell.json").exists()


# ----------------------------------------------------------------------------------------
# 7. Validation of every numeric key; YAML errors

@pytest.mark.parametrize("override", [
    "train.lr=nan", "train.lr=-.inf", "loss.teacher_temp=0", "loss.teacher_temp=-1",
    "loss.student_temp=0", "train.weight_decay=-0.1", "train.clip_grad=-1", "train.log_every=0",
    "data.num_workers=-1", "model.out_dim=0", "crops.global_size=0", "loss.center_momentum=2",
    "eval.k=0", "train.max_steps=0", "loss.warmup_teacher_temp=0", "eval.temperature=0",
    "crops.flip_p=1.5", "model.drop_path_rate=1", "train.min_lr=-1", "train.batch_size=0",
    "train.batch_size=" + "9" * 400, "train.seed=" + "1" + "0" * 22, "data.subset_seed=-1",
    "data.synthetic_num_images=99999999999999999999",
    "crops.num_local=" + "9" * 30, "eval.seg_seed=" + "9" * 30,  # no range of their own: the integer cap
])
def test_every_numeric_key_is_range_checked(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r"=.* out of range: (.* in [\[(]|integers are at most 2\*\*62)"):
        load_config(None, [override])


def test_yaml_syntax_errors_and_top_level_lists_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 5\n  lr: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + r":.*line \d+, column \d+: YAML syntax error"):
        load_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match=re.escape(str(listed)) + " holds a list, not a mapping"):
        load_config(str(listed))
    with pytest.raises(ConfigError, match="override 'train.lr=\\[1': the value is not valid YAML"):
        load_config(None, ["train.lr=[1"])


def test_configs_that_expand_or_nest_without_bound_are_refused_in_one_line(tmp_path):
    """A few hundred bytes of YAML aliases (or a pickle's shared lists in a checkpoint's
    config) that expand to billions of values, a value containing itself, brackets nested
    5,000 deep, a 5,000-digit integer: each a ConfigError, at once, not a hang or a traceback."""
    from glsd.config import from_dict

    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                      + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
                      + "model:\n  backbone_kwargs: {x: *h}\n")
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(str(laughs))
    selfref = tmp_path / "self.yaml"
    selfref.write_text("model: &r {backbone_kwargs: {me: *r}}\n")
    with pytest.raises(ConfigError, match="contains itself"):
        load_config(str(selfref))
    for bad in ("[" * 5000, "9" * 5000):
        with pytest.raises(ConfigError, match="override 'train.lr=.*the value is not valid YAML"):
            load_config(None, ["train.lr=" + bad])
    from glsd.config import validate
    with pytest.raises(ConfigError, match="train.seed=<an integer of 16610 bits> is out of range"):
        validate(from_dict({"train": {"seed": 10 ** 5000}}))  # from a checkpoint: no digit limit
    sibling = [1, 2]
    assert load_config(None, []).model.backbone_kwargs is not None
    from glsd.config_files import check_shape
    check_shape({"a": [sibling, sibling], "b": [[[[[1]]]]] * 3})  # shared, not containing itself
    shared = [1] * 10
    for _ in range(7):
        shared = [shared] * 10  # 10**8 values, a few objects: what a pickle can hold
    with pytest.raises(ConfigError, match="the config cannot be read: it expands"):
        from_dict({"model": {"backbone_kwargs": {"x": shared}}})


def test_a_folder_tree_deeper_than_python_walks_is_a_config_error(tmp_path, monkeypatch):
    import glsd.data.layout as layout

    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
        yield  # a generator, as os.walk

    (tmp_path / "deep").mkdir()
    monkeypatch.setattr(layout.os, "walk", too_deep)
    with pytest.raises(ConfigError, match="nests folders deeper than Python can walk"):
        layout.walk_images(tmp_path / "deep")


# ----------------------------------------------------------------------------------------
# 8. Silent conversions

def test_16_bit_images_are_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif)
    assert read_image_file(path).size == (20, 40)


def _photo(path, size=(1200, 900), exif_orientation=None):
    """A smooth JPEG of many pixels (a gradient with a disc), optionally stored sideways."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, ((xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2) * 200],
                   axis=-1).astype(np.uint8)
    img = Image.fromarray(arr)
    if exif_orientation is None:
        img.save(path, quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, quality=95, exif=exif)
    return path


def test_a_large_jpeg_is_decoded_at_reduced_scale_keeping_its_full_size(tmp_path):
    from glsd.data.image_file import ORIGINAL_SIZE
    path = _photo(tmp_path / "big.jpg")
    full = read_image_file(path)
    reduced = read_image_file(path, min_size=224)
    assert full.size == (1200, 900) and ORIGINAL_SIZE not in full.info
    assert reduced.size == (300, 225) and reduced.info[ORIGINAL_SIZE] == (1200, 900)  # 1/4 scale
    # the same picture: the full decode shrunk to that size differs by a few levels at most
    shrunk = np.asarray(full.resize(reduced.size, Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.float64)
    assert np.abs(shrunk - np.asarray(reduced, dtype=np.float64)).mean() < 3.0
    # both sides kept >= the size asked; a small or a PNG image is read as it is
    assert read_image_file(path, min_size=400).size == (600, 450)
    assert read_image_file(path, min_size=900).size == (1200, 900)
    png = tmp_path / "big.png"
    full.save(png)
    assert read_image_file(png, min_size=224).size == (1200, 900)
    # stored sideways: upright, and the full size upright too
    turned = read_image_file(_photo(tmp_path / "side.jpg", exif_orientation=6), min_size=224)
    assert turned.size == (225, 300) and turned.info[ORIGINAL_SIZE] == (900, 1200)


def test_reduced_decode_of_multi_picture_and_nearly_square_turned_photos(tmp_path):
    from glsd.data.image_file import ORIGINAL_SIZE
    # a phone's multi-picture JPEG (MPO) is a JPEG: decoded reduced too
    first = Image.open(_photo(tmp_path / "a.jpg")).convert("RGB")
    mpo = tmp_path / "multi.jpg"
    first.save(mpo, "MPO", save_all=True, append_images=[first.resize((600, 450))])
    assert Image.open(mpo).format == "MPO"
    img = read_image_file(mpo, min_size=224)
    assert img.size == (300, 225) and img.info[ORIGINAL_SIZE] == (1200, 900)
    # stored sideways, reduced to a square: the full size is still given upright
    turned = read_image_file(_photo(tmp_path / "b.jpg", size=(1200, 1199), exif_orientation=6), min_size=128)
    assert turned.size == (150, 150) and turned.info[ORIGINAL_SIZE] == (1199, 1200)


@pytest.mark.parametrize("orientation", [None, 6, 3])
def test_a_reduced_decode_of_sides_the_scale_does_not_divide_spans_the_whole_photo(tmp_path, orientation):
    """1003 x 757 at 1/4 decodes to 251 x 190 pixels of which 250.75 x 189.25 are picture: the
    frame is resampled to the picture alone, so a feature stays where the full decode has it
    (and where the crop geometry, in original pixels, says it is), upright included."""
    from glsd.data.image_file import ORIGINAL_SIZE
    path = _photo(tmp_path / "odd.jpg", size=(1003, 757), exif_orientation=orientation)
    full = np.asarray(read_image_file(path), dtype=np.float64)
    reduced = read_image_file(path, min_size=160)
    assert reduced.info[ORIGINAL_SIZE] == (full.shape[1], full.shape[0])
    small = np.asarray(Image.fromarray(full.astype(np.uint8)).resize(reduced.size, Image.Resampling.BICUBIC,
                                                                      reducing_gap=3.0), dtype=np.float64)
    # The gradient channels say where each pixel came from: a frame stretched over its padding
    # shifts the far border by most of a reduced pixel (about 1 grey level there; 0.24 when exact).
    diff = np.asarray(reduced, dtype=np.float64) - small
    borders = [diff[2:12], diff[-12:-2], diff[:, 2:12], diff[:, -12:-2]]
    assert max(abs(band[..., c].mean()) for band in borders for c in (0, 1)) < 0.5


@pytest.mark.parametrize("kind", ["folder", "imagefolder", "zip", "synthetic", "sample"])
def test_every_source_survives_pickling(tmp_path, kind):
    """Loader workers started by spawn or forkserver (macOS, Linux from Python 3.14) receive
    the source pickled: its readers must not be closures."""
    import pickle
    folder = tmp_path / "data" / "train" / "cls"
    folder.mkdir(parents=True)
    _photo(folder / "a.jpg", size=(64, 48))
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
            z.write(folder / "a.jpg", "train/cls/a.jpg")
    overrides = {"folder": [f"data.root={folder}", "data.source=folder"],
                 "imagefolder": [f"data.root={tmp_path / 'data'}"],
                 "zip": [f"data.root={tmp_path / 'd.zip'}"],
                 "synthetic": ["data.source=synthetic"], "sample": ["data.source=sample"]}[kind]
    source = open_source(load_config(None, overrides).data)
    copy = pickle.loads(pickle.dumps(source))
    key = copy.keys[0]
    assert np.array_equal(np.asarray(copy.load(key, "fail")), np.asarray(source.load(key, "fail")))
    assert copy.load(key, "fail", min_size=16).size[0] >= 16


def test_a_dataset_reader_pickles():
    import pickle
    from glsd.data.sources import _DatasetReader
    reader = pickle.loads(pickle.dumps(_DatasetReader([(Image.new("L", (8, 8), 7), 0)])))
    assert reader("0").mode == "RGB" and reader("0").getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_training_views_of_a_large_photo_record_its_full_size(tmp_path, jpeg_draft):
    """The loader decodes a 1200 x 900 photo to its 64 px square, reduced or not: the square
    is nearly the same and the geometry stays in the photo's own pixels."""
    from glsd.data.multicrop import DecodeToSquare, MultiCropDataset
    from glsd.data.sources import open_source
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.jpg")
    cfg = load_config(None, [f"data.root={folder}", "data.source=folder", f"data.jpeg_draft={str(jpeg_draft).lower()}"])
    dataset = MultiCropDataset(open_source(cfg.data), DecodeToSquare(64), "fail", cfg.data.jpeg_draft)
    image, hw, *_ = dataset[0]
    assert hw.tolist() == [900.0, 1200.0]
    reference = DecodeToSquare(64)(read_image_file(folder / "a.jpg"))[0]
    assert (image.double() - reference.double()).abs().mean() < (2.0 if jpeg_draft else 1e-9)


@pytest.mark.parametrize("member", ["train/../x.png", "/abs/a/x.png", "train/a/../../x.png"])
def test_zip_members_escaping_their_folder_are_refused_by_name(tmp_path, member):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/a/ok.png", buf.getvalue())
        zf.writestr(member, buf.getvalue())
    with pytest.raises(ConfigError, match=re.escape(repr(member))):
        zip_source(path, "train")


# ----------------------------------------------------------------------------------------
# 9. Exit codes and signals (issue 15 item 4)

def test_sigint_checkpoints_and_exits_130_with_one_message(tmp_path):
    """(SIGTERM -> 143: test_reliability's SIGTERM test.)"""
    sig = signal.SIGINT
    run = tmp_path / "run"
    proc = start_pretrain(write_config(tiny_config(run, "train.max_steps=500"), tmp_path / "c.yaml"))
    try:
        wait_for_step(proc, run, 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.count("glsd:") == 1 and f"signal {int(sig)}" in err, err
    assert load_last(run)["step"] >= 2 and not (run / "backbone.safetensors").exists()


def test_sigint_before_training_exits_130_without_traceback(tmp_path):
    run = tmp_path / "run"
    proc = start_pretrain(write_config(tiny_config(run, "train.max_steps=500"), tmp_path / "c.yaml"))
    try:
        import time

        deadline = time.monotonic() + 120
        while not (run / ".glsd.lock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the lock is the first thing pretraining writes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("glsd:") <= 2, err  # (a stale-lock note aside)


def test_a_finished_run_exits_0(tmp_path):
    assert cli(["pretrain", str(write_config(tiny_config(tmp_path / "run", "train.max_steps=1"),
                                             tmp_path / "c.yaml"))]) == 0


def test_a_second_signal_stops_a_stuck_data_read(tmp_path, monkeypatch):
    """A read that never returns (a hung network file system): the first SIGTERM waits for
    the step, the second stops at once; the checkpoint on disk is kept."""
    import time

    import glsd.data.synthetic as synthetic
    from glsd.errors import TrainingInterrupted

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=1"))
    real, reads = synthetic.synthetic_source, []

    def stuck_source(*args, **kwargs):
        src = real(*args, **kwargs)
        read = src.read

        def slow(key):
            reads.append(key)
            if len(reads) > 8:  # the second batch never arrives
                time.sleep(600)
            return read(key)
        src.read = slow
        return src

    monkeypatch.setattr(synthetic, "synthetic_source", stuck_source)

    def signal_twice():
        while len(reads) <= 8:
            time.sleep(0.01)
        for _ in range(2):  # Ctrl-C twice (a repeated SIGTERM is one request)
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=signal_twice, daemon=True)
    t.start()
    with pytest.raises(TrainingInterrupted, match="second signal 2") as err:
        pretrain(tiny_config(run, "train.max_steps=5"))
    assert err.value.signal == signal.SIGINT
    assert load_last(run)["step"] >= 1


def test_a_read_that_hangs_times_out_naming_the_file():
    import time

    def hung(key):
        time.sleep(30 if key == "1" else 0)
        return Image.new("RGB", (8, 8))

    source = ImageSource("hung", ["0", "1"], [0, 0], ["a"], hung, read_timeout_s=0.2)
    assert source.load("1") is None and source.load("0") is not None  # skipped, then fine
    with pytest.raises(DataError, match=r"cannot read image '1' from hung: .*data.read_timeout_s=0.2"):
        source.load("1", on_error="fail")
    assert load_config(None, ["data.read_timeout_s=0"]).data.read_timeout_s == 0  # 0: no limit


def test_a_read_deadline_gives_back_the_programs_own_timer():
    import signal
    import time

    from glsd.data.image_file import read_deadline

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with read_deadline(10):
            pass
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < left <= 0.5  # still running, minus the time the read took
        time.sleep(0.7)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_an_error_with_loader_workers_running_still_exits():
    """Workers ignore the first SIGTERM (it belongs to the trainer); multiprocessing's exit
    sends them exactly one and joins them: without glsd's exit hook the process printed its
    error and then hung forever, holding a batch job's GPU."""
    import subprocess
    import sys

    script = (
        "from torch.utils.data import DataLoader\n"
        "from glsd.data.workers import leave_stop_signals_to_the_trainer, stop_workers_at_exit\n"
        "stop_workers_at_exit()\n"
        "it = iter(DataLoader(range(100), batch_size=2, num_workers=2,\n"
        "                     worker_init_fn=leave_stop_signals_to_the_trainer))\n"
        "next(it)\n"
        "raise SystemExit(3)  # the iterator, and its workers, outlive the error\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "killed by signal" not in done.stderr, done.stderr


def test_an_image_over_the_pixel_limit_names_the_key_that_raises_it(tmp_path, monkeypatch):
    """PIL's decompression-bomb guard refuses it (skipped and named); data.max_image_pixels
    lets a trusted gigapixel scan through, and PIL's global limit is given back after."""
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.new("RGB", (200, 200)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 px is then a bomb
    src = open_source(load_config(None, [f"data.root={folder}", "data.source=folder"]).data)
    why = src.load_or_why(src.keys[0])
    assert "more pixels than the decompression-bomb guard allows" in why.reason
    assert "raise data.max_image_pixels" in why.reason
    src = open_source(load_config(None, [f"data.root={folder}", "data.source=folder",
                                         "data.max_image_pixels=100000"]).data)
    assert src.load(src.keys[0]).size == (200, 200) and Image.MAX_IMAGE_PIXELS == 1000
    # a run's subset (data.fraction, data.num_images, its subset.json) keeps the limit
    subset = src.subset(src.keys)
    assert subset.max_image_pixels == 100000 and subset.load(subset.keys[0]).size == (200, 200)

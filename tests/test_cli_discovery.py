"""Discovery commands: an import-light CLI, ``glsd presets``, ``glsd config`` (dry run) and
``glsd backbones``."""
import subprocess
import sys

import yaml

from glsd.config import from_dict, preset_names
from helpers_tiny import cli, modules_after_import, subprocess_env


def test_cli_and_config_import_no_torch():
    heavy = modules_after_import("glsd.cli, glsd.config, glsd.discovery", ("torch", "torchvision", "timm"))
    assert [m for m in heavy if m.split(".")[0] in ("torch", "torchvision", "timm")] == []


def test_help_and_presets_do_not_import_torch():
    code = ("import sys, contextlib, io; from glsd.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['presets'])\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_presets_one_line_each_with_a_description(capsys):
    assert cli(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    by_name = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert by_name["cifar10-vit-tiny"] == "A tiny ViT on CIFAR-10-sized images, runnable on a CPU."
    assert all(len(d) <= 104 and d != "(no description)" for d in by_name.values())


def test_config_prints_resolved_yaml_and_grids(capsys):
    assert cli(["config", "cifar10-vit-tiny", "train.epochs=3", "data.source=synthetic",
                "data.synthetic_num_images=128", "train.batch_size=16"]) == 0
    out = capsys.readouterr().out
    cfg = from_dict(yaml.safe_load(out))  # the YAML reads back into the config it resolved
    assert cfg.train.epochs == 3 and cfg.model.patch_size == 4
    assert "# feature grid 8x8 at global 32 px" in out and "# feature grid 4x4 at local 16 px" in out
    assert "# schedule 8 steps/epoch x 3 epochs = 24 steps" in out
    assert "# note: warm-up train.warmup_epochs=10 (80 steps) is longer than the run" in out


def test_config_says_how_a_folder_is_read(capsys, tmp_path):
    """A photo tree by year is read as classes: the dry run must say so, as pretrain does."""
    from PIL import Image

    for year in ("2023", "2024"):
        (tmp_path / "photos" / year).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40)).save(tmp_path / "photos" / year / f"{i}.jpg")
    assert cli(["config", "cifar10-vit-tiny", f"data.root={tmp_path / 'photos'}", "train.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "8 images, 8 used, 2 classes" in out and "#   read as imagefolder (2 sub-folders" in out


def test_config_refuses_what_pretrain_refuses(capsys, tmp_path):
    """The dry run is the same check as the start of pretraining: too few images for one
    batch, or a data path that does not exist, fail it (exit 2) and create no folder."""
    run = tmp_path / "run"
    assert cli(["config", "cifar10-vit-tiny", "data.source=synthetic", "data.synthetic_num_images=40",
                f"output_dir={run}"]) == 2
    assert "40 images are fewer than one global batch of 64" in capsys.readouterr().err
    assert cli(["pretrain", "cifar10-vit-tiny", "data.source=synthetic", "data.synthetic_num_images=40",
                f"output_dir={run}", "train.progress=false"]) == 2
    assert "40 images are fewer than one global batch of 64" in capsys.readouterr().err
    assert not run.exists()
    assert cli(["config", "cifar10-vit-tiny", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["config", "cifar10-vit-tiny", "data.source=synthetic", "train.max_steps=5"]) == 0
    assert "stopping at train.max_steps=5" in capsys.readouterr().out


def test_config_refuses_a_degenerate_grid(capsys):
    assert cli(["config", "cifar10-vit-tiny", "model.backbone=resnet18", "model.backbone_kwargs={}",
                "model.patch_size=null"]) == 2
    err = capsys.readouterr().err
    assert "1x1 feature grid with resnet18" in err and "glsd: config error" in err


def test_backbones_lists_grids_or_why_not(capsys):
    assert cli(["backbones", "resnet18", "--sizes", "64", "48"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.startswith("resnet18 "))
    assert "stride 32" in line and "64: 2x2" in line and "48: 2x2 (not a multiple of 32: use 32 or 64)" in line
    assert cli(["backbones", "convnext_atto", "--sizes", "16", "32", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("convnext_atto ") and "16: fails (RuntimeError" in out and "32: 1x1" in out
    assert "more; narrow the pattern" in out
    assert cli(["backbones", "glsd_conv*", "--sizes", "32", "16"]) == 0
    assert "glsd_convnet  stride 4  32: 8x8  16: 4x4" in capsys.readouterr().out
    assert cli(["backbones", "no_such_net_*"]) == 0
    assert "no timm model matches" in capsys.readouterr().out


def test_glsd_warnings_speak_in_the_tools_voice(capsys):
    """A warning raised in glsd's code is one `glsd: warning:` line (no source path or code
    line); other libraries' warnings are shown as Python shows them."""
    import os

    from glsd.cli import _in_glsd_voice

    passed_on = []
    show = _in_glsd_voice(lambda *args: passed_on.append(args))
    ours = os.path.join(os.sep, "x", "site-packages", "glsd", "eval", "features.py")
    show(UserWarning("2 unreadable images of folder:x skipped (a.jpg, b.jpg)"), UserWarning, ours, 362)
    assert capsys.readouterr().err == "glsd: warning: 2 unreadable images of folder:x skipped (a.jpg, b.jpg)\n"
    show(UserWarning("deprecated"), UserWarning, os.path.join(os.sep, "x", "timm", "layers.py"), 1)
    assert len(passed_on) == 1 and capsys.readouterr().err == ""


def test_the_dry_run_refuses_a_device_this_machine_lacks(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(["config", "cpu-default", "device=cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_overrides_after_the_flags_of_show_matches_are_taken_as_its_items():
    from glsd.cli import parse_args

    args = parse_args(["show-matches", "run", "--image", "a.jpg", "--out", "b.png", "crops.local_size=16"])
    assert args.items == ["run", "crops.local_size=16"]

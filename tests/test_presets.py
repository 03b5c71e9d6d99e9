"""Presets and the data a first run needs: no preset names a path, a preset without data says
how to give it, the sample shipped with the package runs the main job, the photo preset builds."""
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from glsd.config import ConfigError, load_config, preset_names
from glsd.data.sources import open_source

from helpers_tiny import subprocess_env, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", preset_names())
def test_no_preset_names_a_data_root(name):
    raw = yaml.safe_load(resources.files("glsd").joinpath(f"presets/{name}.yaml").read_text())
    assert "root" not in (raw.get("data") or {}), f"{name} sets data.root"


def test_a_preset_run_without_data_root_names_the_key_and_the_fix(tmp_path):
    from glsd.train.pretrain import pretrain

    cfg = load_config("cifar10-lowdata-cpu", [f"output_dir={tmp_path / 'run'}", "device=cpu"])
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    msg = str(err.value)
    assert "data.root" in msg and "data.root=PATH" in msg and "data.source=sample" in msg
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_the_sample_is_a_labelled_train_test_pair():
    cfg = load_config(None, ["data.source=sample"])
    train, test = open_source(cfg.data, "train"), open_source(cfg.data, "test")
    assert train.classes == test.classes == ["checks", "dots", "rings", "stripes"]
    assert (len(train), len(test)) == (96, 32)
    assert sorted(set(train.labels)) == [0, 1, 2, 3]
    img = train.read(train.keys[0])
    assert img.mode == "RGB" and img.size == (64, 64)
    files = list(Path(str(resources.files("glsd").joinpath("sample"))).rglob("*.jpg"))
    assert sum(f.stat().st_size for f in files) < 300 * 1024
    with pytest.raises(ConfigError, match="available: test, train"):
        open_source(cfg.data, "val")


def test_pretrain_and_knn_on_the_sample(tmp_path):
    """The main job on the shipped sample: no file of this workspace, no download."""
    from glsd.eval.runner import run_eval
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    cfg = tiny_config(run, "data.source=sample", "train.batch_size=16", "train.max_steps=2")
    pretrain(cfg)
    assert (run / "backbone.safetensors").is_file()
    result = run_eval("knn", run, ["eval.k=5"], device="cpu")
    assert result["n_train"] == 96 and result["n_test"] == 32
    assert 0.0 <= result["results"]["top1"] <= 100.0


def test_photo_preset_gives_14x14_and_6x6_grids():
    from glsd.models.backbone import build_backbone

    cfg = load_config("photos-vit-s16")
    assert (cfg.crops.global_size, cfg.crops.local_size) == (224, 96)
    backbone = build_backbone(cfg.model, cfg.crops.global_size)
    assert backbone.grid_size((224, 224)) == (14, 14)
    assert backbone.grid_size((96, 96)) == (6, 6)


@pytest.mark.slow
def test_photo_preset_trains_one_step(tmp_path):
    """The whole preset (ViT-S/16, 65536 prototypes, 224/96 crops) at batch 2 on synthetic
    images: about a minute on 2 CPU cores."""
    from glsd.train.pretrain import pretrain

    cfg = load_config("photos-vit-s16", [
        "data.source=synthetic", "data.synthetic_num_images=4", "data.synthetic_image_size=64",
        "data.num_workers=0", "train.batch_size=2", "train.max_steps=1", "train.precision=fp32",
        "train.progress=false", "device=cpu", f"output_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


def readme_main_job() -> list[str]:
    """The command under the README's "Pretrain (the main job)" heading."""
    text = (ROOT / "README.md").read_text().split("## Pretrain (the main job)", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if line.startswith("glsd pretrain")]
    return shlex.split(lines[0])


def test_the_readme_main_job_needs_nothing_of_this_workspace():
    argv = readme_main_job()
    assert "data.source=sample" in argv
    assert not [a for a in argv if a.startswith("data.root=")]


@pytest.mark.slow
def test_the_readme_main_job_runs_as_written(tmp_path):
    argv = [a if not a.startswith("output_dir=") else f"output_dir={tmp_path / 'run'}"
            for a in readme_main_job()]
    proc = subprocess.run([sys.executable, "-m", "glsd", *argv[1:]], capture_output=True, text=True,
                          env=subprocess_env(), timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


# The feature grids each shipped preset trains on (local loss: at least 2x2 cells per crop).
PRESET_GRIDS = {
    "cpu-default": {"global 32 px": (8, 8), "local 16 px": (4, 4)},
    "cifar10-lowdata-cpu": {"global 32 px": (8, 8), "local 16 px": (4, 4)},
    "cifar10-lowdata-gpu": {"global 32 px": (8, 8), "local 16 px": (4, 4)},
    "cifar10-vit-tiny": {"global 32 px": (8, 8), "local 16 px": (4, 4)},
    "photos-vit-s16": {"global 224 px": (14, 14), "local 96 px": (6, 6)},
    "imagenet-swin-t": {"global 224 px": (7, 7), "local 96 px": (3, 3)},  # the paper's Swin-T
}


def test_every_preset_passes_the_grid_check_with_its_grids():
    from glsd.config import preset_names
    from glsd.train.preflight import check_grids

    assert sorted(PRESET_GRIDS) == sorted(preset_names())  # a new preset gets its row
    for name, grids in PRESET_GRIDS.items():
        assert check_grids(load_config(name))[0] == grids, name
        # Evaluation, embedding and export follow crops.global_size when a user changes it.
        assert load_config(name).eval.image_size is None, name

"""The Python API in glsd/__init__.py: import-light, and its docstring examples run."""
import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import glsd
from glsd.config import ConfigError

from helpers_tiny import subprocess_env


def test_import_glsd_does_not_load_torch():
    code = ("import sys, glsd; glsd.RunResult; glsd.load_config; "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), check=True).stdout
    assert out.strip() == "[]"


def test_docstring_examples_run():
    """Every example in glsd/__init__.py (module, load_config, pretrain, embed, load_backbone)."""
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(glsd) if t.examples]
    assert {t.name for t in tests} >= {"glsd", "glsd.load_config", "glsd.pretrain", "glsd.embed",
                                       "glsd.load_backbone"}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 15


def test_keyword_overrides_keep_python_types(tmp_path):
    cfg = glsd.load_config(None, train__lr=1e-3, crops__global_scale=(0.3, 1.0),
                           model__backbone_kwargs={"widths": [8, 16]}, output_dir=tmp_path / "a b",
                           data__root="007", **{"eval.k": 5})
    assert cfg.train.lr == 1e-3 and cfg.crops.global_scale == (0.3, 1.0)
    assert cfg.model.backbone_kwargs == {"widths": [8, 16]} and cfg.output_dir == str(tmp_path / "a b")
    assert cfg.data.root == "007" and cfg.eval.k == 5
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        glsd.load_config(None, train__epoch=1)


def test_pretrain_takes_a_config_object(tmp_path):
    cfg = glsd.load_config("cpu-default", data__synthetic_num_images=8, data__num_workers=0,
                           train__batch_size=8, train__progress=False)
    run = glsd.pretrain(cfg, train__max_steps=1, output_dir=str(tmp_path / "run"))
    assert run.steps == 1 and run.config.preset == "cpu-default" and run.config.train.max_steps == 1
    assert (run.export_dir / "config.json").is_file() and run.backbone.is_file()
    assert Path(run.run_dir) == tmp_path / "run"


def test_api_values_read_back_as_given_and_backbones_come_trainable(tmp_path):
    """A float with an exponent inside backbone_kwargs stays a float (YAML 1.1 reads 1e-05 as
    text); a string key keeps its text; load_backbone gives the same trainable module from a
    run folder as from its export."""
    cfg = glsd.load_config("photos-vit-s16", model__backbone_kwargs={"init_values": 1e-5, "x": [1e-6, "a"]},
                           output_dir="010")
    assert cfg.model.backbone_kwargs == {"init_values": 1e-5, "x": [1e-6, "a"]} and cfg.output_dir == "010"
    run = glsd.pretrain("cpu-default", output_dir=str(tmp_path / "run"), data__synthetic_num_images=8,
                        data__num_workers=0, train__batch_size=8, train__max_steps=1, train__progress=False)
    for path in (run.run_dir, Path(run.run_dir) / "export" / "timm"):
        model = glsd.load_backbone(path)
        assert not model.training and all(p.requires_grad for p in model.parameters())


def _tiny_run(output_dir, **extra):
    return glsd.pretrain("cpu-default", output_dir=str(output_dir), data__synthetic_num_images=8,
                         data__num_workers=0, train__batch_size=8, train__max_steps=1,
                         train__progress=False, **extra)


def test_pretrain_leaves_the_callers_logging_random_state_and_paths_alone(tmp_path, monkeypatch):
    """A library call: the caller's handler on the "glsd" logger stays open and attached, the
    logger's level comes back, the caller's seeded generators and deterministic mode are as
    they were, and output_dir="~/..." is the home folder's."""
    import logging
    import random

    import torch

    mine = logging.FileHandler(tmp_path / "mine.log")
    logger = logging.getLogger("glsd")
    logger.addHandler(mine)
    level = logger.level
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        draws = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            random.seed(seed)
            run = _tiny_run(f"~/run{seed}", train__seed=0, train__deterministic=True)
            draws.append((torch.rand(3).tolist(), random.random()))
            assert run.run_dir == tmp_path / "home" / f"run{seed}"
        assert mine in logger.handlers and mine.stream is not None and logger.level == level
        assert not torch.are_deterministic_algorithms_enabled()
        torch.manual_seed(1)
        random.seed(1)
        assert draws[0] == (torch.rand(3).tolist(), random.random()) != draws[1]
    finally:
        logger.removeHandler(mine)
        mine.close()
    assert not list(Path.cwd().glob("~"))


def test_array_tuple_and_path_overrides_read_back_as_their_values(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = glsd.load_config("cpu-default", crops__global_scale=np.array([0.4, 1.0]),
                           crops__local_scale=(0.1, 0.3), data__source="auto", data__root=tmp_path,
                           model__backbone_kwargs={"widths": [8, 8, 16, 16], "pool_after": (1, 3)})
    assert cfg.crops.global_scale == (0.4, 1.0) and cfg.crops.local_scale == (0.1, 0.3)
    assert cfg.data.root == str(tmp_path) and cfg.model.backbone_kwargs["pool_after"] == [1, 3]


def test_runs_overlapping_in_threads_give_the_caller_back_its_state_at_the_last_end(tmp_path):
    """The first run of the process saves the logger level (and random state, deterministic
    mode), the last restores it: a run ending while another trains must not reset it."""
    import logging
    import threading

    from glsd.train.process_state import caller_state_kept

    logger = logging.getLogger("glsd")
    before = logger.level
    outer_done, inner_started = threading.Event(), threading.Event()
    seen = {}

    def inner():
        with caller_state_kept():
            logger.setLevel(logging.INFO)  # what a run does
            inner_started.set()
            outer_done.wait(10)
            seen["during"] = logger.level  # the other run has ended meanwhile

    t = threading.Thread(target=inner)
    with caller_state_kept():
        t.start()
        inner_started.wait(10)
    outer_done.set()
    t.join(10)
    assert seen["during"] == logging.INFO and logger.level == before


def test_a_script_without_the_main_guard_is_told_so_under_spawn(tmp_path):
    """macOS / Windows start loader workers by spawn, which imports the user's script again:
    its top-level glsd.pretrain(...) must not start a second run in the worker. The worker's
    call is refused naming the guard, and the parent's error points at it too."""
    script = tmp_path / "train.py"
    script.write_text(
        "import multiprocessing, glsd\n"
        "multiprocessing.set_start_method('spawn', force=True)\n"
        f"glsd.pretrain('cpu-default', output_dir={str(tmp_path / 'run')!r}, data__synthetic_num_images=8,\n"
        "              data__num_workers=1, train__batch_size=8, train__max_steps=1, train__progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert "while a worker process was importing your script" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "is in use by process" not in done.stderr  # not the lock's misleading message


def test_the_api_refuses_a_call_made_while_a_spawned_worker_imports(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(glsd.GlsdError, match="__main__"):
        glsd.pretrain("cpu-default")
    with pytest.raises(glsd.GlsdError, match="__main__"):
        glsd.embed("runs/none", "synthetic")

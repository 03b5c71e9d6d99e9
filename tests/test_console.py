"""The console (glsd.train.console), collapse indicators (glsd.train.collapse) and the
TensorBoard sink: what a run prints piped and on a terminal, what it logs."""
import io
import math
import subprocess
import sys

import pytest
import torch

from glsd.train.collapse import CollapseMonitor, collapse_indicators, collapse_reason
from glsd.train.console import Console, fmt, format_record
from helpers_tiny import read_metrics, subprocess_env, tiny_config, write_config


def test_fmt_never_rounds_to_zero():
    assert fmt(3.1e-6) == "3.1e-06" and fmt(0.031234) == "0.0312" and fmt(412.7) == "413"
    assert fmt(0.0) == "0" and fmt(12345.6) == "12,346" and fmt(7) == "7" and fmt(True) == "True"
    line = format_record({"step": 10, "epoch": 0.8333, "loss": 5.2345, "lr": 1.5625e-05,
                          "images_per_sec": 17.42}, max_steps=120)
    assert line == "step 10/120 epoch 0.833 loss 5.23 lr 1.56e-05 img/s 17.4"


def test_log_lines_say_the_time_so_far_and_left_and_warn_of_a_run_of_days(monkeypatch):
    import glsd.train.console as console_mod

    clock = [1000.0]
    monkeypatch.setattr(console_mod.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    console = Console(progress=False, stream=stream)
    console.begin(100, 200)  # resumed at step 100
    clock[0] += 30
    console.log({"step": 110, "loss": 2.5})  # 10 steps in 30 s: 90 steps left, 270 s
    assert stream.getvalue().splitlines()[-1] == "step 110/200 loss 2.5 elapsed 30s eta 4m30s"
    assert "warning" not in stream.getvalue()
    long = Console(progress=False, stream=stream)
    long.begin(0, 100_000)
    clock[0] += 600  # a first step that holds ten minutes of start-up: not the pace
    long.update(1, 2.0, 1e-3, 64)
    for step in range(2, 9):  # then 5 s a step: told a few steps in, once, not at a log line
        clock[0] += 5
        long.log({"step": step, "loss": 2.0})
        long.update(step, 2.0, 1e-3, 64)
        assert ("warning" in stream.getvalue()) == (step >= 6), step
    quick = Console(progress=False, stream=io.StringIO())
    quick.begin(0, 1000)
    clock[0] += 3600  # an hour of start-up, then a fast pace: no warning
    for step in range(1, 8):
        quick.update(step, 2.0, 1e-3, 64)
        clock[0] += 1
    assert "warning" not in quick.stream.getvalue()
    out = stream.getvalue()
    assert out.count("glsd: warning: at this pace the schedule ends in about 5d18h") == 1, out
    assert "a stopped run resumes where it was" in out


def test_the_first_step_says_the_run_is_alive_off_a_terminal(monkeypatch):
    """On a CPU the first log line can be many minutes away: the first step of a run (or of
    its resumption) is one line, with when the next comes; not when that step logs anyway."""
    import glsd.train.console as console_mod

    clock = [1000.0]
    monkeypatch.setattr(console_mod.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    console = Console(progress=False, stream=stream)
    console.begin(120, 1000, log_every=50)  # resumed at step 120
    clock[0] += 95
    console.update(121, 2.0, 1e-3, 8)
    console.update(122, 2.0, 1e-3, 8)
    assert stream.getvalue() == ("step 121/1000 done in 1m35s (start-up included); the next step line at "
                                 "step 150 (train.log_every=50)\n")
    for every, first in ((1, 0), (50, 49)):  # that step logs anyway: nothing more
        quiet = Console(progress=False, stream=io.StringIO())
        quiet.begin(first, 1000, log_every=every)
        quiet.update(first + 1, 2.0, 1e-3, 8)
        assert quiet.stream.getvalue() == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_bar_with_loss_lr_and_images_per_second():
    stream = _Tty()
    console = Console(progress=True, stream=stream)
    console.begin(0, 2)
    console.update(1, 2.5, 3e-6, 8)
    console.log({"step": 1, "loss": 2.5})  # a bar is showing: no log line
    console.update(2, 2.25, 4e-6, 8)
    console.close()
    out = stream.getvalue()
    assert "2/2" in out and "loss 2.25 lr 4e-06 img/s" in out and "step 1" not in out


def test_piped_stderr_shows_the_summary_and_log_lines(tmp_path):
    run = tmp_path / "run"
    config = write_config(tiny_config(run, "train.log_every=2", "train.max_steps=4"), tmp_path / "c.yaml")
    done = subprocess.run([sys.executable, "-m", "glsd", "pretrain", str(config)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    for expected in ("data       synthetic:0: 32 images found, all used, 4 classes",
                     "model      glsd_convnet, stride 4: grid 8x8 at global 32 px, 4x4 at local 16 px",
                     "matching   geometric", "device     cpu, precision fp32",
                     "batch      8 per process x 1 process = 8 images per step",
                     "schedule   4 steps/epoch x 100 epochs = 400 steps, stopping at train.max_steps=4",
                     f"run folder {run}", "step 2/4 epoch 0.5 loss ", "step 4/4 epoch 1 loss ",
                     "glsd: done: 4 steps (step 4) in ",
                     f"teacher backbone exported to {run / 'backbone.safetensors'} (and, for "
                     f"glsd.load_backbone: not a timm model, {run / 'export' / 'timm'})"):
        assert expected in err, (expected, err)
    assert "image skipped" not in err and "images skipped" not in err  # only when some were
    assert "step 1/4 epoch" not in err and "step 3/4" not in err  # log_every=2
    assert "step 1/4 done in " in err and "the next step line at step 2 (train.log_every=2)" in err
    assert " lr 0 " not in err and "'lr': 0.0" not in (run / "train.log").read_text()


# ---------------------------------------------------------------------------------------
# collapse indicators

K, D = 64, 32


def _indicators(logits, feats, temp=0.04):
    return {k: float(v) for k, v in collapse_indicators(logits, torch.zeros(1, K), temp, feats).items()}


def test_indicators_of_a_healthy_batch():
    g = torch.Generator().manual_seed(0)
    ind = _indicators(torch.randn(2, 128, K, generator=g) * 0.5, torch.randn(256, D, generator=g))
    assert ind["effective_prototypes"] > 0.8 * K  # the batch spreads over the prototypes
    assert 0.5 < ind["teacher_kl_uniform"] < math.log(K)  # sharpened, not uniform
    assert 0.9 < ind["feature_spread"] < 1.1 and ind["feature_std"] == pytest.approx(ind["feature_spread"] / D ** 0.5)
    assert collapse_reason({"step": 1, **ind}, K) is None


def test_indicators_of_collapsed_batches():
    feats = torch.randn(256, D)
    one_hot = torch.zeros(2, 128, K)
    one_hot[..., 3] = 10.0  # every image on prototype 3
    ind = _indicators(one_hot, feats)
    assert ind["effective_prototypes"] == pytest.approx(1.0, abs=1e-3)
    assert "1 effective prototypes of 64" in collapse_reason(ind, K)
    uniform = _indicators(torch.zeros(2, 128, K), feats)
    assert uniform["teacher_kl_uniform"] == pytest.approx(0.0, abs=1e-5)
    assert uniform["effective_prototypes"] == pytest.approx(K, rel=1e-4)
    assert "teacher outputs are uniform" in collapse_reason(uniform, K)
    same = _indicators(torch.randn(2, 128, K), torch.randn(1, D).expand(256, D) * 3.0)
    assert same["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert "identical across images" in collapse_reason(same, K)


def test_monitor_warns_once_after_patience_and_rearms():
    monitor = CollapseMonitor(K, patience=3, start_step=10)
    bad = {"effective_prototypes": 1.2}
    assert monitor.update({"step": 5, **bad}) is None  # still warming up
    warnings = [monitor.update({"step": s, **bad}) for s in (11, 12, 13, 14)]
    assert warnings[:2] == [None, None] and warnings[3] is None
    assert "collapsed at step 13 (3 logging steps in a row)" in warnings[2] and "teacher_temp" in warnings[2]
    assert monitor.update({"step": 15, "effective_prototypes": 30.0}) is None
    assert [monitor.update({"step": s, **bad}) for s in (16, 17, 18)][-1] is not None
    assert CollapseMonitor(K, patience=0).update({"step": 99, **bad}) is None


def test_indicators_are_logged_every_logging_step(tmp_path):
    from glsd.train.pretrain import pretrain

    pretrain(tiny_config(tmp_path / "run", "train.max_steps=2"))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]  # log_every=1: both steps, none empty
    for record in records:
        assert 1.0 <= record["effective_prototypes"] <= 64
        assert 0 <= record["teacher_kl_uniform"] <= math.log(64) + 1e-6
        assert record["teacher_entropy"] == pytest.approx(math.log(64) - record["teacher_kl_uniform"], abs=1e-5)
        assert 0 < record["feature_std"] < 1


def test_a_collapsed_run_is_warned_about(tmp_path, capsys, monkeypatch):
    import glsd.models.heads as heads
    from glsd.train.pretrain import pretrain

    # An all-zero student and teacher: every image has the same features and outputs.
    cfg = tiny_config(tmp_path / "run", "train.max_steps=3", "log.collapse_patience=2",
                      "train.freeze_last_layer_epochs=0", "train.lr=1e-9", "train.min_lr=0")
    original = heads.build_network

    def zeroed(c):
        net = original(c)
        with torch.no_grad():
            for param in net.backbone.parameters():
                param.zero_()
        return net

    monkeypatch.setattr(heads, "build_network", zeroed)
    pretrain(cfg)
    err = capsys.readouterr().err
    assert "glsd: warning: the run looks collapsed at step 2" in err
    assert "identical across images" in err


# ---------------------------------------------------------------------------------------
# TensorBoard (optional extra)

def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=3", "log.tensorboard=true"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = read_metrics(run)
    for key in ("loss", "lr", "effective_prototypes"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_tensorboard_drops_the_steps_a_resume_redoes(tmp_path):
    """A run killed after logging steps past its checkpoint redoes them on resume: TensorBoard
    shows each step once, with the resumed run's value, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2", "log.tensorboard=true"))
    stale = SummaryWriter(log_dir=str(run / "tensorboard"))  # what the killed run logged
    stale.add_scalar("loss", -1.0, 3)
    stale.close()
    pretrain(tiny_config(run, "train.max_steps=4", "log.tensorboard=true"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = read_metrics(run)
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in records] == [1, 2, 3, 4]
    assert -1.0 not in [e.value for e in acc.Scalars("loss")]


def test_tensorboard_keeps_what_metrics_keeps_after_a_resume_under_another_batch(tmp_path):
    """Re-counted in batches of 16, the resumed step (1) is below the checkpoint's (2, in
    batches of 8): TensorBoard must drop what metrics.jsonl drops (nothing the checkpoint
    trained), not hide the checkpoint's own steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from glsd.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2", "train.epochs=2", "log.tensorboard=true"))
    pretrain(tiny_config(run, "train.max_steps=null", "train.epochs=2", "train.batch_size=16",
                         "train.extend=true", "log.tensorboard=true"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = sorted(e.step for e in acc.Scalars("loss"))
    assert logged == sorted(r["step"] for r in read_metrics(run) if "loss" in r)
    assert logged[:2] == [1, 2]  # the checkpoint's own steps are still shown


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    from glsd.config import ConfigError
    from glsd.train.pretrain import pretrain

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match=r"glsd\[tensorboard\]"):
        pretrain(tiny_config(tmp_path / "run", "log.tensorboard=true"))
    assert not (tmp_path / "run").exists()  # refused before the run folder

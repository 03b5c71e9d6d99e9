"""Issue 14, findings 1-3: no non-finite step written, no config path reaching timm's
unpickling, one process per run folder."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glsd.config import ConfigError, load_config
from glsd.errors import CheckpointError, NonFiniteError, RunFolderBusy
from glsd.train import lock
from glsd.train.checkpoint import load_checkpoint
from glsd.weights import nonfinite_tensors
from glsd.train.objective import GlobalLocalObjective, LossTerms
from glsd.train.pretrain import pretrain

from helpers_tiny import (cli, load_last, start_pretrain, tiny_config, wait_for_step,
                          write_config)

ROOT = Path(__file__).resolve().parents[1]


def _all_finite(run: Path) -> bool:
    ckpt = load_last(run)
    return nonfinite_tensors({"student": ckpt["student"], "teacher": ckpt["teacher"]}) == []


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_at(monkeypatch, call: int, how: str):
    real, calls = GlobalLocalObjective.forward, []

    def forward(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) != call:
            return terms
        if how == "grad":
            return LossTerms(_NanGrad.apply(terms.loss), terms.loss_global, terms.loss_local, terms.diagnostics)
        nan = torch.tensor(float("nan"))
        return LossTerms(terms.loss * nan, terms.loss_global * nan, terms.loss_local, terms.diagnostics)

    monkeypatch.setattr(GlobalLocalObjective, "forward", forward)


# ----------------------------------------------------------------------------------------
# 1. Non-finite steps

@pytest.mark.parametrize("clip", ["3.0", "null"], ids=["clipped", "unclipped"])
def test_nonfinite_gradients_are_never_applied_or_saved(tmp_path, monkeypatch, clip):
    """The loss is finite, its gradients are NaN: on main the update made every weight NaN and
    the next checkpoint saved them. Now the step is refused and last.pt stays finite."""
    _poison_at(monkeypatch, 3, "grad")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=6",
                             f"train.clip_grad={clip}"))
    msg = str(err.value)
    assert "non-finite gradients at step 3" in msg and "not applied" in msg, msg
    assert "(step 2, finite weights) is kept" in msg and "train.lr" in msg
    # a rerun as it is would replay the same batches: both ways on are named
    assert "train.extend=true" in msg and "train.resume=false" in msg, msg
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert _all_finite(run)


def test_nonfinite_weights_are_never_written(tmp_path, monkeypatch):
    """An update that turns a weight to inf (what train.lr=inf did) is caught before the
    checkpoint: last.pt keeps the previous, finite step, and the message says so."""
    import glsd.train.pretrain as pretrain_mod

    real = pretrain_mod.ema_update

    def poisoned_ema(teacher, student, momentum):
        real(teacher, student, momentum)
        if poisoned_ema.calls == 1:  # the second step
            with torch.no_grad():
                next(student.parameters()).fill_(float("inf"))
        poisoned_ema.calls += 1

    poisoned_ema.calls = 0
    monkeypatch.setattr(pretrain_mod, "ema_update", poisoned_ema)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=6"))
    msg = str(err.value)
    assert re.search(r"non-finite weights after step 2: \d+ of \d+ tensors \(e.g. student\.", msg), msg
    assert "were not written" in msg and "(step 1, finite weights) is kept" in msg
    assert load_last(run)["step"] == 1 and _all_finite(run)


def test_nonfinite_loss_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    _poison_at(monkeypatch, 1, "loss")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        pretrain(tiny_config(run, "train.max_steps=3"))
    msg = str(err.value)
    assert "non-finite loss at step 1" in msg and "No checkpoint was written yet" in msg, msg
    assert "is kept" not in msg and "temp" not in msg  # no false claim, no temperature advice
    assert not (run / "checkpoints" / "last.pt").exists()
    assert "failed before its first checkpoint" in (run / "failed.txt").read_text()


def test_a_poisoned_checkpoint_is_not_resumed(tmp_path):
    """A last.pt holding NaN weights (written by an older glsd) is refused, not resumed into
    the same failure."""
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2"))
    ckpt = load_last(run)
    key = next(iter(ckpt["teacher"]))
    ckpt["teacher"][key] = torch.full_like(ckpt["teacher"][key], float("nan"))
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"non-finite weights .*train.resume=false"):
        pretrain(tiny_config(run, "train.max_steps=4"))
    assert cli(["eval", "knn", str(run), "--device", "cpu"]) == 2  # eval refuses it too


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.lr=.inf",
                                      "loss.teacher_temp=0", "loss.student_temp=0"])
def test_nonfinite_or_zero_settings_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r".*out of range"):
        load_config(None, [override])


# ----------------------------------------------------------------------------------------
# 2. Nothing in a config makes timm load a file

class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_pt(tmp_path) -> tuple[Path, Path]:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Evil(marker)}}, evil)
    return evil, marker


VIT_KW = "{embed_dim: 32, depth: 1, num_heads: 2, checkpoint_path: %s}"


@pytest.mark.parametrize("kwargs", ["checkpoint_path: {evil}", "pretrained: true",
                                    "pretrained_cfg_overlay: {{file: {evil}}}",
                                    "pretrained_cfg: {{url: x}}", "init_path: {evil}",
                                    "weights_file: a", "embed_dim: {evil}"])
def test_backbone_kwargs_that_load_files_are_refused(tmp_path, kwargs):
    evil, marker = _evil_pt(tmp_path)
    override = "model.backbone_kwargs={" + kwargs.format(evil=evil) + "}"
    with pytest.raises(ConfigError, match="model.backbone_kwargs"):
        load_config(None, ["model.backbone=vit_tiny_patch16_224", override])
    assert not marker.exists()


def test_the_attack_through_config_file_metadata_and_checkpoint(tmp_path, capsys):
    """checkpoint_path=evil.pt through `pretrain CONFIG`, an export's metadata
    (load_exported, eval) and a checkpoint's config: refused by glsd, never handed to timm
    (on main timm torch.load-ed the file: with timm < 1.0.26 the payload ran)."""
    from glsd.export import load_exported
    from glsd.models.backbone import create_model
    from glsd.train.checkpoint import export_backbone
    from glsd.config import from_dict, to_dict

    evil, marker = _evil_pt(tmp_path)
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_steps=1", vit=True)
    raw = to_dict(cfg)
    raw["model"]["backbone_kwargs"]["checkpoint_path"] = str(evil)
    # 1. pretrain CONFIG
    config = tmp_path / "evil.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    assert cli(["pretrain", str(config)]) == 2
    assert "backbone_kwargs.checkpoint_path is not allowed" in capsys.readouterr().err
    # 2. an export whose metadata carries the config
    model = create_model(cfg.model, 32)
    st = tmp_path / "backbone.safetensors"
    export_backbone(st, model, raw)
    with pytest.raises(ConfigError, match="checkpoint_path"):
        load_exported(st)
    assert cli(["eval", "knn", str(st), "--device", "cpu"]) == 2
    # 3. a config that skipped validation (a checkpoint's) still cannot reach timm
    with pytest.raises(ConfigError, match="checkpoint_path"):
        create_model(from_dict(raw).model, 32)
    assert not marker.exists()


def test_timm_lower_bound_loads_weights_only():
    """timm 1.0.26 made its torch.load calls weights_only=True by default; older releases
    unpickled a checkpoint_path with weights_only=False."""
    text = (ROOT / "pyproject.toml").read_text()
    timm = re.search(r'"timm>=(\d+)\.(\d+)\.(\d+)"', text)
    assert timm and tuple(map(int, timm.groups())) >= (1, 0, 26), text
    torch_bound = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert tuple(map(int, torch_bound.groups())) >= (2, 6)  # torch.load defaults to weights_only


def test_absurd_model_from_metadata_is_refused_before_it_is_built(tmp_path):
    from glsd.export import load_exported
    from glsd.models.backbone import create_model
    from glsd.train.checkpoint import export_backbone
    from glsd.config import to_dict

    cfg = tiny_config(tmp_path / "r", vit=True)
    raw = to_dict(cfg)
    export_backbone(tmp_path / "b.safetensors", create_model(cfg.model, 32), raw)
    raw["model"]["backbone_kwargs"] = {"embed_dim": 60000, "depth": 12, "num_heads": 2}
    # Rewrite only the metadata: weights of a tiny ViT, config of a ~1 TB one.
    from safetensors.torch import load_file, save_file
    save_file(load_file(tmp_path / "b.safetensors"), tmp_path / "big.safetensors",
              metadata={"format": "glsd-backbone-v1", "backbone": "vit_tiny_patch16_224",
                        "config": json.dumps(raw)})
    with pytest.raises(ConfigError, match=r"parameters .* GB"):
        load_exported(tmp_path / "big.safetensors")


# ----------------------------------------------------------------------------------------
# 3. One process per run folder

def test_second_pretrain_on_a_live_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_steps=500")
    proc = start_pretrain(write_config(cfg, tmp_path / "c.yaml"))
    try:
        wait_for_step(proc, run, 1)
        info = json.loads((run / lock.LOCK_NAME).read_text())
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
        before = (run / "metrics.jsonl").read_text()
        with pytest.raises(RunFolderBusy) as err:
            pretrain(cfg)
        assert f"process {proc.pid} on host {socket.gethostname()}" in str(err.value)
        assert not list(run.glob("previous-*"))  # nothing of the live run was moved
        assert not (run / "failed.txt").exists()  # nor marked failed by the refused one
        assert (run / "metrics.jsonl").read_text().startswith(before)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run / lock.LOCK_NAME).exists()  # released on a clean stop


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_is_taken_over_and_foreign_host_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "what": "pretrain"}
    (run / lock.LOCK_NAME).write_text(json.dumps(stale))
    pretrain(tiny_config(run, "train.max_steps=1"))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert load_last(run)["step"] == 1 and not (run / lock.LOCK_NAME).exists()
    # A live pid that is not the owner (the pid was reused after a reboot or wrap-around).
    reused = {"pid": os.getpid(), "pid_start": "1", "host": socket.gethostname(), "what": "pretrain"}
    (run / lock.LOCK_NAME).write_text(json.dumps(reused))
    pretrain(tiny_config(run, "train.max_steps=2"))
    assert load_last(run)["step"] == 2
    (run / lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "what": "pretrain"}))
    with pytest.raises(RunFolderBusy, match=r"host elsewhere.*delete"):
        pretrain(tiny_config(run, "train.max_steps=3"))
    (run / lock.LOCK_NAME).unlink()


def test_another_hosts_lock_is_taken_over_once_its_heartbeat_stopped(tmp_path, capsys, monkeypatch):
    """A job requeued on another node after its node died: the dead node's lock, unrefreshed
    past the lease, is taken over; one refreshed within it, or of a glsd without a heartbeat,
    is refused. The suspended owner learns it before it writes again."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / lock.LOCK_NAME
    other = {"pid": 1, "host": "node-7", "what": "pretrain", "command": "glsd pretrain", "heartbeat_s": 60.0}
    path.write_text(json.dumps(other))  # refreshed just now
    with pytest.raises(RunFolderBusy, match=r"host node-7.*refreshed [0-9] s ago, .*taken over 900 s after its last refresh"):
        lock.acquire(run)
    old = time.time() - lock.LEASE_S - 60
    os.utime(path, (old, old))
    path.write_text(json.dumps({k: v for k, v in other.items() if k != "heartbeat_s"}))  # older glsd
    os.utime(path, (old, old))
    with pytest.raises(RunFolderBusy, match="host node-7"):
        lock.acquire(run)
    path.write_text(json.dumps(other))
    os.utime(path, (old, old))
    pretrain(tiny_config(run, "train.max_steps=1"))
    assert "process 1 on host node-7 has not refreshed it for over 900 s" in capsys.readouterr().err
    assert load_last(run)["step"] == 1 and sorted(p.name for p in run.iterdir() if p.name.startswith(".glsd")) == []
    # This process holds the lock and is "suspended": another host takes it over.
    lock.acquire(run, "pretrain")
    path.write_text(json.dumps(other))
    with pytest.raises(RunFolderBusy, match="taken over by process 1 on host node-7.*stops without writing"):
        lock.check_owned(run)
    assert not lock.holds(run) and json.loads(path.read_text()) == other  # the new owner's, kept


def test_a_lock_taken_over_is_left_to_its_new_owner(tmp_path, monkeypatch):
    """The old owner neither keeps it alive (heartbeat) nor writes failed.txt into the folder;
    a lock whose age cannot be told (nothing can be written beside it) never expires; a clock
    probe left by a kill is not run content."""
    from glsd.train.run_folder import RunFolder

    run = tmp_path / "run"
    folder = RunFolder(run)
    folder.prepare(tiny_config(run))
    other = {"pid": 1, "host": "node-7", "what": "pretrain", "command": "glsd pretrain", "heartbeat_s": 60.0}
    path = run / lock.LOCK_NAME
    path.write_text(json.dumps(other))
    os.utime(path, (1000, 1000))
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(lock, "_heartbeat", None)
    lock._start_heartbeat()
    time.sleep(0.3)
    assert path.stat().st_mtime == 1000  # not refreshed by the process it was taken from
    with pytest.raises(RunFolderBusy):
        folder.log_metrics({"step": 1})
    folder.mark_failed(RunFolderBusy("taken over"))
    assert not (run / "failed.txt").exists()
    monkeypatch.setattr(lock, "_unrefreshed_for", lambda p: None)
    assert not lock._stale(path, other)
    folder.close()  # its log handler; the lock is no longer its own to release
    assert json.loads(path.read_text()) == other
    assert lock.is_lock_file(f"{lock.LOCK_NAME}.now-node-7-12") and not lock.is_lock_file("config.yaml")


def test_the_heartbeat_refreshes_every_held_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(lock, "_heartbeat", None)
    path = lock.acquire(tmp_path / "run")
    try:
        os.utime(path, (1, 1))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60
    finally:
        lock.release(tmp_path / "run")


def test_two_processes_finding_one_stale_lock_do_not_both_take_it(tmp_path):
    """A read the stale lock, took it over and wrote its own; B, slower, read the same stale
    record: B's take-over must leave A's fresh lock in place (B then finds the folder busy)."""
    path = tmp_path / lock.LOCK_NAME
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "what": "pretrain"}
    fresh = {"pid": os.getpid(), "host": socket.gethostname(), "what": "pretrain"}
    path.write_text(json.dumps(fresh))  # A's, written after A removed the stale one
    lock._take_over(path, stale)  # B acts on what it read before
    assert json.loads(path.read_text()) == fresh and list(tmp_path.iterdir()) == [path]
    path.write_text(json.dumps(stale))
    lock._take_over(path, stale)  # the stale record itself: removed
    assert list(tmp_path.iterdir()) == []


def test_lock_is_reentrant_and_eval_locks_its_output(tmp_path):
    folder = tmp_path / "f"
    lock.acquire(folder)
    lock.acquire(folder)
    lock.release(folder)
    assert (folder / lock.LOCK_NAME).exists()
    lock.release(folder)
    assert not folder.exists()  # created only to lock it, nothing written: removed
    assert lock.eval_output_dir(tmp_path / "run" / "checkpoints" / "last.pt") == tmp_path / "run" / "eval"


def test_large_finite_half_precision_weights_are_not_called_non_finite():
    """A finite fp16 tensor's norm overflows past 65,504 (a BatchNorm running_var of a hub
    file): only the tensor holding an inf is named."""
    big = torch.full((10_000,), 1000.0, dtype=torch.float16)
    broken = big.clone()
    broken[3] = float("inf")
    state = {"big": big, "broken": broken, "double": torch.ones(3, dtype=torch.float64),
             "count": torch.arange(3)}
    assert torch.isinf(torch._foreach_norm([big])[0])  # the overflow this guards against
    assert nonfinite_tensors({"w": state}) == ["w.broken"]


class _FakeWinapi:
    """``_winapi`` as Windows has it, over a table of pids: alive, exited, or another user's."""
    WAIT_TIMEOUT = 0x102

    def __init__(self, processes):
        self.processes, self.closed = processes, 0

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 - Windows' names
        state = self.processes.get(pid)
        if state is None:
            raise OSError(22, "The parameter is incorrect", None, 87)
        if state == "denied":
            raise PermissionError(13, "Access is denied")  # Windows maps error 5 to EACCES
        return pid

    def WaitForSingleObject(self, handle, ms):  # noqa: N802
        return self.WAIT_TIMEOUT if self.processes[handle] == "running" else 0

    def CloseHandle(self, handle):  # noqa: N802
        self.closed += 1


def test_the_lock_probes_a_windows_process_without_signalling_it(monkeypatch):
    """os.kill(pid, 0) on Windows sends CTRL_C_EVENT (or terminates): never used there."""
    fake = _FakeWinapi({10: "running", 11: "exited", 12: "denied"})
    monkeypatch.setitem(sys.modules, "_winapi", fake)
    monkeypatch.setattr(lock.os, "kill", lambda *a: pytest.fail("os.kill used as a probe"))
    monkeypatch.setattr(lock, "_WINDOWS", True)
    assert [lock._alive(pid) for pid in (10, 11, 12, 13)] == [True, False, True, False]
    assert fake.closed == 2  # every opened handle is closed


def test_a_diverged_run_is_told_its_weights_have_grown(tmp_path):
    """A learning rate of 1e30 blows the weights up to 1e28 while the loss stays finite for a
    step or two: the kept checkpoint is finite but ruined, so the message says to start over
    rather than promising that a rerun resumes well."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=8",
                             "train.lr=1e30", "train.warmup_steps=0"))
    msg = str(err.value)
    assert "weights have grown" in msg and "train.resume=false" in msg, msg
    assert "now 1e+30" in msg and "once scaled by the global batch" in msg, msg


def _tiny_run(path, *extra):
    pretrain(tiny_config(path, "train.max_steps=2", *extra))
    return path


def test_resume_without_config_yaml_still_refuses_a_changed_schedule(tmp_path):
    """A checkpoint copied into a new folder, without its config.yaml: its own config
    decides what changed (the copy used to resume under any schedule, saying nothing)."""
    run = _tiny_run(tmp_path / "run")
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    (moved / "checkpoints" / "last.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(ConfigError, match=r"another schedule .*train\.lr"):
        pretrain(tiny_config(moved, "train.max_steps=3", "train.lr=0.5"))


def test_a_kill_before_the_kept_epoch_copy_is_written_is_repaired_by_the_resume(tmp_path, monkeypatch):
    """last.pt of an epoch's end is written, then the kill comes before epochNNNN.pt: the
    resume (from that last.pt, past the epoch's end) writes the kept copy it holds."""
    import glsd.train.saving as saving

    real = saving.atomic_copy

    def killed_at_the_kept_copy(source, target):
        if Path(target).name == "epoch0001.pt":
            raise KeyboardInterrupt("killed")  # nothing below the trainer catches it
        return real(source, target)

    run = tmp_path / "run"
    cfg = ("train.epochs=2", "train.max_steps=8", "train.checkpoint_every_epochs=1", "train.checkpoint_every_steps=0")
    monkeypatch.setattr(saving, "atomic_copy", killed_at_the_kept_copy)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(run, *cfg))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["last.pt"]
    at_epoch_end = (run / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setattr(saving, "atomic_copy", real)
    pretrain(tiny_config(run, *cfg))
    assert (run / "checkpoints" / "epoch0001.pt").read_bytes() == at_epoch_end
    assert load_checkpoint(run / "checkpoints" / "epoch0002.pt")["step"] == 8


def test_a_garbage_checkpoint_is_called_corrupt_with_the_ways_on(tmp_path):
    run = _tiny_run(tmp_path / "run")
    (run / "checkpoints" / "last.pt").write_bytes(b"<html>not a checkpoint</html>" * 10)
    with pytest.raises(CheckpointError) as err:
        pretrain(tiny_config(run, "train.max_steps=3"))
    msg = str(err.value)
    assert "not a torch checkpoint" in msg and "could run code" not in msg, msg
    assert "train.resume=false" in msg, msg
    with pytest.raises(CheckpointError, match="not a torch checkpoint.*backbone.safetensors instead"):
        from glsd.eval.runner import run_eval
        run_eval("knn", run)  # evaluation maps checkpoints: the same diagnosis


def test_eval_refuses_a_checkpoint_of_another_config_laid_into_a_run(tmp_path):
    """Same architecture, other images: the record would mix one run's config with another's
    weights. Resume refuses it; so does evaluation, naming the keys."""
    from glsd.eval.runner import run_eval

    mine = _tiny_run(tmp_path / "mine")
    other = _tiny_run(tmp_path / "other", "data.synthetic_num_images=40")
    (mine / "checkpoints" / "last.pt").write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(ConfigError, match=r"belongs to another run.*data\.synthetic_num_images"):
        run_eval("dense", mine)


def test_eval_of_a_run_that_has_not_finished_says_so(tmp_path):
    from glsd.eval.runner import headline, run_eval

    run = _tiny_run(tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["planned_steps"] == 2  # train.max_steps: where the run stops
    assert run_eval("dense", run)["run_finished"] is True
    torch.save({**ckpt, "planned_steps": 8}, last)  # as a run still training would have it
    record = run_eval("dense", run)
    assert record["run_finished"] is False
    assert "step 2 of 8: not the run's final model" in headline(record)


def test_eval_accepts_a_run_whose_config_names_where_its_data_moved(tmp_path):
    """config.yaml edited to the data's new place: the same run, not another one; other images
    (a data key that chooses them) are another run."""
    from glsd.config import to_dict
    from glsd.eval.locate import _same_run

    def raw(*extra):
        return to_dict(load_config("cpu-default", ["data.source=auto", *extra]))

    ckpt, cfg_file = tmp_path / "last.pt", tmp_path / "config.yaml"
    cfg_file.write_text("written")
    trained = {"config": raw("data.root=/old/photos")}
    _same_run(raw("data.root=/new/photos"), trained, ckpt, cfg_file)  # no refusal
    with pytest.raises(ConfigError, match="belongs to another run.*data.num_images"):
        _same_run(raw("data.root=/new/photos", "data.num_images=50"), trained, ckpt, cfg_file)

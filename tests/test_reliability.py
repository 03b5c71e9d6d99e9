"""Reliability of pretraining: kills, signals, atomic checkpoints, exact resume, config guards,
non-finite losses, bad data, safe loading and config validation."""
import io
import logging
import os
import pickle
import re
import signal
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import glsd.train.pretrain as pretrain_mod
from glsd.config import ConfigError, load_config
from glsd.models.backbone import create_model
from glsd.errors import DataError, DiskFull
from glsd.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from glsd.train.objective import GlobalLocalObjective, LossTerms
from glsd.errors import NonFiniteError
from glsd.train.pretrain import pretrain
from glsd.train.run_folder import RunFolder

from helpers_tiny import (cli, last_step, load_last, read_metrics, start_pretrain, state_dicts_equal,
                          tiny_config, wait_for_step, write_config)

SRC = Path(__file__).resolve().parents[1] / "src" / "glsd"
# Two blocks: timm spreads drop_path_rate linearly over depth, so one block would get 0.
DROP_PATH_VIT = ("model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "model.drop_path_rate=0.2")


@pytest.fixture(autouse=True)
def _restore_determinism():
    """train.deterministic=true flips a process-wide switch; give it back."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _tmp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------------------
# Kills, signals and exact resume

@pytest.mark.parametrize("where", ["cpu", "device"])  # cpu_batched is an alias of cpu
def test_sigkill_mid_run_resumes_to_identical_weights(tmp_path, where):
    """SIGKILL a `python -m glsd pretrain` run, rerun it: the final student and teacher equal,
    tensor for tensor, those of an uninterrupted run, wherever the views are made. A ViT with
    stochastic depth, so the RNG state must be restored exactly too; the run crosses an epoch
    boundary (4 steps/epoch)."""
    extra = ("train.checkpoint_every_steps=2", "train.deterministic=true", "train.max_steps=6",
             f"data.augment_on={where}", *DROP_PATH_VIT)
    killed = tmp_path / "killed"
    proc = start_pretrain(write_config(tiny_config(killed, *extra, vit=True), tmp_path / "killed.yaml"),
                          stdout=subprocess.DEVNULL)
    killer_error = []

    def kill_at_step_3():
        try:
            wait_for_step(proc, killed, 3)
            proc.send_signal(signal.SIGKILL)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            killer_error.append(e)

    killer = threading.Thread(target=kill_at_step_3)
    killer.start()  # the uninterrupted reference runs here meanwhile
    try:
        ref = tmp_path / "ref"
        pretrain(tiny_config(ref, *extra, vit=True))
        killer.join(timeout=150)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killer_error:
        raise killer_error[0]
    assert proc.returncode == -signal.SIGKILL
    ckpt_step = load_checkpoint(killed / "checkpoints" / "last.pt")["step"]
    assert 2 <= ckpt_step < 6 and ckpt_step <= last_step(killed)
    assert not (killed / "backbone.safetensors").exists()
    # A checkpoint write torn by the kill leaves a temp file beside last.pt: it must not matter.
    (killed / "checkpoints" / ".last.pt.tmp-999999").write_bytes(b"torn")

    pretrain(tiny_config(killed, *extra, vit=True))  # the rerun resumes
    assert f"resumed from step {ckpt_step}" in (killed / "train.log").read_text()

    a, b = load_last(ref), load_last(killed)
    assert a["step"] == b["step"] == 6
    assert state_dicts_equal(a["student"], b["student"]) == []
    assert state_dicts_equal(a["teacher"], b["teacher"]) == []
    assert state_dicts_equal(a["objective"], b["objective"]) == []  # both centres
    assert a["rng"]["torch"].equal(b["rng"]["torch"])
    # The resumed steps logged the same losses as the uninterrupted ones.
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(ref)}
    resumed = [r for r in read_metrics(killed) if r["step"] > ckpt_step][-(6 - ckpt_step):]
    assert [(r["step"], r["loss"]) for r in resumed] == [(s, ref_losses[s]) for s in range(ckpt_step + 1, 7)]


@pytest.mark.parametrize("whole_group", [False, True], ids=["to-the-trainer", "to-its-group"])
def test_sigterm_finishes_step_checkpoints_and_exits_cleanly(tmp_path, whole_group):
    """The signal to the training process alone, or (as a scheduler or Ctrl-C sends it) to
    every process of the job, loader workers included: a worker killed by it used to make the
    trainer raise mid-step instead of finishing the step and writing its checkpoint."""
    run = tmp_path / "run"
    workers = "data.num_workers=1" if whole_group else "data.num_workers=0"
    proc = start_pretrain(write_config(tiny_config(run, "train.max_steps=500", workers), tmp_path / "c.yaml"),
                          own_group=whole_group)
    try:
        wait_for_step(proc, run, 2)
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM == 143, err  # interrupted, not finished
    if whole_group:  # the loader worker that ignored the signal ended with the trainer
        deadline = time.monotonic() + 15
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a loader worker outlived the trainer"
            time.sleep(0.2)
    assert f"stopped by signal {int(signal.SIGTERM)}" in err and "Rerun the same command" in err
    assert f"`glsd export {run}` writes this checkpoint's backbone" in err  # usable meanwhile
    assert err.count("glsd:") == 1 and "Traceback" not in err, err  # one message
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped_at = int(re.search(r"after step (\d+)", err).group(1))
    assert ckpt["step"] == stopped_at == last_step(run) >= 2
    assert not (run / "backbone.safetensors").exists()  # not finished: nothing exported
    assert "checkpoint written" in (run / "train.log").read_text()
    assert _tmp_files(run) == []


def test_sigint_in_process_stops_after_the_step(tmp_path, monkeypatch):
    real = pretrain_mod.train_step

    def step(ctx, batch, step, want_stats=True):
        if step == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return real(ctx, batch, step, want_stats)

    monkeypatch.setattr(pretrain_mod, "train_step", step)
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    with pytest.raises(pretrain_mod.TrainingInterrupted, match="step 2"):
        pretrain(tiny_config(run, "train.max_steps=6"))
    assert load_last(run)["step"] == 2 == last_step(run)
    assert signal.getsignal(signal.SIGINT) is before  # handler given back
    assert not (run / "backbone.safetensors").exists()


def test_a_stop_on_the_last_step_of_an_epoch_closes_the_epoch_on_resume(tmp_path, monkeypatch):
    """Stopped by a signal in the run's last step, which ends its second epoch (4 steps each):
    the rerun has no step left to take, but the epoch's own end (its numbered checkpoint) is
    still made, then the export."""
    real = pretrain_mod.train_step

    def step(ctx, batch, step, want_stats=True):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(ctx, batch, step, want_stats)

    monkeypatch.setattr(pretrain_mod, "train_step", step)
    cfg = tiny_config(tmp_path / "run", "train.max_steps=null", "train.epochs=2",
                      "train.checkpoint_every_epochs=2")
    with pytest.raises(pretrain_mod.TrainingInterrupted, match="step 8"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "epoch0002.pt").exists()
    monkeypatch.setattr(pretrain_mod, "train_step", real)
    pretrain(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch0002.pt")["step"] == 8
    assert (tmp_path / "run" / "backbone.safetensors").exists()


# ----------------------------------------------------------------------------------------
# Atomic checkpoints

def test_each_position_is_checkpointed_once(tmp_path, monkeypatch):
    """2 epochs of 4 steps, last.pt refreshed every 2 steps: saved at steps 2, 4 (the epoch's
    end, not also by the every-2-steps rule), 6 and 8 (the end of the run, not again after the
    loop). Each save is a full write and fsync; the kept epoch0001.pt / epoch0002.pt are copies
    of last.pt's bytes at their step (not a second serialisation)."""
    saved = []
    import glsd.train.saving as saving_mod

    real = saving_mod.save_checkpoint

    def counting(path, payload):
        saved.append((Path(path).name, payload["step"]))
        return real(path, payload)

    monkeypatch.setattr(saving_mod, "save_checkpoint", counting)
    pretrain(tiny_config(tmp_path / "run", "train.max_steps=null", "train.epochs=2",
                         "train.checkpoint_every_steps=2", "train.checkpoint_every_epochs=1"))
    assert saved == [("last.pt", 2), ("last.pt", 4), ("last.pt", 6), ("last.pt", 8)]
    folder = tmp_path / "run" / "checkpoints"
    assert [load_checkpoint(folder / f"epoch000{e}.pt")["step"] for e in (1, 2)] == [4, 8]
    assert (folder / "epoch0002.pt").read_bytes() == (folder / "last.pt").read_bytes()


def test_a_kept_copy_is_its_own_file(tmp_path):
    """Not a hard link: a roll-back by `cp epoch0001.pt last.pt` (an in-place write) must not
    rewrite another kept copy that shares last.pt's bytes."""
    from glsd.utils.io import atomic_copy, atomic_write_text

    atomic_write_text(tmp_path / "last.pt", "state at step 8")
    atomic_copy(tmp_path / "last.pt", tmp_path / "epoch0002.pt")
    (tmp_path / "last.pt").write_text("state at step 4")  # in place, as cp does
    assert (tmp_path / "epoch0002.pt").read_text() == "state at step 8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0002.pt", "last.pt"]


def test_ranks_that_find_different_checkpoints_are_refused(monkeypatch):
    """Nodes without a shared output_dir: one rank resumes step 5, another starts fresh."""
    import glsd.train.resume as resume_mod
    monkeypatch.setattr(resume_mod, "gather_objects", lambda mine: [mine, (None, None)])
    with pytest.raises(ConfigError, match=r"rank 0: step 5, rank 1: none.*disk they share"):
        resume_mod.require_one_checkpoint({"step": 5})
    monkeypatch.setattr(resume_mod, "gather_objects", lambda mine: [mine, mine])
    resume_mod.require_one_checkpoint({"step": 5})
    resume_mod.require_one_checkpoint(None)
    # rank 0 alone refused the folder: the other ranks stop with its message, not at a timeout
    monkeypatch.setattr(resume_mod, "gather_objects", lambda mine: [(None, "output_dir x is not empty"), mine])
    with pytest.raises(ConfigError, match="rank 0 could not prepare the run folder: output_dir x is not empty"):
        resume_mod.require_one_checkpoint(None)


def test_a_resume_asks_every_rank_which_checkpoint_it_found(tmp_path, monkeypatch):
    """The training start runs the check: a second rank that (as on another node's disk)
    found no checkpoint stops the resume before any step."""
    import glsd.train.resume as resume_mod
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2")
    pretrain(cfg)
    monkeypatch.setattr(resume_mod, "gather_objects", lambda mine: [mine, (None, None)])
    with pytest.raises(ConfigError, match="rank 0: step 2, rank 1: none"):
        pretrain(tiny_config(tmp_path / "run", "train.max_steps=4"))
    assert load_last(tmp_path / "run")["step"] == 2


def _payload(value: float) -> dict:
    return {"w": torch.full((1000,), value), "step": int(value)}


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _payload(1.0))
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then the disk fails
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(DiskFull, match="disk full while writing .*last.pt; the previous last.pt is intact"):
        save_checkpoint(path, _payload(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.full((1000,), 1.0))
    assert ckpt["format"] == FORMAT
    assert _tmp_files(tmp_path) == []


def test_failed_checkpoint_write_during_pretraining(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def failing_third(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK\x03\x04 partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_third)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=5"))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert _tmp_files(run) == []
    pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=4"))
    assert "resumed from step 2" in (run / "train.log").read_text()
    assert load_last(run)["step"] == 4


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(3.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------
# Config guards on resume

def test_resume_refuses_a_changed_config_naming_keys(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2"))
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(run, "train.max_steps=4", "model.out_dim=32", "loss.matching=none",
                             "data.fraction=0.5"))
    msg = str(err.value)
    for key in ("model.out_dim", "loss.matching", "data.fraction"):
        assert key in msg, msg
    assert "train.resume=false" in msg and "new output_dir" in msg
    # Nothing was touched.
    assert (run / "config.yaml").read_text() == config_before
    assert load_last(run)["step"] == 2 and last_step(run) == 2
    # More steps is a continuation; another lr is another schedule, continued only when
    # train.extend=true says so (test_preflight covers the refusal).
    pretrain(tiny_config(run, "train.max_steps=3"))
    assert load_last(run)["step"] == 3
    pretrain(tiny_config(run, "train.max_steps=4", "train.lr=1e-4", "train.extend=true"))
    assert load_last(run)["step"] == 4


def test_resume_of_a_config_this_version_cannot_read_names_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_steps=1")
    pretrain(cfg)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    ckpt["config"]["train"]["a_later_key"] = 1  # as a newer glsd might have written it
    save_checkpoint(run / "checkpoints" / "last.pt", ckpt)
    with pytest.raises(ConfigError, match=r"saved in .*last\.pt cannot be read: .*a_later_key"):
        pretrain(tiny_config(run, "train.max_steps=2"))


def test_resume_false_or_new_output_dir_start_fresh_and_keep_old(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2"))
    old_ckpt = load_last(run)
    # Another config, resume=false: a fresh run; the old one is moved aside, not deleted.
    pretrain(tiny_config(run, "train.max_steps=1", "model.out_dim=32", "train.resume=false"))
    assert "moved the previous files" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert load_last(run)["step"] == 1
    (prev,) = run.glob("previous-*")
    kept = torch.load(prev / "checkpoints" / "last.pt", weights_only=True)
    assert state_dicts_equal(kept["student"], old_ckpt["student"]) == []
    assert [r["step"] for r in read_metrics(prev)] == [1, 2]
    # A new output_dir starts fresh too.
    other = tmp_path / "other"
    pretrain(tiny_config(other, "train.max_steps=1"))
    assert load_last(other)["step"] == 1


CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM)], ids=["cuda", "cpu"])
def test_out_of_memory_names_what_to_lower_and_the_kept_checkpoint(tmp_path, monkeypatch, capsys, error):
    """Out of memory at step 6 (after the epoch-end checkpoint of step 4), as torch raises it
    on a GPU or from the CPU allocator: one line, exit 1, the batch and views named, and how
    the checkpoint resumes under a smaller batch."""
    real = pretrain_mod.train_step

    def step(ctx, batch, step, want_stats=True):
        if step == 5:
            raise error
        return real(ctx, batch, step, want_stats)

    monkeypatch.setattr(pretrain_mod, "train_step", step)
    run = tmp_path / "run"
    config = write_config(tiny_config(run, "train.max_steps=8"), tmp_path / "c.yaml")
    assert cli(["pretrain", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("glsd:") == 1 and "Traceback" not in err, err
    for part in ("out of memory on cpu in step 6", str(error).splitlines()[0][:60], "train.batch_size=8",
                 "crops.num_local", "train.precision=bf16", "(step 4) is kept", "train.extend=true",
                 "a new run"):
        assert part in err, (part, err)
    assert load_last(run)["step"] == 4


def test_out_of_memory_elsewhere_is_one_line(monkeypatch, capsys):
    import glsd.cli as cli_mod

    def run_eval(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr("glsd.eval.runner.run_eval", run_eval)
    assert cli_mod.main(["eval", "knn", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("glsd: out of memory (CUDA out of memory. Tried to allocate 9.00 GiB)"), err
    assert "eval.batch_size" in err and "Traceback" not in err
    assert cli_mod.main(["eval", "knn", "somewhere", "--debug"]) == 1  # the traceback on demand
    assert "Traceback" in capsys.readouterr().err


def test_a_mapped_resume_reads_the_same_checkpoint(tmp_path):
    """A resume onto a GPU maps last.pt (ranks on a host share the pages): the same state."""
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2")
    pretrain(cfg)
    folder = RunFolder(Path(cfg.output_dir))
    try:
        mapped = folder.prepare(tiny_config(tmp_path / "run", "train.max_steps=4"), map_checkpoint=True)
    finally:
        folder.close()
    whole = load_last(tmp_path / "run")
    assert mapped["step"] == 2 and state_dicts_equal(mapped["student"], whole["student"]) == []
    assert torch.equal(mapped["rng"]["torch"], whole["rng"]["torch"])


def test_run_folder_is_never_overwritten_silently(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.resume=false")
    root = Path(cfg.output_dir)
    # Not a glsd run: refused.
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        RunFolder(root).prepare(cfg)
    assert (root / "notes.txt").read_text() == "mine"
    (root / "notes.txt").unlink()
    # A run of another config that never reached a checkpoint: archived, not overwritten.
    # Twice within one second: each archive must survive.
    for i in range(3):
        folder = RunFolder(root)
        folder.prepare(tiny_config(root, f"model.out_dim={32 + i}", "train.resume=false"))
        (root / "metrics.jsonl").write_text(f'{{"step": {i}}}\n')
        folder.close()
    archives = sorted(root.glob("previous-*"))
    assert len(archives) == 2, archives
    assert sorted((a / "metrics.jsonl").read_text() for a in archives) == ['{"step": 0}\n', '{"step": 1}\n']


# ----------------------------------------------------------------------------------------
# Non-finite loss

def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real, calls = GlobalLocalObjective.forward, []

    def forward(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            nan = torch.tensor(float("nan"))
            return LossTerms(terms.loss * nan, terms.loss_global, terms.loss_local * nan, terms.diagnostics)
        return terms

    monkeypatch.setattr(GlobalLocalObjective, "forward", forward)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        pretrain(tiny_config(run, "train.checkpoint_every_steps=1", "train.max_steps=6"))
    msg = str(err.value)
    assert "step 3" in msg and "loss_global=" in msg and "loss_local=nan" in msg
    assert "(step 2, finite weights) is kept" in msg and "train.lr" in msg
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert last_step(run) == 2
    assert not (run / "backbone.safetensors").exists()
    # The failed run let go of its train.log (later runs in this process must not write to it)
    # and of its folder's lock (a study's next cell, or a rerun from the same Python session).
    assert not [h for h in logging.getLogger("glsd").handlers if isinstance(h, logging.FileHandler)]
    assert not (run / ".glsd.lock").exists()


# ----------------------------------------------------------------------------------------
# Bad data

def _image_folder(root: Path, n_per_class: int = 8) -> tuple[Path, Path]:
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (40, 40), (30 * i, 100 * c, 50)).save(root / cls / f"{i}.png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG", quality=95)
    truncated = root / "a" / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    not_image = root / "b" / "notes.jpg"
    not_image.write_text("this is a text file, not a JPEG\n")
    return truncated, not_image


def _data_cfg(run, root, *extra):
    # 18 images (2 bad), batch 6: one epoch of 3 steps reads them all.
    return tiny_config(run, "data.source=auto", f"data.root={root}", "train.batch_size=6",
                       "train.max_steps=3", *extra)


def test_a_dead_loader_worker_keeps_the_run(tmp_path, monkeypatch):
    """A worker killed mid-run (the OOM killer, a decoder segfault) ends the run with one
    error and a checkpoint of the last finished step, from which the rerun resumes."""
    from glsd.data.sources import ImageSource

    trainer, reads, load = os.getpid(), {}, ImageSource.load_or_why

    def load_then_die(self, *args, **kwargs):
        pid = os.getpid()
        reads[pid] = reads.get(pid, 0) + 1
        # In the worker's 7th batch of 6: with two batches in flight, the trainer has had 5.
        if pid != trainer and reads[pid] > 6 * 6:
            # Die once the trainer has used the batches in flight and waits for this one: its
            # SIGCHLD then lands between steps, not in a weight update (where no checkpoint
            # can be written, by design), which made the test depend on timing.
            time.sleep(2.0)
            os.kill(pid, signal.SIGKILL)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ImageSource, "load_or_why", load_then_die)
    root, run = tmp_path / "images", tmp_path / "run"
    _image_folder(root, n_per_class=24)
    cfg = _data_cfg(run, root, "data.num_workers=1", "train.max_steps=null", "train.epochs=2",
                    "train.checkpoint_every_steps=0")
    with pytest.raises(DataError, match=r"a data loader worker died \(DataLoader worker .*; checkpoint "
                                        r"written at step (\d+): rerun the command to resume") as err:
        pretrain(cfg)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert 4 <= step <= 6 and load_last(run)["step"] == step
    monkeypatch.setattr(ImageSource, "load_or_why", load)
    pretrain(cfg)  # resumes there and finishes
    steps = [r["step"] for r in read_metrics(run)]  # the rerun went on from there: no step twice
    assert load_last(run)["step"] == steps[-1] == 2 * (50 // 6) and len(steps) == len(set(steps))


def test_only_a_dead_worker_is_told_as_one():
    from glsd.data.workers import is_worker_death

    assert is_worker_death(RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. "))
    assert is_worker_death(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly"))
    # A worker's own exception, re-raised by torch, keeps its own message (and its own fix).
    assert not is_worker_death(DataError("Caught DataError in DataLoader worker process 0.\n"
                                         "cannot read image 'a/0.jpg' ... set data.on_error=skip"))
    assert not is_worker_death(RuntimeError("Caught RuntimeError in DataLoader worker process 1."))


def test_a_bad_file_read_in_a_worker_under_on_error_fail_names_the_file(tmp_path):
    root, run = tmp_path / "images", tmp_path / "run"
    _image_folder(root)
    with pytest.raises(DataError, match="cannot read image .* set data.on_error=skip") as err:
        pretrain(_data_cfg(run, root, "data.num_workers=1", "data.on_error=fail"))
    assert "worker died" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])  # 1: read in a worker, named by the trainer
def test_bad_images_are_skipped_and_counted(tmp_path, workers):
    root, run = tmp_path / "images", tmp_path / "run"
    _image_folder(root)
    pretrain(_data_cfg(run, root, f"data.num_workers={workers}"))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["skipped_images"] == 2
    assert load_last(run)["skipped_images"] == 2
    assert (run / "backbone.safetensors").is_file()
    log = (run / "train.log").read_text()  # each skipped file named once, whatever the epochs
    for name in ("a/truncated.jpg", "b/notes.jpg"):
        assert log.count(f"skipped unreadable image '{name}'") == 1, log


def test_a_folder_of_files_that_are_not_images_is_refused_before_the_first_step(tmp_path, monkeypatch):
    root, run = tmp_path / "images", tmp_path / "run"
    root.mkdir()
    for i in range(20):  # e.g. a download that saved HTML error pages under .jpg names
        (root / f"{i}.jpg").write_text("<html>403 Forbidden</html>")

    def no_network(*args, **kwargs):
        raise AssertionError("the model was built: the data error came too late")

    monkeypatch.setattr(pretrain_mod, "build_networks", no_network)
    with pytest.raises(DataError, match=r"none of 16 images read from folder:.* could be decoded; e.g. '0.jpg'"):
        pretrain(_data_cfg(run, root))
    assert not (run / "checkpoints").exists()


def test_removing_images_of_a_run_names_the_ways_forward(tmp_path):
    """The fix the bad-image message gives (remove the file) changes the run's recorded
    images: the rerun says so and how to go on, and train.resume=false does go on."""
    root, run = tmp_path / "images", tmp_path / "run"
    truncated, not_image = _image_folder(root)
    pretrain(_data_cfg(run, root, "train.max_steps=2"))
    truncated.unlink()
    with pytest.raises(ConfigError, match=r"no longer in .*train.resume=false.*new output_dir"):
        pretrain(_data_cfg(run, root))
    pretrain(_data_cfg(run, root, "train.resume=false"))
    assert load_last(run)["step"] == 3


def test_bad_images_fail_the_run_naming_the_file(tmp_path):
    root, run = tmp_path / "images", tmp_path / "run"
    truncated, not_image = _image_folder(root)
    with pytest.raises(RuntimeError) as err:
        pretrain(_data_cfg(run, root, "data.on_error=fail"))
    msg = str(err.value)
    assert truncated.name in msg or not_image.name in msg, msg
    assert "data.on_error=skip" in msg


def _mostly_bad_folder(root: Path, n_good: int, n_bad: int) -> None:
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(n_good):
            Image.new("RGB", (40, 40), (60 * i, 100 * c, 50)).save(root / cls / f"{i}.png")
        for i in range(n_bad):
            (root / cls / f"bad{i}.jpg").write_text("not a JPEG")


def test_batch_of_only_bad_images_is_skipped(tmp_path):
    # 2 good, 18 bad, batch 6 (3 batches an epoch): every epoch has a batch of bad files only.
    root, run = tmp_path / "images", tmp_path / "run"
    _mostly_bad_folder(root, 1, 9)
    pretrain(tiny_config(run, "data.source=auto", f"data.root={root}", "train.batch_size=6",
                         "train.max_steps=3"))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["skipped_images"] > 6


def test_no_readable_image_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import glsd.train.preflight as preflight_mod

    root, run = tmp_path / "images", tmp_path / "run"
    _mostly_bad_folder(root, 0, 6)
    cfg = tiny_config(run, "data.source=auto", f"data.root={root}", "train.batch_size=6", "train.max_steps=3")
    with pytest.raises(DataError, match="none of 12 images read"):  # the check before the first step
        pretrain(cfg)
    # Files that turn unreadable after that check: the epoch that reads none of them stops the run.
    monkeypatch.setattr(preflight_mod, "image_size_notes", lambda cfg, source: [])
    with pytest.raises(RuntimeError, match="no image of 12 could be read"):
        pretrain(cfg)


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _data_error_cases(tmp: Path):
    (tmp / "empty").mkdir()
    no_images = _zip(tmp / "no_images.zip", {"train/a/readme.txt": "x", "train/b/labels.csv": "1"})
    png = _png_bytes()
    splits = _zip(tmp / "splits.zip", {f"{s}/{c}/{i}.png": png for s in ("train", "val")
                                       for c in "ab" for i in range(4)})
    folder = tmp / "splits_folder"
    for s in ("train", "val"):
        for c in "ab":
            (folder / s / c).mkdir(parents=True)
            for i in range(4):
                (folder / s / c / f"{i}.png").write_bytes(png)
    return {
        "empty folder": (["data.source=auto", f"data.root={tmp / 'empty'}"], "no images"),
        "zip without images": (["data.source=auto", f"data.root={no_images}"], "no images (.jpg"),
        "wrong split in a zip": (["data.source=auto", f"data.root={splits}", "data.split=trian"],
                                 "split 'trian'"),
        "wrong split in a folder": (["data.source=imagefolder", f"data.root={folder}", "data.split=trian"],
                                    "split 'trian'"),
        "missing path": (["data.source=auto", f"data.root={tmp / 'nowhere'}"], "does not exist"),
        "missing path, imagefolder": (["data.source=imagefolder", f"data.root={tmp / 'nowhere'}"],
                                      "does not exist"),
        "online k-NN without a test split": (["data.source=imagefolder", f"data.root={folder}",
                                              "eval.every_epochs=1"],
                                             "online k-NN (eval.every_epochs=1): "),
        "online k-NN on the train images": (["data.source=imagefolder", f"data.root={folder}",
                                             "eval.every_epochs=1", "eval.test_split=train"],
                                            "online k-NN (eval.every_epochs=1): the test split"),
    }


@pytest.mark.parametrize("case", ["empty folder", "zip without images", "wrong split in a zip",
                                  "wrong split in a folder", "missing path", "missing path, imagefolder",
                                  "online k-NN without a test split", "online k-NN on the train images"])
def test_data_errors_before_training(tmp_path, monkeypatch, case):
    overrides, expected = _data_error_cases(tmp_path)[case]

    def no_network(*args, **kwargs):
        raise AssertionError("the model was built: the data error came too late")

    monkeypatch.setattr(pretrain_mod, "build_networks", no_network)
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(run, *overrides))
    assert expected in str(err.value), str(err.value)
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------
# Safe loading

class _Evil:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoint(path: Path, marker: Path, as_torch: bool = True) -> Path:
    payload = {"format": FORMAT, "config": {}, "step": 1, "teacher": {"x": _Evil(marker)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_torch:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("as_torch", [True, False], ids=["torch.save", "raw-pickle"])
def test_malicious_checkpoint_is_refused(tmp_path, as_torch):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker, as_torch)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran its code"
    if as_torch:  # the payload is live: unpickled, it would call exec (read, never run here)
        assert _pickled_globals(path) & {"builtins exec", "__builtin__ exec"}


def _pickled_globals(path: Path) -> set[str]:
    """The 'module name' globals a torch.save file's pickle would import, found by reading
    its opcodes (pickletools never executes them)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(" ".join(strings[-2:]))
        elif op.name == "GLOBAL":
            found.add(arg)
    return found


def test_eval_and_resume_refuse_a_malicious_run_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    cfg = tiny_config(run)
    run.mkdir()
    write_config(cfg, run / "config.yaml")
    _evil_checkpoint(run / "checkpoints" / "last.pt", marker)
    # The CLI reports the refusal (exit 2, no traceback); the code never runs.
    assert cli(["eval", "knn", str(run), "--device", "cpu"]) == 2
    assert not marker.exists()
    assert cli(["eval", "knn", str(run / "checkpoints" / "last.pt"), "--device", "cpu"]) == 2
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # pretrain's resume reads it too
        pretrain(cfg)
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start(): end + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(SRC)}: {call}")
        if re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load\(", text):
            offenders.append(f"{path.relative_to(SRC)}: unpickles data")
    assert offenders == []


# ----------------------------------------------------------------------------------------
# Config validation

@pytest.mark.parametrize("override,key", [
    ("data.fraction=0", "data.fraction"), ("data.fraction=-0.5", "data.fraction"),
    ("data.fraction=1.5", "data.fraction"), ("crops.num_local=-1", "crops.num_local"),
    ("model.patch_size=5", "crops.global_size"), ("model.patch_size=3", "patch_size"),
])
def test_config_validation_rejects(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_config_validation_accepts_edges():
    cfg = load_config(None, ["data.fraction=1.0", "crops.num_local=0", "model.patch_size=8"])
    assert cfg.data.fraction == 1.0 and cfg.crops.num_local == 0
    assert load_config(None, ["data.fraction=0.001"]).data.fraction == 0.001


def test_config_validation_checks_the_patch_size_implied_by_the_name():
    with pytest.raises(ConfigError, match="local_size=24 .*nearest valid sizes 16 or 32"):
        load_config(None, ["model.backbone=vit_tiny_patch16_224", "crops.local_size=24"])


def test_unknown_backbone_suggests_close_names(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", "model.backbone=vit_tiny_patch16_22", "model.patch_size=4",
                      "model.backbone_kwargs={}")
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224") as err:
        create_model(cfg.model, 32)
    assert "unknown backbone" in str(err.value)
    with pytest.raises(ConfigError, match="Close names: .*vit_tiny_patch16_224"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_skip_counts_per_rank_survive_a_resume():
    """A checkpoint keeps every rank's skip count; another world size gives rank 0 the total."""
    from glsd.train.rng import rank_state

    rngs = [{"torch": torch.tensor([r])} for r in range(3)]
    ckpt = {"rng": rngs[0], "rng_per_rank": rngs, "skipped_per_rank": [2, 0, 5], "skipped_images": 2}
    assert [rank_state(ckpt, r, 3)[1] for r in range(3)] == [2, 0, 5]
    assert [rank_state(ckpt, r, 3)[0]["torch"].item() for r in range(3)] == [0, 1, 2]
    assert [rank_state(ckpt, r, 2)[1] for r in range(2)] == [7, 0]
    old_format = {"rng": rngs[0], "skipped_images": 4}  # written before per-rank state existed
    assert rank_state(old_format, 0, 1) == (rngs[0], 4)


def test_gpu_random_state_is_the_rank_device_only(monkeypatch):
    """A checkpoint keeps its own GPU's stream, so a node with fewer GPUs can resume it; an
    older checkpoint's list of every visible GPU gives the resuming device its entry."""
    from glsd.train import rng

    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([10 + device]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s), device)))
    state = rng.rng_state()
    assert int(state["cuda_device"]) == 11 and "cuda" not in state
    rng.set_rng_state(state)
    every = [torch.tensor([20 + d]) for d in range(8)]  # written on 8 visible GPUs
    rng.set_rng_state({**state, "cuda": every, "cuda_device": None})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    rng.set_rng_state({k: v for k, v in state.items() if k != "cuda_device"} | {"cuda": every[:2]})
    assert restored == [(11, 1), (21, 1), (20, 3)]


def test_a_process_that_never_used_cuda_saves_no_gpu_stream(monkeypatch):
    """device=cpu under torchrun on a GPU node: saving the random state must not open a CUDA
    context on GPU 0 in every rank."""
    from glsd.train import rng

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("opened CUDA"))
    state = rng.rng_state()
    assert "cuda_device" not in state
    rng.set_rng_state({**state, "cuda_device": torch.tensor([1])})  # a GPU checkpoint, on a CPU


def test_a_finished_run_without_its_last_checkpoint_is_not_started_over(tmp_path, capsys):
    """last.pt deleted to save space (the export is much smaller): rerunning the command is
    refused, naming the step it reached and the two ways on, not retrained from scratch."""
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2"))
    (run / "checkpoints" / "last.pt").unlink()
    with pytest.raises(ConfigError, match=r"reached step 2 but has no checkpoints/last.pt.*train.resume=false"):
        pretrain(tiny_config(run, "train.max_steps=2"))
    assert (run / "backbone.safetensors").exists() and not list(run.glob("previous-*"))
    pretrain(tiny_config(run, "train.max_steps=2", "train.resume=false"))
    assert "(train.resume=false)" in capsys.readouterr().err and len(list(run.glob("previous-*"))) == 1


def test_one_signal_delivered_twice_is_one_request(monkeypatch):
    """A preempted torchrun job gets SIGTERM from the scheduler and again from torchrun, and
    the copy's handler may run seconds later (after a long C call): a repeated SIGTERM is never
    a stop at once, however late. A Ctrl-C after it is; the same Ctrl-C within the repeat
    window is not."""
    from glsd.errors import TrainingInterrupted
    from glsd.train import signals

    monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)  # every repeat counts as "late"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with signals.StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(TrainingInterrupted, match="second signal 2"):
            os.kill(os.getpid(), signal.SIGINT)
    with signals.StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(TrainingInterrupted, match="second signal 2"):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 60.0)
    with signals.StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: a key repeat
        assert stop.signal == signal.SIGINT


def test_under_torchrun_no_forwarded_signal_stops_at_once(monkeypatch):
    """torchrun forwards each signal it gets (and kills the workers after its own timeout):
    under it a worker finishes its step and checkpoints whatever arrives after the first."""
    from glsd.train import signals

    monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with signals.StopRequested() as stop:
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        assert stop.signal == signal.SIGINT


def test_a_full_disk_while_logging_says_what_the_run_kept(tmp_path, monkeypatch):
    import errno

    import glsd.train.run_folder as run_folder_mod

    folder = RunFolder(tmp_path / "run", is_main=True)
    folder.checkpoints.mkdir(parents=True)
    folder.last.write_bytes(b"")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder_mod, "open", full, raising=False)
    with pytest.raises(DiskFull, match=r"disk full while writing .*metrics.jsonl; logging step 7; "
                                       r".*last.pt is kept\. Free space"):
        folder.log_metrics({"step": 7, "loss": 1.0})


def test_a_run_that_failed_exits_1_and_bad_input_2(capsys):
    import errno

    from glsd.cli import _report
    from glsd.errors import NonFiniteError, OutOfMemory, WorkerDied

    failed = [WorkerDied("a data loader worker died"), DiskFull(errno.ENOSPC, "disk full"),
              NonFiniteError("loss is nan"), OutOfMemory("out of memory")]
    assert [_report(e, debug=False) for e in failed] == [1, 1, 1, 1]
    assert _report(DataError("cannot read image 'a.jpg'"), debug=False) == 2
    assert _report(ConfigError("data.root is empty"), debug=False) == 2
    capsys.readouterr()


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    """config.yaml must name the same images from any directory: evaluation, export and resume
    read it (a relative root broke `glsd eval` run from elsewhere, and a resume given the
    absolute path was refused as another dataset)."""
    import yaml

    (tmp_path / "photos").mkdir()
    for i in range(16):
        Image.new("RGB", (40, 40), (i * 15, 80, 160)).save(tmp_path / "photos" / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    pretrain(tiny_config(run, "data.source=folder", "data.root=photos", "train.max_steps=1"))
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    assert recorded == str(tmp_path / "photos")
    monkeypatch.chdir("/")
    pretrain(tiny_config(run, "data.source=folder", f"data.root={tmp_path / 'photos'}", "train.max_steps=2"))
    assert load_last(run)["step"] == 2  # resumed: the same images, named absolutely


def test_a_step_interval_is_not_cut_short_by_tiny_epochs(tmp_path, monkeypatch):
    """Epochs of 4 steps with last.pt every 8 steps: saved at 8 and at the end (12), not at
    every epoch's end (a 1 % subset has 7-step epochs: the whole state every few seconds)."""
    saved = []
    import glsd.train.saving as saving_mod

    real = saving_mod.save_checkpoint
    monkeypatch.setattr(saving_mod, "save_checkpoint",
                        lambda path, payload: (saved.append((Path(path).name, payload["step"])), real(path, payload)))
    pretrain(tiny_config(tmp_path / "run", "train.max_steps=null", "train.epochs=3",
                         "train.checkpoint_every_steps=8", "train.checkpoint_every_epochs=0"))
    assert saved == [("last.pt", 8), ("last.pt", 12)]


def test_a_mapped_optimizer_state_keeps_no_step_tensor_of_the_file():
    """AdamW keeps its loaded ``step`` tensors on the host as they are (its moments go to the
    parameters' GPU): from a mapped checkpoint they kept the whole file mapped, and its disk
    space held after the next save, for the rest of a run. They are copied."""
    import io

    from glsd.train.resume import own_host_tensors

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh = torch.optim.AdamW(model.parameters(), foreach=True)
    fresh.load_state_dict(loaded)
    file_storages = {t.untyped_storage().data_ptr() for s in loaded["state"].values() for t in s.values()}
    assert any(s["step"].untyped_storage().data_ptr() in file_storages for s in fresh.state.values())
    own_host_tensors(fresh)
    assert not any(s["step"].untyped_storage().data_ptr() in file_storages for s in fresh.state.values())
    assert all(float(s["step"]) == 1.0 for s in fresh.state.values())

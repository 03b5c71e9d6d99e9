"""Resuming where the run was: under another global batch (world size), after an online
evaluation, and from a run whose precision used no loss scaling."""
import math
import shutil

import torch

from glsd.train.pretrain import pretrain
from glsd.train.resume import recorded_global_batch, resume_position

from helpers_tiny import load_last, read_metrics, state_dicts_equal, tiny_config

# Two blocks: timm spreads drop_path_rate linearly over depth, so one block would get 0.
DROP_PATH_VIT = ("model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "model.drop_path_rate=0.2")


def test_resume_position_recounts_steps_in_batches_of_the_new_size():
    # 1 process x 64, 50 steps/epoch, stopped after epoch 5 and 10 steps of epoch 6.
    ckpt = {"step": 260, "epoch": 5, "samples_in_epoch": 640, "global_batch": 64}
    assert resume_position(ckpt, 50, 64) == (260, 10)  # same batch: the checkpoint's own step
    assert resume_position(ckpt, 25, 128) == (130, 5)  # 2 processes: epoch 5 of 25 steps + 5
    assert resume_position(ckpt, 100, 32) == (520, 20)
    # Checkpoints written before "global_batch" was recorded: per-process batch x ranks.
    old = {"step": 130, "epoch": 5, "samples_in_epoch": 640, "config": {"train": {"batch_size": 64}},
           "rng_per_rank": [{}, {}]}
    assert recorded_global_batch(old) == 128
    assert resume_position(old, 50, 64) == (260, 10)
    assert recorded_global_batch({"config": {"train": {"batch_size": 8}}, "rng": {}}) == 8


def test_a_run_resumed_under_a_bigger_global_batch_ends_after_its_epochs(tmp_path):
    """32 images, 3 epochs: 4 steps of 8 an epoch, stopped at step 6 (epoch 1, 2 steps in).
    Resumed with batches of 16 (as 2 processes x 8 would be) it must go on at step 3 of 6,
    the same point of the schedule, not stop at once because 6 >= 6."""
    run = tmp_path / "run"
    base = ("train.epochs=3", "train.warmup_steps=0")
    pretrain(tiny_config(run, *base, "train.max_steps=6"))
    assert load_last(run)["step"] == 6
    pretrain(tiny_config(run, *base, "train.max_steps=null", "train.batch_size=16", "train.extend=true"))
    log = (run / "train.log").read_text()
    assert "resumed from step 6 of batches of 8 images = step 3 of this run's batches of 16" in log
    assert "peak learning rate follows the global batch (train.lr x batch / 256: x2)" in log
    ckpt = load_last(run)
    assert (ckpt["step"], ckpt["epoch"], ckpt["global_batch"]) == (6, 3, 16)
    resumed = [r["step"] for r in read_metrics(run)][6:]
    assert resumed == [4, 5, 6]  # three new steps of 16: the last 1.5 epochs


def test_online_knn_does_not_move_the_random_state_a_resume_restores(tmp_path):
    """A run killed right after an epoch's checkpoint (simulated: the kept epoch checkpoint
    laid over last.pt) resumes to the weights of the run that went on, although that run did
    the epoch's online k-NN in between: the evaluation draws from a fork of the RNG."""
    extra = ("train.max_steps=6", "eval.every_epochs=1", "train.checkpoint_every_epochs=1",
             "train.deterministic=true", *DROP_PATH_VIT)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    pretrain(tiny_config(ref, *extra, vit=True))
    pretrain(tiny_config(killed, *extra[1:], "train.max_steps=4", vit=True))
    shutil.copy(killed / "checkpoints" / "epoch0001.pt", killed / "checkpoints" / "last.pt")
    pretrain(tiny_config(killed, *extra, vit=True))
    a, b = load_last(ref), load_last(killed)
    assert a["step"] == b["step"] == 6
    assert state_dicts_equal(a["student"], b["student"]) == []
    assert state_dicts_equal(a["teacher"], b["teacher"]) == []


def test_a_bf16_run_resumes_under_fp16_with_a_fresh_loss_scaler(tmp_path):
    """bf16 and fp32 runs save an empty GradScaler state; fp16 (e.g. `precision=auto` on an
    older GPU; CPU autocast has it too) enables one. The resume starts a fresh scaler, not a
    "corrupt checkpoint", and the fp16 steps train (finite loss, the scaler's state saved)."""
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2", "train.precision=bf16"))
    assert load_last(run)["scaler"] == {} and load_last(run)["config"]["train"]["precision"] == "bf16"
    pretrain(tiny_config(run, "train.max_steps=4", "train.precision=fp16"))
    ckpt = load_last(run)
    assert ckpt["step"] == 4 and ckpt["scaler"].get("scale", 0) > 0  # the fresh scaler's state
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run) if "loss" in r)


def test_ranks_resumed_under_another_world_size_draw_their_own_streams():
    """Rank 0 continues rank 0's recorded state; every other rank gets a stream of its own
    (one shared state would give every rank the same drop-path masks)."""
    from glsd.train.rng import restore_rank_rng, rng_state
    torch.manual_seed(0)
    ckpt = {"rng": rng_state(), "rng_per_rank": [rng_state()], "skipped_per_rank": [3],
            "config": {"train": {"seed": 0}}, "step": 5}
    draws = []
    for rank in (0, 1, 2):
        skipped = restore_rank_rng(ckpt, rank, 3)
        draws.append(torch.rand(4))
        assert skipped == (3 if rank == 0 else 0)
    torch.set_rng_state(ckpt["rng"]["torch"])
    assert torch.equal(draws[0], torch.rand(4))  # rank 0: the recorded stream
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    # under the same world size each rank takes its own recorded state
    ckpt2 = {**ckpt, "rng_per_rank": [rng_state(), rng_state()], "skipped_per_rank": [1, 2]}
    assert restore_rank_rng(ckpt2, 1, 2) == 2

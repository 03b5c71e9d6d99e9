"""Two CPU processes (gloo) against one: same images, same views, same loss, same weights.

One spawn of 2 processes serves all the checks (process start-up dominates on 2 cores): each
rank updates a Center under the group, pretrains 2 steps with recorders installed for every
(backbone, data.augment_on) case (a ViT and the BatchNorm conv net, whose statistics are
synchronised over the ranks by GroupBatchNorm on the CPU), then runs two one-rank events (a
SIGTERM, a NaN loss), and saves what it saw. The 1-process references (batch 2B) run in the
test process.
"""
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import glsd.train.pretrain as pretrain_mod
from glsd.eval.knn import knn_classify
from glsd.loss.dino import Center
from glsd.train.rng import rank_state
from glsd.train.run_folder import RunFolder

from helpers_tiny import free_port, read_metrics, tiny_config

B = 4  # per process
DIST_OVERRIDES = ("loss.matching=geometric", "model.drop_path_rate=0", "train.max_steps=2",
                  "train.freeze_last_layer_epochs=0", "train.lr=0.05", "train.deterministic=true")
CENTER_DIM, CENTER_MOMENTUM = 8, 0.9
# (backbone, data.augment_on, overrides); "cpu_batched" is an alias of "cpu" and is covered in
# test_views. The last case: a loss averaged over the valid cells, whose count spans the ranks.
CASES = [(backbone, where, ()) for backbone in ("vit", "convnet") for where in ("cpu", "device")]
CASES.append(("convnet", "device", ("loss.local_normalize=valid", "loss.matching=hybrid")))
CASE_IDS = [f"{b}-{w}" + "".join(f"-{o.split('=')[1]}" for o in extra) for b, w, extra in CASES]
# A backbone with a parameter no output uses (an average-pool ViT's fc_norm): frozen before
# DistributedDataParallel, which would otherwise wait for its gradient and fail at step 2.
CASES.append(("vit", "device", ("model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}",)))
CASE_IDS.append("vit-device-unused-fc_norm")
# Stochastic depth (the ViT and Swin presets): each rank draws its own masks, the weights stay
# one model. Not comparable with one process of twice the batch (other masks, by design).
CASES.append(("vit", "device", ("model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
                                "model.drop_path_rate=0.3")))
CASE_IDS.append("vit-device-drop_path")
SAME_AS_ONE_PROCESS = [name for name in CASE_IDS if not name.endswith("drop_path")]


def case_config(out_dir, case, batch_size):
    backbone, where, extra = case
    name = CASE_IDS[CASES.index(case)]
    return tiny_config(Path(out_dir) / f"run-{name}", *DIST_OVERRIDES, f"train.batch_size={batch_size}",
                       f"data.augment_on={where}", *extra, vit=backbone == "vit")


def _center_logits(rank: int) -> torch.Tensor:
    """Rank r's teacher outputs: 3 + 2r rows (ranks may hold different counts)."""
    return torch.randn(3 + 2 * rank, CENTER_DIM, generator=torch.Generator().manual_seed(100 + rank))


def _knn_data():
    """A k-NN bank of 40 rows, 4 noisy class clusters, 16 queries; rank 0's shard (3 rows) is
    smaller than the largest k, so its neighbour list is padded."""
    g = torch.Generator().manual_seed(7)
    centers, bank_y, query_y = torch.randn(4, 6, generator=g), torch.arange(40) % 4, torch.arange(16) % 4
    bank = centers[bank_y] + torch.randn(40, 6, generator=g)
    return bank, bank_y, centers[query_y] + torch.randn(16, 6, generator=g), query_y


KNN_ARGS = dict(num_classes=4, ks=(1, 5, 20, 40), temperature=0.07, chunk_size=5)


def _clone_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def install_recorders(setattr_) -> dict:
    """Record per-rank inputs, local losses, logged records and weights of a pretrain() call."""
    rec = {"indices": [], "views": [], "local_loss": [], "logged": []}
    real_step, real_loop, real_log = pretrain_mod.train_step, pretrain_mod.train_loop, RunFolder.log_metrics

    def train_step(ctx, batch, step, want_stats=True):
        rec["indices"].append(batch.indices.clone())
        if step == 0:  # the views as the step sees them, wherever they are made
            rec["views"] = [v.clone() for v in ctx.make_views(batch, ctx.device)[0]]
        if step == 0:  # the random state this step's drop-path masks come from
            rec["rng_0"] = torch.random.get_rng_state()
        terms = real_step(ctx, batch, step, want_stats)
        rec["local_loss"].append(terms.loss.item())
        if step == 0:
            rec["student_1"], rec["teacher_1"] = _clone_state(ctx.student), _clone_state(ctx.teacher)
        return terms

    def train_loop(ctx, state, stop):
        rec["teacher_0"] = _clone_state(ctx.teacher)
        rec["student_0"] = _clone_state(ctx.student)
        done = real_loop(ctx, state, stop)
        rec["teacher_end"], rec["student_end"] = _clone_state(ctx.teacher), _clone_state(ctx.student)
        rec["objective_end"] = _clone_state(ctx.objective)
        return done

    def log_metrics(self, record):
        rec["logged"].append(dict(record))
        return real_log(self, record)

    setattr_(pretrain_mod, "train_step", train_step)
    setattr_(pretrain_mod, "train_loop", train_loop)
    setattr_(RunFolder, "log_metrics", log_metrics)
    return rec


def _worker(rank: int, world: int, ports: list, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # pretrain() joins this group. A short timeout turns a deadlock into an error.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    out = {"rank": rank}
    center = Center(CENTER_DIM, CENTER_MOMENTUM)
    center.center.fill_(0.5)
    center.update(_center_logits(rank))
    out["center"] = center.center.clone()
    bank, bank_y, queries, query_y = _knn_data()
    shard = slice(0, 3) if rank == 0 else slice(3, None)
    out["knn"] = knn_classify(bank[shard], bank_y[shard], queries, query_y, **KNN_ARGS, sharded=True)
    shard = slice(0, 0) if rank == 0 else slice(None)  # fewer images than ranks, or all unreadable
    out["knn_empty_shard"] = knn_classify(bank[shard], bank_y[shard], queries, query_y, **KNN_ARGS, sharded=True)

    real = pretrain_mod.train_step, pretrain_mod.train_loop, RunFolder.log_metrics
    for k, (case, name) in enumerate(zip(CASES, CASE_IDS)):
        if k:  # pretrain() leaves the group when it ends: each case joins a new one
            os.environ["MASTER_PORT"] = str(ports[k])
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
        rec = install_recorders(setattr)
        pretrain_mod.pretrain(case_config(out_dir, case, B))
        out[name] = {k: list(v) if isinstance(v, list) else v for k, v in rec.items()}  # a snapshot
        pretrain_mod.train_step, pretrain_mod.train_loop, RunFolder.log_metrics = real
    out["events"] = _one_rank_events(rank, world, ports[len(CASES):], out_dir)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    ports = [free_port() for _ in range(len(CASES) + 3)]
    ctx = mp.start_processes(_worker, args=(2, ports, str(out_dir)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 400
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError("2-process pretraining hung (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out_dir, recs = tmp_path_factory.mktemp("single"), {}
    before = torch.are_deterministic_algorithms_enabled()
    for case, name in zip(CASES, CASE_IDS):
        if name not in SAME_AS_ONE_PROCESS:
            continue
        mp_ = pytest.MonkeyPatch()
        try:
            recs[name] = install_recorders(mp_.setattr)
            pretrain_mod.pretrain(case_config(out_dir, case, 2 * B))
        finally:
            mp_.undo()
    torch.use_deterministic_algorithms(before)
    return recs


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference over every tensor, except the key third of a ViT's ``attn.qkv.bias``:
    its exact gradient is zero (softmax ignores a constant added to every key of a query), so
    it holds only float noise, which AdamW's first steps scale up to lr-sized moves."""
    assert a.keys() == b.keys()

    def comparable(key, t):
        if key.endswith("attn.qkv.bias"):
            third = t.shape[0] // 3
            return torch.cat([t[:third], t[2 * third:]])
        return t

    return max((comparable(k, a[k]).float() - comparable(k, b[k]).float()).abs().max().item() for k in a)


def test_center_is_the_mean_over_ranks(two_ranks):
    _, ranks = two_ranks
    everything = torch.cat([_center_logits(0), _center_logits(1)])
    expected = 0.5 * CENTER_MOMENTUM + (1 - CENTER_MOMENTUM) * everything.mean(0, keepdim=True)
    for r in ranks:
        torch.testing.assert_close(r["center"], expected, rtol=0, atol=1e-6)
    # Alone, the same update uses only the local rows (a weighted, not a plain, mean of ranks).
    alone = Center(CENTER_DIM, CENTER_MOMENTUM)
    alone.center.fill_(0.5)
    alone.update(_center_logits(1))
    assert not torch.allclose(alone.center, expected)


def test_knn_of_a_sharded_bank_equals_the_whole_bank(two_ranks):
    """Each rank keeps its shard of the bank; the merged neighbours give the whole bank's k-NN."""
    bank, bank_y, queries, query_y = _knn_data()
    whole = knn_classify(bank, bank_y, queries, query_y, **KNN_ARGS)
    assert len({r["top1"] for r in whole["per_k"].values()}) == 3  # the ks disagree: a real check
    for rec in two_ranks[1]:
        assert rec["knn"] == rec["knn_empty_shard"] == whole


@pytest.mark.parametrize("case", CASE_IDS)
def test_ranks_agree_on_loss_and_teacher(two_ranks, case):
    out_dir, ranks = two_ranks
    r0, r1 = (r[case] for r in ranks)
    assert len(r0["logged"]) == len(r1["logged"]) == 2
    for a, b in zip(r0["logged"], r1["logged"]):
        assert a["step"] == b["step"]
        for key in ("loss", "loss_global", "loss_local"):
            assert a[key] == a[key] and abs(a[key]) != float("inf"), (key, a)
            assert a[key] == b[key], f"{key} at step {a['step']}: rank 0 {a[key]} != rank 1 {b[key]}"
    # The run folder holds rank 0's (global) record only, once per step.
    assert [r["step"] for r in read_metrics(out_dir / f"run-{case}")] == [1, 2]
    # The local (per-rank) losses differ: the ranks saw different images.
    assert r0["local_loss"] != r1["local_loss"]
    assert not torch.equal(r0["indices"][0], r1["indices"][0])
    for key in ("teacher_0", "student_0", "teacher_end", "student_end", "objective_end"):
        diff = [k for k in r0[key] if not torch.equal(r0[key][k], r1[key][k])]
        assert diff == [], f"{key} differs between ranks: {diff[:5]}"


def test_ranks_draw_their_own_drop_path_masks_and_stay_one_model(two_ranks):
    """The ranks' random streams differ (one shared stream would drop the same blocks of every
    rank's samples), and DistributedDataParallel keeps their weights equal regardless
    (test_ranks_agree_on_loss_and_teacher checks that for this case too)."""
    _, ranks = two_ranks
    r0, r1 = (r["vit-device-drop_path"] for r in ranks)
    assert not torch.equal(r0["rng_0"], r1["rng_0"])
    assert _max_diff(r0["student_0"], r0["student_end"]) > 1e-4  # it trained
    diff = [k for k in r0["student_end"] if not torch.equal(r0["student_end"][k], r1["student_end"][k])]
    assert diff == []


@pytest.mark.parametrize("case", SAME_AS_ONE_PROCESS)
def test_two_processes_match_one_process_of_twice_the_batch(two_ranks, one_rank, case):
    _, ranks = two_ranks
    r0, r1 = (r[case] for r in ranks)
    single = one_rank[case]
    # Same images: rank r holds slice r of the global batch, with the same views (on every
    # path: drawn per sample; float rounding of another batch size or thread count aside).
    for step in range(2):
        assert torch.equal(torch.cat([r0["indices"][step], r1["indices"][step]]), single["indices"][step])
    assert len(r0["views"]) == len(single["views"]) == 4
    for v0, v1, v in zip(r0["views"], r1["views"], single["views"]):
        torch.testing.assert_close(torch.cat([v0, v1]), v, rtol=0, atol=1e-5)
    # Same start, same first loss (the mean of the ranks' batch means), same updated weights.
    assert _max_diff(r0["student_0"], single["student_0"]) == 0.0
    assert _max_diff(r0["teacher_0"], single["teacher_0"]) == 0.0
    first = (r0["local_loss"][0] + r1["local_loss"][0]) / 2
    assert first == pytest.approx(single["local_loss"][0], rel=1e-5, abs=1e-6)
    assert r0["logged"][0]["loss"] == pytest.approx(single["logged"][0]["loss"], rel=1e-5, abs=1e-6)
    for key in ("effective_prototypes", "feature_std", "teacher_entropy"):  # the global batch's
        assert r0["logged"][0][key] == pytest.approx(single["logged"][0][key], rel=1e-4), key
    moved = _max_diff(single["student_0"], single["student_1"])
    assert moved > 1e-4, "the first step did not move the weights; the comparison would be empty"
    assert _max_diff(r0["student_1"], single["student_1"]) < 1e-5
    assert _max_diff(single["teacher_0"], single["teacher_1"]) > 1e-6  # EMA: (1 - 0.996) of that
    # A few float32 ulps at 1.0: BatchNorm running variances from GroupBatchNorm's float64
    # sums against torch's float32 statistics.
    assert _max_diff(r0["teacher_1"], single["teacher_1"]) < 5e-7
    # After two steps at lr 0.05, float noise of two batch splits (the qkv key third, pure
    # noise, is left out by _max_diff).
    assert _max_diff(r0["student_end"], single["student_end"]) < 3e-5
    assert _max_diff(r0["objective_end"], single["objective_end"]) < 1e-5


# ----------------------------------------------------------------------------------------
# Events seen by one rank only must stop every rank at the same step (no deadlock)

def _one_rank_events(rank: int, world: int, ports: list, out_dir: str) -> dict:
    """Pretrain three times more: rank 1 alone gets a SIGTERM (and skips a file), then rank 1
    alone a NaN loss, then rank 0 alone a full disk when it writes the checkpoint of step 3."""
    import datetime
    import signal

    import torch.distributed as dist

    from glsd.data.sources import Unreadable
    from glsd.train.objective import GlobalLocalObjective, LossTerms

    import glsd.train.saving as saving_mod
    from glsd.errors import DiskFull

    real_step, real_forward, real_save = (pretrain_mod.train_step, GlobalLocalObjective.forward,
                                          saving_mod.save_checkpoint)
    results = {}
    for scenario, port in zip(("sigterm", "nan", "diskfull"), ports):
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
        calls = []

        def train_step(ctx, batch, step, want_stats=True):
            if scenario == "sigterm" and rank == 1 and step == 0:  # a file only rank 1 skipped
                ctx.run.name_unreadable([Unreadable("cat/broken.jpg", "cannot identify image file")])
            if scenario == "sigterm" and rank == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # this rank only, during step 2
            return real_step(ctx, batch, step, want_stats)

        def forward(self, *args, **kwargs):
            terms = real_forward(self, *args, **kwargs)
            calls.append(1)
            if scenario == "nan" and rank == 1 and len(calls) == 3:
                nan = torch.tensor(float("nan"))
                return LossTerms(terms.loss * nan, terms.loss_global * nan, terms.loss_local, terms.diagnostics)
            return terms

        def save_checkpoint(path, payload):
            if scenario == "diskfull" and payload["step"] == 3:  # only rank 0 ever writes
                raise DiskFull(28, f"disk full while writing {path}; the previous last.pt is intact")
            return real_save(path, payload)

        pretrain_mod.train_step, GlobalLocalObjective.forward = train_step, forward
        saving_mod.save_checkpoint = save_checkpoint
        cfg = tiny_config(Path(out_dir) / scenario, "model.drop_path_rate=0", "train.max_steps=6",
                          f"train.batch_size={B}", "train.checkpoint_every_steps=1", vit=True)
        start = time.monotonic()
        try:
            pretrain_mod.pretrain(cfg)
            results[scenario] = "ok"
        except pretrain_mod.TrainingInterrupted:  # the clean stop after a signal
            results[scenario] = "stopped"
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            results[scenario] = f"{type(e).__name__}: {e}"
        results[scenario + "_s"] = time.monotonic() - start
        if dist.is_initialized():
            dist.destroy_process_group()
    pretrain_mod.train_step, GlobalLocalObjective.forward = real_step, real_forward
    saving_mod.save_checkpoint = real_save
    return results


def test_one_rank_signal_nan_or_full_disk_stops_all_ranks(two_ranks):
    out_dir, ranks = two_ranks
    r0, r1 = (r["events"] for r in ranks)
    # SIGTERM seen by rank 1 only: both ranks stop after step 2, rank 0 checkpoints it.
    assert r0["sigterm"] == r1["sigterm"] == "stopped", (r0, r1)
    ckpt = torch.load(out_dir / "sigterm" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert not (out_dir / "sigterm" / "backbone.safetensors").exists()
    # A file skipped on rank 1 is named in rank 0's train.log (the only log).
    assert "skipped unreadable image 'cat/broken.jpg': cannot identify" in (out_dir / "sigterm" / "train.log").read_text()
    # It holds each rank's own random state, so a resume gives each rank its stream back.
    own = [rank_state(ckpt, r, 2)[0]["torch"] for r in range(2)]
    assert len(ckpt["rng_per_rank"]) == 2 and not torch.equal(own[0], own[1])
    assert torch.equal(rank_state(ckpt, 1, 1)[0]["torch"], own[0])  # another world: rank 0's
    # A non-finite loss on rank 1 only: both ranks raise at step 3, none waits for the other.
    for r in (r0, r1):
        # (a rank left waiting would end in gloo's timeout, not in this error)
        assert r["nan"].startswith("NonFiniteError") and "step 3" in r["nan"], r["nan"]
    assert "on another rank" in r0["nan"] and "on another rank" not in r1["nan"]
    # Rank 0 alone fails to write a checkpoint: the other rank stops with it, not at a timeout.
    assert r0["diskfull"].startswith("DiskFull: disk full while writing"), r0["diskfull"]
    assert r1["diskfull"].startswith("RankFailed: rank 0 could not write the checkpoint"), r1["diskfull"]
    assert torch.load(out_dir / "nan" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_collectives_of_host_values_go_to_the_gpu_under_nccl(monkeypatch):
    """NCCL moves only CUDA tensors: a count or flag made on the host (k-NN's bank size, its
    label check) is all-reduced from the current GPU, or every rank raises."""
    import torch.distributed as dist

    from glsd.utils import distributed

    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed._collective_device(None) == torch.device("cuda", 3)
    assert distributed._collective_device("cpu") == torch.device("cuda", 3)
    assert distributed._collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    assert distributed._collective_device(None) == torch.device("cpu")


def test_the_backend_is_chosen_without_touching_a_gpu(monkeypatch):
    """init_distributed gets the device type before torchrun's rank is given its GPU: asking
    for the current device there would open every rank on GPU 0."""
    from glsd.config import ConfigError
    from glsd.utils.device import device_type

    assert device_type("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cpu or device=auto"):
            device_type("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_device_query():
        raise AssertionError("a GPU was touched")

    monkeypatch.setattr(torch.cuda, "current_device", no_device_query)
    assert device_type("auto") == "cuda" and device_type("cuda:1") == "cuda"

"""End-to-end pretraining on synthetic images: the run folder, the export, resume, subsets."""
import dataclasses
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import glsd.train.pretrain as pretrain_mod
from glsd.config import load_config
from glsd.data.sources import balanced_subset
from glsd.data.synthetic import synthetic_source
from glsd.models.backbone import create_model
from glsd.models.heads import build_network
from glsd.train.checkpoint import load_checkpoint
from glsd.train.pretrain import pretrain

from helpers_tiny import METRIC_KEYS, read_metrics, state_dicts_equal, tiny_config

PREFIX = "backbone.model."


def _capture_ctx(monkeypatch) -> dict:
    """Keep the loop's Context (student, teacher, ...) for inspection after pretrain()."""
    seen = {}
    real = pretrain_mod.train_loop

    def loop(ctx, state, stop):
        seen["ctx"], seen["state"] = ctx, state
        return real(ctx, state, stop)

    monkeypatch.setattr(pretrain_mod, "train_loop", loop)
    return seen


@pytest.mark.parametrize("matching", ["none", "similarity", "geometric", "soft_geometric", "hybrid"])
def test_run_folder_export_and_teacher(tmp_path, monkeypatch, matching):
    run = tmp_path / "run"
    cfg = tiny_config(run, f"loss.matching={matching}", "train.max_steps=3")
    seen = _capture_ctx(monkeypatch)
    assert pretrain(cfg) == run

    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "backbone.safetensors",
                 "subset.json", "train.log"):
        assert (run / name).is_file(), name
    assert dataclasses.replace(load_config(str(run / "config.yaml")), preset="") == cfg
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, f"metrics lack {missing}"
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN
    if matching == "none":
        assert all(r["loss_local"] == 0.0 for r in records)
    else:
        assert all(r["loss_local"] > 0.0 for r in records)
    assert "done: 3 steps" in (run / "train.log").read_text()
    subset = json.loads((run / "subset.json").read_text())
    assert subset["n_images"] == 32 and len(subset["keys"]) == 32

    # The export is the teacher's bare backbone and loads into the plain model.
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3
    saved_cfg = load_config(str(run / "config.yaml"))
    exported = create_model(saved_cfg.model, saved_cfg.crops.global_size)
    exported.load_state_dict(load_file(str(run / "backbone.safetensors")))
    nets = {}
    for which in ("teacher", "student"):
        net = create_model(saved_cfg.model, saved_cfg.crops.global_size)
        net.load_state_dict({k[len(PREFIX):]: v for k, v in ckpt[which].items() if k.startswith(PREFIX)})
        nets[which] = net.eval()
    exported.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = exported.forward_features(x)
        assert torch.equal(feats, nets["teacher"].forward_features(x))
        assert not torch.allclose(feats, nets["student"].forward_features(x))

    # The teacher moved (EMA of a moving student), differs from the student, got no gradient.
    ctx = seen["ctx"]
    teacher, student = ctx.teacher, ctx.student
    assert state_dicts_equal(ckpt["teacher"], teacher.state_dict()) == []
    assert state_dicts_equal(ckpt["student"], ckpt["teacher"]), "teacher == student after 3 steps"
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    torch.manual_seed(cfg.train.seed)  # pretrain's seed: the initial weights
    fresh = build_network(cfg)
    moved = state_dicts_equal(fresh.state_dict(), ckpt["teacher"])
    assert moved, "the teacher never changed"


def test_rerun_with_more_steps_resumes(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(run, "train.max_steps=2"))
    first = load_checkpoint(run / "checkpoints" / "last.pt")
    assert first["step"] == 2
    pretrain(tiny_config(run, "train.max_steps=5"))
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3, 4, 5], f"restarted instead of resuming: {steps}"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 5
    assert "resumed from step 2" in (run / "train.log").read_text()
    # Nothing was archived: the same run continued.
    assert not list(run.glob("previous-*"))


@pytest.mark.parametrize("option,expected", [("data.fraction=0.25", 8), ("data.num_images=12", 12)])
def test_balanced_subset_recorded_and_reused(tmp_path, option, expected):
    run = tmp_path / "run"
    pretrain(tiny_config(run, option, "train.max_steps=1"))
    subset = json.loads((run / "subset.json").read_text())
    assert subset["n_images"] == expected == len(subset["keys"]) == len(set(subset["keys"]))
    per_class = Counter(subset["labels"])
    assert sorted(per_class) == [0, 1, 2, 3] and set(per_class.values()) == {expected // 4}
    source = synthetic_source(32, 40, 4)
    label_of = dict(zip(source.keys, source.labels))
    assert subset["labels"] == [label_of[k] for k in subset["keys"]]
    assert f"{expected} images" in (run / "train.log").read_text()

    # A rerun uses the recorded keys, not a fresh draw: record another balanced subset.
    other = balanced_subset(source, num_images=expected, seed=123)
    assert other != subset["keys"]
    subset["keys"], subset["labels"] = other, [label_of[k] for k in other]
    (run / "subset.json").write_text(json.dumps(subset))
    pretrain(tiny_config(run, option, "train.max_steps=2"))
    assert json.loads((run / "subset.json").read_text())["keys"] == other
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("frozen_steps,moves", [(2, False), (1, True)])
def test_prototypes_stay_frozen_for_their_steps(tmp_path, monkeypatch, frozen_steps, moves):
    """DINO's freeze: the heads' last layers (the prototypes) take no step while frozen, so
    weight decay does not shrink them either; after it they move."""
    cfg = tiny_config(tmp_path / "run", "train.max_steps=2",
                      f"train.freeze_last_layer_steps={frozen_steps}")
    seen = _capture_ctx(monkeypatch)
    pretrain(cfg)
    torch.manual_seed(cfg.train.seed)  # pretrain's seed: the initial weights
    fresh = build_network(cfg)
    student = seen["ctx"].student
    for head in ("global_head", "local_head"):
        before = dict(getattr(fresh, head).last_layer.named_parameters())
        after = dict(getattr(student, head).last_layer.named_parameters())
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert bool(changed) == moves, (head, changed)
        mlp_moved = not torch.equal(getattr(fresh, head).mlp[0].weight, getattr(student, head).mlp[0].weight)
        assert mlp_moved  # the rest of the head trains meanwhile


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_channels_last_trains_the_same_numbers(tmp_path, monkeypatch, precision, rel):
    """model.channels_last only changes the memory layout of the conv net's activations (a
    run may resume with it switched: it is not part of the run's identity), not the result;
    also under bf16 (the CPU presets' precision), whose BatchNorm kernels differ by layout."""
    runs = {}
    seen = _capture_ctx(monkeypatch)
    for layout in ("true", "false"):
        run = tmp_path / layout
        pretrain(tiny_config(run, "train.max_steps=2", "train.freeze_last_layer_steps=0",
                             f"model.channels_last={layout}", "loss.matching=geometric",
                             f"train.precision={precision}"))
        runs[layout] = load_checkpoint(run / "checkpoints" / "last.pt")
        convs = [p for p in seen["ctx"].student.parameters() if p.ndim == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == (layout == "true")
                             for p in convs)  # the setting reached the weights
    a, b = runs["true"], runs["false"]
    assert [r["loss"] for r in read_metrics(tmp_path / "true")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "false")], rel=rel)
    for key, value in a["student"].items():
        torch.testing.assert_close(value, b["student"][key], rtol=10 * rel, atol=rel, msg=key)


def test_the_study_recipe_resumes_exactly(tmp_path):
    """The study presets' path (BatchNorm conv net in channels_last, views made on the device,
    hybrid matching, per-parameter clipping) stopped after a checkpoint and rerun ends on the
    weights, centres and losses of an uninterrupted run."""
    extra = ("train.deterministic=true", "train.checkpoint_every_steps=2",
             "model.channels_last=true", "data.augment_on=device", "loss.matching=hybrid",
             "train.clip_grad_mode=per_param", "train.freeze_last_layer_steps=1")
    ref, split = tmp_path / "ref", tmp_path / "split"
    pretrain(tiny_config(ref, "train.max_steps=6", *extra))  # crosses an epoch (4 steps)
    pretrain(tiny_config(split, "train.max_steps=3", *extra))  # checkpoint at 2, then at the end
    pretrain(tiny_config(split, "train.max_steps=6", *extra))
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (ref, split))
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "objective"):
        assert state_dicts_equal(a[key], b[key]) == [], key
    assert [r["loss"] for r in read_metrics(ref)] == [r["loss"] for r in read_metrics(split)]


def test_one_global_view_logs_finite_matching_diagnostics(tmp_path):
    """With crops.num_global=1 the global group has no view pair: its means of nothing must
    not turn the logged diagnostics into NaN."""
    import math

    run = tmp_path / "run"
    pretrain(tiny_config(run, "crops.num_global=1", "train.max_steps=1"))
    record = [r for r in read_metrics(run) if "loss" in r][-1]
    for key in ("geo_valid_frac", "sim_geo_agree", "sim_dist_cells"):
        assert math.isfinite(record[key]), (key, record[key])
    assert 0 < record["geo_valid_frac"] <= 1


def test_a_bf16_run_trains_under_autocast_with_fp32_losses(tmp_path, monkeypatch):
    """precision=bf16 (the GPU presets' auto on a bf16 device): the heads run in bf16, the
    losses in fp32, every student parameter gets a finite gradient, the teacher none, and the
    loss stays near the fp32 run's."""
    from glsd.train.objective import GlobalLocalObjective

    seen, real = {"dtypes": set(), "grads": []}, GlobalLocalObjective.forward

    def spy(self, student_out, teacher_out, *args, **kwargs):
        seen["dtypes"] |= {o.global_logits.dtype for o in student_out}
        terms = real(self, student_out, teacher_out, *args, **kwargs)
        seen["loss_dtype"] = terms.loss.dtype
        return terms

    monkeypatch.setattr(GlobalLocalObjective, "forward", spy)
    ctx = _capture_ctx(monkeypatch)
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        pretrain(tiny_config(run, "train.max_steps=1", f"train.precision={precision}",
                             "loss.matching=geometric", "train.freeze_last_layer_steps=0"))
        losses[precision] = read_metrics(run)[0]["loss"]
        student, teacher = ctx["ctx"].student, ctx["ctx"].teacher
        assert all(p.grad is None for p in teacher.parameters())
        grads = [p.grad for p in student.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ctx["ctx"].amp_dtype is torch.bfloat16
    assert seen["dtypes"] == {torch.float32, torch.bfloat16} and seen["loss_dtype"] is torch.float32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)

"""End to end: a hand-built run folder evaluated with run_eval (knn, linear, dense)."""
import dataclasses
import json
import shutil

import pytest
import torch

from glsd.config import ConfigError, dump_yaml, load_config, to_dict
from glsd.data.sources import balanced_subset, open_source
from glsd.eval.features import load_backbone
from glsd.eval.online import online_knn
from glsd.eval.runner import clear_cache, run_eval
from glsd.models.heads import build_network
from glsd.train.checkpoint import export_backbone, save_checkpoint

TINY = ["data.source=synthetic", "data.synthetic_num_images=24", "data.synthetic_image_size=40",
        "data.synthetic_num_classes=4", "data.num_workers=0", "crops.global_size=32",
        "crops.local_size=16", "model.backbone=glsd_convnet",
        "model.backbone_kwargs={widths: [8, 8, 16, 16, 16, 16]}", "model.out_dim=32",
        "model.hidden_dim=32", "model.bottleneck_dim=16", "eval.batch_size=16",
        "eval.linear_epochs=5", "eval.dense_num_images=6", "device=cpu"]
SUBSET = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN_DIR as the training loop leaves it: config, checkpoint, exported teacher, subset."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY)
    torch.manual_seed(1)
    teacher = build_network(cfg)
    torch.manual_seed(2)
    student = build_network(cfg)
    save_checkpoint(run / "checkpoints" / "last.pt",
                    {"config": to_dict(cfg), "student": student.state_dict(),
                     "teacher": teacher.state_dict(), "step": 0, "epoch": 0})
    export_backbone(run / "backbone.safetensors", teacher.backbone.model, to_dict(cfg))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    train = open_source(cfg.data, "train")
    keys = balanced_subset(train, num_images=SUBSET)
    train = train.subset(keys)
    (run / "subset.json").write_text(json.dumps(
        {"source": train.name, "split": "train", "keys": train.keys, "labels": train.labels}))
    yield run
    clear_cache()


def _read(path):
    return json.loads(path.read_text())


def test_knn_on_run_folder_and_safetensors(run_dir):
    rec = run_eval("knn", run_dir)
    assert rec == _read(run_dir / "eval" / "knn.json")
    assert rec["model"] == "teacher" and rec["checkpoint"].endswith("last.pt")
    assert (rec["n_train"], rec["n_test"], rec["num_classes"]) == (SUBSET, 24, 4)
    assert rec["train_source"] == "synthetic:0" and rec["test_source"] == "synthetic:1"
    assert rec["train_split"] == "train" and rec["test_split"] == "test"
    assert rec["subset_size"] == SUBSET and rec["data_fraction"] == 1.0
    assert rec["feature"] == "pooled" and rec["k"] == 20 and rec["temperature"] == 0.07
    assert rec["ks"] == [10, 20, 100, 200]
    res = rec["results"]
    assert res["per_k"]["200"]["k_effective"] == SUBSET
    assert res["top1"] == res["per_k"]["20"]["top1"] and 0 <= res["top1"] <= 100
    assert set(rec["timing"]) == {"load_s", "features_s", "eval_s", "total_s"}
    # The exported teacher is the same network: identical results, from its metadata config.
    rec_st = run_eval("knn", run_dir / "backbone.safetensors")
    assert rec_st["results"] == res and rec_st["checkpoint"].endswith("backbone.safetensors")


def test_bare_safetensors_writes_beside_it(run_dir, tmp_path):
    path = tmp_path / "backbone.safetensors"
    shutil.copy(run_dir / "backbone.safetensors", path)
    rec = run_eval("knn", path, overrides=["eval.k=5"])
    assert (tmp_path / "eval" / "knn-k5.json").is_file()
    # No subset.json beside it: the whole train split.
    assert rec["n_train"] == 24 and rec["subset_file"] is None and rec["k"] == 5
    assert rec["ks"] == [5, 10, 20, 100, 200]


def test_student_random_init_and_train_fraction(run_dir):
    student = run_eval("knn", run_dir, which="student")
    assert student["model"] == "student" and (run_dir / "eval" / "knn-student.json").is_file()
    rand = run_eval("knn", run_dir, random_init=True)
    assert rand["model"] == "random-init" and rand["checkpoint"] is None
    assert (run_dir / "eval" / "knn-random-init.json").is_file()
    whole = run_eval("knn", run_dir)
    half = run_eval("knn", run_dir, overrides=["eval.train_fraction=0.5", "eval.batch_size=8"])
    assert half["n_train"] == SUBSET // 2 and half["train_fraction"] == 0.5
    # a record of other settings has its own file: the full-split one is not replaced
    assert half["output"] == str(run_dir / "eval" / "knn-train_fraction0.5.json")
    assert _read(run_dir / "eval" / "knn.json") == whole


def test_linear_and_dense(run_dir, monkeypatch):
    lin = run_eval("linear", run_dir)
    assert lin == _read(run_dir / "eval" / "linear.json")
    assert 0 <= lin["results"]["top1"] <= 100 and lin["results"]["epochs"] == 5
    assert lin["linear_epochs"] == 5 and lin["n_train"] == SUBSET
    # The probe's minibatch is its own key: a larger extraction batch is not fewer probe steps.
    assert lin["linear_batch_size"] == 256
    import glsd.eval.runner as runner_mod

    seen, real = [], runner_mod.linear_probe
    monkeypatch.setattr(runner_mod, "linear_probe", lambda *a, **k: seen.append(a[7]) or real(*a, **k))
    run_eval("linear", run_dir, ["eval.batch_size=4", "eval.linear_batch_size=16"])
    assert seen == [16]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="eval.linear_batch_size"):
        run_eval("linear", run_dir, ["eval.linear_batch_size=0"])
    dense = run_eval("dense", run_dir)
    assert dense == _read(run_dir / "eval" / "dense.json")
    res = dense["results"]
    assert res["n_images"] == 6 and res["grid"] == [8, 8] and 0 <= res["within_one"] <= 1
    assert res["chance_within_one"] < 0.2  # 8x8 grid: at most 9/64
    dense_st = run_eval("dense", run_dir / "backbone.safetensors")
    assert dense_st["results"] == res  # seeded views, same weights


def test_load_backbone_sources_agree(run_dir):
    a, cfg, info = load_backbone(run_dir)
    b, _, _ = load_backbone(run_dir / "backbone.safetensors")
    c, _, info_c = load_backbone(run_dir / "checkpoints" / "last.pt", which="student")
    r1, _, _ = load_backbone(run_dir, random_init=True)
    r2, _, _ = load_backbone(run_dir, random_init=True)
    key = "features.0.weight"
    sa = a.model.state_dict()
    assert torch.equal(sa[key], b.model.state_dict()[key])
    assert not torch.equal(sa[key], c.model.state_dict()[key])
    assert torch.equal(r1.model.state_dict()[key], r2.model.state_dict()[key])  # seeded
    assert not torch.equal(sa[key], r1.model.state_dict()[key])
    assert info["step"] == 0 and info_c["model"] == "student" and not a.training
    _, cfg2, _ = load_backbone(run_dir, overrides=["eval.k=3"])
    assert cfg2.eval.k == 3 and cfg.eval.k == 20


def test_clear_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown evaluation"):
        run_eval("svm", run_dir)
    with pytest.raises(ConfigError, match="same images"):
        run_eval("knn", run_dir, overrides=["eval.test_split=train"])
    with pytest.raises(ConfigError, match="holds only the teacher"):
        load_backbone(run_dir / "backbone.safetensors", which="student")
    with pytest.raises(ConfigError, match="not a run folder"):
        load_backbone(tmp_path)
    with pytest.raises(ConfigError, match="do not fit"):
        load_backbone(run_dir, overrides=["model.backbone_kwargs={widths: [4, 4, 4, 4, 4, 4]}"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_backbone(run_dir, overrides=["eval.kk=3"])


def test_a_run_whose_images_moved_says_how_to_point_at_them(tmp_path):
    """The run's config names images that are no longer there: the message says they moved and
    which override fixes it (not "data.root does not exist", a key the user never typed)."""
    from glsd.models.backbone import build_backbone

    cfg = load_config(None, ["model.backbone=glsd_convnet", "model.backbone_kwargs={widths: [8, 8, 16, 16]}",
                             f"data.root={tmp_path / 'photos'}", "data.source=auto"])
    weights = tmp_path / "backbone.safetensors"
    export_backbone(weights, build_backbone(cfg.model, cfg.crops.global_size).model, to_dict(cfg))
    for kind in ("knn", "dense"):
        with pytest.raises(ConfigError, match=f"the images of {weights} were at data.root={tmp_path / 'photos'} "
                                              r"\(its config\), which does not exist: if they moved, add "
                                              "data.root=NEW_PLACE"):
            run_eval(kind, weights, device="cpu", progress=False)
    # the run's training images are still read with another test set: data.root would be that
    # set's, so the fix named is another
    with pytest.raises(ConfigError, match="if they moved, give data.root=NEW_PLACE without --test-data, "
                                          "or --train-data NEW_PLACE"):
        run_eval("knn", weights, device="cpu", progress=False, test_data=str(tmp_path / "elsewhere"))
    # another set given in their place: the run's own images are not needed
    with pytest.raises(ConfigError) as other:
        run_eval("dense", weights, device="cpu", progress=False, test_data=str(tmp_path / "elsewhere"))
    assert "were at data.root" not in str(other.value)


def test_the_headline_gives_the_floor_once_it_was_measured(run_dir):
    from glsd.eval.runner import headline

    trained = run_eval("knn", run_dir, ["eval.batch_size=8"], device="cpu", progress=False)
    (run_dir / "eval" / "knn-random-init.json").unlink(missing_ok=True)
    assert "floor" not in headline(trained)
    floor = run_eval("knn", run_dir, ["eval.batch_size=8"], random_init=True, device="cpu", progress=False)
    assert headline(trained).endswith(f"; random-init floor {floor['results']['top1']:.1f} %")
    assert "floor" not in headline(floor)
    # an earlier checkpoint's record has the same floor (random weights come from no checkpoint)
    earlier = dict(trained, checkpoint=str(run_dir / "checkpoints" / "epoch0001.pt"),
                   output=str(run_dir / "eval" / "knn-epoch0001.json"))
    assert headline(earlier).endswith(f"; random-init floor {floor['results']['top1']:.1f} %")


def test_online_knn(run_dir):
    backbone, cfg, _ = load_backbone(run_dir)
    backbone.train()
    keys = json.loads((run_dir / "subset.json").read_text())["keys"]
    out = online_knn(backbone, cfg, "cpu", keys)
    assert backbone.training  # mode restored for the training loop
    assert out["n_train"] == SUBSET and out["n_test"] == 24 and out["k"] == SUBSET
    ref = run_eval("knn", run_dir, overrides=[f"eval.k={SUBSET}"])
    assert out["top1"] == ref["results"]["per_k"][str(SUBSET)]["top1"]
    # The run folder (its subset.json) gives the same images; the cached sources are reused.
    assert online_knn(backbone, cfg, "cpu", run_dir)["top1"] == out["top1"]
    assert online_knn(backbone, cfg, "cpu", None)["n_train"] == 24
    # eval.max_test_images caps the online test set as it caps `glsd eval knn`'s
    capped = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_test_images=10))
    online = online_knn(backbone, capped, "cpu", keys)
    offline = run_eval("knn", run_dir, overrides=[f"eval.k={SUBSET}", "eval.max_test_images=10"])
    assert online["n_test"] == offline["n_test"] == 10
    assert online["top1"] == offline["results"]["per_k"][str(SUBSET)]["top1"]


def test_a_checkpoint_of_another_run_is_named_as_such_in_a_short_message(run_dir, tmp_path):
    """last.pt of a conv net laid into a ViT run's folder: the message says whose it is, and a
    weights misfit is one short line, not torch's list of every key."""
    from glsd.weights import load_checked_weights

    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    vit = load_config(None, [*TINY, "model.backbone=vit_tiny_patch16_224", "model.patch_size=4",
                             "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"])
    (foreign / "config.yaml").write_text(dump_yaml(vit))
    with pytest.raises(ConfigError, match=r"last.pt belongs to another run: it holds model.backbone='glsd_convnet'"):
        load_backbone(foreign)
    with pytest.raises(ConfigError) as e:
        load_checked_weights(build_network(vit).backbone.model, build_network(load_config(None, TINY)).backbone.model.state_dict(),
                             "x.pt", "the ViT")
    assert len(str(e.value)) < 400 and "missing (" in str(e.value) and "unexpected (" in str(e.value)


def test_a_gpu_run_is_evaluated_where_there_is_no_gpu(monkeypatch):
    """device=auto follows the run's recorded device only where this machine has that kind."""
    import dataclasses

    from glsd.eval.runner import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_run = dataclasses.replace(load_config(None, []), device="cuda")
    assert eval_device("auto", gpu_run) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        eval_device("cuda", gpu_run)  # asked for by name: refused, not moved


def test_a_run_with_online_knn_lists_its_training_split_once(tmp_path, monkeypatch):
    """The pretraining images and online k-NN's bank are one listing (a million-file folder
    costs seconds per listing, on every rank)."""
    import glsd.data.sources as sources
    from helpers_tiny import tiny_config
    from glsd.train.pretrain import pretrain

    clear_cache()
    opened, real = [], sources._open_source
    monkeypatch.setattr(sources, "_open_source", lambda cfg, split: opened.append(split) or real(cfg, split))
    pretrain(tiny_config(tmp_path / "run", "train.max_steps=4", "eval.every_epochs=1",
                         "train.epochs=1", "eval.test_split=test"))
    assert sorted(opened) == ["test", "train"]
    assert any("knn_top1" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())

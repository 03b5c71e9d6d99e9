"""Typed config (glsd.config): overrides, strict keys, value checks, YAML files."""
import pytest

from glsd.config import Config, ConfigError, dump_yaml, load_config, parse_overrides, preset_names


def test_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 100 and cfg.loss.match_threshold == "half_diagonal"
    assert cfg.preset == ""


def test_int_override():
    cfg = load_config(None, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)


def test_list_override_to_tuple():
    cfg = load_config(None, ["crops.global_scale=[0.3,1.0]"])
    assert cfg.crops.global_scale == (0.3, 1.0)
    assert isinstance(cfg.crops.global_scale, tuple)
    assert all(isinstance(v, float) for v in cfg.crops.global_scale)


def test_several_overrides_and_later_wins():
    cfg = load_config(None, ["train.epochs=3", "train.lr=1e-3", "model.out_dim=64",
                             "train.epochs=4", "data.num_images=null"])
    assert cfg.train.epochs == 4 and cfg.model.out_dim == 64
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.data.num_images is None


@pytest.mark.parametrize("value,expected", [("4.5", 4.5), ("4", 4.0)])
def test_numeric_match_threshold(value, expected):
    cfg = load_config(None, [f"loss.match_threshold={value}"])
    assert cfg.loss.match_threshold == expected
    assert isinstance(cfg.loss.match_threshold, float)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_numeric_match_threshold_must_be_a_positive_finite_distance(value):
    # NaN would make every match invalid: the local loss silently zero
    with pytest.raises(ConfigError, match="loss.match_threshold"):
        load_config(None, [f"loss.match_threshold={value}"])


def test_an_override_inside_a_value_set_earlier_is_a_config_error():
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_config(None, ["train.epochs=5", "train.epochs.x=1"])


def test_numeric_match_threshold_from_yaml(tmp_path):
    path = tmp_path / "thr.yaml"
    path.write_text("loss:\n  match_threshold: 6.0\n")
    assert load_config(str(path)).loss.match_threshold == 6.0


@pytest.mark.parametrize("value", ["none", "half_diagonal"])
def test_string_match_threshold(value):
    assert load_config(None, [f"loss.match_threshold={value}"]).loss.match_threshold == value


def test_bad_match_threshold_string():
    with pytest.raises(ConfigError, match="match_threshold"):
        load_config(None, ["loss.match_threshold=half_diag"])


def test_unknown_key_names_it_lists_valid_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epoch=3"])
    msg = str(e.value)
    assert "'train.epoch'" in msg
    assert "Did you mean 'train.epochs'" in msg
    for key in ("epochs", "batch_size", "lr", "momentum_teacher"):
        assert key in msg.split("Valid keys")[1]


def test_unknown_section_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trian.epochs=3"])
    msg = str(e.value)
    assert "'trian'" in msg and "Did you mean 'train'" in msg
    assert "crops" in msg and "loss" in msg


def test_unknown_key_without_close_match_still_lists():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.zzzzzz=1"])
    msg = str(e.value)
    assert "'loss.zzzzzz'" in msg and "Did you mean" not in msg
    assert "matching" in msg and "local_normalize" in msg


def test_bad_literal_lists_valid_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.matching=geo"])
    msg = str(e.value)
    assert "'loss.matching'" in msg and "'geo'" in msg
    for v in ("none", "similarity", "geometric"):
        assert v in msg


@pytest.mark.parametrize("override,fragment", [
    ("train.epochs=abc", "integer"),
    ("train.epochs=2.5", "integer"),
    ("train.lr=fast", "number"),
    ("train.resume=3", "true or false"),
    ("crops.global_scale=0.5", "list"),
    ("crops.global_scale=[0.1,0.5,1.0]", "2 items"),
    ("model.backbone_kwargs=3", "mapping"),
    ("train=5", "mapping"),
])
def test_bad_types(override, fragment):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert key in str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


@pytest.mark.parametrize("override,fragment", [
    ("data.fraction=0", "data.fraction"),
    ("data.fraction=1.5", "data.fraction"),
    ("crops.num_local=-1", "crops.num_local"),
    ("crops.num_global=0", "crops.num_global"),
    ("crops.global_scale=[0.9,0.5]", "crops.global_scale"),
    ("train.lr=0", "train.lr"),
    ("crops.local_size=256", "crops.local_size=256 is larger than crops.global_size"),
])
def test_range_validation(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_boundary_values_accepted():
    cfg = load_config(None, ["data.fraction=1.0", "crops.num_local=0"])
    assert cfg.data.fraction == 1.0 and cfg.crops.num_local == 0


def test_crop_size_multiple_of_patch_size():
    load_config(None, ["model.patch_size=4", "crops.global_size=32", "crops.local_size=16"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.patch_size=5", "crops.global_size=32"])
    assert "crops.global_size=32" in str(e.value) and "patch_size=5" in str(e.value)
    with pytest.raises(ConfigError, match="crops.local_size=18"):
        load_config(None, ["model.patch_size=4", "crops.local_size=18"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "train:\n  epochs: 7\n  batch_size: 8\n"
        "model:\n  backbone: glsd_convnet\n  backbone_kwargs: {widths: [8, 8]}\n")
    cfg = load_config(str(path), ["train.epochs=3", "model.backbone_kwargs.pool_after=[0]"])
    assert cfg.train.epochs == 3  # override wins
    assert cfg.train.batch_size == 8  # file value kept
    assert cfg.train.lr == 5e-4  # default kept
    assert cfg.model.backbone == "glsd_convnet"
    assert cfg.model.backbone_kwargs == {"widths": [8, 8], "pool_after": [0]}  # merged
    assert cfg.preset == str(path)


def test_mapping_override_replaces_dotted_key_merges(tmp_path):
    path = tmp_path / "kw.yaml"
    path.write_text("model:\n  backbone_kwargs: {embed_dim: 32, depth: 2}\n")
    cfg = load_config(str(path), ["model.backbone_kwargs.depth=1"])
    assert cfg.model.backbone_kwargs == {"embed_dim": 32, "depth": 1}
    cfg = load_config(str(path), ["model.backbone_kwargs={num_heads: 2}"])
    assert cfg.model.backbone_kwargs == {"num_heads": 2}
    cfg = load_config(str(path), ["model.backbone_kwargs={}"])
    assert cfg.model.backbone_kwargs == {}
    # sections merge key by key: the file's other values survive an override
    assert load_config(str(path), ["model.out_dim=8"]).model.backbone_kwargs == {"embed_dim": 32, "depth": 2}
    # ... and a whole section given as a mapping merges too (it once reset the section's other keys)
    whole = load_config("cifar10-vit-tiny", ["train={epochs: 1}"])
    assert whole.train.epochs == 1 and whole.train.lr == load_config("cifar10-vit-tiny").train.lr
    # one level deep, as a file's section: a mapping key inside it is replaced, not merged
    model = load_config("cifar10-vit-tiny", ["model={backbone: vit_small_patch16_224, backbone_kwargs: {depth: 2}}"])
    assert model.model.backbone_kwargs == {"depth": 2} and model.model.out_dim == whole.model.out_dim


def test_another_seed_or_the_same_folder_written_otherwise_is_judged_as_a_run_is(tmp_path, monkeypatch):
    from glsd.config_compare import diff_keys, identity

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    a = load_config(None, [f"data.root={tmp_path / 'photos'}"])
    assert diff_keys(identity(a), identity(load_config(None, ["data.root=~/photos"]))) == []
    assert diff_keys(identity(a), identity(load_config(None, [f"data.root={tmp_path / 'photos'}",
                                                              "train.seed=1"]))) == ["train.seed: 0 -> 1"]


def test_the_api_takes_numpy_scalars():
    np = pytest.importorskip("numpy")
    import glsd

    cfg = glsd.load_config(None, train__lr=np.float64(1e-3), train__epochs=np.int64(3))
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 3


def test_yaml_file_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  matchng: geometric\n")
    with pytest.raises(ConfigError, match="Did you mean 'loss.matching'"):
        load_config(str(path))


def test_a_key_given_twice_in_a_file_is_refused_not_half_dropped(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("preset: cpu-default\ntrain:\n  epochs: 5\nmodel:\n  out_dim: 64\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 6, column 1: .*key 'train' given twice"):
        load_config(str(path))
    path.write_text("a: &base {epochs: 5}\ntrain:\n  <<: *base\n  epochs: 6\n")  # a merge may repeat
    from glsd.config_files import parse_yaml
    assert parse_yaml(path.read_text(), "x")["train"] == {"epochs": 6}


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_folder_named_like_a_preset_is_not_taken_for_a_config(tmp_path, monkeypatch):
    """`glsd study cifar10-lowdata-cpu ... --out cifar10-lowdata-cpu`, rerun to resume from
    the folder that holds it: the preset is meant, not the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10-lowdata-cpu").mkdir()
    assert load_config("cifar10-lowdata-cpu").model.backbone == "glsd_convnet"
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="mine is a folder, not a config file"):
        load_config("mine")


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)).train.epochs == 100


def test_unknown_preset_name():
    with pytest.raises(ConfigError) as e:
        load_config("no_such_preset_xyz")
    msg = str(e.value)
    assert "unknown preset 'no_such_preset_xyz'" in msg
    assert "YAML" in msg
    assert "Presets:" in msg


def test_unknown_preset_suggests_close_name():
    names = preset_names()
    assert "cifar10-vit-tiny" in names  # the package data shipped
    with pytest.raises(ConfigError, match=f"Did you mean {names[0]}"):
        load_config(names[0] + "x")


def test_a_preset_left_out_or_written_as_a_file_is_named(tmp_path, monkeypatch):
    """glsd pretrain data.root=PHOTOS (no preset) and glsd pretrain cpu-default.yaml: the
    message says what was meant, not 'unknown preset' or 'file does not exist' alone."""
    with pytest.raises(ConfigError, match="'data.root=x' is an override, where the preset .* comes first"):
        load_config("data.root=x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"cpu-default.yaml does not exist \(the shipped preset is "
                                          "named cpu-default, without .yaml\)"):
        load_config("cpu-default.yaml")
    with pytest.raises(ConfigError, match="mine.yaml does not exist$"):
        load_config("mine.yaml")


@pytest.mark.parametrize("name", preset_names())
def test_shipped_presets_load(name):
    cfg = load_config(name)
    assert cfg.preset == name


def test_apply_overrides_takes_a_config_or_a_raw_mapping():
    from glsd.config import apply_overrides, to_dict

    cfg = load_config(None, ["train.epochs=3"])
    again = apply_overrides(cfg, ["train.lr=1e-3"])
    assert (again.train.epochs, again.train.lr) == (3, 1e-3) and cfg.train.lr != 1e-3  # a copy
    from_raw = apply_overrides(to_dict(cfg), ["model.out_dim=64"])
    assert from_raw.train.epochs == 3 and from_raw.model.out_dim == 64
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        apply_overrides(cfg, ["train.epoch=2"])


def test_a_retired_key_still_loads_from_old_runs_but_cannot_be_asked_for():
    from glsd.config import apply_overrides, to_dict

    old = to_dict(load_config())
    old["train"]["compile"] = False  # what run folders of earlier versions hold
    assert apply_overrides(old).train.epochs == 100
    with pytest.raises(ConfigError, match=r"'train.compile' was removed"):
        load_config(None, ["train.compile=true"])


def test_a_yaml_file_starts_from_the_preset_it_names(tmp_path):
    """`preset: NAME` in a user's file is its base (its own keys win, a mapping such as
    model.backbone_kwargs whole); without it the file starts from the defaults."""
    path = tmp_path / "mine.yaml"
    path.write_text("preset: cifar10-vit-tiny\ntrain: {epochs: 3}\nmodel: {backbone_kwargs: {depth: 2}}\n")
    cfg, base = load_config(str(path)), load_config("cifar10-vit-tiny")
    assert cfg.preset == "cifar10-vit-tiny" and cfg.train.epochs == 3
    assert cfg.train.lr == base.train.lr and cfg.crops == base.crops
    assert cfg.model.backbone_kwargs == {"depth": 2}  # replaced, not merged with the preset's
    run_record = tmp_path / "config.yaml"  # a run folder's record: complete, the same config
    run_record.write_text(dump_yaml(cfg))
    assert load_config(str(run_record)) == cfg
    path.write_text("preset: cifar10-vit-tni\n")
    with pytest.raises(ConfigError, match="mine.yaml: preset: 'cifar10-vit-tni'.*cifar10-vit-tiny"):
        load_config(str(path))
    # A file on top of another file is not read as one (it was ignored, the defaults used).
    path.write_text("preset: base.yaml\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="mine.yaml: preset: base.yaml names a file; .* copy the keys"):
        load_config(str(path))
    path.write_bytes(b"train: {epochs: 3}\n\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read the config file .*mine.yaml"):
        load_config(str(path))


def test_an_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train: {epohcs: 3}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown config key 'train\.epohcs'.*train\.epochs"):
        load_config(str(path))


@pytest.mark.parametrize("text", ["010", "0.10", "12:30", "2024-06-01", "true", "1e3"])
def test_a_string_key_keeps_the_override_as_typed(text):
    """YAML 1.1 reads 010 as octal 8, 12:30 as 750 and 2024-06-01 as a date: a run folder or
    data path given that way must not silently become another."""
    assert load_config(None, [f"output_dir={text}"]).output_dir == text
    assert load_config(None, [f"data.root=/d/{text}", f"data.split={text}"]).data.split == text


def test_other_types_take_the_yaml_reading_of_an_override():
    cfg = load_config(None, ["train.epochs=7", "loss.match_threshold=4.5", "train.lr=1e-3",
                             "train.deterministic=true", "train.max_steps=null", "train.compile=false"])
    assert (cfg.train.epochs, cfg.loss.match_threshold, cfg.train.lr) == (7, 4.5, 1e-3)
    assert type(cfg.train.epochs) is int and type(cfg.loss.match_threshold) is float
    assert cfg.train.deterministic is True and cfg.train.max_steps is None
    assert load_config(None, ["loss.match_threshold=half_diagonal"]).loss.match_threshold == "half_diagonal"
    with pytest.raises(ConfigError, match="'train.compile' was removed"):
        load_config(None, ["train.compile=true"])


def test_a_data_root_the_source_would_ignore_is_refused():
    """cpu-default generates its images: data.root=MY_PHOTOS alone must not train on them
    silently; the message names data.source=auto."""
    with pytest.raises(ConfigError, match=r"data.root=/photos is not read by data.source=synthetic.*data.source=auto"):
        load_config("cpu-default", ["data.root=/photos"])
    assert load_config("cpu-default", ["data.root=/photos", "data.source=auto"]).data.root == "/photos"


def test_an_exponent_without_a_dot_is_a_number_everywhere(tmp_path):
    """YAML 1.1 reads 1e-5 as a string: inside backbone_kwargs timm then refused it, and the same
    run from the Python API (1.0e-05) was another config."""
    import glsd

    cli = load_config(None, ["model.backbone_kwargs.init_values=1e-5", "train.lr=5e-4"])
    assert cli.model.backbone_kwargs == {"init_values": 1e-5} and cli.train.lr == 5e-4
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone_kwargs: {init_values: 1e-5}}\n")
    assert load_config(str(path)).model.backbone_kwargs == {"init_values": 1e-5}
    assert glsd.load_config(None, model__backbone_kwargs={"init_values": 1e-5}).model == cli.model


def test_a_string_that_reads_as_a_number_survives_its_record(tmp_path):
    cfg = load_config(None, ["output_dir=1e3", "data.split=1e5"])
    assert (cfg.output_dir, cfg.data.split) == ("1e3", "1e5")
    record = tmp_path / "config.yaml"
    record.write_text(dump_yaml(cfg))
    again = load_config(str(record))
    assert (again.output_dir, again.data.split) == ("1e3", "1e5")


@pytest.mark.parametrize("overrides, message", [
    (["loss.global_weight=0", "loss.local_weight=0"], "the loss is always 0"),
    (["loss.matching=none", "loss.global_weight=0"], r"loss.matching=none \(no local loss\)"),
    (["crops.color_jitter=[.inf, 0.4, 0.2, 0.1]"], "crops.color_jitter=inf"),
    (["crops.color_jitter=[.nan, 0.4, 0.2, 0.1]"], "crops.color_jitter=nan"),
])
def test_settings_that_would_train_nothing_or_something_else_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["loss.global_weight=0"]).loss.global_weight == 0  # the local loss alone


def test_a_hash_in_an_override_is_part_of_the_value():
    """A shell passes `output_dir=runs/exp #2` (quoted) whole; YAML would cut it at ' #'."""
    assert load_config(None, ["output_dir=runs/exp #2"]).output_dir == "runs/exp #2"
    assert load_config(None, ["output_dir=#3"]).output_dir == "#3"
    assert load_config(None, ['output_dir="runs/a #3"']).output_dir == "runs/a #3"

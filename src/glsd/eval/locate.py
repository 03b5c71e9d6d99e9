"""Where the weights and config of a path to evaluate come from: a run folder (its
``config.yaml`` and ``checkpoints/last.pt``, else ``backbone.safetensors``), a checkpoint
``.pt``, a ``backbone.safetensors`` or a ``glsd export`` folder. Checkpoints are untrusted:
read with ``weights_only=True`` (:func:`glsd.train.checkpoint.load_checkpoint`)."""
from __future__ import annotations

from pathlib import Path

from glsd.config import ConfigError, from_dict
from glsd.config_compare import diff_keys, identity
from glsd.errors import CheckpointError
from glsd.config_files import parse_yaml
from glsd.export import EXPORT_DIR, export_folder_config
from glsd.run_layout import BACKBONE_FILE, LAST_CHECKPOINT
from glsd.train.checkpoint import MAP_CHECKPOINTS, load_checkpoint, read_backbone_config
from glsd.train.lock import run_of
from glsd.weights import read_safetensors

EXPORT_WEIGHTS = "model.safetensors"  # beside config.json in a `glsd export` folder


def snapshot_name(checkpoint) -> str:
    """"" for a run's final weights, else the stem of the earlier checkpoint they came from
    (``checkpoints/epoch0010.pt`` -> ``epoch0010``): what keeps its records and export apart
    from the final model's. A checkpoint outside any run (``~/models/v2.pt``) is named by its
    stem too: two of them in one folder must not share an export or a record."""
    if checkpoint is None:
        return ""
    path = Path(checkpoint)
    if path.parent.parent.name == "export":  # a file of an export folder: the folder's name
        return "" if path.parent.name == EXPORT_DIR.name else path.parent.name
    if path.parent.name == LAST_CHECKPOINT.parent.name and path.name == LAST_CHECKPOINT.name:
        return ""
    if path.suffix != LAST_CHECKPOINT.suffix:  # backbone.safetensors: the final model's
        return ""
    # timm.pt must not take the final model's export folder, export/timm
    return path.name if path.stem == EXPORT_DIR.name else path.stem


def locate(path: Path):
    """(raw config dict, weights loader ``which -> (state, meta)``, info) for any input path."""
    if path.is_dir():
        if (path / "config.json").is_file() and (path / EXPORT_WEIGHTS).is_file():
            return _locate_safetensors(path / EXPORT_WEIGHTS)  # a `glsd export` folder
        return _locate_run(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a run folder, a {BACKBONE_FILE} or a .pt checkpoint")
    if path.suffix == ".safetensors":
        return _locate_safetensors(path)
    if path.suffix == ".pt":
        return _locate_checkpoint(path)
    raise ConfigError(f"{path} is neither a run folder, a .safetensors backbone nor a .pt checkpoint")


def _locate_run(run_dir: Path):
    ckpt_path, st_path, cfg_path = run_dir / LAST_CHECKPOINT, run_dir / BACKBONE_FILE, run_dir / "config.yaml"
    cache: dict = {}

    def ckpt() -> dict:  # read once, and only when needed
        if "c" not in cache:
            try:
                cache["c"] = load_checkpoint(ckpt_path, mmap=MAP_CHECKPOINTS)
            except CheckpointError as e:
                if not st_path.is_file():
                    raise
                raise CheckpointError(f"{e}. The run's exported teacher is intact: evaluate "
                                      f"{st_path} instead") from None
        return cache["c"]

    if cfg_path.is_file():
        raw = _read_yaml(cfg_path)
    elif ckpt_path.is_file():
        raw = _ckpt_config(ckpt(), ckpt_path)
    elif st_path.is_file():
        raw = _safetensors_config(st_path)
    else:
        raise ConfigError(f"{run_dir} is not a run folder: it has no config.yaml, {LAST_CHECKPOINT} "
                          f"or {BACKBONE_FILE}")

    def weights(which: str):
        if ckpt_path.is_file():
            _same_run(raw, ckpt(), ckpt_path, cfg_path)
            return _from_checkpoint(ckpt(), ckpt_path, which)
        if which == "teacher" and st_path.is_file():
            return _from_safetensors(st_path)
        raise ConfigError(f"no weights for the {which} in {run_dir}: {LAST_CHECKPOINT} is missing"
                          + ("" if which == "student" else f" and so is {BACKBONE_FILE}")
                          + "; has training saved a checkpoint yet? (a random-init evaluation, --random-init, needs none)")

    return raw, weights, {"path": str(run_dir), "run_dir": str(run_dir)}


def _same_run(raw: dict, ckpt: dict, ckpt_path: Path, cfg_path: Path) -> None:
    """A checkpoint laid into another run's folder: say so, naming both architectures."""
    saved = ckpt.get("config")
    if not (isinstance(saved, dict) and cfg_path.is_file()):
        return
    mine, theirs = raw.get("model", {}), saved.get("model", {})
    keys = [k for k in ("backbone", "backbone_kwargs", "patch_size") if k in theirs and mine.get(k, theirs[k]) != theirs[k]]
    fix = "; evaluate that checkpoint's own run folder (or the .pt file alone), or put this run's last.pt back"
    if keys:
        raise ConfigError(f"{ckpt_path} belongs to another run: it holds "
                          + ", ".join(f"model.{k}={theirs[k]!r}" for k in keys) + f" while {cfg_path} says "
                          + ", ".join(f"model.{k}={mine.get(k)!r}" for k in keys) + fix)
    try:  # the same architecture trained under another config: the record would mix two runs
        ours, its = identity(from_dict(raw)), identity(from_dict(saved))
    except ConfigError:  # a config of another glsd version: the architecture check above is all
        return
    for ident in (ours, its):  # data moved (config.yaml edited to its new place): the same run
        ident["data"].pop("root", None)
    diffs = diff_keys(its, ours)
    if diffs:
        raise ConfigError(f"{ckpt_path} belongs to another run: its config differs from {cfg_path} "
                          f"in {'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}" + fix)


def _locate_checkpoint(path: Path):
    ckpt = load_checkpoint(path, mmap=MAP_CHECKPOINTS)

    def weights(which: str):
        return _from_checkpoint(ckpt, path, which)

    return _ckpt_config(ckpt, path), weights, {"path": str(path), "run_dir": str(run_of(path))}


def _locate_safetensors(path: Path):
    raw = _safetensors_config(path)

    def weights(which: str):
        if which != "teacher":
            raise ConfigError(f"{path} holds only the teacher backbone; evaluate the run folder "
                              f"(its {LAST_CHECKPOINT}) for the {which}")
        return _from_safetensors(path)

    # results go to the run an export folder (RUN/export/timm) belongs to
    return raw, weights, {"path": str(path), "run_dir": str(run_of(path))}


def _read_yaml(path: Path) -> dict:
    return parse_yaml(path.read_text(), str(path))


def _ckpt_config(ckpt: dict, path: Path) -> dict:
    if not isinstance(ckpt.get("config"), dict):
        raise ConfigError(f"checkpoint {path} has no 'config' dict; put the run's config.yaml next to it")
    return ckpt["config"]


def _safetensors_config(path: Path) -> dict:
    config = read_backbone_config(path)  # checked header (untrusted file)
    if config is not None:
        return config
    sibling = path.parent / "config.yaml"
    if sibling.is_file():
        return _read_yaml(sibling)
    if (path.parent / "config.json").is_file():  # the weights of a `glsd export` folder
        return export_folder_config(path.parent)
    raise ConfigError(f"{path} has no glsd config in its metadata and no config.yaml or glsd "
                      "export config.json beside it; re-export it with glsd or copy the run's "
                      "config.yaml next to it")


def _from_checkpoint(ckpt: dict, path: Path, which: str) -> tuple[dict, dict]:
    if which not in ckpt:
        raise ConfigError(f"checkpoint {path} has no '{which}' weights")
    state = backbone_state(ckpt[which])
    if not state:
        raise ConfigError(f"checkpoint {path}: '{which}' holds no 'backbone.model.*' weights")
    planned = ckpt.get("planned_steps")  # absent in checkpoints of older versions
    return state, {"checkpoint": str(path), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
                   "planned_steps": planned if isinstance(planned, int) else None}


def _from_safetensors(path: Path) -> tuple[dict, dict]:
    return read_safetensors(path)[0], {"checkpoint": str(path), "step": None, "epoch": None}


def backbone_state(net_state: dict) -> dict:
    """Plain timm keys of the backbone inside a GLSDNet state dict.

    Wrappers leave prefixes in keys (``module.`` from DDP, ``_orig_mod.`` from torch.compile);
    they are dropped so a checkpoint of a wrapped network loads the same.
    """
    prefix = "backbone.model."
    out = {}
    for key, value in net_state.items():
        key = key.replace("_orig_mod.", "")
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out

"""The exported backbone: ``backbone.safetensors`` and the timm folder ``export/timm/``.

At the end of pretraining the teacher's bare backbone is written twice:

* ``RUN_DIR/backbone.safetensors``: the state dict of the plain timm model (or glsd's small
  conv net), keys exactly as the model names them, with the run's config as JSON metadata
  (``config``) and the model name (``backbone``). :func:`load_exported` rebuilds it.
* ``RUN_DIR/export/timm/``: ``config.json`` (timm's Hugging Face layout: ``architecture``,
  ``model_args``, ``pretrained_cfg`` with the training normalisation, input size and
  interpolation) and ``model.safetensors``, which plain timm loads offline::

      import json, timm
      folder = "RUN_DIR/export/timm"
      cfg = json.load(open(f"{folder}/config.json"))
      model = timm.create_model(cfg["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{folder}/model.safetensors"),
                                **cfg["model_args"]).eval()
      data_cfg = timm.data.resolve_data_config({}, model=model)  # glsd's eval preprocessing

  (or ``timm.create_model(f"local-dir:{folder}", pretrained=True)``). ``glsd export RUN_DIR``
  writes it for an existing run. A ``glsd_convnet`` backbone is not a timm model:
  ``glsd.load_backbone(folder)`` loads it.

All exported files are mode 0644.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from glsd.config import ConfigError, from_dict
from glsd.errors import CheckpointError
from glsd.models.backbone import create_model, declared_layout, has_class_token
from glsd.models.families import GLSD_CONVNET
from glsd.run_layout import BACKBONE_FILE
from glsd.train.checkpoint import read_backbone
from glsd.utils.io import check_writable
from glsd.weights import load_checked_weights, read_safetensors


def load_exported(path: Union[str, Path]) -> torch.nn.Module:
    """Rebuild the model of an exported backbone and load its weights.

    Args:
        path: a ``backbone.safetensors`` written by glsd (its metadata holds the config).
    Returns:
        The bare backbone (``create_model(cfg.model, cfg.crops.global_size)``, no classifier)
        in eval mode on the CPU; ``forward_features(x)`` gives ViT tokens ``(B, P + N, D)``
        or a feature map ``(B, D, h, w)``, ``forward(x)`` the pooled ``(B, D)`` embedding.
    Raises:
        ConfigError: the file is missing, or its weights do not fit the model its config
            describes. CheckpointError: the file has no glsd config in its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; it is written at the end of pretraining as "
                          "RUN_DIR/backbone.safetensors")
    state, raw = read_backbone(path)
    return _backbone_of(config_of_file(raw, path), state, path).eval()


def config_of_file(raw: dict, path: Path):
    """The config a weight file records, or an error naming the file: a key this version does
    not know is a file from another glsd version (or an edited one)."""
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: the config it records does not fit this glsd version ({e}); "
                          "it was written by another glsd version or edited: load it with the "
                          "version that wrote it") from None


def _backbone_of(cfg, state: dict, source) -> torch.nn.Module:
    """The backbone ``cfg`` describes (no stochastic depth: it is for inference) holding
    ``state``, checked."""
    model = create_model(dataclasses.replace(cfg.model, drop_path_rate=0.0), cfg.crops.global_size)
    return load_checked_weights(model, state, source,
                                f"model.backbone={cfg.model.backbone!r} as its metadata describes "
                                "it; was it written by another glsd or timm version?")


# ----------------------------------------------------------------------------------------
# The timm / Hugging-Face-style folder for downstream use

EXPORT_DIR = Path("export") / "timm"
FILE_MODE = 0o644  # exported files are meant to be shared: readable by all, whatever the umask
CONVNET_NOTE = ("glsd_convnet is not a timm model: load it with glsd.load_backbone(FOLDER) "
                "(or glsd.models.convnet.ConvNet(**model_args) + model.safetensors)")


def timm_config(cfg, num_features: int) -> dict:
    """The ``config.json`` of an export folder (timm's Hugging Face hub layout).

    ``model_args`` are the keyword arguments glsd builds the backbone with (backbone_kwargs,
    img_size, patch_size, ...; without stochastic depth, which no weight depends on) plus
    ``num_classes=0``; ``pretrained_cfg`` holds the training normalisation and input size, so
    ``timm.data.resolve_data_config`` gives glsd's evaluation preprocessing.
    """
    from glsd.config import to_dict
    from glsd.models.backbone import timm_kwargs

    m, c = cfg.model, cfg.crops
    is_timm = m.backbone != GLSD_CONVNET
    args = timm_kwargs(m, c.global_size) if is_timm else dict(m.backbone_kwargs)
    args.pop("drop_path_rate", None)
    if is_timm:
        args["num_classes"] = 0
    size = cfg.eval.image_size or c.global_size
    pretrained_cfg = {"input_size": [3, size, size], "interpolation": c.interpolation,
                      "crop_pct": 1.0, "crop_mode": "center", "mean": list(c.mean), "std": list(c.std),
                      "num_classes": 0,
                      # a registry tag's custom_load (the ViTs' .npz loader) would otherwise
                      # read model.safetensors as a JAX file on timm < 1.0.31
                      "custom_load": False}
    if args.get("dynamic_img_size") or args.get("strict_img_size") is False:
        pretrained_cfg["fixed_input_size"] = False
    feature = m.global_feature
    glsd_info = {"format": "glsd-timm-export-v1", "global_feature": feature,
                 "loader": "timm" if is_timm else "glsd", "config": to_dict(cfg)}
    if not is_timm:
        glsd_info["note"] = CONVNET_NOTE
    return {"architecture": m.backbone, "num_classes": 0, "num_features": int(num_features),
            "model_args": args, "pretrained_cfg": pretrained_cfg, "glsd": glsd_info}


def write_timm_export(out_dir: Union[str, Path], model: torch.nn.Module, cfg) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the bare backbone's state dict) to
    ``out_dir`` (atomically, mode 0644); returns ``out_dir``.

    ``model`` is the plain backbone (``Backbone.model``): keys exactly as timm names them.
    """
    from safetensors.torch import save

    from glsd.utils.io import atomic_write

    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights = save(tensors, metadata={"format": "pt"})  # the key HF/timm loaders look for
    config = timm_config(cfg, int(getattr(model, "num_features")))
    config["glsd"]["feature"] = _resolved_feature(model, cfg)
    text = json.dumps(config, indent=2).encode()
    for name, payload in (("model.safetensors", weights), ("config.json", text)):
        atomic_write(out_dir / name, lambda f, p=payload: f.write(p))
        os.chmod(out_dir / name, FILE_MODE)
    (out_dir / "README.md").write_text(_folder_readme(config, out_dir.resolve(), declared_layout(model)))
    os.chmod(out_dir / "README.md", FILE_MODE)
    return out_dir


def _resolved_feature(model: torch.nn.Module, cfg) -> str:
    """"cls" or "pooled": the global feature glsd evaluates, the one its k-NN, linear and
    embed numbers were made with: ``eval.features``, else the training's ``model.global_feature``,
    resolved."""
    for choice in (cfg.eval.features, cfg.model.global_feature):
        if choice != "auto":
            return choice
    return "cls" if declared_layout(model) == "tokens" and has_class_token(model) else "pooled"


# glsd's global feature from timm's forward_features, per layout: timm's own model(x) may
# differ (an average-pool ViT's fc_norm, ConvNeXt's head norm: layers glsd never trains).
FEATURE_LINES = {
    ("cls", "tokens"): "model.forward_features(x)[:, 0]",
    ("pooled", "tokens"): "model.forward_features(x)[:, model.num_prefix_tokens:].mean(1)",
    ("pooled", "nhwc"): "model.forward_features(x).mean((1, 2))",
    ("pooled", "nchw"): "model.forward_features(x).mean((2, 3))",
}


def _folder_readme(config: dict, out_dir: Path, layout: str) -> str:
    """The export folder's README; ``layout``: that of ``forward_features`` (tokens, nhwc, nchw)."""
    arch = config["architecture"]
    if config["glsd"]["loader"] == "glsd":
        return (f"# {arch} exported by glsd\n\n{CONVNET_NOTE}.\n\n```python\nimport glsd\n"
                f"model = glsd.load_backbone(\"{out_dir}\")  # nn.Module, eval mode\n```\n")
    feature = FEATURE_LINES[config["glsd"]["feature"], layout] + "  # (B, num_features): glsd's global feature"
    return f"""# {arch} exported by glsd

Plain timm, offline (no glsd needed):

```python
import json, PIL.Image, timm, torch
folder = "{out_dir}"
cfg = json.load(open(f"{{folder}}/config.json"))
model = timm.create_model(cfg["architecture"], pretrained=True,
                          pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{{folder}}/model.safetensors"),
                          **cfg["model_args"]).eval()
data_cfg = timm.data.resolve_data_config({{}}, model=model)  # training mean/std, input size
transform = timm.data.create_transform(**data_cfg)
x = transform(PIL.Image.open("photo.jpg").convert("RGB")).unsqueeze(0)  # (1, 3, H, W)
with torch.no_grad():
    feats = {feature}
```

or in one line: `timm.create_model(f"local-dir:{{folder}}", pretrained=True)`.
"""


def export_run(path: Union[str, Path], out_dir: Union[str, Path, None] = None) -> Path:
    """Write the export folder of an existing run (its teacher) or ``backbone.safetensors``.

    Args:
        path: a run folder, a ``backbone.safetensors`` or a checkpoint ``.pt``.
        out_dir: default ``RUN_DIR/export/timm``; for an earlier checkpoint
            (``checkpoints/epoch0010.pt``) ``RUN_DIR/export/epoch0010``, so that the final
            model's export is never replaced by an older one.
    Returns:
        The folder written.
    """
    from glsd.eval.features import load_backbone
    from glsd.eval.locate import snapshot_name

    backbone, cfg, info = load_backbone(path, "teacher")
    snapshot = snapshot_name(info.get("checkpoint"))
    default = Path(info["run_dir"]) / (EXPORT_DIR.parent / snapshot if snapshot else EXPORT_DIR)
    out = Path(out_dir) if out_dir is not None else default
    check_export_target(out, Path(info["run_dir"]))
    return write_timm_export(out, backbone.model, cfg)


def check_export_target(out: Path, run_dir: Optional[Path] = None) -> None:
    """An export replaces an earlier export of the same run; it never writes its config.json
    and README.md among someone's other files, nor over another run's own export (a folder
    inside that run), and it finds out that it cannot write there before it writes any file."""
    if out.is_file():
        raise ConfigError(f"{out} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / "config.json").read_text()).get("glsd", {})
        except (OSError, ValueError, AttributeError):
            earlier = {}
        if not isinstance(earlier, dict) or earlier.get("format") is None:
            raise ConfigError(f"{out} is not empty and holds no glsd export; give a new or empty "
                              "folder to --out (an earlier export there is replaced)")
        owner = _export_owner(out, earlier)
        if owner is not None and run_dir is not None and owner != run_dir.resolve():
            raise ConfigError(f"{out} is the export of another run ({owner}); give another --out, "
                              "or delete that folder first")
    check_writable(out, "the export")


def _export_owner(out: Path, earlier: dict) -> Optional[Path]:
    """The run whose folder holds the export ``out`` (its recorded output_dir, when ``out``
    lies inside it), else None: an export elsewhere belongs to no run."""
    recorded = (earlier.get("config") or {}).get("output_dir") if isinstance(earlier.get("config"), dict) else None
    if not isinstance(recorded, str):
        return None
    owner = Path(recorded).expanduser().resolve()
    return owner if owner in out.resolve().parents else None


def write_run_exports(run_dir: Union[str, Path], model: torch.nn.Module, cfg) -> Path:
    """End of pretraining: the export folder beside ``backbone.safetensors``, and both 0644."""
    run_dir = Path(run_dir)
    if (run_dir / BACKBONE_FILE).is_file():
        os.chmod(run_dir / BACKBONE_FILE, FILE_MODE)
    return write_timm_export(run_dir / EXPORT_DIR, model, cfg)


def load_export_folder(folder: Union[str, Path]) -> torch.nn.Module:
    """Rebuild the backbone of an export folder (any backbone, glsd_convnet included)."""
    folder = Path(folder)
    raw, weights = export_folder_config(folder), folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder} is not a glsd export folder (config.json + model.safetensors)")
    cfg = config_of_file(raw, folder / "config.json")
    state = read_safetensors(weights)[0]  # checked header, dtypes and values (untrusted file)
    return _backbone_of(cfg, state, weights).eval()


def export_folder_config(folder: Path) -> dict:
    """The glsd config an export folder's ``config.json`` keeps under ``glsd.config``."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} is not a glsd export folder (config.json + model.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-export with `glsd export`") from None
    glsd_meta = meta.get("glsd") if isinstance(meta, dict) else None
    raw = glsd_meta.get("config") if isinstance(glsd_meta, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path} has no glsd config ('glsd.config'); write it with `glsd export`")
    return raw

"""Load an exported ``backbone.safetensors`` back into a plain model.

At the end of pretraining the teacher's bare backbone is written to
``RUN_DIR/backbone.safetensors``: the state dict of the plain timm model (or glsd's small
conv net), keys exactly as the model names them, with the run's config as JSON metadata
(``config``) and the model name (``backbone``).

With glsd installed, one call rebuilds the exact model and loads the weights::

    from glsd.export import load_exported
    model = load_exported("runs/x/backbone.safetensors")  # nn.Module, eval mode, CPU
    tokens = model.forward_features(images)               # (B, 1 + N, D) for a ViT

Without glsd, plain timm does the same; pass the architecture keys of the run
(``model.backbone_kwargs``, plus for a ViT ``img_size=crops.global_size`` and
``patch_size=model.patch_size`` when the run set one)::

    import timm
    from safetensors.torch import load_file
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)
    model.load_state_dict(load_file("runs/x/backbone.safetensors"))

(glsd also builds ViTs with ``dynamic_img_size=True``, which changes no weight: add it to feed
other image sizes.) A ``glsd_convnet`` backbone is not a timm model: use
:func:`load_exported`, or ``glsd.models.convnet.ConvNet(**backbone_kwargs)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from glsd.config import ConfigError, from_dict
from glsd.models.backbone import create_model
from glsd.train.checkpoint import read_backbone


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
    cfg = from_dict(raw)
    model = create_model(cfg.model, cfg.crops.global_size)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:3])
        raise ConfigError(f"weights in {path} do not fit model.backbone={cfg.model.backbone!r} as "
                          f"its metadata describes it ({first}); was it written by another glsd "
                          "or timm version?") from None
    return model.eval()

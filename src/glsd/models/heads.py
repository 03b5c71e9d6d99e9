"""DINO projection heads, the student/teacher network (backbone + global + local head), and
the pair a run starts from (:func:`build_networks`)."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from glsd.config import Config
from glsd.models.backbone import Backbone, build_backbone
from glsd.weights import load_initial_weights

_LOG = logging.getLogger("glsd")  # the run's train.log once a run is open


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2-normalise -> weight-normed prototypes.

    Input ``(..., in_dim)``, output ``(..., out_dim)`` logits. With ``norm_last_layer`` the
    prototype norms are fixed to 1 (DINO's stabiliser for large out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # parametrizations.weight_norm (not the old hook) so the module deep-copies and
        # its state dict round-trips.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


@dataclass
class ViewGroupOutput:
    """Outputs for V views of one resolution, batch B, grid gh x gw (N = gh*gw cells)."""
    global_logits: torch.Tensor  # (V, B, K)
    local_logits: Optional[torch.Tensor]  # (V, B, N, K_local) or None without a local head
    local_feat: torch.Tensor  # (V, B, N, D) backbone features (similarity matching)
    grid: tuple[int, int]
    global_feat: Optional[torch.Tensor] = None  # (V*B, D) backbone global features


class GLSDNet(nn.Module):
    """Backbone + global head + (optional) local head, applied to groups of same-size views."""

    def __init__(self, backbone: Backbone, global_head: DINOHead, local_head: Optional[DINOHead]):
        super().__init__()
        self.backbone = backbone
        self.global_head = global_head
        self.local_head = local_head

    def forward(self, views: list[torch.Tensor]) -> list[ViewGroupOutput]:
        """views: tensors (B, 3, S, S); consecutive views of one size run as one batch.

        One call per step (not one per size) so DistributedDataParallel sees one forward.
        Returns one ViewGroupOutput per run of same-size views, in order.
        """
        groups: list[list[torch.Tensor]] = []
        for v in views:
            if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        return [self.forward_group(g) for g in groups]

    def forward_group(self, views: list[torch.Tensor]) -> ViewGroupOutput:
        """V views (B, 3, S, S) of one size S -> outputs for the V*B images."""
        n_views, batch = len(views), views[0].shape[0]
        out = self.backbone(torch.cat(views))
        gh, gw = out.local_feat.shape[1:3]
        local_feat = out.local_feat.reshape(n_views, batch, gh * gw, -1)
        global_logits = self.global_head(out.global_feat).reshape(n_views, batch, -1)
        local_logits = None
        if self.local_head is not None:
            local_logits = self.local_head(local_feat)
        return ViewGroupOutput(global_logits, local_logits, local_feat, (gh, gw), out.global_feat)


def build_network(cfg: Config) -> GLSDNet:
    m = cfg.model
    backbone = build_backbone(m, cfg.crops.global_size)
    dim = backbone.embed_dim
    global_head = DINOHead(dim, m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers,
                           m.norm_last_layer)
    local_head = None
    if cfg.loss.matching != "none":
        local_head = DINOHead(dim, m.local_out_dim or m.out_dim, m.local_hidden_dim or m.hidden_dim,
                              m.local_bottleneck_dim or m.bottleneck_dim, m.head_layers,
                              m.norm_last_layer)
    return GLSDNet(backbone, global_head, local_head)


def build_teacher(cfg: Config, student: GLSDNet) -> GLSDNet:
    """A fresh network holding the student's weights; it never receives gradients.

    Built fresh rather than deep-copied, and without stochastic depth: the teacher's targets
    must not be randomly thinned.
    """
    no_drop = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, drop_path_rate=0.0))
    teacher = build_network(no_drop)
    teacher.load_state_dict(student.state_dict())
    without_randomness(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def without_randomness(net: nn.Module) -> None:
    """Zero every stochastic-depth and dropout rate. ``model.drop_path_rate=0`` alone misses a
    rate set in ``model.backbone_kwargs`` and a family whose timm default is above zero; the
    teacher stays in train mode (BatchNorm batch statistics, as DINO's), so its own rates act."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "drop_prob", None), float):  # timm's DropPath / DropBlock
            module.drop_prob = 0.0


def freeze_unused_parameters(net: GLSDNet, crop_sizes: list[int]) -> list[str]:
    """Freeze the parameters that none of the network's outputs depend on, and name them.

    Some timm models hold a classifier-side norm that ``forward_intermediates`` never calls
    (ConvNeXt's ``head.norm``, an average-pool ViT's ``fc_norm``). Alone they get no gradient
    and AdamW skips them; but DistributedDataParallel waits for every trainable parameter's
    gradient and fails at the next step. One forward and backward of a copy, on two random
    images per crop size, finds them: the network's buffers (BatchNorm statistics) and the
    random state are left as they were.
    """
    probe = copy.deepcopy(net).train()
    device = next(probe.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        outputs = probe([torch.randn(2, 3, size, size, device=device) for size in crop_sizes])
        total = sum(o.global_logits.float().sum() for o in outputs)
        total = total + sum(o.local_logits.float().sum() for o in outputs if o.local_logits is not None)
        total.backward()
    unused = [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    params = dict(net.named_parameters())
    for name in unused:
        params[name].requires_grad_(False)
    return unused


def build_networks(cfg: Config, device: torch.device, initial_weights: bool = True) -> tuple[GLSDNet, GLSDNet]:
    """(student, teacher) on ``device``: the teacher starts as a copy of the student. Student
    parameters no output depends on are frozen (named in train.log). ``initial_weights``:
    read ``model.init_from`` (a resumed run's checkpoint replaces them: not needed then)."""
    student = build_network(cfg)
    if cfg.model.init_from and initial_weights:  # before the teacher is copied from it
        unused = load_initial_weights(student.backbone.model, cfg.model.init_from, cfg.model.backbone)
        _LOG.info("backbone initialised from %s%s", cfg.model.init_from,
                  f" (left out, not in the backbone: {', '.join(unused)})" if unused else "")
    student = student.to(device)
    sizes = [cfg.crops.global_size] + ([cfg.crops.local_size] if cfg.crops.num_local else [])
    unused = freeze_unused_parameters(student, sizes)
    if unused:
        _LOG.info("frozen: %d parameters none of glsd's outputs use (%s)",
                  len(unused), ", ".join(unused))
    return student, build_teacher(cfg, student).to(device)

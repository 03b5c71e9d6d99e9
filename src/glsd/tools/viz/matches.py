"""Pictures: local matches between two views, local features, training curves.

Three figures, each written as a PNG of a fixed pixel size (``*_FIGSIZE`` inches at ``dpi``):

* :func:`show_matches`: two views of one image (crops drawn with the run's crop config, as in
  pretraining) side by side, with a line from every student cell to its matched teacher cell,
  for geometric and for similarity matching;
* :func:`show_features`: the first three principal components of the local features as RGB,
  and for ViTs the CLS attention of the last block;
* :func:`plot_runs`: training curves of several runs overlaid.

matplotlib is an optional extra (``pip install -e .[viz]``). It is imported inside the functions,
through its object-oriented API only (no pyplot), so drawing neither needs a display nor
touches the global pyplot state of a caller's session.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from glsd.config import Config, load_config
from glsd.data.geometry import cell_centers
from glsd.data.view_params import sample_seed
from glsd.data.views import crops_of_image
from glsd.eval.features import eval_transform, load_backbone
from glsd.loss.matching import geometric_match, match_threshold_sq, similarity_match
from glsd.models.backbone import Backbone, build_backbone

PathLike = Union[str, Path]
MATCHES_FIGSIZE = (15.0, 4.6)  # inches; times dpi gives the PNG size
FEATURES_FIGSIZE = (12.0, 4.6)
PLOT_FIGSIZE = (16.0, 7.0)
DPI = 100
VIEW_PX = 256  # each view is shown at this size (a 16 px local crop is unreadable otherwise)
GAP_PX = 40
DISPLAY_MIN_PX = 256
PLOT_METRICS = ("loss", "loss_global", "loss_local", "knn_top1",
                "geo_valid_frac", "sim_geo_agree", "sim_dist_cells")


class VizError(ValueError):
    """A picture cannot be made from the given inputs; the message says why and the fix."""


class MatplotlibMissing(ImportError):
    """matplotlib (the ``viz`` extra) is not installed."""


def _figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure without pyplot; raises MatplotlibMissing naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing("glsd pictures need matplotlib, an optional extra: "
                                "pip install -e '.[viz]' (or pip install 'glsd[viz]')") from None
    return Figure(figsize=figsize, dpi=dpi)


def _save(fig, out: PathLike) -> Path:
    """Save at the figure's own size (no tight bbox): the PNG is figsize * dpi pixels."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=fig.dpi, format="png")
    return out


def read_image(path: PathLike) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise VizError(f"cannot read image {path}: {e}") from None


def upscale(img: Image.Image, min_px: int = DISPLAY_MIN_PX,
            resample=Image.Resampling.NEAREST) -> Image.Image:
    """Enlarge by an integer factor until the short side is >= ``min_px`` (CIFAR's 32 px
    would be a smudge); larger images are returned as they are."""
    factor = max(1, -(-min_px // min(img.size)))
    return img if factor == 1 else img.resize((img.width * factor, img.height * factor), resample)


# ----------------------------------------------------------------------------------------
# Backbones for pictures

def picture_backbone(run_dir: Optional[PathLike], config: Optional[str], overrides: Sequence[str] = (),
                     random_init: bool = False) -> tuple[Backbone, Config, str]:
    """(backbone in eval mode on the CPU, config, a label) for a picture.

    A run folder gives its teacher (or, with ``random_init``, a fresh backbone of its
    architecture); without one, ``config`` (a preset or YAML path) gives a random backbone
    seeded by ``train.seed``.
    """
    if run_dir is not None:
        backbone, cfg, info = load_backbone(run_dir, "teacher", random_init=random_init, overrides=overrides)
        step = f", step {info['step']}" if info.get("step") is not None else ""
        return backbone, cfg, f"{Path(run_dir).name} ({info['model']}{step})"
    if not config:
        raise VizError("give a run folder, or --config PRESET_OR_YAML for a random-init backbone")
    cfg = load_config(config, overrides)
    cfg.model.drop_path_rate = 0.0  # eval mode ignores it; keeps the module lean
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = build_backbone(cfg.model, cfg.crops.global_size)
    backbone.eval().requires_grad_(False)
    return backbone, cfg, f"{cfg.preset or config} (random init)"


def _normalize(cfg: Config, view: Image.Image) -> torch.Tensor:
    """PIL view -> ``(1, 3, S, S)`` normalised tensor (no colour augmentation: the picture is
    about geometry, and the same view is shown as the network saw it)."""
    x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.crops.mean).view(3, 1, 1)
    std = torch.tensor(cfg.crops.std).view(3, 1, 1)
    return ((x - mean) / std)[None]


# ----------------------------------------------------------------------------------------
# Matches between two views

@dataclass
class View:
    image: Image.Image  # the crop as the network sees it (S x S, flipped if ``flipped``)
    geometry: torch.Tensor  # (5,) top, left, height, width, flipped in original pixels
    kind: str  # "global" or "local"


@dataclass
class ViewMatches:
    teacher_grid: tuple[int, int]  # (gh_t, gw_t)
    student_grid: tuple[int, int]  # (gh_s, gw_s)
    geo_index: torch.Tensor  # (Ns,) nearest teacher cell in image coordinates
    geo_valid: torch.Tensor  # (Ns,) bool: within the run's match threshold
    sim_index: torch.Tensor  # (Ns,) teacher cell of highest cosine similarity

    @property
    def agree(self) -> torch.Tensor:
        """(Ns,) bool: the similarity match is the (valid) geometric match."""
        return (self.sim_index == self.geo_index) & self.geo_valid


def sample_views(cfg: Config, img: Image.Image, seed: int, student_view: str = "local") -> tuple[View, View]:
    """A teacher view (global crop) and a student view (local or second global crop), drawn
    by the training views' crop rule with the run's crop config, reproducibly from ``seed``
    (:func:`glsd.data.views.crops_of_image`; no global random state is touched).
    """
    if student_view not in ("local", "global"):
        raise VizError(f"student view {student_view!r}: use local or global")
    c = dataclasses.replace(cfg.crops, num_global=max(2, cfg.crops.num_global),
                            num_local=max(1, cfg.crops.num_local))
    student_index = c.num_global if student_view == "local" else 1
    (t_img, t_geom), (s_img, s_geom) = crops_of_image(c, img, sample_seed("viz", seed), [0, student_index])
    to_pil = lambda x: Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())  # noqa: E731
    return View(to_pil(t_img), t_geom, "global"), View(to_pil(s_img), s_geom, student_view)


@torch.no_grad()
def match_views(backbone: Backbone, cfg: Config, teacher: View, student: View) -> ViewMatches:
    """Geometric and similarity matches of the student's cells to the teacher's.

    One backbone embeds both views (the teacher's, for a run): the picture shows what the
    teacher's features would match, next to what the geometry says should match.
    """
    t_feat = backbone(_normalize(cfg, teacher.image)).local_feat[0]  # (gh_t, gw_t, D)
    s_feat = backbone(_normalize(cfg, student.image)).local_feat[0]  # (gh_s, gw_s, D)
    t_grid, s_grid = tuple(t_feat.shape[:2]), tuple(s_feat.shape[:2])
    thr = match_threshold_sq(student.geometry, s_grid, teacher.geometry, t_grid, cfg.loss.match_threshold)
    geo, _ = geometric_match(cell_centers(student.geometry, s_grid),
                             cell_centers(teacher.geometry, t_grid), thr)
    sim = similarity_match(s_feat.flatten(0, 1), t_feat.flatten(0, 1))
    return ViewMatches(t_grid, s_grid, geo.index, geo.valid, sim.index)


def _canvas(teacher: View, student: View) -> np.ndarray:
    """``(VIEW_PX, 2 * VIEW_PX + GAP_PX, 3)`` uint8: teacher view | gap | student view."""
    canvas = np.full((VIEW_PX, 2 * VIEW_PX + GAP_PX, 3), 255, dtype=np.uint8)
    for view, x0 in ((teacher, 0), (student, VIEW_PX + GAP_PX)):
        # Nearest: every network input pixel stays a visible square.
        big = view.image.resize((VIEW_PX, VIEW_PX), Image.Resampling.NEAREST)
        canvas[:, x0:x0 + VIEW_PX] = np.asarray(big)
    return canvas


def _cell_xy(grid: tuple[int, int], x0: float) -> np.ndarray:
    """``(gh * gw, 2)`` display (x, y) of a view's cell centres, row-major like the tokens.

    A flipped view is shown flipped, exactly as the network saw it, so no flip handling here.
    """
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return np.stack([x0 + (cols + 0.5) * VIEW_PX / gw, (rows + 0.5) * VIEW_PX / gh], axis=1)


def _draw_lines(ax, m: ViewMatches, index: torch.Tensor, groups) -> None:
    """One LineCollection per (mask, style) group, student cell -> matched teacher cell."""
    from matplotlib.collections import LineCollection

    s_xy = _cell_xy(m.student_grid, VIEW_PX + GAP_PX)
    t_xy = _cell_xy(m.teacher_grid, 0)[index.numpy()]
    for mask, style in groups:
        mask = mask.numpy()
        if mask.any():
            segs = np.stack([s_xy[mask], t_xy[mask]], axis=1)  # (n, 2 points, xy)
            ax.add_collection(LineCollection(segs, **style))
    ax.scatter(s_xy[:, 0], s_xy[:, 1], s=6, c="white", edgecolors="black", linewidths=0.4, zorder=3)


GEO_VALID = dict(colors="lime", linewidths=1.2, linestyles="solid")
GEO_MASKED = dict(colors="red", linewidths=1.0, linestyles="dashed")
SIM_AGREE = dict(colors="lime", linewidths=1.2, linestyles="solid")
SIM_DISAGREE = dict(colors="orange", linewidths=1.2, linestyles="solid")
SIM_NO_REF = dict(colors="silver", linewidths=1.0, linestyles="dotted")


def _match_panel(ax, canvas: np.ndarray, m: ViewMatches, kind: str, views: tuple[View, View]) -> None:
    """One panel: the two views and the geometric or the similarity matches."""
    from matplotlib.lines import Line2D

    ax.imshow(canvas, interpolation="nearest")
    n, valid = len(m.geo_valid), m.geo_valid
    if kind == "geometric":
        groups = [(valid, GEO_VALID), (~valid, GEO_MASKED)]
        labels = ["within threshold", "beyond threshold (masked)"]
        title = f"geometric: {int(valid.sum())}/{n} student cells within threshold"
    else:
        agree = m.agree
        groups = [(agree, SIM_AGREE), (valid & ~agree, SIM_DISAGREE), (~valid, SIM_NO_REF)]
        labels = ["= geometric match", "!= geometric match", "no valid geometric match"]
        title = f"similarity (argmax cosine): {int(agree.sum())}/{int(valid.sum())} agree with geometric"
    _draw_lines(ax, m, m.geo_index if kind == "geometric" else m.sim_index, groups)
    handles = [Line2D([], [], color=s["colors"], linestyle=s["linestyles"], lw=1.5) for _, s in groups]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=len(labels),
              fontsize=8, frameon=False)
    t, s = views
    ax.set_title(title, fontsize=10, pad=16)
    ax.text(VIEW_PX / 2, -6, f"teacher: {t.kind} {t.image.width} px, grid {m.teacher_grid[0]}x"
            f"{m.teacher_grid[1]}", ha="center", va="bottom", fontsize=8)
    ax.text(VIEW_PX * 1.5 + GAP_PX, -6, f"student: {s.kind} {s.image.width} px, grid "
            f"{m.student_grid[0]}x{m.student_grid[1]}", ha="center", va="bottom", fontsize=8)
    ax.set_axis_off()


def _image_panel(ax, img: Image.Image, views: tuple[View, View], m: ViewMatches) -> None:
    """The original image with both crop boxes and their cell centres (image pixels)."""
    from matplotlib.patches import Rectangle

    # extent = pixel edges, so crop boxes and centres (original pixels) land where they belong.
    ax.imshow(np.asarray(img), interpolation="nearest", extent=(0, img.width, img.height, 0))
    boxes = (("teacher", views[0], m.teacher_grid, "deepskyblue"),
             ("student", views[1], m.student_grid, "orange"))
    for role, view, grid, color in boxes:
        top, left, h, w, flipped = view.geometry.tolist()
        label = f"{role} ({view.kind}{', flipped' if flipped else ''})"
        ax.add_patch(Rectangle((left, top), w, h, fill=False, edgecolor=color, lw=2, label=label))
        yx = cell_centers(view.geometry, grid).numpy()
        ax.scatter(yx[:, 1], yx[:, 0], s=5, c=color, zorder=3)
    ax.set_xlim(0, img.width)
    ax.set_ylim(img.height, 0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=1, fontsize=8, frameon=False)
    ax.set_title(f"image {img.width}x{img.height} px: crops and cell centres", fontsize=10, pad=16)
    ax.set_axis_off()


def show_matches(image: PathLike, out: PathLike, run_dir: Optional[PathLike] = None,
                 config: Optional[str] = None, overrides: Sequence[str] = (), seed: int = 0,
                 student_view: Optional[str] = None, random_init: bool = False, dpi: int = DPI) -> Path:
    """Write the matches picture (``MATCHES_FIGSIZE * dpi`` pixels) to ``out``.

    Args:
        image: an image file. run_dir: a run folder (its teacher); else ``config`` (a preset or
            YAML) with random init. overrides: ``key=value`` on the config (crops.*, loss.*).
        seed: draws the two crops. student_view: "local" (default when the config has local
            crops) or "global" (a second global crop).
    """
    backbone, cfg, label = picture_backbone(run_dir, config, overrides, random_init)
    img = read_image(image)
    student_view = student_view or ("local" if cfg.crops.num_local > 0 else "global")
    views = sample_views(cfg, img, seed, student_view)
    m = match_views(backbone, cfg, *views)
    fig = _figure(MATCHES_FIGSIZE, dpi)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 2.15, 2.15]})
    _image_panel(axes[0], img, views, m)
    canvas = _canvas(*views)
    _match_panel(axes[1], canvas, m, "geometric", views)
    _match_panel(axes[2], canvas, m, "similarity", views)
    fig.suptitle(f"{label}: local matches, threshold {cfg.loss.match_threshold}, seed {seed}", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.1, wspace=0.05)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------
# Local features: principal components and CLS attention

def _last_attention(backbone: Backbone):
    """The last block's timm Attention module of a ViT with a class token, else None."""
    blocks = getattr(backbone.model, "blocks", None)
    if backbone.layout != "tokens" or backbone.num_prefix_tokens == 0 or not blocks:
        return None
    attn = getattr(blocks[-1], "attn", None)
    ok = attn is not None and hasattr(attn, "qkv") and hasattr(attn, "num_heads")
    return attn if ok else None


def attention_probs(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a timm Attention module, recomputed from its qkv linear.

    Args:
        attn: the module (``.qkv``, ``.num_heads``; optional ``.q_norm``/``.k_norm``/``.scale``).
        x: ``(B, N, C)`` its input (tokens after the block's norm1).
    Returns:
        ``(B, heads, N, N)`` attention weights, rows summing to 1.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x)  # (B, N, 3 * heads * head_dim)
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scale = getattr(attn, "scale", head_dim ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def features_and_attention(backbone: Backbone,
                           x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local features and, for ViTs, the CLS token's last-block attention to the patches.

    Args:
        x: ``(1, 3, H, W)`` one normalised image.
    Returns:
        local ``(gh, gw, D)`` and cls_attention ``(gh, gw)`` averaged over heads (None when
        the backbone is not a timm ViT with a class token).
    """
    attn = _last_attention(backbone)
    seen: dict = {}
    # The attention module's input is captured during the normal forward, so the picture
    # shows exactly the network's own pass (norms, layer scale, registers included).
    handle = None if attn is None else attn.register_forward_pre_hook(
        lambda mod, args: seen.setdefault("x", args[0]))
    try:
        local = backbone(x).local_feat[0]
    finally:
        if handle is not None:
            handle.remove()
    if attn is None:
        return local, None
    probs = attention_probs(attn, seen["x"])  # (1, heads, N, N)
    cls = probs[0, :, 0, backbone.num_prefix_tokens:].mean(dim=0)  # (gh * gw,)
    return local, cls.reshape(local.shape[:2])


def pca_rgb(local: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """First three principal components of ``(gh, gw, D)`` features as ``(gh, gw, 3)`` RGB
    in [0, 1] (each component min-max scaled), and their explained variance fractions."""
    gh, gw, d = local.shape
    x = local.reshape(gh * gw, d).float()
    x = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = x @ vh[:3].T  # (N, <=3)
    if comps.shape[1] < 3:  # fewer cells or channels than 3: pad with grey
        comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - comps.shape[1])], dim=1)
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    rgb = (comps - lo) / (hi - lo).clamp(min=1e-8)
    var = s.pow(2) / s.pow(2).sum().clamp(min=1e-12)
    return rgb.reshape(gh, gw, 3), var[:3].tolist()


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(gh, gw, C)`` -> ``(H, W, C)`` numpy, nearest (each cell stays a visible block)."""
    x = grid.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=size, mode="nearest")[0].permute(1, 2, 0).numpy()


def center_square(img: Image.Image) -> Image.Image:
    """The central square crop: what ``eval_transform`` (resize short side, centre crop) sees."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def show_features(run_dir: Optional[PathLike], image: PathLike, out: PathLike, overrides: Sequence[str] = (),
                  config: Optional[str] = None, random_init: bool = False, dpi: int = DPI) -> Path:
    """Write the features picture (``FEATURES_FIGSIZE * dpi`` pixels): the image as the model
    sees it (eval transform), the PCA of its local features, and the CLS attention map (ViT)
    or the local feature norm (other backbones)."""
    backbone, cfg, label = picture_backbone(run_dir, config, overrides, random_init)
    square = center_square(read_image(image))
    local, cls_attn = features_and_attention(backbone, eval_transform(cfg)(square)[None])
    shown = upscale(square)  # nearest: no invented detail, and the PNG stays small
    size = (shown.height, shown.width)
    rgb, var = pca_rgb(local)
    fig = _figure(FEATURES_FIGSIZE, dpi)
    axes = fig.subplots(1, 3)
    axes[0].imshow(np.asarray(shown))
    axes[0].set_title(f"input ({cfg.eval.image_size or cfg.crops.global_size} px to the model)", fontsize=10)
    axes[1].imshow(_upsample(rgb, size))
    axes[1].set_title("local features: PC1-3 as RGB\n(explained variance "
                      + "/".join(f"{100 * v:.0f}" for v in var) + " %)", fontsize=10)
    heat, title = (cls_attn, "CLS attention, last block\n(mean over heads)") if cls_attn is not None \
        else (local.float().norm(dim=-1), "local feature norm\n(not a ViT: no CLS attention)")
    axes[2].imshow(np.asarray(shown.convert("L")), cmap="gray")
    axes[2].imshow(_upsample(heat[..., None], size)[..., 0], cmap="inferno", alpha=0.6)
    axes[2].set_title(title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{label}: {local.shape[0]}x{local.shape[1]} grid of {local.shape[2]}-d local features",
                 fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.78, bottom=0.02, wspace=0.05)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------
# Training curves

def read_run(run_dir: PathLike) -> tuple[list[dict], dict]:
    """(metrics records, config dict) of a run folder; a torn last line (a run still
    writing) is skipped."""
    run_dir = Path(run_dir)
    metrics, cfg_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file():
        raise VizError(f"{run_dir} has no metrics.jsonl: is it a glsd run folder that has logged a step?")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    raw = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return records, raw if isinstance(raw, dict) else {}


def run_label(run_dir: PathLike, raw: dict) -> str:
    """``name: matching, data amount`` from a run's config.yaml (what the curves compare)."""
    data, loss = raw.get("data", {}), raw.get("loss", {})
    if data.get("num_images"):
        amount = f"{data['num_images']} images"
    else:
        amount = f"{100 * float(data.get('fraction', 1.0)):g}% of data"
    return f"{Path(run_dir).name}: {loss.get('matching', '?')}, {amount}"


def _curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold ``key`` (online k-NN records are separate)."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# Line style by matching, colour by run: runs that differ only in matching stay apart.
LINESTYLES = {"none": ":", "similarity": "--", "geometric": "-"}


def plot_runs(run_dirs: Sequence[PathLike], out: PathLike, dpi: int = DPI) -> Path:
    """Write the curves (``PLOT_FIGSIZE * dpi`` pixels) of PLOT_METRICS against the step,
    one colour per run, the legend in the last panel."""
    if not run_dirs:
        raise VizError("give at least one run folder")
    runs = []
    for d in run_dirs:
        records, raw = read_run(d)
        runs.append((run_label(d, raw), records, raw.get("loss", {}).get("matching")))
    fig = _figure(PLOT_FIGSIZE, dpi)
    from matplotlib.lines import Line2D  # after _figure: it has checked that matplotlib exists

    axes = fig.subplots(2, 4).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, PLOT_METRICS):
        drawn = 0
        for (label, records, matching), color in zip(runs, colors):
            steps, values = _curve(records, key)
            if steps:
                ax.plot(steps, values, color=color, ls=LINESTYLES.get(matching, "-"),
                        marker="o" if len(steps) < 20 else None, ms=3, lw=1.3, label=label)
                drawn += 1
        if not drawn:  # say why the panel is empty instead of leaving a bare frame
            hint = " (eval.every_epochs=0)" if key == "knn_top1" else ""
            ax.text(0.5, 0.5, f"not logged{hint}", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    legend_ax = axes[len(PLOT_METRICS)]
    legend_ax.set_axis_off()
    handles = [Line2D([], [], color=c, ls=LINESTYLES.get(m, "-"), lw=2) for (_, _, m), c in zip(runs, colors)]
    legend_ax.legend(handles, [run[0] for run in runs], loc="center", fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.94, bottom=0.08, wspace=0.28, hspace=0.38)
    return _save(fig, out)

"""The matches picture: two views of one image (crops drawn with the run's crop config, as in
pretraining) side by side, with a line from every student cell to its matched teacher cell, for
geometric and for similarity matching."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from glsd.config import Config
from glsd.data.geometry import cell_centers
from glsd.data.view_params import sample_seed
from glsd.data.views import crops_of_image
from glsd.loss.matching import match_threshold_sq, nearest_cell_match, similarity_match
from glsd.models.backbone import Backbone
from glsd.tools.viz.common import (DPI, PathLike, VizError, figure, normalize, picture_backbone,
                                   read_image, save)

MATCHES_FIGSIZE = (15.0, 4.6)  # inches; times dpi gives the PNG size
VIEW_PX = 256  # each view is shown at this size (a 16 px local crop is unreadable otherwise)
GAP_PX = 40


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
    t_feat = backbone(normalize(cfg, teacher.image)).local_feat[0]  # (gh_t, gw_t, D)
    s_feat = backbone(normalize(cfg, student.image)).local_feat[0]  # (gh_s, gw_s, D)
    t_grid, s_grid = tuple(t_feat.shape[:2]), tuple(s_feat.shape[:2])
    thr = match_threshold_sq(student.geometry, s_grid, teacher.geometry, t_grid, cfg.loss.match_threshold)
    geo, _ = nearest_cell_match(cell_centers(student.geometry, s_grid), teacher.geometry, t_grid, thr)
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
    # two lines: one is wider than a portrait photo's panel
    ax.set_title(f"image {img.width}x{img.height} px:\ncrops and cell centres", fontsize=10, pad=16)
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
    from glsd.train.preflight import check_grids

    backbone, cfg, label = picture_backbone(run_dir, config, overrides, random_init)
    check_grids(cfg)  # crops the training would refuse (off its stride: cell centres misplaced)
    img = read_image(image)
    student_view = student_view or ("local" if cfg.crops.num_local > 0 else "global")
    views = sample_views(cfg, img, seed, student_view)
    m = match_views(backbone, cfg, *views)
    fig = figure(MATCHES_FIGSIZE, dpi)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 2.15, 2.15]})
    _image_panel(axes[0], img, views, m)
    canvas = _canvas(*views)
    _match_panel(axes[1], canvas, m, "geometric", views)
    _match_panel(axes[2], canvas, m, "similarity", views)
    fig.suptitle(f"{label}: local matches, threshold {cfg.loss.match_threshold}, seed {seed}", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.1, wspace=0.05)
    return save(fig, out)

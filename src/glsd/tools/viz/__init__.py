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
from glsd.tools.viz.common import DPI, MatplotlibMissing, VizError, picture_backbone, read_image
from glsd.tools.viz.curves import PLOT_FIGSIZE, PLOT_METRICS, plot_runs, read_run, run_label
from glsd.tools.viz.features import FEATURES_FIGSIZE, features_and_attention, pca_rgb, show_features
from glsd.tools.viz.matches import MATCHES_FIGSIZE, match_views, sample_views, show_matches

__all__ = ["DPI", "FEATURES_FIGSIZE", "MATCHES_FIGSIZE", "PLOT_FIGSIZE", "PLOT_METRICS",
           "MatplotlibMissing", "VizError", "features_and_attention", "match_views", "pca_rgb",
           "picture_backbone", "plot_runs", "read_image", "read_run", "run_label", "sample_views",
           "show_features", "show_matches"]

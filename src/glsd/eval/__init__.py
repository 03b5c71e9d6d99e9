"""Evaluation of pretrained backbones: k-NN, linear probe, dense correspondence."""
from glsd.eval.dense import dense_correspondence, run_dense
from glsd.eval.features import eval_transform, extract_features, load_backbone
from glsd.eval.knn import knn_classify
from glsd.eval.linear import linear_probe
from glsd.eval.runner import KINDS, online_knn, run_eval

__all__ = ["KINDS", "dense_correspondence", "eval_transform", "extract_features", "knn_classify",
           "linear_probe", "load_backbone", "online_knn", "run_dense", "run_eval"]

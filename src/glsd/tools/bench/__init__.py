"""``glsd bench``: where the time of a step goes, every comparison measured side by side.

Sections (each a function returning a JSON-able dict; :func:`run_bench` runs the chosen ones
and prints one JSON object):

- ``geometry`` (:mod:`.geometry`): analytic cell centres (:func:`glsd.data.geometry.cell_centers`)
  against a position-map baseline, for 32 x 32 and 500 x 375 sources.
- ``data`` (:mod:`.data`): images/s of the view pipelines against the training step, on the
  preset's images and on ``--data PATH``.
- ``step`` (:mod:`.step`): images/s of the real training step for matching none / similarity /
  geometric and a few local-head sizes, interleaved step by step; the matching's share.
- ``utilisation`` (:mod:`.step`): FLOPs of one step over the step time, against the matmul peak
  measured in the same run; levers side by side; allocator.
- ``knn`` (:mod:`.knn`): throughput and peak memory of :func:`glsd.eval.knn.knn_classify`.

The step is built by pretraining's own builders (:mod:`.harness`). Timings are medians after
warm-up; ratios come from timings taken in the same loop, so a loaded machine slows both sides
alike (but still adds noise: read ``env.load_avg``).
"""
from glsd.tools.bench.common import allocator_info, environment, write_json
from glsd.tools.bench.run import DEFAULT_PRESET, SCHEMA, SECTIONS, TARGETS, run_bench

__all__ = ["DEFAULT_PRESET", "SCHEMA", "SECTIONS", "TARGETS", "allocator_info", "environment",
           "run_bench", "write_json"]

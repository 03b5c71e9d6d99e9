"""Tooling around the method: ``glsd bench`` (:mod:`glsd.tools.bench`), the low-data study
(:mod:`glsd.tools.study`) and pictures (:mod:`glsd.tools.viz`).

The tooling imports the core (data, models, loss, train, eval, config, export); the core never
imports the tooling (``tests/test_layout.py`` checks it).
"""

"""Helpers every part of the core shares, one home each: file writes (:mod:`glsd.utils.io`),
device and precision resolution (:mod:`glsd.utils.device`)."""

"""glsd: global-local self-distillation for visual representation learning."""

__version__ = "0.1.0"

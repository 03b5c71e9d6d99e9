"""The names of a run folder's files, in one place (training writes them; evaluation, export,
embedding and the API read them)."""
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINT_DIR) / "last.pt"  # the whole training state, for resume
BACKBONE_FILE = "backbone.safetensors"  # the teacher backbone with its config, at the end

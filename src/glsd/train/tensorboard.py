"""TensorBoard logging (the optional extra ``pip install 'glsd[tensorboard]'``): every numeric
value of each metrics.jsonl record, as a scalar at its step, under ``RUN_DIR/tensorboard``."""
from __future__ import annotations

from pathlib import Path

from glsd.config import ConfigError

INSTALL_HINT = "pip install 'glsd[tensorboard]' (or pip install tensorboard), or set log.tensorboard=false"


def require_tensorboard() -> None:
    """Raise before the run starts when log.tensorboard=true cannot be honoured."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(f"log.tensorboard=true needs the tensorboard package: {INSTALL_HINT}") from None


class TensorBoardSink:
    def __init__(self, run_root: Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_root) / "tensorboard"))

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

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


def require_sinks(cfg) -> None:
    """Before the run folder: the configured metric writers can be built."""
    if cfg.log.tensorboard:
        require_tensorboard()


def metric_sinks(cfg, run_root: Path, is_main: bool, resumed_step: int = 0) -> list:
    """Writers that receive every metrics.jsonl record (``write``/``close``); rank 0 only.
    ``resumed_step``: the checkpoint's step; what was logged after it is redone, so dropped."""
    return [TensorBoardSink(run_root, resumed_step)] if cfg.log.tensorboard and is_main else []


class TensorBoardSink:
    def __init__(self, run_root: Path, resumed_step: int = 0):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of steps >= it written before (a killed
        # run's steps past its checkpoint), as metrics.jsonl drops them.
        self.writer = SummaryWriter(log_dir=str(Path(run_root) / "tensorboard"),
                                    purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

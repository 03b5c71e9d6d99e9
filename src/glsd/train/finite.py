"""The non-finite guard: a step whose loss, gradients or weights are not finite is never saved.

Checks, cheapest first: the loss before ``backward`` (one scalar), the total gradient norm
before the optimizer step (the norm clipping computes anyway), and every weight before a
checkpoint is written (a fused norm per tensor list; a NaN or inf anywhere makes its norm
non-finite). A failure raises :class:`NonFiniteError`; the checkpoint on disk, written from
finite weights, is the state a rerun resumes from. A step that runs out of memory is told
the same way: what to lower, and which checkpoint the rerun resumes from.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch

from glsd.errors import NonFiniteError, OutOfMemory
from glsd.utils.distributed import max_over_ranks


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors (0-dim, float32): non-finite iff any element is."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def check_loss(terms, step: int, distributed: bool = False) -> float:
    """The loss of ``terms`` (a LossTerms) on the host (one sync, before backward), or
    NonFiniteError on every rank: one left in backward() would wait for the others."""
    value = terms.loss.item()
    finite_here = math.isfinite(value)
    ok = finite_here
    if distributed:
        ok = max_over_ranks(float(not finite_here), terms.loss.device) == 0
    if ok:
        return value
    values = {"loss": value, "loss_global": terms.loss_global.item(),
              "loss_local": terms.loss_local.item()}
    raise loss_error(step, values, elsewhere=finite_here)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    return total_norm(p.grad for p in params if p.grad is not None)


GROWN_WEIGHT = 1e3  # far beyond what an initialised and normed network's weights reach


def largest_weight(params: Iterable[torch.Tensor]) -> float:
    """The largest finite |w| (a non-finite weight is told by its own check)."""
    norms = torch._foreach_norm([p.detach() for p in params], float("inf"))
    values = torch.stack([n.float() for n in norms])
    finite_values = values[torch.isfinite(values)]
    return float(finite_values.max()) if finite_values.numel() else 0.0


def advice(cause: str, lr: float, peak_lr: float, clip_grad: Optional[float], mixed_precision: bool) -> str:
    """What to change, for the cause found ("loss", "gradients" or "weights")."""
    hints = [f"a lower train.lr (now {lr:g}, a peak of {peak_lr:g} once scaled by the global batch / 256)"]
    if mixed_precision:  # overflow in 16 bits: first suspect for a loss or gradient, not weights
        hints.insert(0 if cause != "weights" else 1, "train.precision=fp32")
    if cause != "weights" and not clip_grad:
        hints.append("train.clip_grad=1.0")
    return "Try " + ", or ".join(hints) + "."


def loss_error(step: int, values: Mapping[str, float], elsewhere: bool) -> NonFiniteError:
    where = " (on another rank; this rank's terms follow)" if elsewhere else ""
    terms = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    return NonFiniteError(f"non-finite loss at step {step}{where}: {terms}; the step was not applied.")


def grad_error(step: int, norm: float) -> NonFiniteError:
    return NonFiniteError(f"non-finite gradients at step {step} (total norm {_fmt(norm)}) with a "
                          "finite loss; the step was not applied.", cause="gradients")


def weights_error(step: int, bad: list[str], total: int) -> NonFiniteError:
    return NonFiniteError(f"non-finite weights after step {step}: {len(bad)} of {total} tensors "
                          f"(e.g. {', '.join(bad[:3])}); they were not written.", cause="weights")


def kept_note(last_path, checkpoint_step: Optional[int]) -> str:
    """Which checkpoint survives, truthfully."""
    if checkpoint_step is None:
        return "No checkpoint was written yet, so there is none to resume from."
    return (f"The checkpoint {last_path} (step {checkpoint_step}, finite weights) is kept; "
            "rerunning resumes from it.")


def _fmt(v: float) -> str:
    return str(v) if not math.isfinite(v) else f"{v:.4g}"


def out_of_memory(cfg, amp_dtype, device, step: int, last_path, checkpoint_step: Optional[int],
                  error: Exception) -> OutOfMemory:
    """What ran out, what to lower, and how the kept checkpoint resumes: under a smaller batch
    with train.extend (the batch size is a schedule key); other crops or another model are
    another run (their keys define the run)."""
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    precision = " or train.precision=bf16" if amp_dtype is None else ""
    kept = ("No checkpoint was written yet." if checkpoint_step is None else
            f"The checkpoint {last_path} (step {checkpoint_step}) is kept: it resumes "
            "under a smaller train.batch_size with train.extend=true, under another "
            "train.precision as it is, or with the same settings on a device with more memory; "
            "other crops or another model are a new run (a new output_dir, or train.resume=false).")
    return OutOfMemory(
        f"out of memory on {device} in step {step} ({detail}). This step held "
        f"train.batch_size={cfg.train.batch_size} images per process in {cfg.crops.num_global} views of "
        f"{cfg.crops.global_size} px and {cfg.crops.num_local} of {cfg.crops.local_size} px: lower "
        f"train.batch_size or crops.num_local{precision}, or pick a smaller model.backbone. {kept}")

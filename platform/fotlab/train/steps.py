"""One optimizer step (gradient accumulation, autocast, clipping, finite checks) and validation loss.

- Loss is the token mean of CE(logits, targets, ignore_index=-100) over ALL micro-batches of the step (and all
  ranks): each micro-batch contributes sum-CE / n_loss_tokens(step), so accumulating k micro-batches gives the
  same gradient as one k-times bigger batch even when micro-batches carry different numbers of loss tokens.
  Under DDP (gradients averaged over ranks) the scale is multiplied by world_size to keep that exact.
- Targets come already shifted from the packer (targets[b, t] = token after input_ids[b, t]).
- Non-final micro-steps run under `model.no_sync()` when the model has it (DDP), so gradients are all-reduced once.
- A NaN/inf loss or gradient norm raises `LossNotFiniteError` naming the step (`train.nonfinite: stop`), or with
  `train.nonfinite: skip` the step's update is dropped (gradients zeroed, no optimizer step) and the step is
  returned as skipped, for the loop to count; all ranks decide together (a NaN on one rank skips everywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from fotlab.train.runtime import LossNotFiniteError

IGNORE_INDEX = -100


@dataclasses.dataclass
class StepStats:
    """What one optimizer step measured: token-mean loss, pre-clip grad norm, loss-token / input-token counts."""

    loss: float
    grad_norm: float
    n_loss_tokens: int
    n_input_tokens: int
    skipped: bool = False  # non-finite loss or gradient norm under `train.nonfinite: skip`: no update was made


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision "bf16" (CPU autocast bf16 is supported by torch); fp32 otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast can run on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "xla", "mps")


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE over positions whose target is not -100 (fp32)."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.float().reshape(-1, V),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _global_count(n_local: int, device: torch.device) -> tuple[int, int]:
    """(n summed over ranks, number of ranks); (n_local, 1) without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n_local, 1
    count = torch.tensor([n_local], dtype=torch.long, device=device)
    torch.distributed.all_reduce(count)
    return int(count.item()), torch.distributed.get_world_size()


def _clip(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients to `max_norm` (no clipping when None/<=0) and return the total norm before clipping."""
    limit = float(max_norm) if max_norm and max_norm > 0 else float("inf")
    clip_sharded = getattr(model, "clip_grad_norm_", None)
    if clip_sharded is not None:  # FSDP computes the norm over shards
        return clip_sharded(limit)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor over all shards


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    step: int,
    crossbatch=None,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    grad_clip: float | None = 1.0,
    nonfinite: str = "stop",
) -> StepStats:
    """Forward/backward over `micro_batches` (one optimizer step), clip, `optimizer.step()`, zero grads.

    `step` is the 1-based number of the step being taken (for error messages). The lr scheduler is the
    caller's: call its `.step()` afterwards. `nonfinite` is "stop" (raise) or "skip" (module docstring).
    """
    micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
    n_loss_local = sum(int((mb["targets"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    n_loss, n_ranks = _global_count(n_loss_local, device)
    scale = n_ranks / max(n_loss, 1)  # DDP averages gradients over ranks
    loss_sum = 0.0
    no_sync = getattr(model, "no_sync", None)  # DDP's: no gradient all-reduce before the last micro-batch
    for i, mb in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if is_last or no_sync is None else no_sync()
        with sync:
            with autocast_context(device, precision):
                logits = model(mb["input_ids"], crossbatch=crossbatch).logits  # (B, T, V)
            micro_sum = token_ce_sum(logits, mb["targets"])
            if not torch.isfinite(micro_sum) and nonfinite == "stop":
                raise LossNotFiniteError(
                    f"step {step}: loss is {micro_sum.item()} (micro-batch {i + 1}/{len(micro_batches)}); "
                    "stopping (train.nonfinite: stop) — lower the lr, check the data, try fp32, "
                    "or set train.nonfinite: skip"
                )
            (micro_sum * scale).backward()
        loss_sum += micro_sum.item()
    grad_norm = _clip(model, grad_clip)
    n_inputs = sum(mb["input_ids"].numel() for mb in micro_batches)
    stats = StepStats(loss_sum / max(n_loss_local, 1), float(grad_norm), n_loss_local, n_inputs)
    if nonfinite == "skip" and _any_rank_nonfinite(stats.loss, stats.grad_norm, device):
        optimizer.zero_grad(set_to_none=True)
        return dataclasses.replace(stats, skipped=True)
    if not torch.isfinite(grad_norm):
        raise LossNotFiniteError(f"step {step}: gradient norm is {grad_norm.item()}; stopping")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def _any_rank_nonfinite(loss: float, grad_norm: float, device: torch.device) -> bool:
    """Whether the loss or gradient norm is NaN/inf on any rank (one all-reduce when a process group exists)."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bad
    flag = torch.tensor([int(bad)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    crossbatch=None,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> float:
    """Token-mean CE over `batches` in eval mode (train mode is restored afterwards); NaN when no target token is
    scored (e.g. validation chunks that hold only the loss-masked part of their documents), never a fake 0."""
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    try:
        for batch in batches:
            input_ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            with autocast_context(device, precision):
                logits = model(input_ids, crossbatch=crossbatch).logits  # (B, T, V)
            total += token_ce_sum(logits, targets).item()
            n_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / n_tokens if n_tokens else math.nan

"""Optimizers and learning-rate schedules built from `spec.train.optimizer` / `spec.train.schedule`.

- AdamW is `torch.optim.AdamW`; Adafactor is `torch.optim.Adafactor` (torch >= 2.5), not hand-written.
  Adafactor keeps its own defaults for betas/eps (its eps means something else); only lr and weight decay apply.
- Weight decay applies to matrices only (ndim >= 2: projections, embeddings, lm_head); norms and biases
  (ndim < 2) go into a second group with weight_decay 0.
- Schedules are `LambdaLR` multipliers of the base lr, as a function of the 0-based step s being taken:
  * constant:     warmup(s), then 1
  * inverse_sqrt: min((s+1)/w, sqrt(w/(s+1))) — linear warm-up to 1 at s = w-1, then 1/sqrt decay
                  (the paper's small models: w = 1000); w = 0 gives 1/sqrt(s+1)
  * cosine:       warm-up, then min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2 with
                  progress 0 at the end of warm-up and 1 at the last step
  where warmup(s) = min(1, (s+1)/w) (the first step already has a non-zero lr).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "inverse_sqrt", "cosine")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group (ndim >= 2) and a non-decayed one (norms, biases)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():  # parameters() de-duplicates tied weights
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, opt_spec: Any) -> torch.optim.Optimizer:
    """The optimizer named by `opt_spec.name` over `model`'s trainable parameters.

    `opt_spec` has: name ("adamw" | "adafactor"), lr, weight_decay, betas (AdamW), eps (AdamW).
    """
    groups = param_groups(model, float(opt_spec.weight_decay))
    name = opt_spec.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=float(opt_spec.lr), betas=tuple(opt_spec.betas), eps=float(opt_spec.eps))
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=float(opt_spec.lr))
    raise ValueError(f"train.optimizer.name: unknown optimizer {name!r} (expected one of {OPTIMIZERS})")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up multiplier for 0-based `step`: (step+1)/warmup_steps capped at 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def constant_factor(step: int, warmup_steps: int) -> float:
    return warmup_factor(step, warmup_steps)


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return 1.0 / math.sqrt(step + 1)
    return min((step + 1) / warmup_steps, math.sqrt(warmup_steps / (step + 1)))


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step + 1 - warmup_steps) / decay_steps, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor_fn(sched_spec: Any, total_steps: int) -> Callable[[int], float]:
    """step -> lr multiplier for `sched_spec` (name, warmup_steps, min_lr_ratio)."""
    name, warmup = sched_spec.name, int(sched_spec.warmup_steps)
    if name == "constant":
        return lambda step: constant_factor(step, warmup)
    if name == "inverse_sqrt":
        return lambda step: inverse_sqrt_factor(step, warmup)
    if name == "cosine":
        min_ratio = float(sched_spec.min_lr_ratio)
        return lambda step: cosine_factor(step, warmup, total_steps, min_ratio)
    raise ValueError(f"train.schedule.name: unknown schedule {name!r} (expected one of {SCHEDULES})")


def build_scheduler(optimizer: torch.optim.Optimizer, sched_spec: Any, total_steps: int) -> LambdaLR:
    """A `LambdaLR` over `optimizer`; call `.step()` once after every optimizer step."""
    return LambdaLR(optimizer, lr_factor_fn(sched_spec, total_steps))

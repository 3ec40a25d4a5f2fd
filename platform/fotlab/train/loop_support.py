"""Small pieces the loop needs: the step's CrossBatch from the spec, cross-rank means, precision resolution,
and the atomic final-model write (HF format + tokenizer; a full disk reported as one error)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fotlab.model.crossbatch import CrossBatch
from fotlab.train.checkpoint import fsync_path, intact_note, replace_dir
from fotlab.train.crossbatch_schedule import crossbatch_for_step
from fotlab.train.disk_full import no_space, removed_if_failed
from fotlab.train.runtime import TrainError
from fotlab.train.steps import bf16_supported

if TYPE_CHECKING:
    from fotlab.model import FoTForCausalLM

logger = logging.getLogger(__name__)


def crossbatch_at(spec, step: int) -> CrossBatch:
    """The CrossBatch of 0-based training step `step` (switch / sample_from per spec.train.crossbatch)."""
    return crossbatch_for_step(step, spec.train.crossbatch, seed=spec.seed, batch_size=spec.train.batch_size)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """`value` averaged over all ranks (the value itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def check_replicated(model: torch.nn.Module) -> None:
    """Raise unless every rank holds full parameters (plain or DDP): checkpoints are written from rank 0's full
    state dict, which a sharded (FSDP) model does not have."""
    sharded = type(model).__name__ == "FullyShardedDataParallel" or any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    )
    if sharded:
        raise TrainError(
            "scaling.strategy: fsdp-sharded models cannot be checkpointed by fotlab.train yet "
            "(it saves rank 0's full state dict); use strategy ddp"
        )


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on any rank, so all ranks stop together (no hang in a collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "bf16" when asked for and supported on `device`, else "fp32" (with a warning when downgraded)."""
    if precision == "bf16" and not bf16_supported(device):
        logger.warning("train.precision bf16 is not supported on %s; training in fp32", device)
        return "fp32"
    return precision


def save_final_model(model: FoTForCausalLM, tokenizer, model_dir: Path, checkpoint_dir: Path | None = None) -> Path:
    """Write model (safetensors) + tokenizer into `model_dir` atomically (temp dir in the same parent, renamed).

    A full disk raises one `DiskFullError` naming the checkpoint under `checkpoint_dir` a resume starts from; the
    partial write is removed (train/disk_full.py)."""
    model_dir = Path(model_dir)
    tmp_dir = model_dir.with_name(f".tmp-{model_dir.name}")

    def disk_full() -> str:
        kept = f"; {intact_note(checkpoint_dir, 'the last checkpoint')}" if checkpoint_dir is not None else ""
        written = f"the final model could not be written to {model_dir}: {no_space(model_dir)}"
        return f"{written}; the partial write was removed{kept}"

    with removed_if_failed(tmp_dir, disk_full):
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.save_pretrained(str(tmp_dir))
        tokenizer.save_pretrained(str(tmp_dir))
        for file in tmp_dir.iterdir():
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp_dir)
        replace_dir(tmp_dir, model_dir)
        fsync_path(model_dir.parent)
    logger.info("final model -> %s", model_dir)
    return model_dir

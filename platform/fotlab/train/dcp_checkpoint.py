"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP), for FSDP2 runs.

    python -c "from fotlab.train.dcp_checkpoint import find_resumable; print(find_resumable('out/checkpoints'))"

Layout of one checkpoint (`<output_dir>/checkpoints/step-00000100/`, same names as the replicated format):
    .metadata, __<rank>_0.distcp   DCP: model + optimizer state, one shard file per rank (DCP reshards on load,
                                   so a checkpoint written by N ranks resumes on M)
    scheduler.pt                   lr scheduler state_dict (rank 0)
    rank-00000.pt ...              per-rank state: RNG states, data position (packer)
    trainer_state.json             step, metrics, world size, `format: "dcp"` and the manifest (every other
                                   file's size and sha256, `checkpoint.file_manifest`) — written LAST: it is
                                   the completion marker

Atomicity: every rank writes into `.tmp-step-00000100/` (DCP fsyncs its files); after a barrier rank 0 writes
the manifest, renames the dir into place and prunes old checkpoints (`train.keep_checkpoints`). A failed save
(a full disk: one `DiskFullError`, train/disk_full.py) leaves no temp dir behind on rank 0's side and never
costs the previous checkpoint, as in the replicated format.
`find_resumable` walks the checkpoints newest first and takes the first one whose manifest matches the files on
disk; a dir without its marker, with a missing, truncated or altered file, is skipped with a warning that names
it (both formats share that check: `fotlab.train.checkpoint`).

Resuming at another world size: model and optimizer reshard through DCP exactly; the lr scheduler is global.
Each rank's RNG state comes from rank `r % old_world_size`; the data position is approximate
(`fotlab.train.checkpoint.restore_packer`, shared with the replicated format).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fotlab.train.checkpoint import (
    STATE_FILE,
    checkpoint_problem,
    commit_checkpoint,
    disk_full_message,
    find_resumable,
    list_checkpoints,
    start_save,
    step_dir_name,
    torch_save,
)
from fotlab.train.disk_full import removed_if_failed

logger = logging.getLogger(__name__)

FORMAT = "dcp"


def is_dcp_checkpoint(path: Path) -> bool:
    """True when `path` holds a DCP checkpoint marker (trainer_state.json with format "dcp")."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        return json.loads(state_file.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_dcp_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int,
    keep: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write sharded checkpoint `step` under `root` atomically (called by every rank); returns the final dir."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final_dir = root / step_dir_name(step)
    tmp_dir = start_save(root, step, rank)
    with removed_if_failed(tmp_dir, lambda: disk_full_message(root, step, rank), remove=rank == 0):
        barrier()
        dcp.save(_model_and_optim_state(model, optimizer), checkpoint_id=str(tmp_dir))
        torch_save(rank_state, tmp_dir / f"rank-{rank:05d}.pt")
        if rank == 0:
            torch_save(scheduler.state_dict(), tmp_dir / "scheduler.pt")
        barrier()
        if rank == 0:
            commit_checkpoint(tmp_dir, final_dir, {"format": FORMAT, "step": step, **trainer_state}, keep)
            logger.info("sharded checkpoint step %d -> %s", step, final_dir)
    barrier()
    return final_dir


def load_dcp_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model + optimizer (resharded to this world size), scheduler; returns (trainer_state, rank_state)
    where rank_state is the saved state of rank `rank % saved_world_size`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    trainer_state = json.loads((path / STATE_FILE).read_text())
    state = _model_and_optim_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    saved_world = int(trainer_state.get("world_size", 1))
    rank_state = torch.load(path / f"rank-{rank % saved_world:05d}.pt", weights_only=True)
    return trainer_state, rank_state


__all__ = [
    "find_resumable",
    "checkpoint_problem",
    "is_dcp_checkpoint",
    "save_dcp_checkpoint",
    "load_dcp_checkpoint",
    "list_checkpoints",
]

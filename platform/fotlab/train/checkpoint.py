"""Atomic training checkpoints: everything needed to continue a run exactly.

Layout of one checkpoint (`<output_dir>/checkpoints/step-00000100/`):
    model.safetensors    model weights (safetensors `save_model`: tied weights handled)
    optimizer.pt         optimizer.state_dict()
    scheduler.pt         lr scheduler state_dict()
    rank-00000.pt        per-rank state: RNG states, data position (packer), crossbatch schedule state
    trainer_state.json   step, last metrics, world size and the manifest (`files`: every other file's size and
                         sha256) — written LAST: a dir without it is incomplete

Atomicity: everything is written into `.tmp-step-00000100/` next to the final dir, each file fsync'ed, then
the dir is renamed into place (`os.replace`) and the parent fsync'ed. A crash at any point leaves either the
old set of checkpoints or the new complete one; hidden `.tmp-*` leftovers are never picked up and are
removed by the next save. A save that fails (a full disk above all) removes its own temp dir at once and raises,
a full disk as one `DiskFullError` that names what is still intact (train/disk_full.py); older checkpoints are
pruned only after the new one is in place, so a failed save never costs the previous one.
Integrity: `find_resumable` checks a checkpoint's files against its manifest before anything is loaded (a
missing, truncated or altered file) and falls back to the previous complete checkpoint with a warning naming
the bad one; the same manifest guards the sharded DCP format.
Every rank writes its own rank file into the same temp dir (shared `output_dir`); rank 0 writes the shared files
and does the rename. Files are read back with safetensors and `torch.load(weights_only=True)` only.

Retention: these checkpoints are the only ones a run keeps, and `train.keep_checkpoints` (applied by
`save_checkpoint`, `prune_checkpoints`) is the only retention policy. Ray Train's and Ray Tune's `CheckpointConfig`
is not used and nothing is reported to Ray with a checkpoint, because fotlab's folder is the one every way of
running has in common: an in-process run (`scaling.num_workers: 0`, which Ray does not persist), a sweep trial
inside Tune, and Ray Train workers all write it, and all resume from it (`orchestrate.worker.resume_dir`). A Ray
copy would be a second, redundant copy of every checkpoint with a second policy and a second place to look.
The folder must therefore be on storage all workers share (a local path, NFS or another mounted filesystem).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from fotlab.train.disk_full import folder_bytes, no_space, removed_if_failed

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_DIR = re.compile(r"^\.tmp-step-(\d{8})$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2  # 2: trainer_state.json carries the file manifest (sizes and sha256)
MANIFEST_KEY = "files"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(obj: Any, path: Path) -> None:
    """`torch.save` into a file opened here (a full disk then surfaces as OSError(ENOSPC) in the error's context,
    where torch's own file writer reports a bare RuntimeError), flushed to disk."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (dirs named step-NNNNNNNN with a trainer state)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint dir, else the newest checkpoint inside it; raises if none."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"resume_from: no complete checkpoint at {path}")
    return latest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {"bytes": size, "sha256": hex}} for every file of a checkpoint dir except the state file."""
    return {
        f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(Path(directory).iterdir())
        if f.is_file() and f.name != STATE_FILE
    }


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (no marker, unreadable marker, a file missing, truncated or altered
    against the manifest), or None. A manifest entry that is a plain int (DCP checkpoints before sha256) checks
    the size only; a checkpoint without a manifest (format 1) cannot be checked and passes."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    for name, entry in (state.get(MANIFEST_KEY) or {}).items():
        expected = entry if isinstance(entry, dict) else {"bytes": entry}
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if "sha256" in expected and file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (altered on disk)"
    return None


def _candidates(path: Path) -> list[Path]:
    """Checkpoint dirs to try, newest first: `path` itself (a step dir) and its older siblings, or the step
    dirs under a checkpoints root (complete or not)."""
    path = Path(path)
    is_step = _STEP_DIR.match(path.name) or (path / STATE_FILE).is_file()
    root, newest = (path.parent, path) if is_step else (path, None)
    steps = (
        sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), reverse=True)
        if root.is_dir()
        else []
    )
    if newest is not None:
        steps = [newest] + [p for p in steps if p.name < newest.name]
    return steps


def find_resumable(path: Path) -> Path:
    """The newest intact checkpoint at `path` (a step dir or a checkpoints root); incomplete or corrupt ones are
    skipped with a warning naming them. Raises FileNotFoundError when none is intact."""
    for candidate in _candidates(Path(path)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning(
            "checkpoint %s is incomplete (%s); not resuming from it, trying the previous one",
            candidate,
            problem,
        )
    raise FileNotFoundError(f"resume_from: no complete checkpoint at {path}")


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int = 0,
    keep: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write checkpoint `step` atomically under `root` (called by every rank); returns the final dir.

    `model` is the bare (unwrapped) model; `trainer_state` must be JSON-serialisable; `rank_state` holds
    tensors / numbers / strings / lists / dicts (loadable with weights_only=True).
    """
    root = Path(root)
    final_dir = root / step_dir_name(step)
    tmp_dir = start_save(root, step, rank)
    with removed_if_failed(tmp_dir, lambda: disk_full_message(root, step, rank), remove=rank == 0):
        barrier()
        torch_save(rank_state, tmp_dir / f"rank-{rank:05d}.pt")
        if rank == 0:
            save_model(model, str(tmp_dir / "model.safetensors"))
            fsync_path(tmp_dir / "model.safetensors")
            torch_save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
            torch_save(scheduler.state_dict(), tmp_dir / "scheduler.pt")
        barrier()
        if rank == 0:
            state = {"format_version": FORMAT_VERSION, "step": step, **trainer_state}
            commit_checkpoint(tmp_dir, final_dir, state, keep)
            logger.info("checkpoint step %d -> %s", step, final_dir)
    barrier()
    return final_dir


def start_save(root: Path, step: int, rank: int) -> Path:
    """The temp dir checkpoint `step` is written into (both formats); rank 0 creates it after removing what
    interrupted saves left behind (they would hold on to the space this save needs)."""
    tmp_dir = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        with removed_if_failed(tmp_dir, lambda: disk_full_message(root, step)):
            root.mkdir(parents=True, exist_ok=True)
            for leftover in root.iterdir():
                if _TMP_DIR.match(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
            tmp_dir.mkdir()
    return tmp_dir


def disk_full_message(root: Path, step: int, rank: int = 0) -> str:
    """What a full disk cost while writing checkpoint `step` under `root` (said after rank 0 removed the temp dir;
    another rank leaves that to rank 0 or to the next save)."""
    previous = latest_checkpoint(root)
    needed = folder_bytes(previous) if previous is not None else None
    removed = "the partial write was removed" if rank == 0 else "the partial write is removed by the next save"
    return (
        f"checkpoint {step_dir_name(step)} could not be written to {root}: {no_space(root, needed)}; {removed}; "
        f"{intact_note(root, 'the previous checkpoint')}"
    )


def intact_note(root: Path, label: str) -> str:
    """`<label> step-00000002 is intact` after checking the newest checkpoint under `root` against its manifest
    (or that it is damaged, or that there is none)."""
    latest = latest_checkpoint(root)
    if latest is None:
        return "there is no earlier checkpoint"
    problem = checkpoint_problem(latest)
    return f"{label} {latest.name} is intact" if problem is None else f"{label} {latest.name} is damaged ({problem})"


def commit_checkpoint(tmp_dir: Path, final_dir: Path, state: dict[str, Any], keep: int) -> None:
    """Make a fully written checkpoint count (rank 0, both formats): the trainer state with the manifest of every
    other file is written LAST and synced, the folder renamed into place, then older checkpoints pruned."""
    state = {**state, MANIFEST_KEY: file_manifest(tmp_dir)}
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    fsync_path(tmp_dir / STATE_FILE)
    fsync_path(tmp_dir)
    replace_dir(tmp_dir, final_dir)
    fsync_path(final_dir.parent)
    prune_checkpoints(final_dir.parent, keep)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` (same step saved twice) is moved aside first, then deleted."""
    if dst.exists():
        aside = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rank: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint `path` into `model` (and `optimizer` / `scheduler` when given), in place.

    Returns (trainer_state, rank_state) for this rank (that of rank `rank % saved world size` when the checkpoint
    was written by another number of ranks). Weights go through safetensors, the rest through
    `torch.load(weights_only=True)`. The optimizer can also be loaded later with `load_optimizer_state` (after
    the model has been wrapped for DDP/FSDP and the optimizer built over the wrapped parameters).
    """
    path = Path(path)
    trainer_state = json.loads((path / STATE_FILE).read_text())
    device = next(model.parameters()).device
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if optimizer is not None or scheduler is not None:
        load_optimizer_state(path, optimizer, scheduler)
    saved_world = int(trainer_state.get("world_size", 1))
    rank_file = path / f"rank-{rank % saved_world:05d}.pt"  # another world size: `restore_packer` says what changes
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: checkpoint was written by {saved_world} rank(s)")
    rank_state = torch.load(rank_file, weights_only=True)
    return trainer_state, rank_state


def load_optimizer_state(path: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any = None) -> None:
    """Load the optimizer and lr-scheduler states of checkpoint `path` (weights_only)."""
    path = Path(path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


def restore_packer(packer, saved: dict[str, Any], saved_world_size: int, world_size: int) -> None:
    """Put this rank's packer at the saved data position: exactly when the world size is unchanged. Else (an
    elastic restart, a resume on another number of workers) the position cannot map document for document (each
    rank packs its own stream), so every rank starts a fresh stream for its new rank and skips its share of the
    global batches drawn so far, with a warning; the global batch is now batch_size x the new world size."""
    if saved_world_size == world_size:
        packer.load_state_dict(saved)
        return
    drawn = int(saved["step"]) * saved_world_size
    skip = drawn // world_size
    logger.warning(
        "resuming %d-rank checkpoint on %d ranks: data position is approximate (each rank skips %d "
        "batches of its new stream, %d global batches were drawn)",
        saved_world_size,
        world_size,
        skip,
        drawn,
    )
    for _ in range(skip):
        packer.next_batch()

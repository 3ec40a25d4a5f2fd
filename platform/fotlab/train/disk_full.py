"""A disk that fills up while a checkpoint or the final model is written: one `DiskFullError`, nothing half-written.

    with removed_if_failed(tmp_dir, lambda: f"checkpoint step-3 could not be written to {root}: {no_space(root)}"):
        write_everything_into(tmp_dir)

- Detection: the libraries that write our files report a full disk each their own way. Python's own writes raise
  `OSError(ENOSPC)`; safetensors raises `SafetensorError("... No space left on device (os error 28)")`; `torch.save`
  to a path raises a bare `RuntimeError("... unexpected pos ...")` with no errno at all, so fotlab's writes hand
  torch an open file, whose `OSError(ENOSPC)` then sits in the exception's `__context__`; `torch.distributed.
  checkpoint` collects each rank's exception in `CheckpointException.failures`. `is_disk_full` looks through all
  of these (checked on a real tmpfs).
- A write goes into a hidden temp folder (`.tmp-*`) that is renamed into place only once complete; on ANY error
  that folder is removed (by the rank that owns it), so no partial checkpoint or model is left for a resume to
  trip over or to keep the space. Older checkpoints are only pruned after a new one is committed.
- The message names what could not be written, where, how much space is free now (after removing the partial
  write) and what is still intact; the caller (`orchestrate.runner`) adds how to resume.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from fotlab.errors import DiskFullError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """True when `err`, its cause/context chain, or a rank failure it carries is a full disk (or quota)."""
    pending: list[object] = [err]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, tuple):  # DCP's failures: rank -> (exception, traceback summary)
            pending.extend(item[:1])
            continue
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(item) for text in NO_SPACE_TEXTS):
            return True
        pending += [item.__cause__, item.__context__]
        failures = getattr(item, "failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
    return False


def free_mb(path: Path) -> float:
    """Free space (MB) on the filesystem holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e6


def no_space(path: Path, needed_bytes: int | None = None) -> str:
    """`no space left on device (0.3 MB free[, it needs about 1.6 MB])` for the filesystem of `path`."""
    needed = f", it needs about {needed_bytes / 1e6:.1f} MB" if needed_bytes else ""
    return f"no space left on device ({free_mb(path):.1f} MB free{needed})"


@contextlib.contextmanager
def removed_if_failed(tmp_dir: Path, describe: Callable[[], str], *, remove: bool = True) -> Iterator[None]:
    """Run the body that writes into `tmp_dir`; on any error remove `tmp_dir` (when `remove`: the rank that owns
    it) and re-raise, a full disk as `DiskFullError(describe())` (`describe` runs after the removal, so the free
    space it reports is what a retry would get)."""
    try:
        yield
    except BaseException as err:
        if remove:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if is_disk_full(err):
            raise DiskFullError(describe()) from err
        raise


def folder_bytes(path: Path) -> int:
    """Total size of the files in folder `path` (0 when it is not a folder)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0

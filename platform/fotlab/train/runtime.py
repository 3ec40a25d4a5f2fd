"""The typed edges of the training loop: what the caller passes in (`Runtime`, `TrainHooks`) and gets back
(`TrainResult`), plus the errors the loop raises.

- `Runtime` is the environment resolved ONCE by the caller (the Ray adapter, a test, the CLI): device, rank,
  world size, where outputs go, which checkpoint to resume, and how to wrap the model (DDP/FSDP). The loop
  makes no environment decisions of its own.
- `TrainHooks` is the only way out of the loop while it runs (metrics, checkpoints, preemption). Pass callables
  (`TrainHooks(on_log=fn)`) or subclass and override the methods; every hook is optional.
- Hooks are called on EVERY rank (Ray Train's `report` must be called by all workers); tracking code decides
  to log from rank 0 only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fotlab.errors import FotlabError


class TrainError(FotlabError, RuntimeError):
    """A training run cannot go on; the message names the step and the cause in one line."""


class LossNotFiniteError(TrainError):
    """The loss (or the gradient norm) became NaN/inf; training stops instead of skipping the step."""


def _identity(model: torch.nn.Module) -> torch.nn.Module:
    return model


def _default_barrier() -> None:
    """Synchronise ranks when a torch.distributed process group exists; a no-op otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class _DeviceField:
    """A dataclass field that is always a `torch.device` and is given one or its name ("cpu", "cuda:0").

    A descriptor-typed field (see the `dataclasses` docs): `__set__` converts, so `Runtime(device="cpu").device`
    is `torch.device("cpu")`, and type checkers take `__set__`'s value type for the `__init__` parameter and
    `__get__`'s return type for the attribute.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_{name}"

    def __get__(self, obj: object | None, objtype: type | None = None) -> torch.device:
        if obj is None:  # dataclasses reads the class attribute once: the field's default
            return torch.device("cpu")
        return getattr(obj, self._attr)

    def __set__(self, obj: object, value: str | torch.device) -> None:
        setattr(obj, self._attr, torch.device(value))


@dataclasses.dataclass(kw_only=True)
class Runtime:
    """Where and how this worker trains (resolved by the caller, passed down unchanged).

    Attributes:
        output_dir: this run's folder; the loop writes `checkpoints/` and `model/` below it. With several ranks
            it must be the same (shared) folder for all of them.
        device: torch device for this worker; a `torch.device` or its name ("cpu", "cuda:0", ...), always a
            `torch.device` once set.
        rank / world_size: this worker's index and the number of data-parallel workers.
        resume_from: a checkpoint dir (`.../checkpoints/step-00000100`) or a checkpoints root (the newest
            complete checkpoint in it is used); None starts fresh.
        wrap_model: called once with the built model (already on `device`); returns the module to train
            (e.g. `DistributedDataParallel`); identity by default.
        barrier: synchronises all ranks around checkpoint writes; default `torch.distributed.barrier` when a
            process group is initialised, else nothing.
        sharded: `wrap_model` shards the parameters (FSDP2, `fotlab.train.sharding.fsdp_wrapper`): the model is
            built on the meta device and filled from rank 0, checkpoints are DCP shards (train/dcp_checkpoint.py)
            and the final `model/` is gathered to rank 0.
    """

    output_dir: Path
    device: _DeviceField = _DeviceField()
    rank: int = 0
    world_size: int = 1
    resume_from: Path | None = None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    barrier: Callable[[], None] = _default_barrier
    sharded: bool = False

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.resume_from is not None:
            self.resume_from = Path(self.resume_from)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Runtime: rank {self.rank} is outside world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared files (model, optimizer, final model)."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"


class TrainHooks:
    """Callbacks out of the loop. Give callables to the constructor or override the methods.

    - `on_log(step, metrics)`: every `log_every` steps (train metrics) and after each validation (val metrics).
    - `on_checkpoint(step, path, metrics)`: after a checkpoint is complete on disk (all ranks).
    - `should_stop() -> bool`: polled after every step; True saves a checkpoint and returns early.
    """

    def __init__(
        self,
        on_log: Callable[[int, dict[str, float]], Any] | None = None,
        on_checkpoint: Callable[[int, Path, dict[str, float]], Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self._on_log = on_log
        self._on_checkpoint = on_checkpoint
        self._should_stop = should_stop

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self._on_log is not None:
            self._on_log(step, metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        if self._on_checkpoint is not None:
            self._on_checkpoint(step, path, metrics)

    def should_stop(self) -> bool:
        return bool(self._should_stop()) if self._should_stop is not None else False


@dataclasses.dataclass
class TrainResult:
    """What `train()` returns.

    Attributes:
        final_step: number of optimizer steps done (including those before a resume).
        metrics: the last value of every metric logged (train/*, val/*).
        model_dir: HF-format model + tokenizer (`FoTForCausalLM.from_pretrained`, `AutoTokenizer`).
        checkpoint_dir: the folder holding `step-*` checkpoints.
        stopped_early: True when `hooks.should_stop()` ended the run before `spec.train.steps`.
        datasets: what the run read (`fotlab.data.lineage.DatasetRecord`: training and validation documents).
    """

    final_step: int
    metrics: dict[str, float]
    model_dir: Path
    checkpoint_dir: Path
    stopped_early: bool = False
    datasets: list = dataclasses.field(default_factory=list)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP/FSDP wrapper (or the model itself)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model

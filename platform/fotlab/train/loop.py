"""`train(spec, runtime, hooks) -> TrainResult`: the plain FoT training loop (no Ray, no MLflow).

    python -c "from pathlib import Path; from fotlab.spec import parse_spec; from fotlab.train import train, Runtime; \
      print(train(parse_spec({'name': 'cpu-demo', 'train': {'steps': 20}}), Runtime(output_dir=Path('/tmp/fot'))))"

Setup -> build -> fit:
- setup: seed everything with spec.seed (so every rank builds identical initial weights), resolve precision
  (bf16 autocast only when asked for and supported by the device; fp32 otherwise).
- build: tokenizer + datasets + rank-sharded DocPacker, model (preset or init_from), then — for a resume — the
  checkpoint's weights, then `runtime.wrap_model` (DDP/FSDP), optimizer over the wrapped parameters, scheduler,
  and the checkpoint's optimizer / scheduler / RNG / packer state.
- fit: per step the CrossBatch from `crossbatch_for_step` (a pure function of step and seed), grad_accum
  micro-batches, one optimizer step; metrics every log_every, validation every eval_every, checkpoints every
  checkpoint_every and at the end; `hooks.should_stop()` ends early with a checkpoint.
- Resume is exact: model, optimizer, scheduler, packer position and every RNG come back, so on CPU the steps
  after a resume reproduce an uninterrupted run's losses bit for bit.
- Validation: `val/loss` uses the crossbatch of the current step (same contexts as training) and
  `val/loss_no_xbatch` uses range 0; with range 0 both are the same number.
- Checkpoint writes assume every rank sees the same `output_dir` (shared storage). Replicated models (plain,
  DDP): rank 0 writes the full state dict (train/checkpoint.py). Sharded models (`runtime.sharded`, FSDP2):
  meta-device build filled from rank 0, DCP checkpoints with one shard per rank, resumable at another world
  size, and a `model/` gathered to rank 0 at the end (train/sharding.py, train/dcp_checkpoint.py).
- Resume takes the newest complete checkpoint; an incomplete one is skipped with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fotlab import names as M
from fotlab.model import FoTForCausalLM
from fotlab.train import dcp_checkpoint as dcp_ckpt
from fotlab.train.build import DataBundle, build_data, build_model, count_parameters, val_batches
from fotlab.train.checkpoint import load_checkpoint, load_optimizer_state, restore_packer, save_checkpoint
from fotlab.train.loop_support import (
    any_rank,
    check_replicated,
    crossbatch_at,
    mean_over_ranks,
    resolve_precision,
    save_final_model,
)
from fotlab.train.optim import build_optimizer, build_scheduler
from fotlab.train.rng import capture_rng_state, restore_rng_state, seed_everything
from fotlab.train.runtime import Runtime, TrainError, TrainHooks, TrainResult, unwrap_model
from fotlab.train.sharding import build_sharded_model, gather_full_model
from fotlab.train.steps import evaluate_loss, train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Window:
    """Accumulators between two metric reports."""

    loss_sum: float = 0.0
    n_steps: int = 0
    step_time_s: float = 0.0
    n_tokens: int = 0


@dataclasses.dataclass
class _Run:
    """Everything the fit phase works on (built once by `_build`)."""

    spec: Any
    runtime: Runtime
    hooks: TrainHooks
    data: DataBundle
    model: torch.nn.Module  # as wrapped by runtime.wrap_model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: str
    step: int = 0
    tokens_seen: int = 0
    last_checkpoint_step: int = -1
    last_eval_step: int = -1
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    window: _Window = dataclasses.field(default_factory=_Window)
    last_step: tuple[float, float, int] = (0.0, 0.0, 0)  # (lr, grad_norm, crossbatch range) of the last step

    @property
    def bare_model(self) -> FoTForCausalLM:
        """The FoT model `build_model` built, inside `runtime.wrap_model`'s wrapper (FSDP2 shards it in place)."""
        model = unwrap_model(self.model)
        if not isinstance(model, FoTForCausalLM):
            raise TrainError(f"runtime.wrap_model: returned a {type(model).__name__} that does not wrap the FoT model")
        return model


def train(spec, runtime: Runtime, hooks: TrainHooks | None = None) -> TrainResult:
    """Train the model `spec` describes on this worker; see the module docstring for the phases."""
    run = _build(spec, runtime, hooks or TrainHooks())
    stopped_early = _fit(run)
    _finish(run)
    return TrainResult(
        final_step=run.step,
        metrics=dict(run.metrics),
        model_dir=runtime.model_dir,
        checkpoint_dir=runtime.checkpoint_dir,
        stopped_early=stopped_early,
        datasets=list(run.data.datasets),
    )


def _build(spec, runtime: Runtime, hooks: TrainHooks) -> _Run:
    seed_everything(spec.seed)
    precision = resolve_precision(spec.train.precision, runtime.device)
    data = build_data(spec, runtime)
    if runtime.sharded:
        return _build_sharded(spec, runtime, hooks, data, precision)
    model = build_model(spec, data.tokenizer, runtime.device)
    logger.info("model: %.2fM parameters, mem_layers %s", count_parameters(model) / 1e6, model.config.mem_layers)
    resume: tuple[Path, dict[str, Any], dict[str, Any]] | None = None  # (checkpoint, trainer state, rank state)
    if runtime.resume_from is not None:
        checkpoint = _resumable(runtime.resume_from, sharded=False)
        resume = (checkpoint, *load_checkpoint(checkpoint, model=model, rank=runtime.rank))
    wrapped = runtime.wrap_model(model)
    check_replicated(wrapped)
    optimizer = build_optimizer(wrapped, spec.train.optimizer)
    scheduler = build_scheduler(optimizer, spec.train.schedule, spec.train.steps)
    run = _Run(spec, runtime, hooks, data, wrapped, optimizer, scheduler, precision)
    if resume is not None:
        checkpoint, trainer_state, rank_state = resume
        load_optimizer_state(checkpoint, optimizer, scheduler)
        restore_packer(data.train_packer, rank_state["packer"], int(trainer_state["world_size"]), runtime.world_size)
        _resumed(run, checkpoint, trainer_state, rank_state)
    return run


def _resumable(path: Path, sharded: bool) -> Path:
    """The newest complete checkpoint at `path`, in the format this run writes (sharded DCP or replicated)."""
    checkpoint = dcp_ckpt.find_resumable(path)
    if dcp_ckpt.is_dcp_checkpoint(checkpoint) != sharded:
        kind = "sharded (fsdp)" if not sharded else "replicated (ddp)"
        raise TrainError(
            f"resume_from: {checkpoint} is a {kind} checkpoint; resume it with the strategy that wrote "
            "it (scaling.strategy)"
        )
    return checkpoint


def _resumed(run: _Run, checkpoint: Path, trainer_state: dict, rank_state: dict) -> None:
    restore_rng_state(rank_state["rng"])
    run.step = run.last_checkpoint_step = int(trainer_state["step"])
    run.tokens_seen = int(trainer_state.get("tokens_seen", 0))
    run.metrics = dict(trainer_state.get("metrics", {}))
    logger.info("resumed from %s at step %d", checkpoint, run.step)


def _build_sharded(spec, runtime: Runtime, hooks: TrainHooks, data: DataBundle, precision: str) -> _Run:
    """`_build` for a sharded model: meta-device build + broadcast from rank 0, then the DCP checkpoint."""
    model = build_sharded_model(spec, data.tokenizer, runtime, build_model)
    logger.info("model: %.2fM parameters (sharded over %d ranks)", count_parameters(model) / 1e6, runtime.world_size)
    optimizer = build_optimizer(model, spec.train.optimizer)
    scheduler = build_scheduler(optimizer, spec.train.schedule, spec.train.steps)
    run = _Run(spec, runtime, hooks, data, model, optimizer, scheduler, precision)
    if runtime.resume_from is not None:
        checkpoint = _resumable(runtime.resume_from, sharded=True)
        trainer_state, rank_state = dcp_ckpt.load_dcp_checkpoint(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, rank=runtime.rank
        )
        restore_packer(data.train_packer, rank_state["packer"], int(trainer_state["world_size"]), runtime.world_size)
        _resumed(run, checkpoint, trainer_state, rank_state)
    return run


def _fit(run: _Run) -> bool:
    """Optimizer steps until spec.train.steps; True when `hooks.should_stop()` ended the run early."""
    train_spec = run.spec.train
    while run.step < train_spec.steps:
        crossbatch = crossbatch_at(run.spec, run.step)
        micro_batches = [run.data.train_packer.next_batch() for _ in range(train_spec.grad_accum)]
        started = time.perf_counter()
        stats = train_step(
            run.model,
            run.optimizer,
            micro_batches,
            step=run.step + 1,
            crossbatch=crossbatch,
            device=run.runtime.device,
            precision=run.precision,
            grad_clip=train_spec.grad_clip,
            nonfinite=train_spec.nonfinite,
        )
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        run.step += 1
        window = run.window
        if stats.skipped:
            run.metrics[M.SKIPPED_STEPS] = run.metrics.get(M.SKIPPED_STEPS, 0.0) + 1
            logger.warning("step %d: loss %s, grad norm %s; update skipped (train.nonfinite: skip)", run.step,
                           stats.loss, stats.grad_norm)  # fmt: skip
        else:
            window.loss_sum += stats.loss
            window.n_steps += 1
        window.step_time_s += time.perf_counter() - started
        window.n_tokens += stats.n_input_tokens * run.runtime.world_size
        run.tokens_seen += stats.n_input_tokens * run.runtime.world_size
        run.last_step = (lr, stats.grad_norm, crossbatch.range)
        if run.step % train_spec.log_every == 0 or run.step == train_spec.steps:
            _report_train(run, *run.last_step)
        if train_spec.eval_every and run.step % train_spec.eval_every == 0:
            _evaluate(run, crossbatch)
        if train_spec.checkpoint_every and run.step % train_spec.checkpoint_every == 0:
            _checkpoint(run)
        if any_rank(run.hooks.should_stop(), run.runtime.device):
            logger.info("stop requested at step %d", run.step)
            return True
    return False


def _report_train(run: _Run, lr: float, grad_norm: float, crossbatch_range: int) -> None:
    window, device = run.window, run.runtime.device
    logged = {
        M.LR: lr,
        M.TOKENS_PER_S: window.n_tokens / max(window.step_time_s, 1e-9),
        M.CROSSBATCH_RANGE: float(crossbatch_range),
        M.TOKENS_SEEN: float(run.tokens_seen),
    }
    if window.n_steps:  # all ranks agree (skips are decided together): no step of the window was skipped-only
        logged[M.TRAIN_LOSS] = mean_over_ranks(window.loss_sum / window.n_steps, device)
        logged[M.STEP_TIME_S] = window.step_time_s / window.n_steps
    if math.isfinite(grad_norm):
        logged[M.GRAD_NORM] = grad_norm
    if M.SKIPPED_STEPS in run.metrics:
        logged[M.SKIPPED_STEPS] = run.metrics[M.SKIPPED_STEPS]
    run.window = _Window()
    run.metrics.update(logged)
    logger.info(
        "step %d/%d loss %.4f lr %.3g grad_norm %.3g %.0f tok/s xbatch %d",
        run.step,
        run.spec.train.steps,
        logged.get(M.TRAIN_LOSS, math.nan),
        lr,
        grad_norm,
        logged[M.TOKENS_PER_S],
        crossbatch_range,
    )
    run.hooks.on_log(run.step, logged)


def _evaluate(run: _Run, crossbatch) -> None:
    """Validation losses with the step's crossbatch and with range 0 (module docstring)."""
    batches = val_batches(run.data, run.spec, run.runtime)
    run.last_eval_step = run.step
    if not batches:
        return
    model, device, precision = run.bare_model, run.runtime.device, run.precision
    val_loss = evaluate_loss(model, batches, crossbatch=crossbatch, device=device, precision=precision)
    if crossbatch.range:
        no_xbatch = evaluate_loss(
            model, batches, crossbatch=replace(crossbatch, range=0), device=device, precision=precision
        )
    else:
        no_xbatch = val_loss
    val_loss = mean_over_ranks(val_loss, run.runtime.device)
    logged = {
        M.VAL_LOSS: val_loss,
        M.VAL_PPL: math.exp(min(val_loss, 50.0)),
        M.VAL_LOSS_NO_XBATCH: mean_over_ranks(no_xbatch, run.runtime.device),
    }
    run.metrics.update(logged)
    logger.info("step %d val/loss %.4f val/loss_no_xbatch %.4f", run.step, val_loss, logged[M.VAL_LOSS_NO_XBATCH])
    run.hooks.on_log(run.step, logged)


def _checkpoint(run: _Run) -> Path:
    runtime = run.runtime
    save = dcp_ckpt.save_dcp_checkpoint if runtime.sharded else save_checkpoint
    started = time.perf_counter()
    path = save(
        runtime.checkpoint_dir,
        run.step,
        model=run.model if runtime.sharded else run.bare_model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        trainer_state={
            "metrics": run.metrics,
            "tokens_seen": run.tokens_seen,
            "world_size": runtime.world_size,
            "name": run.spec.name,
        },
        rank_state={"rng": capture_rng_state(), "packer": run.data.train_packer.state_dict()},
        rank=runtime.rank,
        keep=run.spec.train.keep_checkpoints,
        barrier=runtime.barrier,
    )
    run.last_checkpoint_step = run.step
    run.hooks.on_checkpoint(run.step, path, {**run.metrics, M.CHECKPOINT_TIME_S: time.perf_counter() - started})
    return path


def _finish(run: _Run) -> None:
    """Unreported train metrics (early stop), final validation (unless just done), final checkpoint (unless just
    written), HF model + tokenizer."""
    if run.window.n_tokens:
        _report_train(run, *run.last_step)
    if run.last_eval_step != run.step and run.step > 0:
        _evaluate(run, crossbatch_at(run.spec, run.step - 1))
    if run.last_checkpoint_step != run.step:
        _checkpoint(run)
    final = gather_full_model(run.bare_model, run.runtime.rank) if run.runtime.sharded else run.bare_model
    if run.runtime.is_main and final is not None:  # not None on rank 0
        save_final_model(final, run.data.tokenizer, run.runtime.model_dir, run.runtime.checkpoint_dir)
    run.runtime.barrier()

"""`train(spec, runtime, hooks) -> TrainResult` in JAX: fotlab's training loop contract, on a JAX mesh.

    python -c "from pathlib import Path; from fotlab.spec import parse_spec; from fotlab.train import Runtime; \
      from fotlab.jax.train import train; print(train(parse_spec({'name': 'jax-demo', 'train': {'steps': 5, \
      'framework': 'jax'}}), Runtime(output_dir=Path('/tmp/fot-jax'))))"

Same inputs, outputs and hooks as `fotlab.train.train` (Runtime, TrainHooks, TrainResult, metric names), so the
Ray worker, MLflow logging and evaluations treat both frameworks alike. Differences by design:
- Initial weights: the PyTorch model the spec describes is built with the spec's seed (`fotlab.train.build`) and
  converted, so a JAX run starts from exactly the weights a PyTorch run starts from (init_from included).
- Data: fotlab's DocPacker (same packing, same batches, rank-sharded by `runtime.rank/world_size`, which are
  the JAX process index/count under `jax.distributed`). Each process feeds its rows; the global batch is their
  concatenation, and crossbatch contexts never cross a process's rows (`JaxCrossBatch.group`), as under DDP.
- Reported train/loss and val/loss are token means over the global batch (PyTorch averages per-rank means; equal
  on one process).
- Checkpoints are orbax directories (steps.py); resume restores params, optimizer state, step, metrics and the
  packer position, so the steps after a resume reproduce an uninterrupted run. The final `model/` directory is
  fotlab's format (weights.save_model_dir + tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fotlab import names
from fotlab.jax import steps as S
from fotlab.jax.crossbatch import JaxCrossBatch
from fotlab.jax.model import JaxFoTConfig, n_params
from fotlab.jax.sharding import global_batch, make_mesh, param_shardings
from fotlab.jax.weights import params_from_state_dict, save_model_dir

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _JaxRun:
    spec: Any
    runtime: Any
    hooks: Any
    data: Any
    config: JaxFoTConfig
    config_dict: dict
    mesh: Any
    optimizer: Any
    state: dict  # {"params", "opt_state"}
    manager: Any
    step: int = 0
    tokens_seen: int = 0
    last_checkpoint_step: int = -1
    last_eval_step: int = -1
    metrics: dict = dataclasses.field(default_factory=dict)
    window: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0.0, 0])  # loss sum, steps, seconds, tokens
    last_step: tuple = (0.0, 0.0, 0)
    compiled: dict = dataclasses.field(default_factory=dict)


def initial_model(spec, tokenizer) -> tuple[JaxFoTConfig, dict, dict]:
    """(config, float32 params, FoTConfig dict) of the model a PyTorch run of `spec` starts from."""
    import torch

    from fotlab.train.build import build_model
    from fotlab.train.rng import seed_everything

    seed_everything(spec.seed)
    model = build_model(spec, tokenizer, torch.device("cpu"))
    config_dict = model.config.to_dict()
    config = JaxFoTConfig.from_dict(config_dict)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, params_from_state_dict(state), config_dict


def _place(tree, shardings):
    """Host arrays (identical on every process) -> global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]), tree, shardings
    )


def train(spec, runtime, hooks=None):
    """Train the model `spec` describes with JAX on this process; see the module docstring."""
    from fotlab.train.runtime import TrainHooks, TrainResult

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


def _build(spec, runtime, hooks) -> _JaxRun:
    from fotlab.train.build import build_data

    data = build_data(spec, runtime)
    config, params, config_dict = initial_model(spec, data.tokenizer)
    logger.info(
        "jax model: %.2fM parameters, mem_layers %s, devices %s",
        n_params(params) / 1e6,
        config.mem_layers,
        jax.devices(),
    )
    mesh = make_mesh()
    params = _place(params, param_shardings(params, mesh))
    optimizer = S.build_optimizer(spec)
    state = {"params": params, "opt_state": jax.jit(optimizer.init)(params)}
    manager = S.checkpoint_manager(runtime.checkpoint_dir, spec.train.keep_checkpoints)
    run = _JaxRun(spec, runtime, hooks, data, config, config_dict, mesh, optimizer, state, manager)
    if runtime.resume_from is not None:
        root, step = S.resolve_resume(runtime.resume_from)
        source = (
            manager
            if Path(root).absolute() == Path(runtime.checkpoint_dir).absolute()
            else S.checkpoint_manager(root, spec.train.keep_checkpoints)
        )
        run.state, meta, rank_state = S.restore_checkpoint(source, step, state, runtime.rank)
        data.train_packer.load_state_dict(rank_state["packer"])
        run.step = run.last_checkpoint_step = int(meta["step"])
        run.tokens_seen = int(meta.get("tokens_seen", 0))
        run.metrics = dict(meta.get("metrics", {}))
        logger.info("resumed from %s at step %d", root, run.step)
    return run


def _crossbatch(run: _JaxRun, step: int) -> JaxCrossBatch:
    from fotlab.train.loop_support import crossbatch_at

    return JaxCrossBatch.from_torch(crossbatch_at(run.spec, step), group=run.spec.train.batch_size)


def _compiled(run: _JaxRun, kind: str, cb: JaxCrossBatch):
    key = (kind, cb)
    if key not in run.compiled:
        precision = run.spec.train.precision
        run.compiled[key] = (
            S.make_train_step(run.config, run.optimizer, cb, precision)
            if kind == "train"
            else S.make_eval_sum(run.config, cb, precision)
        )
    return run.compiled[key]


def _fit(run: _JaxRun) -> bool:
    from fotlab.train.runtime import LossNotFiniteError

    train_spec = run.spec.train
    while run.step < train_spec.steps:
        cb = _crossbatch(run, run.step)
        micro = [run.data.train_packer.next_batch() for _ in range(train_spec.grad_accum)]
        ids = global_batch(np.stack([m["input_ids"].numpy() for m in micro]).astype(np.int32), run.mesh, True)
        targets = global_batch(np.stack([m["targets"].numpy() for m in micro]).astype(np.int32), run.mesh, True)
        started = time.perf_counter()
        params, opt_state, loss, norm = _compiled(run, "train", cb)(
            run.state["params"], run.state["opt_state"], ids, targets
        )
        run.state = {"params": params, "opt_state": opt_state}
        loss, norm = scalar(loss), scalar(norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise LossNotFiniteError(f"step {run.step + 1}: loss {loss}, gradient norm {norm}; stopping")
        run.step += 1
        n_tokens = int(np.prod(ids.shape))
        run.window = [
            run.window[0] + loss,
            run.window[1] + 1,
            run.window[2] + time.perf_counter() - started,
            run.window[3] + n_tokens,
        ]
        run.tokens_seen += n_tokens
        run.last_step = (_lr(run, run.step - 1), norm, cb.range)
        if run.step % train_spec.log_every == 0 or run.step == train_spec.steps:
            _report_train(run)
        if train_spec.eval_every and run.step % train_spec.eval_every == 0:
            _evaluate(run, cb)
        if train_spec.checkpoint_every and run.step % train_spec.checkpoint_every == 0:
            _checkpoint(run)
        if _any_process(run.hooks.should_stop()):
            logger.info("stop requested at step %d", run.step)
            return True
    return False


def scalar(x) -> float:
    """A replicated scalar as a float (also when other processes hold copies: read this process's one)."""
    return float(np.asarray(x.addressable_data(0)))


def _lr(run: _JaxRun, step: int) -> float:
    if "lr" not in run.compiled:
        run.compiled["lr"] = np.asarray(S.lr_table(run.spec))
    return float(run.compiled["lr"][step])


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _report_train(run: _JaxRun) -> None:
    loss_sum, n_steps, seconds, n_tokens = run.window
    lr, norm, xrange = run.last_step
    logged = {
        names.TRAIN_LOSS: loss_sum / n_steps,
        names.LR: lr,
        names.GRAD_NORM: norm,
        names.TOKENS_PER_S: n_tokens / max(seconds, 1e-9),
        names.STEP_TIME_S: seconds / n_steps,
        names.CROSSBATCH_RANGE: float(xrange),
        names.TOKENS_SEEN: float(run.tokens_seen),
    }
    run.window = [0.0, 0, 0.0, 0]
    run.metrics.update(logged)
    logger.info(
        "step %d/%d loss %.4f lr %.3g grad_norm %.3g %.0f tok/s xbatch %d",
        run.step,
        run.spec.train.steps,
        logged[names.TRAIN_LOSS],
        lr,
        norm,
        logged[names.TOKENS_PER_S],
        xrange,
    )
    run.hooks.on_log(run.step, logged)


def validation_loss(run: _JaxRun, cb: JaxCrossBatch, batches) -> float:
    """Token-mean CE over the global validation batches; NaN when no target token is scored."""
    total, count = 0.0, 0
    fn = _compiled(run, "eval", cb)
    for batch in batches:
        ids = global_batch(batch["input_ids"].numpy().astype(np.int32), run.mesh)
        targets = global_batch(batch["targets"].numpy().astype(np.int32), run.mesh)
        s, c = fn(run.state["params"], ids, targets)
        total, count = total + scalar(s), count + int(scalar(c))
    return total / count if count else math.nan


def _evaluate(run: _JaxRun, cb: JaxCrossBatch) -> None:
    from fotlab.train.build import val_batches

    batches = val_batches(run.data, run.spec, run.runtime)
    run.last_eval_step = run.step
    if not batches:
        return
    val = validation_loss(run, cb, batches)
    plain = validation_loss(run, dataclasses.replace(cb, range=0), batches) if cb.range else val
    logged = {names.VAL_LOSS: val, names.VAL_PPL: math.exp(min(val, 50.0)), names.VAL_LOSS_NO_XBATCH: plain}
    run.metrics.update(logged)
    logger.info("step %d val/loss %.4f val/loss_no_xbatch %.4f", run.step, val, plain)
    run.hooks.on_log(run.step, logged)


def _checkpoint(run: _JaxRun) -> Path:
    started = time.perf_counter()
    meta = {
        "step": run.step,
        "metrics": run.metrics,
        "tokens_seen": run.tokens_seen,
        "world_size": run.runtime.world_size,
        "name": run.spec.name,
        "framework": "jax",
    }
    path = S.save_checkpoint(
        run.manager, run.step, run.state, meta, {"packer": run.data.train_packer.state_dict()}, run.runtime.rank
    )
    multihost_utils.sync_global_devices(f"checkpoint {run.step}")
    run.last_checkpoint_step = run.step
    run.hooks.on_checkpoint(run.step, path, {**run.metrics, names.CHECKPOINT_TIME_S: time.perf_counter() - started})
    return path


def host_params(params) -> dict:
    """Parameters as host numpy arrays (gathered across processes when sharded)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return jax.tree.map(np.asarray, params)
    return multihost_utils.process_allgather(params, tiled=True)


def _finish(run: _JaxRun) -> None:
    """Unreported train metrics, final validation, final checkpoint, fotlab model dir + tokenizer (rank 0)."""
    from fotlab.train.checkpoint import replace_dir

    if run.window[1]:
        _report_train(run)
    if run.last_eval_step != run.step and run.step > 0:
        _evaluate(run, _crossbatch(run, run.step - 1))
    if run.last_checkpoint_step != run.step:
        _checkpoint(run)
    params = host_params(run.state["params"])
    if run.runtime.is_main:
        model_dir = Path(run.runtime.model_dir)
        tmp = model_dir.with_name(f".tmp-{model_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_dir(tmp, params, run.config_dict)
        run.data.tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, model_dir)
        logger.info("final model -> %s", model_dir)
    multihost_utils.sync_global_devices("final model")

"""Optimizer, jitted train/eval steps and orbax checkpoints of the JAX training loop (train.py).

Design choices:
- Optimizer: optax AdamW (decoupled weight decay on matrices only, as fotlab.train.optim) after global-norm
  clipping; the learning rate per step is a table computed from fotlab's own schedule functions
  (`lr_factor_fn`), so both frameworks follow the same schedule to the last digit. Adafactor is not offered.
- Loss: token mean of CE over every micro-batch of the step (sum-CE / number of loss tokens of the whole global
  batch), computed inside one jitted step; the gradient of k accumulated micro-batches equals that of one k
  times bigger batch. Micro-batches are a static leading axis (unrolled).
- bf16 policy: float32 master weights and optimizer state; forward/backward on a bfloat16 copy of the parameters;
  logits go to float32 for the loss; memory attention softmax is float32 in any case.
- Checkpoints: orbax CheckpointManager (`checkpoints/step_00000010/`: params + optimizer state via
  StandardSave, loop state via JsonSave) plus one `rank-<r>.json` per process (its packer position).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from fotlab.jax.crossbatch import JaxCrossBatch
from fotlab.jax.model import FoTLM, JaxFoTConfig, token_ce_sum

STEP_PREFIX = "step"


def lr_table(spec) -> jnp.ndarray:
    """Learning rate of every 0-based step (fotlab.train.optim's schedules; torch imported lazily)."""
    from fotlab.train.optim import lr_factor_fn

    factor = lr_factor_fn(spec.train.schedule, spec.train.steps)
    lr = float(spec.train.optimizer.lr)
    return jnp.asarray([lr * factor(s) for s in range(spec.train.steps)], dtype=jnp.float32)


def build_optimizer(spec) -> optax.GradientTransformation:
    """clip_by_global_norm(train.grad_clip) -> AdamW(schedule, betas, eps, weight decay on ndim >= 2)."""
    opt = spec.train.optimizer
    if opt.name != "adamw":
        raise ValueError(f"train.optimizer.name: {opt.name!r} is not available with train.framework=jax (use adamw)")
    table = lr_table(spec)
    last = table.shape[0] - 1

    def schedule(count):
        return table[jnp.minimum(count, last)]

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    adamw = optax.adamw(
        schedule,
        b1=float(opt.betas[0]),
        b2=float(opt.betas[1]),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        mask=decay_mask,
    )
    clip = spec.train.grad_clip
    return optax.chain(optax.clip_by_global_norm(float(clip)), adamw) if clip else adamw


def _compute_params(params, precision: str):
    return jax.tree.map(lambda p: p.astype(jnp.bfloat16), params) if precision == "bf16" else params


def loss_sum(params, ids, targets, config: JaxFoTConfig, crossbatch: JaxCrossBatch | None, precision: str):
    """(sum of CE over loss tokens, their count) of one (B, T) batch."""
    logits, _ = FoTLM(config).apply({"params": _compute_params(params, precision)}, ids, None, None, crossbatch)
    return token_ce_sum(logits, targets)


def make_train_step(config: JaxFoTConfig, optimizer, crossbatch: JaxCrossBatch, precision: str):
    """Jitted (params, opt_state, ids (A, B, T), targets (A, B, T)) -> (params, opt_state, loss, grad_norm)."""

    def scaled(params, ids, targets, n_loss):
        total = loss_sum(params, ids, targets, config, crossbatch, precision)[0]
        return total / n_loss, total

    grad_fn = jax.value_and_grad(scaled, has_aux=True)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids, targets):
        n_loss = jnp.maximum(jnp.sum(targets != -100), 1).astype(jnp.float32)
        grads = jax.tree.map(jnp.zeros_like, params)
        total = jnp.float32(0.0)
        for a in range(ids.shape[0]):
            (_, micro_total), micro_grads = grad_fn(params, ids[a], targets[a], n_loss)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            total = total + micro_total
        norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total / n_loss, norm

    return step


def make_eval_sum(config: JaxFoTConfig, crossbatch: JaxCrossBatch, precision: str):
    """Jitted (params, ids (B, T), targets (B, T)) -> (CE sum, loss-token count)."""
    return jax.jit(lambda p, i, t: loss_sum(p, i, t, config, crossbatch, precision))


# ---- checkpoints ----------------------------------------------------------------------------------------------


def checkpoint_manager(root: Path, keep: int):
    import logging

    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save/restore step at INFO

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=STEP_PREFIX, step_format_fixed_length=8, create=True
    )
    return ocp.CheckpointManager(Path(root).absolute(), options=options)


def step_path(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}_{step:08d}"


def save_checkpoint(manager, step: int, state: dict, meta: dict, rank_state: dict, rank: int) -> Path:
    """Params + optimizer state (orbax), loop state (json) and this process's packer state; all processes call."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    path = step_path(manager.directory, step)
    (path / f"rank-{rank}.json").write_text(json.dumps(rank_state))
    return path


def latest_step(root: Path) -> int | None:
    """The newest complete JAX checkpoint step under the checkpoints root `root`, or None (also when `root` is
    missing: nothing is created)."""
    if not Path(root).is_dir():
        return None
    step = checkpoint_manager(root, keep=1 << 30).latest_step()
    return None if step is None else int(step)


def resolve_resume(path: Path) -> tuple[Path, int]:
    """(checkpoints root, step) of a step dir or of a root (its newest complete step)."""
    path = Path(path)
    if path.name.startswith(f"{STEP_PREFIX}_") and path.name[len(STEP_PREFIX) + 1 :].isdigit():
        return path.parent, int(path.name[len(STEP_PREFIX) + 1 :])
    manager = checkpoint_manager(path, keep=1 << 30)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{path}: no JAX checkpoint (step_XXXXXXXX) to resume from")
    return path, int(step)


def restore_checkpoint(manager, step: int, like: dict, rank: int) -> tuple[dict, dict, dict]:
    """(state with like's structure and shardings, loop meta, this process's rank state)."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    rank_file = step_path(manager.directory, step) / f"rank-{rank}.json"
    return restored["state"], restored["meta"], json.loads(rank_file.read_text())

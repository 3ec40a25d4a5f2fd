"""Training step in JAX vs PyTorch: one AdamW step of the same FoT model on the same batch, on CPU.

Cases (benchmark model of models.py, fp32, B 4 x T 512, crossbatch range 3, packing 4, stepping, 3 memory layers):
PyTorch fotlab (the ratio baseline, `train_step.step`) and fotlab.jax (`jax.jit` step: forward, backward, optax
AdamW). The JAX case reports the first call (trace + XLA compile + one step) separately as `compile_seconds`;
the timed steps are the compiled function only. Weights are the PyTorch model's, converted.
"""

from __future__ import annotations

import statistics

from benchmarks import models
from benchmarks.runner import Case, timed
from benchmarks.train_step import SHAPES


def cases(size: str, device: str = "cpu") -> list[Case]:
    if device != "cpu":
        return []  # CPU only (the JAX TPU path has no benchmark here)
    base = {"size": size, **SHAPES[size]}
    group = f"B{base['batch']} T{base['seq_len']}"
    return [
        Case("train_step_jax", group, name, {**base, "impl": impl})
        for name, impl in (("torch-crossbatch", "torch"), ("jax-crossbatch", "jax"))
    ]


def _torch_model(params: dict):
    size = params["size"]
    config = models.fot_config(
        size,
        models.TRAIN_MEM_LAYERS[size],
        max_position_embeddings=params["seq_len"],
        last_context_length=params["seq_len"],
    )
    return models.build_fot(config).train()


def _run_torch(params: dict, model, ids, targets) -> dict:
    import torch

    from benchmarks.train_step import step
    from fotlab.model.crossbatch import CrossBatch

    crossbatch = CrossBatch(range=3, packing=4, stepping=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(params["warmup"]):
        step(model, optimizer, ids, targets, crossbatch)
    times = [timed(step, model, optimizer, ids, targets, crossbatch)[:2] for _ in range(params["steps"])]
    return {"seconds": statistics.median(t[0] for t in times), "cpu_seconds": statistics.median(t[1] for t in times)}


def _run_jax(params: dict, model, ids, targets) -> dict:
    import jax
    import optax

    from fotlab.jax import steps as S
    from fotlab.jax.crossbatch import JaxCrossBatch
    from fotlab.jax.model import JaxFoTConfig
    from fotlab.jax.weights import params_from_state_dict

    config = JaxFoTConfig.from_dict(model.config.to_dict())
    weights = params_from_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    optimizer = optax.adamw(1e-4)
    state = [weights, jax.jit(optimizer.init)(weights)]
    train_step = S.make_train_step(config, optimizer, JaxCrossBatch(range=3, packing=4, stepping=True), "fp32")
    ids, targets = ids.numpy()[None].astype("int32"), targets.numpy()[None].astype("int32")

    def one_step():
        state[0], state[1], loss, _ = train_step(state[0], state[1], ids, targets)
        return float(loss)  # waits for the result

    compile_seconds, compile_cpu, _ = timed(one_step)
    for _ in range(max(params["warmup"] - 1, 0)):
        one_step()
    times = [timed(one_step)[:2] for _ in range(params["steps"])]
    return {
        "seconds": statistics.median(t[0] for t in times),
        "cpu_seconds": statistics.median(t[1] for t in times),
        "compile_seconds": compile_seconds,
        "compile_cpu_seconds": compile_cpu,
    }


def run(params: dict) -> dict:
    model = _torch_model(params)
    tokens = models.random_ids(params["batch"], params["seq_len"] + 1, model.config.vocab_size)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    metrics = (_run_jax if params["impl"] == "jax" else _run_torch)(params, model, ids, targets)
    return {**metrics, "tokens_per_cpu_s": ids.numel() / metrics["cpu_seconds"]}

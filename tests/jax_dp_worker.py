"""Helper for test_jax_distributed.py (run as a script, never collected): one process of a data-parallel JAX
train step on CPU. Every process builds the same debug-preset weights and the same global batch of 8 rows, feeds
its own rows (process r: rows r*8/n ...), runs one jitted train step on a ("data", "model") mesh spanning all
processes, and process 0 prints loss, gradient norm and a checksum of the updated weights as one JSON line.

    python tests/jax_dp_worker.py PORT N_PROCESSES PROCESS_ID [MODEL_PARALLEL]

MODEL_PARALLEL > 1 (with XLA_FLAGS=--xla_force_host_platform_device_count=N for N CPU devices) shards the weights
over a "model" mesh axis of that size (sharding.py), data over the rest.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(port: int, n_proc: int, proc_id: int, model_parallel: int = 1) -> None:
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if n_proc > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=proc_id)
    from types import SimpleNamespace

    from fotlab.jax import steps as S
    from fotlab.jax.crossbatch import JaxCrossBatch
    from fotlab.jax.model import JaxFoTConfig, init_params
    from fotlab.jax.sharding import global_batch, make_mesh, param_shardings
    from fotlab.jax.train import _place, scalar

    config = JaxFoTConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        mem_layers=(1,),
    )
    params = jax.tree.map(np.asarray, init_params(config, seed=0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (2, 8, 16)).astype(np.int32)  # (micro-batches, rows, tokens)
    targets = rng.integers(0, 96, (2, 8, 16)).astype(np.int32)
    targets[:, :, :2] = -100
    rows = slice(proc_id * 8 // n_proc, (proc_id + 1) * 8 // n_proc)
    mesh = make_mesh(model_parallel)
    params = _place(params, param_shardings(params, mesh))
    spec = SimpleNamespace(
        train=SimpleNamespace(
            steps=1,
            grad_clip=1.0,
            schedule=SimpleNamespace(name="constant", warmup_steps=0, min_lr_ratio=0.0),
            optimizer=SimpleNamespace(name="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01),
        )
    )
    optimizer = S.build_optimizer(spec)
    opt_state = jax.jit(optimizer.init)(params)
    cb = JaxCrossBatch(range=3, packing=2, stepping=False, group=4)  # 4 rows per original rank
    step = S.make_train_step(config, optimizer, cb, "fp32")
    new_params, _, loss, norm = step(
        params, opt_state, global_batch(ids[:, rows], mesh, True), global_batch(targets[:, rows], mesh, True)
    )

    def whole(x):  # the full array: gathered from local shards, or this process's replica (data-parallel run)
        return np.asarray(x if x.is_fully_addressable else x.addressable_data(0), np.float64)

    checksum = sum(float(whole(x).sum()) for x in jax.tree.leaves(new_params))
    sharded = [str(x.sharding.spec) for x in jax.tree.leaves(new_params) if any(x.sharding.spec)]
    if proc_id == 0:
        print(
            json.dumps(
                {
                    "loss": scalar(loss),
                    "grad_norm": scalar(norm),
                    "checksum": checksum,
                    "devices": len(jax.devices()),
                    "n_sharded_params": len(sharded),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

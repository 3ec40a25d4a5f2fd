"""Device mesh and sharding of the JAX FoT model: a ("data", "model") mesh, batches split over "data", weight
matrices split over "model" (Megatron layout), everything else replicated. XLA inserts the collectives.

Design choices:
- Column-parallel (output features on "model"): q/k/v/gate/up kernels (D, X) and lm_head (D, V); row-parallel
  (input features on "model"): o/down kernels (X, D); the embedding table (V, D) is split on D. A dimension that
  the "model" axis does not divide stays replicated (tiny test models on one device).
- With several processes (`jax.distributed`), each process feeds its own rows (`global_batch`): the global batch is
  the concatenation of the per-process batches, rank order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW = ("o_proj", "down_proj")


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over all devices (every process's): data = n_devices / model_parallel."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise ValueError(f"model_parallel {model_parallel} does not divide {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, ("data", "model"))


def _leaf_spec(path, leaf, n_model: int) -> P:
    names = [str(getattr(k, "key", k)) for k in path]
    owner = names[-2] if len(names) >= 2 else ""
    if leaf.ndim != 2 or n_model == 1:
        return P()
    if owner in COLUMN and leaf.shape[1] % n_model == 0:
        return P(None, "model")
    if owner in ROW and leaf.shape[0] % n_model == 0:
        return P("model", None)
    if names[-1] == "embedding" and leaf.shape[1] % n_model == 0:
        return P(None, "model")
    return P()


def param_shardings(params, mesh: Mesh):
    """A NamedSharding per parameter leaf (same tree structure as params)."""
    n_model = mesh.shape["model"]
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, _leaf_spec(p, x, n_model)), params)


def shard_params(params, mesh: Mesh):
    """Place params on the mesh (from host arrays; identical on every process)."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over "data", tokens unsplit; for (B, T) and (A, B, T) (micro-batch axis first) arrays."""
    return NamedSharding(mesh, P("data", None))


def global_batch(local: np.ndarray, mesh: Mesh, micro_axis: bool = False) -> jax.Array:
    """One global array from this process's rows (concatenated over processes in rank order)."""
    spec = P(None, "data", None) if micro_axis else P("data", None)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)

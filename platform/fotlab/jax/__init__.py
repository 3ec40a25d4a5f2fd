"""fotlab.jax: the FoT model and its training loop in JAX, for TPUs (same semantics as fotlab.model).

    fotlab run experiments/quickstart.yaml --set train.framework=jax

Modules: model (Flax Linen FoT model + long-input driver), crossbatch (attention kernels), weights (safetensors
interchange with fotlab's model directories), sharding (data/model mesh), train (optax/orbax loop on fotlab's data
pipeline), steps (jitted steps, optimizer, orbax checkpoints). `fotlab.orchestrate` runs the loop in its one
pipeline under Ray Train's JaxTrainer. Nothing here imports torch at module level; loading foreign checkpoints,
building the data pipeline and writing the final model directory import it lazily.

Why Flax Linen (not NNX or Equinox): a Linen model is a pure function of an explicit parameter pytree. That tree is
exactly what optax updates, orbax checkpoints, `jax.jit` shards (NamedSharding per leaf) and what the safetensors
interchange renames — no module state to split/merge around `jit` (NNX) and no extra dependency (Equinox).
Linen's nested module names reproduce HF LLaMA's weight names, so PyTorch interchange is a transpose-and-rename.
"""

"""FSDP2 for FoT models: shard each decoder layer and the root, build large models on the meta device.

    python -c "import fotlab.train.sharding as s; help(s.fsdp_wrapper)"

- `apply_fsdp` calls `torch.distributed.fsdp.fully_shard` on every `FoTDecoderLayer` and then on the whole
  model (embeddings, final norm and lm_head form the root group, so tied embeddings stay in one group). On GPU
  with `train.precision: bf16` the parameters are all-gathered and computed in bf16 while gradients are
  reduce-scattered in fp32 (`MixedPrecisionPolicy`); on CPU (gloo) everything stays fp32.
- Gradients are averaged over ranks, as under DDP, so `train_step`'s loss scaling is the same for both.
- Activation checkpointing (`model.gradient_checkpointing`) wraps the call of the sharded layer, so the
  recomputation all-gathers the layer again; memory-layer gradients flow as without FSDP.
- Meta-device init (`build_sharded_model`): rank 0 alone builds the full model (preset with the spec's seed,
  or `model.init_from`), the other ranks build the same architecture on the meta device, every rank shards it,
  and rank 0's weights are broadcast shard by shard (`set_model_state_dict(full_state_dict=True,
  broadcast_from_rank0=True)`). One full copy lives in host memory per node instead of one per worker.
- Crossbatch under FSDP (as under DDP): every rank packs its own batch, so the crossbatch negatives of a row
  come from the other rows of that rank's batch (its own packing groups), never from another rank's.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fotlab.train.runtime import TrainError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType

    from fotlab.model import FoTForCausalLM

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FsdpSettings:
    """What `apply_fsdp` needs (from `spec.scaling.fsdp` and `spec.train.precision`)."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    bf16: bool = False  # bf16 parameters / fp32 reduction; only on CUDA devices

    @classmethod
    def from_spec(cls, spec) -> FsdpSettings:
        fsdp = spec.scaling.fsdp
        return cls(
            reshard_after_forward=True if fsdp is None else fsdp.reshard_after_forward,
            cpu_offload=False if fsdp is None else fsdp.cpu_offload,
            bf16=spec.train.precision == "bf16",
        )


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FoT decoder layers (`model.model.layers`), the unit FSDP shards and all-gathers at a time."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TrainError(f"scaling.strategy: fsdp needs a FoT model with decoder layers, got {type(model).__name__}")
    return list(layers)


def apply_fsdp(model: torch.nn.Module, device: torch.device, settings: FsdpSettings) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 (per decoder layer, then the root); returns it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise TrainError("scaling.strategy: fsdp needs a torch.distributed process group (Ray Train workers)")
    device = torch.device(device)
    mp = MixedPrecisionPolicy()  # fp32 everywhere
    if settings.bf16 and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if settings.cpu_offload and device.type == "cuda" else OffloadPolicy()
    # A decoder layer returns its raw (k, v) as transposed views; FoT only concatenates them (out of place), so
    # FSDP2's warning about in-place ops on views does not apply and would repeat on every step.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPFoTDecoderLayer\) returned a view")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        reshard = settings.reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward, mp_policy=mp, offload_policy=offload)
    return model


def fsdp_wrapper(settings: FsdpSettings, device: torch.device) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A `Runtime.wrap_model` that applies FSDP2 (use with `Runtime(sharded=True)`)."""

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return apply_fsdp(model, device, settings)

    return wrap


def _broadcast(obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_sharded_model(spec, tokenizer, runtime, build_full: Callable) -> torch.nn.Module:
    """The spec's model, sharded by `runtime.wrap_model`, with rank 0's initial weights on every rank.

    `build_full(spec, tokenizer, device)` is the plain builder (`fotlab.train.build.build_model`); only rank 0
    calls it (on CPU). A build error on rank 0 is raised on every rank (no rank hangs in a collective).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from fotlab.model import FoTForCausalLM

    full, config, error = None, None, None
    if runtime.rank == 0:
        try:
            full = build_full(spec, tokenizer, torch.device("cpu"))
            config = full.config.to_dict()
        except TrainError as err:
            error = str(err)
    config, error = _broadcast((config, error), runtime.rank)
    if error is not None:
        raise TrainError(error)
    from fotlab.model.configuration import FoTConfig

    fot_config = FoTConfig.from_dict(config)
    with torch.device("meta"):
        model = FoTForCausalLM(fot_config)
    model = model.to(dtype=getattr(torch, spec.model.dtype))
    if spec.model.gradient_checkpointing:
        from fotlab.train.build import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    wrapped = runtime.wrap_model(model.train())
    wrapped.to_empty(device=runtime.device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(wrapped, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, state
    return wrapped


def full_state_dict(model: torch.nn.Module) -> dict[str, ValueType]:
    """The whole model's weights on CPU, on rank 0 (an empty dict elsewhere); called on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_full_model(model: FoTForCausalLM, rank: int) -> FoTForCausalLM | None:
    """A plain (unsharded, CPU) copy of a sharded model (FSDP2 shards it in place) on rank 0, None elsewhere;
    called on every rank."""
    from fotlab.model import FoTForCausalLM

    state = full_state_dict(model)
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = FoTForCausalLM(model.config)
    plain.load_state_dict(state, assign=True)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()

"""Build phase of `train()`: tokenizer, datasets and packers, model, optimizer, scheduler — from the spec.

- The model is `preset_config(spec.model.preset or "debug", **model_overrides(spec))` with the tokenizer's vocab
  size and special ids, or `FoTForCausalLM.from_pretrained(spec.model.init_from, **model_overrides(spec))` for an
  HF LLaMA / LongLLaMA / fotlab directory (memory settings from `spec.memory` become config overrides, e.g.
  `mem_layers`). The checkpoint keeps its own vocab; a tokenizer with more ids than the model is an error.
- Data is rank-sharded by the packer (rank r reads positions r, r + world_size, ... of each epoch's order).
  The validation packer is rebuilt for every evaluation so each evaluation sees the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from fotlab.train.runtime import Runtime, TrainError

if TYPE_CHECKING:
    from fotlab.model import FoTForCausalLM

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataBundle:
    """The tokenizer, the training packer and the held-out documents of this rank."""

    tokenizer: Any
    train_packer: Any
    val_docs: Any | None
    datasets: list = dataclasses.field(default_factory=list)  # `fotlab.data.lineage.DatasetRecord`s read


def spec_packer(docs, spec, runtime: Runtime, tokenizer, seed: int, *, with_doc_ids: bool = False):
    """The `DocPacker` training uses for `spec` (batch, context length, packing) on this rank; `with_doc_ids`
    adds each token's document id (to count the crossbatch mixture, `fotlab.train.mixture`)."""
    from fotlab.data import DocPacker

    train = spec.train
    return DocPacker(
        docs,
        batch_size=train.batch_size,
        seq_len=train.context_length,
        packing=train.crossbatch.packing,
        seed=seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        with_doc_ids=with_doc_ids,
    )


def build_data(spec, runtime: Runtime) -> DataBundle:
    """Tokenizer, datasets (train / validation split) and this rank's training packer."""
    from fotlab.data import build_datasets, build_tokenizer

    tokenizer = build_tokenizer(spec.data.tokenizer, data_spec=spec.data)  # BPE: trained on (or cached for) the data
    train_docs, val_docs = build_datasets(spec.data, tokenizer, spec.seed)
    records = data_lineage(spec, train_docs, val_docs)
    if val_docs is not None and len(val_docs) < runtime.world_size:
        logger.warning(
            "only %d validation documents for %d ranks: validation is off", len(val_docs), runtime.world_size
        )
        val_docs = None
    return DataBundle(tokenizer, spec_packer(train_docs, spec, runtime, tokenizer, spec.seed), val_docs, records)


def data_lineage(spec, train_docs, val_docs) -> list:
    """The training and validation documents as dataset records (digest, documents, tokens) for tracking."""
    from fotlab.data.lineage import describe_dataset, sources_json

    source = sources_json(spec.data.sources)
    records = [describe_dataset(train_docs, name=f"{spec.name}-train", source=source, context="training")]
    if val_docs is not None:
        records.append(describe_dataset(val_docs, name=f"{spec.name}-validation", source=source, context="validation"))
    return records


def val_batches(bundle: DataBundle, spec, runtime: Runtime) -> list[dict[str, torch.Tensor]]:
    """The `spec.train.eval_batches` validation batches of this rank (the same ones at every evaluation)."""
    if bundle.val_docs is None:
        return []
    packer = spec_packer(bundle.val_docs, spec, runtime, bundle.tokenizer, seed=spec.seed + 1)
    return [packer.next_batch() for _ in range(spec.train.eval_batches)]


def build_model(spec, tokenizer, device: torch.device) -> FoTForCausalLM:
    """The FoT model the spec describes, on `device`, in train mode (see module docstring)."""
    from fotlab.model import FoTForCausalLM, preset_config
    from fotlab.spec import model_overrides

    overrides = model_overrides(spec)
    n_vocab = len(tokenizer)
    if spec.model.init_from:
        model = FoTForCausalLM.from_pretrained(spec.model.init_from, **overrides)
        if spec.data.tokenizer.kind == "byte" and model.config.vocab_size != n_vocab:
            raise TrainError(
                f"model.init_from: {spec.model.init_from} has vocab_size {model.config.vocab_size}, not a byte-level "
                f"fotlab model ({n_vocab} ids); use the checkpoint's tokenizer (data.tokenizer.kind: pretrained)"
            )
        if model.config.vocab_size < n_vocab:
            raise TrainError(
                f"model.init_from: {spec.model.init_from} has vocab_size {model.config.vocab_size} but the "
                f"tokenizer has {n_vocab} ids; use the checkpoint's tokenizer (data.tokenizer.kind: pretrained)"
            )
    else:
        config = preset_config(
            spec.model.preset or "debug",
            vocab_size=n_vocab,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **overrides,
        )
        model = FoTForCausalLM(config)
    window = model.config.max_position_embeddings
    if spec.train.context_length > window:
        raise TrainError(f"train.context_length: {spec.train.context_length} exceeds the model window W = {window}")
    model = model.to(device=device, dtype=getattr(torch, spec.model.dtype))
    if spec.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def enable_activation_checkpointing(model: FoTForCausalLM) -> None:
    """Recompute decoder-layer activations in backward (non-reentrant; the model keeps memory gradients exact)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

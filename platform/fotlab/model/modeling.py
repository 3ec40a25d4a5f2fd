"""`FoTForCausalLM`: a LLaMA decoder whose memory layers also attend to an explicit FoT memory (FOT_SPEC §1).

Run: `python -c "from fotlab.model import *; m = FoTForCausalLM(preset_config('debug')); print(m(torch.ones(1, 200,
dtype=torch.long)).logits.shape)"`.

Design choices:
- A long input (L tokens) is processed as FOT_SPEC §1.1: the first `max(L - last_context_length, 0)` tokens in
  windows of W = max_position_embeddings tokens (each window through all layers, then its raw keys/values appended
  to memory in every memory layer), the remaining tokens last as the local context. Positions restart at 0 in each
  window and follow the padding mask: HF positions `cumsum - 1` taken relative to the window's first local key (a
  masked first key keeps its HF position, so the next real token is at 1, as in the LongLLaMA reference).
- Memory is explicit state: `forward(memory=m)` reads `m` and returns the updated memory as `.memory`
  (`FoTMemory` updates return new objects). With a cache, the cache carries the memory.
- Generation uses `FoTCache` (local cache capped at W, flushed whole into memory; see cache.py).
- lm_head runs only on the positions whose logits are returned (`logits_to_keep`), window by window.
- Gradient checkpointing (HF `gradient_checkpointing_enable()`; every `gradient_checkpoint_every_ith` layer) always
  uses non-reentrant `torch.utils.checkpoint` with memory tensors as real inputs, so gradients into
  (differentiable) memory are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from fotlab.model.cache import FoTCache
from fotlab.model.configuration import FoTConfig
from fotlab.model.layers import FoTDecoderLayer, FoTRMSNorm, MemoryMassProbe, SegmentContext, rope_tables
from fotlab.model.memory import FoTMemory

if TYPE_CHECKING:
    from fotlab.model.crossbatch import CrossBatch


@dataclass
class FoTCausalLMOutput(ModelOutput):
    """loss (HF shifted labels), logits (B, L_kept, V), cache (FoTCache or None), memory (FoTMemory)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: FoTCache | None = None
    memory: FoTMemory | None = None

    @property
    def past_key_values(self) -> FoTCache | None:
        return self.cache


def segment_context(
    key_valid: torch.Tensor,
    n_new: int,
    config: FoTConfig,
    dtype: torch.dtype,
    crossbatch: CrossBatch | None = None,
    memory_mass: MemoryMassProbe | None = None,
) -> SegmentContext:
    """Positions, RoPE tables and the local mask for n_new queries after S - n_new cached keys.

    key_valid: (B, S) bool. Positions are the HF positions `cumsum(valid) - 1` minus that of the first local key,
    i.e. `cumsum(valid) - valid[:, 0]`: when the first key is masked (a mid-sequence pad at a window start, or
    left padding) the first real token is at position 1, not 0. This matters once memory is non-empty (queries
    meet unrotated memory keys), and is what the LongLLaMA reference computes.
    """
    S = key_valid.shape[1]
    counts = key_valid.long().cumsum(-1)  # (B, S)
    positions = counts - counts[:, :1]  # (B, S): cumsum - valid[:, 0] (counts[:, 0] = valid[:, 0])
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, dtype)  # (B, S, Dh)
    q_idx = torch.arange(S - n_new, S, device=key_valid.device)[:, None]  # (T, 1) absolute query index
    k_idx = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    causal = k_idx <= q_idx  # (T, S)
    mask = causal & (key_valid[:, None, :] | (k_idx == q_idx))  # (B, T, S): a query always sees itself
    return SegmentContext(
        cos=cos, sin=sin, local_mask=mask[:, None], key_valid=key_valid, crossbatch=crossbatch, memory_mass=memory_mass
    )


class FoTPreTrainedModel(PreTrainedModel):
    config_class = FoTConfig
    config: FoTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FoTDecoderLayer"]
    _supports_sdpa = True


class FoTModel(FoTPreTrainedModel):
    """Embeddings + decoder layers + final norm; `run_segment` processes one window/segment."""

    def __init__(self, config: FoTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = FoTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def run_segment(
        self,
        input_ids,
        key_valid,
        local,
        memory: FoTMemory,
        crossbatch: CrossBatch | None = None,
        memory_mass: MemoryMassProbe | None = None,
    ):
        """Run T new tokens through every layer.

        input_ids (B, T); key_valid (B, S) for the S = n_local + T local keys; local: per-layer raw (k, v) of the
        n_local cached tokens or None. Returns normed hidden (B, T, D) and per-layer raw (k, v) of all S keys.
        """
        x = self.embed_tokens(input_ids)  # (B, T, D)
        ctx = segment_context(key_valid, input_ids.shape[1], self.config, x.dtype, crossbatch, memory_mass)
        new_local = []
        for i, layer in enumerate(self.layers):
            past = None if local is None else local[i]
            mem = _memory_view(memory, i) if layer.is_memory_layer else None
            if self.gradient_checkpointing and self.training and i % self.config.gradient_checkpoint_every_ith == 0:
                x, k, v = checkpoint(layer, x, ctx, past, mem, use_reentrant=False)
            else:
                x, k, v = layer(x, ctx, past, mem)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, Hkv, S, Dh)
                v = torch.cat([past[1], v], dim=2)  # (B, Hkv, S, Dh)
            new_local.append((k, v))
        return self.norm(x), tuple(new_local)


def _memory_view(memory: FoTMemory, layer_idx: int):
    """(keys, values, valid) of one memory layer, or None when it holds nothing."""
    layer_mem = memory.get(layer_idx)
    if layer_mem is None or layer_mem.n_tokens == 0:
        return None
    return layer_mem.keys, layer_mem.values, layer_mem.valid


class FoTForCausalLM(FoTPreTrainedModel, GenerationMixin):
    """FoT / LongLLaMA causal LM. `model(input_ids, memory=m).memory` is the memory after the call;
    `model.generate(...)` works as in transformers (greedy / sampling), with memory and the W-capped local cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FoTConfig):
        super().__init__(config)
        self.model = FoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds and returns its own FoTCache

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Load a fotlab, LongLLaMA (model_type "longllama") or HF LLaMA ("llama") directory; FoTConfig fields
        (e.g. `mem_layers=[...]`, `last_context_length=...`) may be given as overrides. See loading.py."""
        from fotlab.model.loading import load_pretrained

        return load_pretrained(cls, path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_memory(self) -> FoTMemory:
        """An empty memory with this model's storage dtype and capacity."""
        return FoTMemory.empty(self.config.mem_dtype, self.config.mem_capacity)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        last_context_length: int | None = None,
        memory: FoTMemory | None = None,
        cache: FoTCache | None = None,
        past_key_values: FoTCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        crossbatch: CrossBatch | None = None,
        memory_mass: MemoryMassProbe | None = None,
        **kwargs,
    ) -> FoTCausalLMOutput:
        """input_ids (B, L); attention_mask (B, L) or (B, n_past + L) (its last L columns are used), 1 = token.

        memory: memory to start from (ignored when a cache is given: the cache carries its memory).
        last_context_length: tokens kept local (default config.last_context_length); 0 = everything to memory.
        logits_to_keep: int N > 0 = logits only for the last N positions. Positions are always derived from the
        padding mask per window (see `segment_context`); a `position_ids` argument is ignored.
        crossbatch: `CrossBatch` for training (the whole input is one segment, L <= W).
        memory_mass: a `MemoryMassProbe`: the memory layers record their attention mass per memory source over the
        final segment into it (evaluation; the outputs are the same with or without it).
        Returns logits, loss, cache (if use_cache), memory.
        """
        cache = cache if cache is not None else past_key_values
        B, L = input_ids.shape
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -L:].bool()
        )  # (B, L)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        state = cache if cache is not None else FoTCache.empty(memory if memory is not None else self.new_memory())
        n_keep = L if (labels is not None or not logits_to_keep) else min(int(logits_to_keep), L)
        lcl = self.config.last_context_length if last_context_length is None else last_context_length
        state, logits = self._process(input_ids, valid, state, lcl, n_keep, crossbatch, memory_mass)
        loss = None if labels is None else self._loss(logits, labels, kwargs.get("num_items_in_batch"))
        return FoTCausalLMOutput(loss=loss, logits=logits, cache=state if use_cache else None, memory=state.memory)

    def _segments(self, state: FoTCache, L: int, lcl: int, crossbatch) -> tuple[list, int]:
        """Window bounds [(start, end)] sent to memory, and the start of the final (local) segment."""
        if crossbatch is not None:
            if self.config.max_position_embeddings < L:
                raise ValueError(f"crossbatch training needs L <= W = {self.config.max_position_embeddings}, got {L}")
            return [], 0
        if state.n_local:
            return [], 0
        W = self.config.max_position_embeddings
        mem_len = max(L - lcl, 0)
        return [(s, min(s + W, mem_len)) for s in range(0, mem_len, W)], mem_len

    def _process(self, input_ids, valid, state: FoTCache, lcl: int, n_keep: int, crossbatch, memory_mass=None):
        """Flush if needed, run windows into memory, then the local segment; logits of the last n_keep positions."""
        L = input_ids.shape[1]
        if state.n_local and state.n_local + L > self.config.max_position_embeddings:
            state = state.flushed(self.config.mem_layers)
        windows, local_start = self._segments(state, L, lcl, crossbatch)
        memory, logits = state.memory, []
        for s, e in windows:
            hidden, kv = self.model.run_segment(input_ids[:, s:e], valid[:, s:e], None, memory, crossbatch)
            for i in self.config.mem_layers:
                memory = memory.append(i, kv[i][0], kv[i][1], valid[:, s:e])
            logits.append(self._logits(hidden, s, L - n_keep))
        local, local_valid = None, None
        if local_start < L:
            key_valid = valid[:, local_start:]  # (B, T)
            if state.local_valid is not None:
                key_valid = torch.cat([state.local_valid, key_valid], dim=1)  # (B, S)
            hidden, local = self.model.run_segment(
                input_ids[:, local_start:], key_valid, state.local, memory, crossbatch, memory_mass
            )
            local_valid = key_valid
            logits.append(self._logits(hidden, local_start, L - n_keep))
        kept = [x for x in logits if x is not None]
        new_state = FoTCache(local=local, local_valid=local_valid, memory=memory, n_seen=state.n_seen + L)
        return new_state, torch.cat(kept, dim=1)  # (B, n_keep, V)

    def _logits(self, hidden: torch.Tensor, start: int, keep_from: int) -> torch.Tensor | None:
        """lm_head on the rows of hidden (B, T, D) at absolute positions >= keep_from (segment begins at start)."""
        offset = max(keep_from - start, 0)
        if offset >= hidden.shape[1]:
            return None
        return self.lm_head(hidden[:, offset:])  # (B, T', V)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Next-token cross entropy with HF label shifting (labels[t + 1] is the target at t), ignore -100."""
        flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(L-1), V)
        flat_labels = labels[:, 1:].reshape(-1).to(logits.device)  # (B*(L-1),)
        if num_items_in_batch is None:
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum") / num_items_in_batch

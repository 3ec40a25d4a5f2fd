"""`FoTCache`: the generation state of a FoT model = local KV cache (capped at W) + FoT memory.

Design choices:
- Not a `transformers.Cache` subclass: FoT needs raw (unrotated) keys and a flush of the whole local cache into
  memory, which the layered HF caches do not model. `generate()` only needs the attributes defined here
  (`get_seq_length`, `is_linear`, `is_compileable`, `is_croppable`); the model returns the cache as `.cache` and
  disables HF's default DynamicCache (`_supports_default_dynamic_cache` is False).
- Every update returns a new `FoTCache` (values, not buffers mutated in place); `memory` is a `FoTMemory`.
- Local keys are kept raw and re-rotated at use: positions are recomputed from the local padding mask
  (`cumsum - 1`, restarting at 0 after each flush), so cached and recomputed runs agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fotlab.model.memory import FoTMemory


@dataclass
class FoTCache:
    """local: per layer (raw keys, values) each (B, Hkv, n_local, Dh), or None when empty;
    local_valid: (B, n_local) bool padding mask of the local tokens; memory: FoTMemory;
    n_seen: tokens processed so far (what `generate` uses to slice new input ids)."""

    local: tuple | None
    local_valid: torch.Tensor | None
    memory: FoTMemory
    n_seen: int = 0

    # attributes read by transformers' generate()
    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    @classmethod
    def empty(cls, memory: FoTMemory) -> FoTCache:
        return cls(local=None, local_valid=None, memory=memory, n_seen=0)

    @property
    def n_local(self) -> int:
        """Tokens in the local cache."""
        return 0 if self.local_valid is None else self.local_valid.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far (local + those sent to memory or dropped)."""
        return self.n_seen

    def flushed(self, mem_layers) -> FoTCache:
        """The whole local cache leaves: memory layers append it (raw keys, current masks); others drop it."""
        if self.local is None or self.n_local == 0:
            return self
        memory = self.memory
        for i in mem_layers:
            k, v = self.local[i]
            memory = memory.append(i, k, v, self.local_valid)
        return replace(self, local=None, local_valid=None, memory=memory)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> FoTCache:
        """Not supported: FoT memory rows cannot be reordered for beam search."""
        raise NotImplementedError("beam search is not supported by FoTCache")

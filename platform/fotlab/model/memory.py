"""FoT memory as explicit state: per memory layer, the (key, value, valid) slots of every batch row.

Design choices:
- Memory is a value, not a module buffer: `append`, `reset_rows`, `detach`, `to` return a new memory and never
  change what an earlier memory object (or a view it handed out) shows.
- Slots are shared by all batch rows: row b of the memory is `keys[b, :, :M]` with `valid[b, :M]` saying which
  slots hold a real token. Padding follows tokens into memory (a padded token is stored but stays invalid).
- Keys are stored raw (no rotation, FOT_SPEC §1) in `dtype` (bfloat16 by default, even for an fp32 model).
- Amortised growth: appends that do not require grad write into a preallocated buffer whose size doubles when
  full (O(1) amortised copy per token, no `torch.cat` of the whole memory). Only the memory object that owns the
  end of the buffer writes in place (past every length handed out so far); appending to an older memory copies.
  Once a view was read with autograd recording (grad mode on), the next append copies into a fresh buffer instead
  (autograd may have saved the view; see `_Buffer`): run inference under `torch.no_grad()` / `inference_mode()`
  to get amortised appends.
- Differentiable memory: once an appended tensor requires grad, the memory keeps a tuple of segments and
  concatenates them on read, so autograd reaches every segment.
- Capacity (optional, slots per row): FIFO eviction, the oldest slots leave first, for all rows together.

Dimension letters: B batch, Hkv key/value heads, M memory slots, Dh head dim, T appended tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

MIN_BUFFER_SLOTS = 64
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'bfloat16' | 'float32' | 'float16' | torch.dtype -> torch.dtype."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


class _Buffer:
    """Preallocated storage shared by successive memories; `filled` is the end of the newest live region.

    `exposed` is set once a view was handed out while autograd was recording: autograd may have saved that view,
    and any in-place write to the storage (even past the view) would fail its version check at backward time."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        self.keys = keys  # (B, Hkv, S, Dh), S = allocated slots
        self.values = values  # (B, Hkv, S, Dh)
        self.valid = valid  # (B, S)
        self.filled = 0
        self.exposed = False

    @property
    def n_slots(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True, eq=False)
class LayerMemory:
    """Memory of one layer for all batch rows. Build with `LayerMemory.empty(...)`, grow with `append`.

    Read `keys`, `values` (B, Hkv, M, Dh) in `dtype` and `valid` (B, M) bool.
    """

    dtype: torch.dtype = torch.bfloat16
    capacity: int | None = None
    _buffer: _Buffer | None = None
    _start: int = 0
    _end: int = 0
    _segments: tuple = ()  # differentiable mode: tuple of (keys, values, valid) segments, oldest first
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def empty(cls, dtype: torch.dtype | str = torch.bfloat16, capacity: int | None = None) -> LayerMemory:
        """A memory with no slots yet (shapes are taken from the first append)."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
        return cls(dtype=resolve_dtype(dtype), capacity=capacity)

    # ----- reading -------------------------------------------------------------------------------------------
    @property
    def differentiable(self) -> bool:
        """True when the memory keeps autograd segments instead of a buffer."""
        return bool(self._segments)

    @property
    def n_tokens(self) -> int:
        """M: number of slots per batch row (valid or not)."""
        if self._segments:
            return sum(seg[0].shape[2] for seg in self._segments)
        return self._end - self._start

    @property
    def buffer_slots(self) -> int:
        """Allocated slots of the underlying buffer (0 in differentiable mode or when empty)."""
        return 0 if self._buffer is None else self._buffer.n_slots

    def _read(self, i: int, expose: bool = True) -> torch.Tensor | None:
        if self._segments:
            if i not in self._cache:
                parts = [seg[i] for seg in self._segments]
                self._cache[i] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1 if i == 2 else 2)
            return self._cache[i]
        if self._buffer is None:
            return None
        if expose and torch.is_grad_enabled():
            self._buffer.exposed = True
        if i == 2:
            return self._buffer.valid[:, self._start : self._end]
        return (self._buffer.keys, self._buffer.values)[i][:, :, self._start : self._end]

    def _slots(self, expose: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values, valid of a memory that was appended to (as the properties, but never None)."""
        keys, values, valid = (self._read(i, expose) for i in range(3))
        if keys is None or values is None or valid is None:
            raise ValueError("this memory was never appended to: it has no slots to read")
        return keys, values, valid

    @property
    def keys(self) -> torch.Tensor | None:
        """(B, Hkv, M, Dh) raw keys in `dtype`, or None when nothing was ever appended."""
        return self._read(0)

    @property
    def values(self) -> torch.Tensor | None:
        """(B, Hkv, M, Dh) values in `dtype`, or None when nothing was ever appended."""
        return self._read(1)

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, M) bool, True where the slot holds a real (non-padding, non-reset) token."""
        return self._read(2)

    # ----- updates (each returns a new memory) -----------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> LayerMemory:
        """Add T slots: k, v (B, Hkv, T, Dh) raw keys / values, valid (B, T) bool (None = all valid)."""
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"k and v must both be (B, Hkv, T, Dh), got {tuple(k.shape)} and {tuple(v.shape)}")
        if valid is None:
            valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        if valid.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"valid must be (B, T) = {(k.shape[0], k.shape[2])}, got {tuple(valid.shape)}")
        self._check_shape(k)
        k, v, valid = k.to(self.dtype), v.to(self.dtype), valid.to(device=k.device, dtype=torch.bool)
        if self._segments or k.requires_grad or v.requires_grad:
            return self._append_segment(k, v, valid)
        return self._append_buffer(k, v, valid)

    def _check_shape(self, k: torch.Tensor) -> None:
        old = self._read(0, expose=False)
        if old is not None and (old.shape[:2] != k.shape[:2] or old.shape[3] != k.shape[3]):
            raise ValueError(f"appended keys {tuple(k.shape)} do not fit memory (B, Hkv, M, Dh) {tuple(old.shape)}")

    def _append_segment(self, k, v, valid) -> LayerMemory:
        segments = self._segments
        if not segments and self.n_tokens > 0:  # leaving buffer mode: the old slots become the first segment
            segments = ((self.keys, self.values, self.valid),)
        segments = _evict_segments(segments + ((k, v, valid),), self.capacity)
        return LayerMemory(dtype=self.dtype, capacity=self.capacity, _segments=segments)

    def _append_buffer(self, k, v, valid) -> LayerMemory:
        n_new = k.shape[2]
        if self.capacity is not None and n_new > self.capacity:  # only the newest `capacity` slots survive
            k, v, valid = k[:, :, -self.capacity :], v[:, :, -self.capacity :], valid[:, -self.capacity :]
            n_new = self.capacity
        n_keep = self.n_tokens
        if self.capacity is not None:
            n_keep = min(n_keep, self.capacity - n_new)
        buffer, start = self._buffer, self._end - n_keep
        # Write in place only where this memory owns the end of the buffer and the new slots fit.
        if buffer is None or buffer.filled != self._end or buffer.exposed or self._end + n_new > buffer.n_slots:
            buffer, start = self._grow(k, n_keep, n_new), 0
        end = start + n_keep + n_new
        buffer.keys[:, :, end - n_new : end] = k
        buffer.values[:, :, end - n_new : end] = v
        buffer.valid[:, end - n_new : end] = valid
        buffer.filled = end
        return LayerMemory(dtype=self.dtype, capacity=self.capacity, _buffer=buffer, _start=start, _end=end)

    def _grow(self, k: torch.Tensor, n_keep: int, n_new: int) -> _Buffer:
        """A fresh buffer holding the newest `n_keep` current slots at its start, with room to double."""
        n_slots = max(2 * (n_keep + n_new), MIN_BUFFER_SLOTS)
        if self.capacity is not None:
            n_slots = min(n_slots, 2 * self.capacity)
        B, n_kv_heads, _, head_dim = k.shape
        buffer = _Buffer(
            keys=k.new_zeros(B, n_kv_heads, n_slots, head_dim),
            values=k.new_zeros(B, n_kv_heads, n_slots, head_dim),
            valid=torch.zeros(B, n_slots, dtype=torch.bool, device=k.device),
        )
        if n_keep > 0:
            keys, values, valid = self._slots(expose=False)
            buffer.keys[:, :, :n_keep] = keys[:, :, -n_keep:]
            buffer.values[:, :, :n_keep] = values[:, :, -n_keep:]
            buffer.valid[:, :n_keep] = valid[:, -n_keep:]
        return buffer

    def reset_rows(self, rows) -> LayerMemory:
        """Empty batch rows `rows` (ints or (B,) bool): their slots become invalid (the tokens are forgotten).

        Slots are shared by all rows, so a reset row keeps its slot count; then every slot that is invalid in
        all rows is dropped (so resetting every row gives an empty memory). Copies: O(M) per call.
        """
        if self.n_tokens == 0:
            return self
        keys, values, valid = self._slots()
        valid = valid.clone()
        rows = torch.as_tensor(rows, device=valid.device)
        valid[rows if rows.dtype == torch.bool else rows.long()] = False
        keep = valid.any(dim=0)  # (M,)
        return LayerMemory._from_tensors(
            keys[:, :, keep], values[:, :, keep], valid[:, keep], self.capacity, self.dtype
        )

    @classmethod
    def _from_tensors(cls, keys, values, valid, capacity, dtype) -> LayerMemory:
        if keys.requires_grad or values.requires_grad:
            return cls(dtype=dtype, capacity=capacity, _segments=((keys, values, valid),))
        return cls.empty(dtype, capacity)._append_buffer(keys, values, valid)  # 0 slots keep their shapes

    def detach(self) -> LayerMemory:
        """Same slots without autograd history (back in amortised buffer mode)."""
        if not self._segments:
            return self
        keys, values, valid = self._slots()
        return LayerMemory._from_tensors(keys.detach(), values.detach(), valid, self.capacity, self.dtype)

    def to(self, device=None, dtype: torch.dtype | str | None = None) -> LayerMemory:
        """Copy to `device` and/or storage `dtype`."""
        dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        if self.n_tokens == 0:
            return LayerMemory.empty(dtype, self.capacity)
        keys, values, valid = self._slots()
        keys, values = keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype)
        return LayerMemory._from_tensors(keys, values, valid.to(device), self.capacity, dtype)


def _evict_segments(segments: tuple, capacity: int | None) -> tuple:
    """Drop the oldest slots of a segment tuple until at most `capacity` remain (FIFO)."""
    if capacity is None:
        return segments
    n_drop = sum(seg[0].shape[2] for seg in segments) - capacity
    kept = []
    for k, v, valid in segments:
        n_here = k.shape[2]
        if n_drop >= n_here:
            n_drop -= n_here
            continue
        if n_drop > 0:
            k, v, valid, n_drop = k[:, :, n_drop:], v[:, :, n_drop:], valid[:, n_drop:], 0
        kept.append((k, v, valid))
    return tuple(kept)


@dataclass(frozen=True, eq=False)
class FoTMemory:
    """The memory of a FoT model: memory-layer index -> LayerMemory, plus the storage dtype and capacity.

    Every update returns a new FoTMemory (`mem = mem.append(layer, k, v, valid)`); layers not yet written are
    absent (`get(layer)` returns None).
    """

    layers: dict = field(default_factory=dict)  # int -> LayerMemory
    dtype: torch.dtype = torch.bfloat16
    capacity: int | None = None

    @classmethod
    def empty(cls, dtype: torch.dtype | str = torch.bfloat16, capacity: int | None = None) -> FoTMemory:
        """A memory with no layers written yet; `capacity` = max slots per row per layer (FIFO), None = unbounded."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
        return cls(layers={}, dtype=resolve_dtype(dtype), capacity=capacity)

    def get(self, layer: int) -> LayerMemory | None:
        """The LayerMemory of `layer`, or None when nothing was appended there yet."""
        return self.layers.get(layer)

    def __getitem__(self, layer: int) -> LayerMemory:
        return self.layers[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    @property
    def n_tokens(self) -> int:
        """M: slots per batch row (the same in every layer after a full model step; max over layers)."""
        return max((mem.n_tokens for mem in self.layers.values()), default=0)

    def _replace(self, layers: dict) -> FoTMemory:
        return FoTMemory(layers=layers, dtype=self.dtype, capacity=self.capacity)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> FoTMemory:
        """Add k, v (B, Hkv, T, Dh) (raw, unrotated keys) with valid (B, T) bool to `layer`."""
        old = self.layers.get(layer) or LayerMemory.empty(self.dtype, self.capacity)
        return self._replace({**self.layers, layer: old.append(k, v, valid)})

    def reset_rows(self, rows) -> FoTMemory:
        """Forget batch rows `rows` in every layer (see LayerMemory.reset_rows: slots invalidated, then compacted)."""
        return self._replace({i: mem.reset_rows(rows) for i, mem in self.layers.items()})

    def detach(self) -> FoTMemory:
        """Cut autograd history (e.g. between training steps); returns buffer-mode layers."""
        return self._replace({i: mem.detach() for i, mem in self.layers.items()})

    def to(self, device=None, dtype: torch.dtype | str | None = None) -> FoTMemory:
        """Copy every layer to `device` and/or storage `dtype`."""
        dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        return FoTMemory(
            layers={i: mem.to(device, dtype) for i, mem in self.layers.items()}, dtype=dtype, capacity=self.capacity
        )

    def save(self, path: str | Path) -> Path:
        """Write `path/memory.safetensors` (keys, values, valid per layer) and `path/memory.json`; returns path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, mem in self.layers.items():
            if mem.n_tokens:
                tensors[f"layer{i}.keys"] = mem.keys.detach().contiguous()
                tensors[f"layer{i}.values"] = mem.values.detach().contiguous()
                tensors[f"layer{i}.valid"] = mem.valid.contiguous()
        save_file({name: t.cpu() for name, t in tensors.items()}, str(path / "memory.safetensors"))
        meta = {
            "format": "fotlab-memory-v1",
            "layers": sorted(self.layers),
            "dtype": str(self.dtype).split(".")[-1],
            "capacity": self.capacity,
            "n_tokens": self.n_tokens,
        }
        (path / "memory.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device=None, dtype: torch.dtype | str | None = None) -> FoTMemory:
        """Read a memory written by `save`, onto `device`, stored as `dtype` (default: the saved dtype)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "memory.json").read_text())
        if meta.get("format") != "fotlab-memory-v1":
            raise ValueError(f"{path / 'memory.json'}: not a fotlab memory (format {meta.get('format')!r})")
        tensors = load_file(str(path / "memory.safetensors"), device=str(device) if device is not None else "cpu")
        dtype = resolve_dtype(dtype or meta["dtype"])
        memory = cls.empty(dtype, meta["capacity"])
        layers = {}
        for i in meta["layers"]:
            layers[i] = LayerMemory.empty(dtype, memory.capacity)
            if f"layer{i}.keys" in tensors:
                layers[i] = layers[i].append(
                    tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"], tensors[f"layer{i}.valid"]
                )
        return memory._replace(layers)

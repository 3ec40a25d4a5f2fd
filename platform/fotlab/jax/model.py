"""The FoT model in Flax Linen: same function as `fotlab.model.FoTForCausalLM` (FOT_SPEC §1, §2).

Run: `python -c "from fotlab.jax.model import *; c = JaxFoTConfig(vocab_size=64, hidden_size=32,
intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, mem_layers=(1,)); m = FoTLM(c);
import jax.numpy as jnp; p = m.init(__import__('jax').random.key(0), jnp.ones((1, 8), jnp.int32)); print(p.keys())"`

Design choices:
- Parameter names mirror the HF LLaMA names (`model/layers_3/self_attn/q_proj/kernel` is
  `model.layers.3.self_attn.q_proj.weight` transposed), so interchange with PyTorch is a renaming (weights.py).
- One call runs one segment (window) of T tokens through every layer with no local cache: training (the whole
  input is one segment, optionally with crossbatch) and the window-by-window long-input driver `forward_long`
  (FOT_SPEC §1.1) are built from it. Generation with a local cache is not implemented in JAX.
- Memory is explicit functional state: {layer index: (keys, values, valid)} with keys/values (B, Hkv, M, Dh) in
  `mem_dtype` (raw k_proj / v_proj outputs, never rotated) and valid (B, M). Each new memory size is a new jit
  shape (fine for evaluation-sized inputs; training uses crossbatch, not memory).
- Attention: scores in the activation dtype, masked with -1e6, one softmax in float32 over local + memory keys,
  weights cast back to the activation dtype (as the PyTorch memory layers; non-memory layers use the same code,
  which equals PyTorch's SDPA because every query sees at least itself).
- Compute dtype follows the parameters: cast the parameter tree to bfloat16 for a bf16 policy (train.py).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fotlab.jax.crossbatch import JaxCrossBatch, attend, crossbatch_attention

MEM_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
UNSUPPORTED = {"qk_norm": False, "mem_retrieval": "dense", "mem_capacity": None}


@dataclasses.dataclass(frozen=True)
class JaxFoTConfig:
    """The FoTConfig fields the JAX model uses (hashable: it is static under jit)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    mem_layers: tuple[int, ...] = ()
    mem_dtype: str = "bfloat16"
    mem_positionals: bool = True
    last_context_length: int = 1024

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "mem_layers", tuple(sorted(int(i) for i in self.mem_layers)))
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {tuple(MEM_DTYPES)}, got {self.mem_dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> JaxFoTConfig:
        """From a FoTConfig dict (`FoTConfig.to_dict()`); FoT options the JAX model lacks are an error."""
        for name, default in UNSUPPORTED.items():
            if d.get(name, default) != default:
                raise ValueError(
                    f"model config {name}={d[name]!r} is not supported by the JAX model (only {default!r})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["mem_layers"] = tuple(kwargs.get("mem_layers", ()))
        return cls(**kwargs)

    @property
    def mem_jnp_dtype(self):
        return MEM_DTYPES[self.mem_dtype]


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, S, Dh) for integer positions (B, S), HF "rotate_half" layout, computed in float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)  # (Dh/2,)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, S, Dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, S, Dh)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x (B, H, S, Dh) with tables (B, S, Dh)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def segment_context(key_valid: jax.Array, config: JaxFoTConfig, dtype):
    """(cos, sin, local_mask (B, T, T)) for one segment: positions `cumsum(valid) - valid[:, 0]` (restart per
    window, follow padding), causal mask with key padding (a query always sees itself)."""
    T = key_valid.shape[1]
    counts = jnp.cumsum(key_valid.astype(jnp.int32), axis=-1)  # (B, T)
    positions = counts - counts[:, :1]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, dtype)
    idx = jnp.arange(T)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    mask = causal[None] & (key_valid[:, None, :] | (idx[None, :] == idx[:, None])[None])  # (B, T, T)
    return cos, sin, mask


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, parameter `weight` (as LLaMA)."""

    dim: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.dim,), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * xf.astype(x.dtype)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name, kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
    """LLaMA attention; in a memory layer also over memory (or, in training, the crossbatch contexts)."""

    config: JaxFoTConfig
    is_memory_layer: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, key_valid, memory=None, crossbatch: JaxCrossBatch | None = None):
        cfg = self.config
        B, T, _ = x.shape
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(H * Dh, "q_proj")(x).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (B, H, T, Dh)
        k = _dense(Hkv * Dh, "k_proj")(x).reshape(B, T, Hkv, Dh).transpose(0, 2, 1, 3)  # (B, Hkv, T, Dh)
        v = _dense(Hkv * Dh, "v_proj")(x).reshape(B, T, Hkv, Dh).transpose(0, 2, 1, 3)  # (B, Hkv, T, Dh)
        q_rot, k_rot = q, k
        if not self.is_memory_layer or cfg.mem_positionals:
            q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.is_memory_layer and crossbatch is not None and crossbatch.range > 0:
            out = crossbatch_attention(q_rot, k_rot, k, v, crossbatch, key_valid)
        else:
            out = attend(q_rot, k_rot, v, mask, memory if self.is_memory_layer else None)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
        return _dense(cfg.hidden_size, "o_proj")(out), k, v


class MLP(nn.Module):
    config: JaxFoTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: JaxFoTConfig
    is_memory_layer: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, key_valid, memory=None, crossbatch=None):
        cfg = self.config
        h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="input_layernorm")(x)
        attn, k, v = Attention(cfg, self.is_memory_layer, name="self_attn")(
            h, cos, sin, mask, key_valid, memory, crossbatch
        )
        x = x + attn
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, k, v


class FoTModel(nn.Module):
    """Embeddings + decoder layers + final norm over one segment."""

    config: JaxFoTConfig

    @nn.compact
    def __call__(self, input_ids, key_valid, memory=None, crossbatch=None, dtype=jnp.float32):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens", embedding_init=nn.initializers.normal(0.02)
        )
        x = embed(input_ids).astype(dtype)  # (B, T, D)
        cos, sin, mask = segment_context(key_valid, cfg, x.dtype)
        kvs = {}
        for i in range(cfg.num_hidden_layers):
            is_mem = i in cfg.mem_layers
            layer_mem = None if memory is None else memory.get(i)
            x, k, v = DecoderLayer(cfg, is_mem, name=f"layers_{i}")(x, cos, sin, mask, key_valid, layer_mem, crossbatch)
            if is_mem:
                kvs[i] = (k, v)
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="norm")(x), kvs


class FoTLM(nn.Module):
    """FoT causal LM over one segment: `apply(params, ids, key_valid, memory, crossbatch)` -> (logits, kvs).

    kvs: {memory layer: (raw k, v (B, Hkv, T, Dh))} of this segment (what a window sends to memory)."""

    config: JaxFoTConfig

    @nn.compact
    def __call__(self, input_ids, key_valid=None, memory=None, crossbatch: JaxCrossBatch | None = None):
        cfg = self.config
        if key_valid is None:
            key_valid = jnp.ones(input_ids.shape, dtype=bool)
        model = FoTModel(cfg, name="model")
        dtype = self._compute_dtype()
        hidden, kvs = model(input_ids, key_valid, memory, crossbatch, dtype)
        if cfg.tie_word_embeddings:
            table = model.variables["params"]["embed_tokens"]["embedding"]
            logits = hidden @ table.T.astype(hidden.dtype)
        else:
            logits = _dense(cfg.vocab_size, "lm_head")(hidden)
        return logits, kvs

    def _compute_dtype(self):
        """The dtype of the parameters (float32 at init; bfloat16 when the caller cast them)."""
        if self.is_initializing():
            return jnp.float32
        return self.variables["params"]["model"]["embed_tokens"]["embedding"].dtype


def init_params(config: JaxFoTConfig, seed: int = 0) -> dict:
    """Fresh float32 parameters (normal(0.02) matrices, unit norms)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    return FoTLM(config).init(jax.random.key(seed), ids)["params"]


@partial(jax.jit, static_argnames=("config", "crossbatch"))
def apply_segment(params, input_ids, key_valid, memory, config: JaxFoTConfig, crossbatch: JaxCrossBatch | None = None):
    """Jitted `FoTLM.apply` for one segment (see FoTLM)."""
    return FoTLM(config).apply({"params": params}, input_ids, key_valid, memory, crossbatch)


def append_memory(memory: dict, kvs: dict, valid: jax.Array, dtype) -> dict:
    """Memory with this segment's raw (k, v) appended in storage `dtype` (padding follows the tokens)."""
    new = {}
    for i, (k, v) in kvs.items():
        k, v = k.astype(dtype), v.astype(dtype)
        if i in memory:
            mk, mv, mvalid = memory[i]
            k, v = jnp.concatenate([mk, k], axis=2), jnp.concatenate([mv, v], axis=2)
            valid_i = jnp.concatenate([mvalid, valid], axis=1)
        else:
            valid_i = valid
        new[i] = (k, v, valid_i)
    return new


def forward_long(
    params,
    config: JaxFoTConfig,
    input_ids,
    attention_mask=None,
    last_context_length: int | None = None,
    memory: dict | None = None,
):
    """Logits (B, L, V) of a long input as FOT_SPEC §1.1, and the memory after it.

    The first max(L - last_context_length, 0) tokens go through the model in windows of W tokens, each window's
    raw keys/values appended to memory; the remaining tokens run last against memory and are not stored."""
    input_ids = jnp.asarray(input_ids)
    B, L = input_ids.shape
    valid = jnp.ones((B, L), bool) if attention_mask is None else jnp.asarray(attention_mask)[:, -L:].astype(bool)
    lcl = config.last_context_length if last_context_length is None else last_context_length
    W, mem_len = config.max_position_embeddings, max(L - lcl, 0)
    bounds = [(s, min(s + W, mem_len)) for s in range(0, mem_len, W)]
    if mem_len < L:
        bounds.append((mem_len, L))
    memory = dict(memory or {})
    logits = []
    for s, e in bounds:
        mem_arg = memory or None
        out, kvs = apply_segment(params, input_ids[:, s:e], valid[:, s:e], mem_arg, config)
        logits.append(out)
        if e <= mem_len:
            memory = append_memory(memory, kvs, valid[:, s:e], config.mem_jnp_dtype)
    return jnp.concatenate(logits, axis=1), memory


def token_ce_sum(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over targets != -100 in float32, number of such targets); targets come already shifted."""
    logits = logits.astype(jnp.float32)
    keep = targets != -100
    safe = jnp.where(keep, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, logz - picked, 0.0)), jnp.sum(keep)


def n_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

"""Benchmark model shapes and the LLaMA twin built on the same weights.

"full": the issue's 8-layer, D 512 model (8 heads, Dh 64, SwiGLU 2048, vocab 32000), window W 2048, last
context 1024, bf16 memory, fp32 weights. "tiny": a CPU-instant shape with the same structure for smoke tests.
"""

from __future__ import annotations

import torch

SHAPES = {
    "full": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=2048,
        last_context_length=1024,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        last_context_length=32,
    ),
}
PREFILL_MEM_LAYERS = {"full": [3, 6], "tiny": [1, 3]}  # 2 memory layers
TRAIN_MEM_LAYERS = {"full": [2, 4, 6], "tiny": [1, 2, 3]}  # 3 memory layers


def fot_config(size: str, mem_layers: list[int], **overrides):
    """FoTConfig of benchmark shape `size` with bf16 memory in `mem_layers`."""
    from fotlab.model import FoTConfig

    fields = {**SHAPES[size], "mem_layers": list(mem_layers), "mem_dtype": "bfloat16", **overrides}
    return FoTConfig(**fields)


def build_fot(config, seed: int = 0):
    """FoTForCausalLM with deterministic random weights, in eval mode."""
    from fotlab.model import FoTForCausalLM

    torch.manual_seed(seed)
    return FoTForCausalLM(config).eval()


def llama_twin(fot_model, max_len: int | None = None):
    """transformers LlamaForCausalLM with the same shape and exactly the same weights as `fot_model` (SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = fot_model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=max(max_len or 0, c.max_position_embeddings),
        attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(fot_model.state_dict(), strict=True)
    return llama.train(fot_model.training)


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids, reproducible."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def to_device(model, device: str):
    """`model` on `device`: unchanged on CPU (fp32, the CPU benchmarks' setting); bf16 weights on CUDA."""
    if device == "cpu":
        return model
    return model.to(device=device, dtype=torch.bfloat16)

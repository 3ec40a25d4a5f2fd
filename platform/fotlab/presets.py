"""The table of named model shapes (plain data; `fotlab.model.preset_config(name)` builds the `FoTConfig`).

Kept outside `fotlab.model` so spec validation (`fotlab validate`) can check shapes without importing torch or
transformers. Tiny CPU presets for tests and the quickstart; the paper's small models "37m"/"184m" (12 layers,
memory layer 8; FOT_SPEC §2.1); the LongLLaMA shapes "3b"/"7b" (OpenLLaMA-3B / CodeLlama-7B bases; FOT_SPEC §1.4).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        last_context_length=32,
        mem_layers=[1],
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        last_context_length=128,
        mem_layers=[2],
    ),
    "37m": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=256,
        last_context_length=256,
        mem_layers=[8],
    ),
    "184m": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=512,
        last_context_length=512,
        mem_layers=[8],
        mem_retrieval="topk",
        mem_topk=128,
    ),
    "3b": dict(
        vocab_size=32000,
        hidden_size=3200,
        intermediate_size=8640,
        num_hidden_layers=26,
        num_attention_heads=32,
        max_position_embeddings=2048,
        last_context_length=1024,
        mem_layers=[6, 12, 18],
        rope_theta=1e4,
    ),
    "7b": dict(
        vocab_size=32016,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
        last_context_length=3072,
        mem_layers=[8, 16, 24],
        rope_theta=1e6,
    ),
}

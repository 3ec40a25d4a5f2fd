"""Named model shapes: tiny CPU presets for tests and the paper's shapes (FOT_SPEC §1.4, §2.1).

`preset_config("debug")` is CPU-instant; "37m"/"184m" are the paper's small models (12 layers, memory layer 8);
"3b"/"7b" are the LongLLaMA shapes (OpenLLaMA-3B / CodeLlama-7B bases).
"""

from __future__ import annotations

from typing import Any

from fotlab.model.configuration import FoTConfig

PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, last_context_length=32, mem_layers=[1]),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=256, last_context_length=128, mem_layers=[2]),
    "37m": dict(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                max_position_embeddings=256, last_context_length=256, mem_layers=[8]),
    "184m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=512, last_context_length=512, mem_layers=[8],
                 mem_retrieval="topk", mem_topk=128),
    "3b": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               max_position_embeddings=2048, last_context_length=1024, mem_layers=[6, 12, 18], rope_theta=1e4),
    "7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, max_position_embeddings=4096, last_context_length=3072,
               mem_layers=[8, 16, 24], rope_theta=1e6),
}


def preset_config(name: str, **overrides: Any) -> FoTConfig:
    """Build the `FoTConfig` of preset `name` ("debug", "tiny", "37m", "184m", "3b", "7b"), with field overrides.

    Example: `preset_config("debug", mem_layers=[0, 1])`; overrides set to None are ignored.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return FoTConfig(**fields)

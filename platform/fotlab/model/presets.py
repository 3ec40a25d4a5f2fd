"""Named model shapes as `FoTConfig`s; the table itself is `fotlab.presets.PRESETS` (plain data).

`preset_config("debug")` is CPU-instant; "37m"/"184m" are the paper's small models (12 layers, memory layer 8);
"3b"/"7b" are the LongLLaMA shapes (OpenLLaMA-3B / CodeLlama-7B bases).
"""

from __future__ import annotations

from typing import Any

from fotlab.model.configuration import FoTConfig
from fotlab.presets import PRESETS

__all__ = ["PRESETS", "preset_config"]


def preset_config(name: str, **overrides: Any) -> FoTConfig:
    """Build the `FoTConfig` of preset `name` ("debug", "tiny", "37m", "184m", "3b", "7b"), with field overrides.

    Example: `preset_config("debug", mem_layers=[0, 1])`; overrides set to None are ignored.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return FoTConfig(**fields)

"""fotlab.model: FoT / LongLLaMA models in PyTorch + transformers (no ray / mlflow imports).

`from fotlab.model import FoTConfig, FoTForCausalLM, preset_config`. Importing registers model_type "fot" with
AutoConfig / AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(fotlab_dir)` needs no remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from fotlab.model.cache import FoTCache
from fotlab.model.configuration import FoTConfig
from fotlab.model.layers import MemoryMassProbe
from fotlab.model.memory import FoTMemory, LayerMemory
from fotlab.model.modeling import FoTCausalLMOutput, FoTForCausalLM, FoTModel
from fotlab.model.presets import PRESETS, preset_config

AutoConfig.register("fot", FoTConfig, exist_ok=True)
AutoModelForCausalLM.register(FoTConfig, FoTForCausalLM, exist_ok=True)

__all__ = [
    "FoTCache",
    "FoTCausalLMOutput",
    "FoTConfig",
    "FoTForCausalLM",
    "FoTMemory",
    "FoTModel",
    "LayerMemory",
    "MemoryMassProbe",
    "PRESETS",
    "preset_config",
]

"""Loading FoT models from fotlab, LongLLaMA and HF LLaMA directories (ARCHITECTURE "Public contracts").

Design choices:
- fotlab directories (config.json model_type "fot") go through transformers' own `from_pretrained`.
- LongLLaMA ("longllama") and HF LLaMA ("llama") directories: the config dict becomes a `FoTConfig` (plus the
  caller's overrides, e.g. `mem_layers=[...]`), the model is built on the meta device and the weights are loaded
  with `assign=True` from `*.safetensors` or `pytorch_model*.bin` (`torch.load(weights_only=True)`), sharded
  (index json) or not. Key names are HF LLaMA's, so no renaming; stale RoPE buffers (`rotary_emb.inv_freq`) are
  dropped (fotlab computes RoPE tables on the fly).
- Any keyword that is a FoTConfig field is a config override; the rest go to transformers' `from_pretrained`.
- No code shipped with a model ever runs: `trust_remote_code=True` is refused, and so is a fotlab (or unknown)
  directory whose config asks for custom code (`auto_map`, `trust_remote_code`). A LongLLaMA directory's
  `auto_map` names its own modelling files; they are not used (fotlab's classes load its weights), so it passes.
  A `model_type` fotlab cannot load is refused with one line instead of a config built from foreign fields.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from fotlab.errors import RemoteCodeError, check_no_remote_code
from fotlab.model.configuration import FoTConfig

FOREIGN_MODEL_TYPES = ("longllama", "llama")
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def _config_fields() -> set[str]:
    names = set(inspect.signature(FoTConfig.__init__).parameters) - {"self", "kwargs"}
    return names | {"rope_parameters", "rope_scaling", "attention_bias", "mlp_bias"}


def split_overrides(kwargs: dict) -> tuple[dict, dict]:
    """(config overrides, remaining loader kwargs)."""
    fields = _config_fields()
    overrides = {k: kwargs[k] for k in kwargs if k in fields}
    return overrides, {k: v for k, v in kwargs.items() if k not in fields}


def fot_config_from_dict(config_dict: dict, **overrides) -> FoTConfig:
    """A FoTConfig from a fotlab / LongLLaMA / HF LLaMA config dict, with field overrides."""
    merged = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map", "architectures")}
    merged.update(overrides)
    for flag in ("attention_bias", "mlp_bias"):
        if merged.pop(flag, False):
            raise ValueError(f"LLaMA checkpoints with {flag}=True are not supported by FoTConfig")
    merged.pop("transformers_version", None)
    return FoTConfig(**merged)


def load_pretrained(cls, path, *args, **kwargs) -> PreTrainedModel:
    """`cls.from_pretrained` for fotlab, LongLLaMA and HF LLaMA directories (see module docstring)."""
    overrides, kwargs = split_overrides(kwargs)
    if kwargs.pop("trust_remote_code", False):
        raise RemoteCodeError(f"{path}: trust_remote_code=True is refused; fotlab never runs code shipped with a model")
    config = kwargs.pop("config", None)
    if config is None:
        config_dict, _ = PretrainedConfig.get_config_dict(str(path))
        model_type = config_dict.get("model_type", "fot")
        if model_type not in FOREIGN_MODEL_TYPES:
            check_no_remote_code(path)
        if model_type not in ("fot", *FOREIGN_MODEL_TYPES):
            raise ValueError(f"{path}: model_type {model_type!r} is not one fotlab loads (fot, longllama, llama)")
        config = fot_config_from_dict(config_dict, **overrides)
    else:
        model_type = "fot"
        config = fot_config_from_dict(config.to_dict(), **overrides) if overrides else config
    if model_type in FOREIGN_MODEL_TYPES and Path(path).is_dir():
        return load_foreign_dir(cls, Path(path), config, dtype=kwargs.pop("dtype", kwargs.pop("torch_dtype", None)))
    return PreTrainedModel.from_pretrained.__func__(cls, path, *args, config=config, **kwargs)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir: *.safetensors or pytorch_model*.bin, sharded (index json) or not."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        if (path / index_name).exists():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(str(path / shard)).items()}
    files = sorted(path.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    if (path / "pytorch_model.bin").exists():
        return _load_bin(str(path / "pytorch_model.bin"))
    raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model.bin weights")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def load_foreign_dir(cls, path: Path, config: FoTConfig, dtype=None) -> PreTrainedModel:
    """Build `cls(config)` on the meta device and assign the checkpoint's LLaMA-named weights."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype) if dtype != "auto" else None
    state = {k: v for k, v in read_state_dict(path).items() if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or torch.float32
    state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = dtype
    return model.eval()

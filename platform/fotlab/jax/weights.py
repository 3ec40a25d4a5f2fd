"""Weights interchange between the JAX model and fotlab's model directory format (safetensors, HF LLaMA names).

    python -c "from fotlab.jax.weights import load_model_dir; c, p, d = load_model_dir('runs/x/model'); print(c)"

Design choices:
- `load_model_dir` reads every directory `FoTForCausalLM.from_pretrained` reads (fotlab "fot", LongLLaMA
  "longllama", HF "llama"): the config goes through fotlab's own `fot_config_from_dict` (same overrides, same
  errors), weights are read from *.safetensors with safetensors' flax reader (bf16 included) or, for
  `pytorch_model*.bin` directories, through fotlab's `read_state_dict` (torch.load(weights_only=True)).
  Both pull torch/transformers in lazily, only while loading.
- `save_model_dir` writes `config.json` (FoTConfig.save_pretrained, model_type "fot") and one `model.safetensors`
  with HF names and metadata format "pt" (what transformers expects), tied lm_head omitted: a directory that
  `FoTForCausalLM.from_pretrained` loads, so evaluations, registration and HF export work unchanged.
- Renaming: `a.b.3.c.weight` <-> params["a"]["b_3"]["c"]["kernel"] with Linear weights transposed; norms keep
  `weight`; the embedding table is `embedding`. Stale RoPE buffers (`rotary_emb.inv_freq`) are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fotlab.jax.model import JaxFoTConfig

_IGNORED = ("rotary_emb.inv_freq",)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _param_path(key: str) -> tuple[tuple[str, ...], bool]:
    """HF key -> (param tree path, transpose?)."""
    if key == "model.embed_tokens.weight":
        return ("model", "embed_tokens", "embedding"), False
    if key == "model.norm.weight":
        return ("model", "norm", "weight"), False
    if key == "lm_head.weight":
        return ("lm_head", "kernel"), True
    match = _LAYER.match(key)
    if not match:
        raise ValueError(f"unexpected weight name {key!r}")
    parts = match.group(2).split(".")  # e.g. self_attn q_proj weight | input_layernorm weight
    if parts[-2].endswith("layernorm"):
        return ("model", f"layers_{match.group(1)}", parts[-2], "weight"), False
    return ("model", f"layers_{match.group(1)}", *parts[:-1], "kernel"), True


def params_from_state_dict(state: dict, dtype=jnp.float32) -> dict:
    """HF-named tensors (numpy / jax arrays) -> the JAX parameter tree in `dtype`."""
    params: dict = {}
    for key, value in state.items():
        if key.endswith(_IGNORED):
            continue
        path, transpose = _param_path(key)
        array = jnp.asarray(value).astype(dtype)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array.T if transpose else array
    return params


def state_dict_from_params(params: dict, tie_word_embeddings: bool = False) -> dict[str, np.ndarray]:
    """The JAX parameter tree -> HF-named float32 numpy arrays (lm_head omitted when tied)."""
    out = {}

    def walk(node, path):
        for name, child in node.items():
            if isinstance(child, dict):
                walk(child, (*path, name))
                continue
            array = np.asarray(jnp.asarray(child, jnp.float32))
            parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
            if name == "kernel":
                out[".".join((*parts, "weight"))] = np.ascontiguousarray(array.T)
            else:  # norm weight / embedding table
                out[".".join((*parts, "weight"))] = array

    walk(params, ())
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _check_complete(params: dict, config: JaxFoTConfig, path: Path) -> None:
    import jax

    from fotlab.jax.model import init_params

    expected = jax.eval_shape(lambda: init_params(config))
    want = {"/".join(str(k.key) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {"/".join(str(k.key) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        unexpected = sorted(set(have) - set(want))[:5]
        bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]
        raise ValueError(
            f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}, wrong shape {bad}"
        )


def read_tensors(path: Path) -> dict:
    """HF-named arrays of a checkpoint dir (*.safetensors via safetensors.flax; .bin via fotlab's torch reader)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.flax import load_file

        return {k: v for f in files for k, v in load_file(str(f)).items()}
    from fotlab.model.loading import read_state_dict  # torch.load(weights_only=True)

    return {k: v.float().numpy() for k, v in read_state_dict(path).items()}


def load_model_dir(path, **overrides) -> tuple[JaxFoTConfig, dict, dict]:
    """(JaxFoTConfig, float32 params, FoTConfig dict) of a fotlab / LongLLaMA / HF LLaMA directory.

    overrides: FoTConfig fields (e.g. mem_layers=[...], last_context_length=...), as `from_pretrained` takes."""
    from transformers import PretrainedConfig

    from fotlab.model.loading import fot_config_from_dict

    path = Path(path)
    raw, _ = PretrainedConfig.get_config_dict(str(path))
    fot_config = fot_config_from_dict(raw, **overrides)
    config_dict = fot_config.to_dict()
    config = JaxFoTConfig.from_dict(config_dict)
    params = params_from_state_dict(read_tensors(path))
    if config.tie_word_embeddings:
        params.pop("lm_head", None)
    _check_complete(params, config, path)
    return config, params, config_dict


def save_model_dir(path, params: dict, config_dict: dict) -> Path:
    """Write a fotlab model directory (config.json + model.safetensors) that FoTForCausalLM.from_pretrained loads."""
    from safetensors.numpy import save_file

    from fotlab.model.configuration import FoTConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "transformers_version")}
    fot_config = FoTConfig(**fields)
    fot_config.architectures = ["FoTForCausalLM"]
    fot_config.save_pretrained(str(path))
    state = state_dict_from_params(params, fot_config.tie_word_embeddings)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    json.loads((path / "config.json").read_text())  # written and parseable
    return path

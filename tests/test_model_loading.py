"""Loading: fotlab dirs (save/load round-trip, AutoModelForCausalLM), LongLLaMA dirs, HF LLaMA dirs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fotlab.model import FoTConfig, FoTForCausalLM, preset_config


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FoTForCausalLM(
        preset_config("debug", num_key_value_heads=2, mem_positionals=False, mem_attention_grouping=(2, 16))
    ).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "fot"
    ids = torch.randint(0, 512, (2, 100))
    ref = logits(model, ids)
    for loaded in (FoTForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, FoTForCausalLM)
        assert loaded.config.mem_positionals is False and loaded.config.num_key_value_heads == 2
        assert torch.equal(logits(loaded, ids), ref)
    override = FoTForCausalLM.from_pretrained(tmp_path, last_context_length=100)
    assert override.config.last_context_length == 100
    assert logits(override, ids).shape == ref.shape


def write_longllama_dir(path, model: FoTForCausalLM, sharded: bool):
    """A LongLLaMA-style checkpoint dir: its config fields and torch.save'd state dict(s) with LLaMA key names."""
    cfg = model.config
    config = {
        "architectures": ["LongLlamaForCausalLM"],
        "model_type": "longllama",
        "auto_map": {"AutoConfig": "configuration_longllama.LongLlamaConfig"},
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "mem_layers": cfg.mem_layers,
        "mem_dtype": "bfloat16",
        "mem_positionals": True,
        "mem_attention_grouping": [4, 128],
        "last_context_length": cfg.last_context_length,
        "torch_attention": False,
        "gradient_checkpoint_every_ith": 1,
        "transformers_version": "4.33.2",
    }
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # stale buffer of old checkpoints
    if not sharded:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_load_longllama_dir(tmp_path):
    torch.manual_seed(1)
    source = FoTForCausalLM(preset_config("debug", rope_theta=1e4)).eval()
    ids = torch.randint(0, 512, (1, 90))
    ref = logits(source, ids)
    for sharded in (False, True):
        path = tmp_path / f"longllama_{sharded}"
        write_longllama_dir(path, source, sharded)
        loaded = FoTForCausalLM.from_pretrained(path)
        assert loaded.config.mem_layers == source.config.mem_layers
        assert loaded.config.mem_attention_grouping == (4, 128)
        assert loaded.config.torch_attention is False
        assert torch.equal(logits(loaded, ids), ref)
    bf16 = FoTForCausalLM.from_pretrained(tmp_path / "longllama_False", dtype=torch.bfloat16, mem_layers=[0])
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and bf16.config.mem_layers == [0]


def test_load_hf_llama_dir_with_mem_layers(tmp_path):
    torch.manual_seed(2)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
        )
    ).eval()
    llama.save_pretrained(tmp_path)
    model = FoTForCausalLM.from_pretrained(tmp_path, mem_layers=[1, 2], last_context_length=16)
    assert isinstance(model.config, FoTConfig)
    assert model.config.mem_layers == [1, 2] and model.config.rope_theta == 2000.0
    assert model.config.num_key_value_heads == 2
    ids = torch.randint(0, 300, (2, 16))
    assert (logits(model, ids) - logits(llama, ids)).abs().max().item() <= 1e-5
    long_ids = torch.randint(0, 300, (2, 80))
    out = model(long_ids)
    assert out.memory.n_tokens == 64 and out.memory.get(1) is not None and out.memory.get(0) is None
    model.save_pretrained(tmp_path / "fot")
    saved = load_file(str(tmp_path / "fot" / "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.weight" in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fot")
    assert again.config.mem_layers == [1, 2]
    assert torch.equal(logits(again, long_ids), logits(model, long_ids))


def one_line_error(error_type, fn, *args, **kwargs) -> str:
    """Call fn expecting `error_type`; return its message after checking it is one line."""
    with pytest.raises(error_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(hidden_act="gelu"), ["hidden_act", "'gelu'"]),
        (dict(mem_dtype="int8"), ["mem_dtype", "'int8'"]),
        (dict(mem_retrieval="knn"), ["mem_retrieval", "'knn'"]),
        (dict(num_attention_heads=4, num_key_value_heads=3), ["num_attention_heads 4", "kv heads 3"]),
        (dict(num_hidden_layers=2, mem_layers=[1, 2]), ["mem_layers [2]", "2 layers"]),
    ],
)
def test_fot_config_errors_name_the_field(fields, words):
    message = one_line_error(ValueError, FoTConfig, **fields)
    assert all(w in message for w in words), message


def test_unknown_preset_is_named():
    message = one_line_error(ValueError, preset_config, "huge")
    assert "'huge'" in message and "debug" in message


def _llama_dir(path, **config):
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            **config,
        )
    ).save_pretrained(path)
    return path


def test_loading_errors_name_the_directory_and_what_is_wrong(tmp_path):
    biased = _llama_dir(tmp_path / "biased", attention_bias=True)
    assert "attention_bias=True" in one_line_error(ValueError, FoTForCausalLM.from_pretrained, biased)
    no_weights = _llama_dir(tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    message = one_line_error(FileNotFoundError, FoTForCausalLM.from_pretrained, no_weights)
    assert str(no_weights) in message and "no *.safetensors or pytorch_model.bin" in message
    partial = _llama_dir(tmp_path / "partial")
    state = load_file(str(partial / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(partial / "model.safetensors"))
    message = one_line_error(ValueError, FoTForCausalLM.from_pretrained, partial)
    assert str(partial) in message and "missing ['model.layers.0.mlp.up_proj.weight']" in message

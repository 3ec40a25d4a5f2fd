"""JAX FoT model vs the PyTorch FoTForCausalLM with the same weights (fp32, CPU).

Tolerance: logits agree to 1e-4 absolute (logits are O(1); fp32 summation order differs between XLA and torch),
losses to 1e-5 relative, gradients to 1e-4 of each tensor's largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_model_loading import write_longllama_dir
from transformers import LlamaConfig, LlamaForCausalLM

from fotlab.jax.crossbatch import JaxCrossBatch, allowed_contexts
from fotlab.jax.model import JaxFoTConfig, forward_long, token_ce_sum
from fotlab.jax.weights import load_model_dir, params_from_state_dict, save_model_dir, state_dict_from_params
from fotlab.model import FoTForCausalLM, preset_config
from fotlab.model.crossbatch import CrossBatch
from fotlab.model.crossbatch import allowed_contexts as torch_allowed
from fotlab.train.steps import token_ce_sum as torch_ce_sum

jax.config.update("jax_platforms", "cpu")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
LOGIT_ATOL = 1e-4


def torch_model(seed=0, **overrides) -> FoTForCausalLM:
    torch.manual_seed(seed)
    return FoTForCausalLM(preset_config("debug", **overrides)).eval()


def to_jax(model: FoTForCausalLM):
    config = JaxFoTConfig.from_dict(model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return config, params_from_state_dict(state)


def torch_logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask), **kwargs)
    return out.logits.numpy()


@pytest.fixture(scope="module")
def debug_pair():
    model = torch_model()
    return model, *to_jax(model)


def test_short_input_equals_torch(debug_pair):
    model, config, params = debug_pair
    ids = np.random.default_rng(0).integers(0, 512, (2, 30))
    got, memory = forward_long(params, config, ids)
    assert memory == {}
    np.testing.assert_allclose(np.asarray(got), torch_logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_long_input_windows_and_memory_equal_torch(debug_pair):
    """L = 200 with W 64, last_context_length 32: windows 64, 64, 40 go to memory (bf16), the last 32 stay local."""
    model, config, params = debug_pair
    ids = np.random.default_rng(1).integers(0, 512, (2, 200))
    got, memory = forward_long(params, config, ids)
    ref = torch_logits(model, ids)
    np.testing.assert_allclose(np.asarray(got), ref, atol=LOGIT_ATOL, rtol=0)
    keys, values, valid = memory[1]
    assert keys.shape == (2, 4, 168, 16) and keys.dtype == jnp.bfloat16 and bool(valid.all())
    no_memory, _ = forward_long(params, config, ids, last_context_length=200)  # one segment, no memory
    assert np.abs(np.asarray(no_memory)[:, -32:] - ref[:, -32:]).max() > 1e-3  # memory changed the logits


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=2, mem_dtype="float32"),
        dict(mem_positionals=False, tie_word_embeddings=True),
        dict(mem_layers=[0, 1], rope_theta=500.0),
    ],
)
def test_variants_with_padding_equal_torch(overrides):
    """GQA, fp32 memory, no memory positionals, tied embeddings, two memory layers; left padding + a mid pad."""
    model = torch_model(seed=3, **overrides)
    config, params = to_jax(model)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 512, (2, 150))
    mask = np.ones((2, 150), dtype=np.int64)
    mask[0, :10] = 0
    mask[1, 64] = 0  # a padded token at a window start
    got, _ = forward_long(params, config, ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(got), torch_logits(model, ids, mask), atol=LOGIT_ATOL, rtol=0)


def test_longllama_dir_gives_torch_logits(tmp_path):
    source = torch_model(seed=4, rope_theta=1e4)
    write_longllama_dir(tmp_path / "ll", source, sharded=True)
    config, params, config_dict = load_model_dir(tmp_path / "ll")
    assert config.mem_layers == (1,) and list(config_dict["mem_attention_grouping"]) == [4, 128]
    loaded = FoTForCausalLM.from_pretrained(tmp_path / "ll")
    ids = np.random.default_rng(3).integers(0, 512, (1, 140))
    got, _ = forward_long(params, config, ids)
    np.testing.assert_allclose(np.asarray(got), torch_logits(loaded, ids), atol=LOGIT_ATOL, rtol=0)


def test_hf_llama_dir_and_save_round_trip(tmp_path):
    """An HF LLaMA dir loads with mem_layers overrides; the JAX save loads in FoTForCausalLM with equal logits."""
    torch.manual_seed(5)
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
    llama.save_pretrained(tmp_path / "hf")
    config, params, config_dict = load_model_dir(tmp_path / "hf", mem_layers=[1, 2], last_context_length=16)
    assert config.mem_layers == (1, 2) and config.num_key_value_heads == 2 and config.rope_theta == 2000.0
    short = np.random.default_rng(4).integers(0, 300, (2, 16))
    np.testing.assert_allclose(
        np.asarray(forward_long(params, config, short)[0]), torch_logits(llama, short), atol=LOGIT_ATOL, rtol=0
    )
    save_model_dir(tmp_path / "model", params, config_dict)
    reloaded = FoTForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.mem_layers == [1, 2] and reloaded.config.last_context_length == 16
    ids = np.random.default_rng(5).integers(0, 300, (2, 100))
    np.testing.assert_allclose(
        np.asarray(forward_long(params, config, ids)[0]), torch_logits(reloaded, ids), atol=LOGIT_ATOL, rtol=0
    )
    again = state_dict_from_params(load_model_dir(tmp_path / "model")[1])
    assert all(np.array_equal(again[k], v.numpy()) for k, v in reloaded.state_dict().items())


def test_jax_package_imports_no_torch_ray_or_mlflow():
    """ARCHITECTURE: fotlab.jax imports nothing from torch at module level (nor Ray / MLflow / transformers)."""
    import subprocess
    import sys

    code = (
        "import sys, fotlab.jax.model, fotlab.jax.train, fotlab.jax.weights, fotlab.jax.steps; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'mlflow', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_allowed_contexts_match_torch():
    for B, n, k, stepping in [(8, 4, 4, True), (8, 7, 4, True), (6, 3, 2, False), (4, 9, 1, True)]:
        assert allowed_contexts(B, n, k, stepping).tolist() == torch_allowed(B, n, k, stepping).tolist()


@pytest.mark.parametrize("cb", [CrossBatch(range=3, packing=4, stepping=True), CrossBatch(range=6, packing=2)])
def test_crossbatch_loss_and_gradients_equal_torch(cb):
    """One training batch (B 8, T 32, some ignored targets): CE loss and every parameter gradient."""
    model = torch_model(seed=6, num_key_value_heads=2).train()
    config, params = to_jax(model)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 512, (8, 32))
    targets = rng.integers(0, 512, (8, 32))
    targets[:, :3] = -100
    t_ids, t_targets = torch.as_tensor(ids), torch.as_tensor(targets)
    n_loss = int((targets != -100).sum())
    torch_loss = torch_ce_sum(model(t_ids, crossbatch=cb).logits, t_targets) / n_loss
    torch_loss.backward()
    torch_loss = torch_loss.item()
    jcb = JaxCrossBatch.from_torch(cb)

    def loss_fn(p):
        from fotlab.jax.model import FoTLM

        logits, _ = FoTLM(config).apply({"params": p}, jnp.asarray(ids), None, None, jcb)
        total, count = token_ce_sum(logits, jnp.asarray(targets))
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert float(loss) == pytest.approx(float(torch_loss), rel=1e-5)
    with torch.no_grad():  # the crossbatch contexts really change the loss
        plain = torch_ce_sum(model(t_ids, crossbatch=CrossBatch(range=0)).logits, t_targets) / n_loss
    assert abs(float(plain) - float(torch_loss)) > 1e-4
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    jax_grads = state_dict_from_params(grads)
    assert set(jax_grads) == set(torch_grads)
    for name, ref in torch_grads.items():
        err = np.abs(jax_grads[name] - ref).max()
        assert err <= 1e-4 * max(np.abs(ref).max(), 1e-6), name

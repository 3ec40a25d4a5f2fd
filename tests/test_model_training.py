"""Training-side behaviour: gradient checkpointing keeps memory gradients exact, crossbatch hook, imports."""

import subprocess
import sys

import pytest
import torch

from fotlab.model import FoTForCausalLM, preset_config


def grads_of(model, ids, checkpointing: bool):
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    out = model(ids, labels=ids)  # first windows go to (differentiable) memory, the rest is local
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_keeps_memory_gradients_exact():
    torch.manual_seed(0)
    model = FoTForCausalLM(
        preset_config("debug", max_position_embeddings=16, last_context_length=16, mem_dtype="float32")
    )
    ids = torch.randint(0, 512, (2, 48))  # 2 windows into memory + 16 local tokens
    loss_plain, plain = grads_of(model, ids, checkpointing=False)
    loss_ckpt, ckpt = grads_of(model, ids, checkpointing=True)
    assert model.model.gradient_checkpointing
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in plain.items():
        assert torch.allclose(grad, ckpt[name], atol=1e-6, rtol=1e-5), name
    # the memory path really carries gradient: cutting it (detached memory) changes the gradients
    model.gradient_checkpointing_disable()
    model.zero_grad()
    first = model(ids[:, :32], last_context_length=0)
    out = model(ids[:, 32:], memory=first.memory.detach(), labels=ids[:, 32:])
    out.loss.backward()
    q_grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert not torch.allclose(q_grad, plain["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)


def test_differentiable_memory_gradient_reaches_first_window():
    torch.manual_seed(1)
    model = FoTForCausalLM(preset_config("debug", max_position_embeddings=16, last_context_length=16)).train()
    ids = torch.randint(0, 512, (1, 32))
    embeds_grad = []
    hook = model.model.embed_tokens.weight.register_hook(lambda g: embeds_grad.append(g))
    labels = torch.full_like(ids, -100)
    labels[:, 20:] = ids[:, 20:]  # loss only on local tokens
    model(ids, labels=labels).loss.backward()
    hook.remove()
    first_window_rows = embeds_grad[0][ids[0, :16]].abs().sum()
    assert first_window_rows > 0  # gradient flows from local tokens through memory into the first window


def test_crossbatch_range_zero_is_plain_causal():
    from fotlab.model.crossbatch import CrossBatch

    torch.manual_seed(2)
    model = FoTForCausalLM(preset_config("debug")).eval()
    ids = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        plain = model(ids).logits
        zero = model(ids, crossbatch=CrossBatch(range=0)).logits
        cross = model(ids, crossbatch=CrossBatch(range=1))
    assert torch.allclose(plain, zero, atol=1e-5)
    assert torch.allclose(cross.logits[0], plain[0], atol=1e-5)  # entry 0 has no earlier entry to see
    assert not torch.allclose(cross.logits[1], plain[1], atol=1e-4)
    assert cross.memory.n_tokens == 0
    with pytest.raises(ValueError):
        model(torch.randint(0, 512, (2, 65)), crossbatch=CrossBatch(range=1))


def test_import_does_not_pull_ray_or_mlflow():
    code = (
        "import sys, fotlab.model; bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_64k_prompt_through_tiny_preset():
    torch.manual_seed(3)
    model = FoTForCausalLM(preset_config("tiny")).eval()
    ids = torch.randint(0, 512, (1, 65536))
    with torch.no_grad():  # one torch thread (conftest)
        out = model(ids, logits_to_keep=1)
    assert out.logits.shape == (1, 1, 512) and torch.isfinite(out.logits).all()
    assert out.memory.n_tokens == 65536 - model.config.last_context_length


def test_bfloat16_model_forward_and_generate():
    torch.manual_seed(4)
    model = FoTForCausalLM(preset_config("debug", num_key_value_heads=2)).to(torch.bfloat16).eval()
    ids = torch.randint(1, 512, (2, 100))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    layer = model.config.mem_layers[0]
    assert out.memory[layer].keys.dtype == torch.bfloat16
    gen = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)  # crosses a flush
    assert gen.shape == (2, 140)


def test_checkpoint_every_ith_layer_same_gradients():
    torch.manual_seed(6)
    model = FoTForCausalLM(
        preset_config("debug", max_position_embeddings=16, last_context_length=16, gradient_checkpoint_every_ith=2)
    )
    ids = torch.randint(0, 512, (1, 40))
    _, plain = grads_of(model, ids, checkpointing=False)
    _, ckpt = grads_of(model, ids, checkpointing=True)
    for name, grad in plain.items():
        assert torch.allclose(grad, ckpt[name], atol=1e-6, rtol=1e-5), name


def test_crossbatch_training_view_equals_inference_with_memory():
    """FoT trains what it later runs: entry b seeing entry b-1 (the previous chunk of its document) through
    crossbatch gives the same logits as reading that chunk into memory first and then the chunk itself."""
    from fotlab.model.crossbatch import CrossBatch

    torch.manual_seed(4)
    config = preset_config("debug", mem_dtype="float32")  # bf16 memory would round the stored keys
    model = FoTForCausalLM(config).eval()
    T = config.last_context_length
    doc = torch.randint(0, config.vocab_size, (1, 2 * T))
    with torch.no_grad():
        train_view = model(doc.view(2, T), crossbatch=CrossBatch(range=1, packing=2)).logits[1]
        inference = model(doc, last_context_length=T)
    assert inference.memory.n_tokens == T  # the first chunk went to memory, the second stayed local
    torch.testing.assert_close(train_view, inference.logits[0, T:], atol=1e-5, rtol=1e-5)

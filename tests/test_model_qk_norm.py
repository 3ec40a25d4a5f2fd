"""The paper's QK-normalisation variant (FOT_SPEC §1.3): cosine attention logits times a learnable per-head
temperature, in local, memory and crossbatch attention alike."""

import torch
import torch.nn.functional as F

from fotlab.model import FoTForCausalLM, preset_config
from fotlab.model.crossbatch import CrossBatch


def _model(**overrides):
    torch.manual_seed(5)
    return FoTForCausalLM(preset_config("debug", qk_norm=True, mem_dtype="float32", **overrides)).eval()


def test_logits_depend_on_directions_only():
    model = _model()
    ids = torch.randint(0, 512, (1, 48))
    with torch.no_grad():
        before = model(ids, last_context_length=16).logits  # 32 tokens into memory, then 16 local
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)  # cosines do not change
            layer.self_attn.k_proj.weight.mul_(0.25)
        after = model(ids, last_context_length=16).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_attention_logit_is_temperature_times_cosine():
    model = _model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.qk_temperature.copy_(torch.arange(1.0, attn.n_heads + 1).view(-1, 1, 1))
        x = torch.randn(1, 6, model.config.hidden_size)
        q, k, _, _, _ = attn.project(x, None)
        q_raw = attn.q_proj(x).view(1, 6, attn.n_heads, attn.head_dim).transpose(1, 2)
        k_raw = attn.k_proj(x).view(1, 6, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        cos = F.normalize(q_raw, dim=-1) @ F.normalize(k_raw, dim=-1).transpose(-1, -2)  # (1, H, 6, 6)
        logits = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5
    torch.testing.assert_close(logits, attn.qk_temperature * cos, atol=1e-5, rtol=1e-5)
    assert torch.allclose(k.norm(dim=-1), torch.ones(1, attn.n_kv_heads, 6))


def test_crossbatch_view_equals_inference_and_temperature_learns(tmp_path):
    model = _model()
    T = model.config.last_context_length
    doc = torch.randint(0, 512, (1, 2 * T))
    with torch.no_grad():
        train_view = model(doc.view(2, T), crossbatch=CrossBatch(range=1, packing=2)).logits[1]
        inference = model(doc, last_context_length=T).logits[0, T:]
    torch.testing.assert_close(train_view, inference, atol=1e-5, rtol=1e-5)
    model.train()
    out = model(doc.view(2, T), labels=doc.view(2, T), crossbatch=CrossBatch(range=1, packing=2))
    out.loss.backward()
    assert all(layer.self_attn.qk_temperature.grad.abs().sum() > 0 for layer in model.model.layers)
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:  # trained temperatures must survive save / load
            layer.self_attn.qk_temperature.uniform_(2.0, 20.0)
        expected = model(doc, last_context_length=T).logits
    model.save_pretrained(tmp_path)
    loaded = FoTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm
    with torch.no_grad():
        torch.testing.assert_close(loaded(doc, last_context_length=T).logits, expected, atol=1e-5, rtol=1e-5)


def test_spec_field_builds_a_qk_norm_model():
    from fotlab.spec import model_overrides, parse_spec

    spec = parse_spec({"name": "qk", "model": {"preset": "debug", "qk_norm": True}})
    assert model_overrides(spec)["qk_norm"] is True
    assert preset_config("debug", **model_overrides(spec)).qk_norm
    assert not preset_config("debug").qk_norm

"""FoT == HF LlamaForCausalLM (same weights) whenever the whole input stays local (L <= last_context_length)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fotlab.model import FoTForCausalLM, preset_config


def build_pair(n_kv_heads=4, mem_layers=(1,), **overrides):
    config = preset_config(
        "debug", num_key_value_heads=n_kv_heads, mem_layers=list(mem_layers), rope_theta=500.0, **overrides
    )
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config).eval()
    fot = FoTForCausalLM(config).eval()
    fot.load_state_dict(llama.state_dict(), strict=True)
    return fot, llama


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_logits_equal_llama_when_input_is_local(n_kv_heads):
    fot, llama = build_pair(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, fot.config.vocab_size, (2, fot.config.last_context_length))
    with torch.no_grad():
        ours, ref = fot(ids).logits, llama(ids).logits
    assert ours.shape == ref.shape == (2, ids.shape[1], fot.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_last_context_length_override_keeps_long_input_local():
    fot, llama = build_pair()
    ids = torch.randint(0, fot.config.vocab_size, (1, 100))  # > W = 64 and > default last_context_length = 32
    with torch.no_grad():
        split = fot(ids)
        local = fot(ids, last_context_length=100)
        ref = llama(ids).logits
    assert split.memory.n_tokens == 100 - 32  # default: the prefix went to memory
    assert (split.logits - ref).abs().max().item() > 1e-3  # ...so it is no longer vanilla LLaMA
    assert local.memory.n_tokens == 0
    assert (local.logits - ref).abs().max().item() <= 1e-5


def test_left_padded_batch_equals_rows_alone():
    fot, llama = build_pair(n_kv_heads=2)
    lengths = [30, 19, 7]
    L = max(lengths)
    rows = [torch.randint(1, fot.config.vocab_size, (1, n)) for n in lengths]
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, L - row.shape[1] :] = row
        mask[b, L - row.shape[1] :] = 1
    with torch.no_grad():
        batch = fot(ids, attention_mask=mask).logits
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ref_batch = llama(ids, attention_mask=mask, position_ids=position_ids).logits
        for b, row in enumerate(rows):
            alone = fot(row).logits[0]
            n = row.shape[1]
            assert (batch[b, L - n :] - alone).abs().max().item() <= 1e-5
            assert (batch[b, L - n :] - ref_batch[b, L - n :]).abs().max().item() <= 1e-5
    assert torch.isfinite(batch).all()


def test_logits_to_keep_and_loss():
    fot, llama = build_pair()
    ids = torch.randint(0, fot.config.vocab_size, (2, 90))
    with torch.no_grad():
        full = fot(ids, labels=ids)
        last = fot(ids, logits_to_keep=5)
        short = ids[:, :30]
        ours_loss, ref_loss = fot(short, labels=short).loss, llama(short, labels=short).loss
    assert last.logits.shape == (2, 5, fot.config.vocab_size)
    assert torch.allclose(last.logits, full.logits[:, -5:], atol=1e-6)
    manual = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].reshape(-1, fot.config.vocab_size), ids[:, 1:].reshape(-1)
    )
    assert torch.allclose(full.loss, manual, atol=1e-6)
    assert abs(ours_loss.item() - ref_loss.item()) <= 1e-5

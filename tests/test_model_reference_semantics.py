"""Semantic facts found by checking fotlab against the public LongLLaMA code on tiny random checkpoints.

Each test encodes one fact against a brute-force computation written here (no reference code needed).

Fact 1 (positions with a masked first local key): inside a window, RoPE positions are the HF positions
`cumsum(attention_mask) - 1` taken relative to the window's FIRST LOCAL KEY, padding included. When that first key is
masked (a mid-sequence pad at a window start, or left padding), the first real token after it is at position 1,
not 0. Local attention cannot see the difference (RoPE scores depend on relative positions only), but memory keys
are unrotated, so once memory holds real tokens the absolute query position changes the logits.
"""

import math

import torch
import torch.nn.functional as F

from fotlab.model import FoTForCausalLM, preset_config


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, pos, theta):
    """x (T, Dh) rotated at integer positions pos (T,), rotate_half layout."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2).float() / dh)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return x * cos + torch.cat([-x[:, dh // 2 :], x[:, : dh // 2]], -1) * sin


def _attend(q, k, v, visible, mem_k, mem_v):
    """One head: q (T, Dh), local k/v (S, Dh), visible (T, S) bool, memory (M, Dh) -> (T, Dh), one softmax."""
    scores = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~visible, -1e6)
    if mem_k is not None:
        scores = torch.cat([scores, q @ mem_k.T / math.sqrt(q.shape[-1])], dim=1)
        v = torch.cat([v, mem_v], dim=0)
    return torch.softmax(scores, -1) @ v


def brute_force_logits(model, ids, valid, last_context_length, first_real_at_zero=False):
    """One row ids (L,), valid (L,) bool -> (L, V) logits (meaningful at valid positions).

    Windows as FOT_SPEC §1.1; memory holds only valid tokens (masked slots get zero weight); RoPE positions of a
    segment = HF positions (cumsum(valid) - 1) minus that of the segment's first key. `first_real_at_zero=True`
    instead uses cumsum(valid within the segment) - 1 clamped at 0 (the rule this file guards against).
    """
    cfg, sd = model.config, {k: v.float() for k, v in model.state_dict().items()}
    H, Dh, W = cfg.num_attention_heads, cfg.head_dim, cfg.max_position_embeddings
    L = ids.shape[0]
    mem_len = max(L - last_context_length, 0)
    segments = [(s, min(s + W, mem_len)) for s in range(0, mem_len, W)] + ([(mem_len, L)] if mem_len < L else [])
    hf_pos = valid.long().cumsum(0) - 1  # (L,)
    memory = {i: (torch.zeros(H, 0, Dh), torch.zeros(H, 0, Dh)) for i in cfg.mem_layers}
    out = []
    for s, e in segments:
        T, seg_valid = e - s, valid[s:e]
        pos = (seg_valid.long().cumsum(0) - 1).clamp(min=0) if first_real_at_zero else hf_pos[s:e] - hf_pos[s]
        visible = torch.ones(T, T).tril().bool() & (seg_valid[None, :] | torch.eye(T, dtype=torch.bool))
        x = sd["model.embed_tokens.weight"][ids[s:e]]  # (T, D)
        new_kv = {}
        for li in range(cfg.num_hidden_layers):
            p = f"model.layers.{li}."
            h = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            q, k, v = ((h @ sd[p + f"self_attn.{n}_proj.weight"].T).view(T, H, Dh) for n in "qkv")
            heads = []
            for hh in range(H):
                qh, kh = _rotate(q[:, hh], pos, cfg.rope_theta), _rotate(k[:, hh], pos, cfg.rope_theta)
                mk, mv = (memory[li][0][hh], memory[li][1][hh]) if li in memory else (None, None)
                heads.append(_attend(qh, kh, v[:, hh], visible, mk, mv))
            x = x + torch.stack(heads, 1).reshape(T, H * Dh) @ sd[p + "self_attn.o_proj.weight"].T
            h = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            x = (
                x
                + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T))
                @ sd[p + "mlp.down_proj.weight"].T
            )
            if li in memory:
                new_kv[li] = (k[seg_valid].transpose(0, 1), v[seg_valid].transpose(0, 1))  # (H, T_valid, Dh)
        if e <= mem_len:
            for li, (k, v) in new_kv.items():
                memory[li] = (torch.cat([memory[li][0], k], 1), torch.cat([memory[li][1], v], 1))
        out.append(_rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ sd["lm_head.weight"].T)
    return torch.cat(out, 0)


def _model():
    torch.manual_seed(0)
    config = preset_config(
        "debug",
        vocab_size=64,
        max_position_embeddings=8,
        last_context_length=4,
        mem_layers=[0, 1],
        mem_dtype="float32",
        rope_theta=100.0,
    )
    model = FoTForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so positions visibly move the logits
        for name, param in model.named_parameters():
            param.copy_(
                1.0 + 0.3 * torch.randn_like(param) if name.endswith("norm.weight") else 0.25 * torch.randn_like(param)
            )
    return model


def test_masked_first_key_keeps_its_hf_position_when_memory_is_non_empty():
    model = _model()
    W = model.config.max_position_embeddings
    L = 3 * W + 7  # windows [0, 8), [8, 16), [16, 24), [24, 27); local segment [27, 31)
    ids = torch.randint(1, model.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, W] = valid[0, 2 * W] = valid[0, 2 * W + 1] = False  # pads opening windows 1 and 2
    valid[0, L - 4] = False  # pad opening the local segment
    valid[1, W + 3] = False  # a pad inside a window (no effect on positions of later windows)
    ids[~valid] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=valid.long()).logits  # (2, L, V)
    for b in range(2):
        expected = brute_force_logits(model, ids[b], valid[b], model.config.last_context_length)
        assert (ours[b][valid[b]] - expected[valid[b]]).abs().max().item() <= 1e-4
    other_rule = brute_force_logits(model, ids[0], valid[0], model.config.last_context_length, first_real_at_zero=True)
    assert (ours[0][valid[0]] - other_rule[valid[0]]).abs().max().item() > 1e-2  # the scenario is sensitive


def test_cached_decode_after_masked_local_start_equals_recomputation():
    """Prompt whose local segment opens with a pad (memory non-empty): each cached greedy step equals a fresh
    forward of prompt + generated tokens with the same split (everything after the prompt's memory part local)."""
    model = _model()
    W, lcl = model.config.max_position_embeddings, model.config.last_context_length
    L = 2 * W + lcl
    ids = torch.randint(1, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(2))
    ids[0, L - lcl] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        cache, steps = out.cache, []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(W - lcl):  # stay inside the local cache (no flush): the masked key stays first
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            step = model(token, attention_mask=mask, cache=cache)
            cache = step.cache
            steps.append((token, step.logits[:, -1]))
            token = step.logits[:, -1].argmax(-1, keepdim=True)
        full_ids = torch.cat([ids] + [t for t, _ in steps], 1)
        full = model(full_ids, attention_mask=mask, last_context_length=full_ids.shape[1] - 2 * W).logits
    for i, (_, logits) in enumerate(steps):
        assert (logits - full[:, L + i]).abs().max().item() <= 1e-4
    expected = brute_force_logits(model, full_ids[0], mask[0].bool(), full_ids.shape[1] - 2 * W)
    assert (full[0, -1] - expected[-1]).abs().max().item() <= 1e-4

"""Long inputs (>= 5 windows) against a slow brute-force reference written here from FOT_SPEC §1.1.

The reference loops over windows and layers with explicit per-head attention: local keys rotated at positions
restarting per window, memory keys raw k_proj outputs rounded to bf16, one fp32 softmax over local + memory.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fotlab.model import FoTForCausalLM, preset_config


def rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, pos, theta):
    """x (T, Dh) rotated at integer positions pos (T,), rotate_half layout."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2).float() / dh)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[:, dh // 2 :], x[:, : dh // 2]], -1)
    return x * cos + half * sin


def topk_keep(s_mem, mem_k, mem_v, topk, stats=None, tie_margin=1e-5):
    """(T, M) bool: the topk best memory slots of every query row of s_mem (T, M), by a plain descending sort.

    A tie at the k-th place (scores within tie_margin shared by a kept and a dropped slot) is allowed only between
    slots with identical keys and values, where any choice gives the same output (counted in stats["ties"]); any
    other near-tie makes the selection depend on rounding, so the reference refuses it (change the test input)."""
    keep = torch.zeros_like(s_mem, dtype=torch.bool)
    for t in range(s_mem.shape[0]):
        row = s_mem[t].tolist()
        order = sorted(range(len(row)), key=lambda m: -row[m])
        keep[t, order[:topk]] = True
        kth = order[topk - 1]
        boundary = [m for m in range(len(row)) if abs(row[m] - row[kth]) <= tie_margin]
        if len({bool(keep[t, m]) for m in boundary}) > 1:
            for m in boundary:
                assert torch.equal(mem_k[m], mem_k[kth]) and torch.equal(mem_v[m], mem_v[kth]), (
                    f"ambiguous top-{topk} at query {t}: slots {kth} and {m} score {row[kth]:.6f}, {row[m]:.6f}"
                )
            if stats is not None:
                stats["ties"] = stats.get("ties", 0) + 1
    return keep


def reference_logits(model, ids, last_context_length, mem_dtype=torch.bfloat16, topk=None, stats=None):
    """Brute force for one row ids (L,): returns (L, V) logits and the memory size.

    topk: per query and query head only the topk best memory keys (by inner product) join the softmax (FOT_SPEC
    §1.3 kNN retrieval); None = dense memory attention."""
    cfg, sd = model.config, {k: v.float() for k, v in model.state_dict().items()}
    H, Hkv, Dh, W = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings
    L = ids.shape[0]
    mem_len = max(L - last_context_length, 0)
    segments = [(s, min(s + W, mem_len)) for s in range(0, mem_len, W)] + ([(mem_len, L)] if mem_len < L else [])
    memory = {i: ([], []) for i in cfg.mem_layers}  # layer -> (list of raw keys (Hkv, Dh), values)
    out = []
    for s, e in segments:
        x = sd["model.embed_tokens.weight"][ids[s:e]]  # (T, D)
        T = e - s
        pos = torch.arange(T)
        new_kv = {}
        for li in range(cfg.num_hidden_layers):
            p = f"model.layers.{li}."
            h = rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, Dh)
            k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, Hkv, Dh)
            v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, Hkv, Dh)
            is_mem = li in cfg.mem_layers
            use_rope = not is_mem or cfg.mem_positionals
            heads = []
            for hh in range(H):
                g = hh // (H // Hkv)
                qh, kh, vh = q[:, hh], k[:, g], v[:, g]
                if use_rope:
                    qh, kh = rotate(qh, pos, cfg.rope_theta), rotate(kh, pos, cfg.rope_theta)
                scores = qh @ kh.T / math.sqrt(Dh)  # (T, T)
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -1e6)
                values = vh
                if is_mem and memory[li][0]:
                    mk = torch.stack([m[g] for m in memory[li][0]])  # (M, Dh)
                    mv = torch.stack([m[g] for m in memory[li][1]])
                    s_mem = qh @ mk.T / math.sqrt(Dh)  # (T, M)
                    if topk is not None and topk < mk.shape[0]:
                        s_mem = s_mem.masked_fill(~topk_keep(s_mem, mk, mv, topk, stats), -math.inf)
                    scores = torch.cat([scores, s_mem], dim=1)
                    values = torch.cat([vh, mv], dim=0)
                heads.append(torch.softmax(scores, -1) @ values)
            attn = torch.stack(heads, 1).reshape(T, H * Dh)
            x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
            h = rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
            if is_mem:
                new_kv[li] = (k.to(mem_dtype).float(), v.to(mem_dtype).float())
        if e <= mem_len:  # a window: its keys/values enter memory after all layers ran
            for li, (k, v) in new_kv.items():
                memory[li][0].extend(k.unbind(0))
                memory[li][1].extend(v.unbind(0))
        x = rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
        out.append(x @ sd["lm_head.weight"].T)
    n_mem = len(memory[cfg.mem_layers[0]][0]) if cfg.mem_layers else 0
    return torch.cat(out, 0), n_mem


@pytest.mark.parametrize("mem_positionals,n_kv_heads,mem_layers", [(True, 4, [1]), (False, 2, [0, 1])])
def test_five_windows_equal_brute_force(mem_positionals, n_kv_heads, mem_layers):
    torch.manual_seed(0)
    model = FoTForCausalLM(
        preset_config(
            "debug",
            mem_positionals=mem_positionals,
            num_key_value_heads=n_kv_heads,
            mem_layers=mem_layers,
            max_position_embeddings=8,
            last_context_length=6,
        )
    ).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5 * 8 + 6 + 3))  # 5 full windows + 3-token window + local
    with torch.no_grad():
        out = model(ids)
    for b in range(2):
        ref, n_mem = reference_logits(model, ids[b], 6)
        assert (out.logits[b] - ref).abs().max().item() <= 1e-4
    assert out.memory.n_tokens == n_mem == ids.shape[1] - 6
    assert out.cache.n_local == 6


def test_bf16_memory_rounding_matters():
    """The reference without bf16 rounding differs: the model really stores memory in bf16."""
    torch.manual_seed(1)
    model = FoTForCausalLM(preset_config("debug", max_position_embeddings=16, last_context_length=8)).eval()
    ids = torch.randint(0, model.config.vocab_size, (40,))
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
    ref_bf16, _ = reference_logits(model, ids, 8)
    ref_fp32, _ = reference_logits(model, ids, 8, mem_dtype=torch.float32)
    err_bf16 = (ours - ref_bf16).abs().max().item()
    assert err_bf16 <= 1e-4 < (ours - ref_fp32).abs().max().item()


def test_chunked_memory_passing_equals_one_call():
    """`last_context_length=0` sends everything to memory; feeding chunks with the returned memory is the same."""
    torch.manual_seed(2)
    model = FoTForCausalLM(preset_config("debug", max_position_embeddings=16)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 80))
    with torch.no_grad():
        whole = model(ids, last_context_length=0)
        memory, parts = model.new_memory(), []
        for chunk in ids.split(16, dim=1):
            out = model(chunk, memory=memory, last_context_length=0)
            memory = out.memory
            parts.append(out.logits)
    assert whole.memory.n_tokens == memory.n_tokens == 80
    assert whole.cache is None or whole.cache.n_local == 0
    assert torch.allclose(torch.cat(parts, 1), whole.logits, atol=1e-5)
    ref, _ = reference_logits(model, ids[0], 0)
    assert (whole.logits[0] - ref).abs().max().item() <= 1e-4


def test_padding_is_carried_into_memory():
    """Left padding in a multi-window input: pads stay masked in memory, so rows do not see each other's pads and
    a row's logits do not depend on the pad token ids."""
    torch.manual_seed(3)
    model = FoTForCausalLM(preset_config("debug", max_position_embeddings=16, last_context_length=8)).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, 50))
    mask = torch.ones(1, 50, dtype=torch.long)
    mask[:, :5] = 0
    other = ids.clone()
    other[:, :5] = torch.randint(1, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        a = model(ids, attention_mask=mask)
        b = model(other, attention_mask=mask)
    assert torch.allclose(a.logits[:, 5:], b.logits[:, 5:], atol=1e-6)
    layer = model.config.mem_layers[0]
    assert a.memory[layer].valid[0].tolist() == [False] * 5 + [True] * 37


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mem_retrieval="topk", mem_topk=1000),
        dict(mem_retrieval="faiss", mem_topk=1000),
        dict(mem_attention_grouping=(1, 4)),
    ],
)
def test_retrieval_and_grouping_variants_equal_dense(overrides):
    """Top-k retrieval with k >= M and (heads, queries) grouping are the dense computation (FOT_SPEC §1.3, §1.4)."""
    torch.manual_seed(5)
    dense = FoTForCausalLM(preset_config("debug", max_position_embeddings=16, last_context_length=8)).eval()
    variant = FoTForCausalLM(
        preset_config("debug", max_position_embeddings=16, last_context_length=8, **overrides)
    ).eval()
    variant.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        assert torch.allclose(variant(ids).logits, dense(ids).logits, atol=1e-4)


def retrieval_calls(monkeypatch) -> dict:
    """Count the calls of the two top-k searches (spies that call through), so a test knows which path ran: the
    torch block scan ("topk") or FAISS ("faiss"). Dense attention (k >= M, or no memory yet) calls neither."""
    import fotlab.model.memory_attention as ma

    calls = {"topk": 0, "faiss": 0}

    def counting(real, key):
        def spy(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return spy

    for name, key in (("_topk_dense_scan", "topk"), ("_faiss_scan", "faiss")):
        monkeypatch.setattr(ma, name, counting(getattr(ma, name), key))
    return calls


def topk_model(seed, retrieval, topk, **overrides):
    """A debug model with W = 8, last_context_length 6 and top-k retrieval; q and k weights scaled up 8x so that
    attention scores spread over a few units (at init they are ~0.02 apart: near-ties everywhere, top-k ~ dense)."""
    torch.manual_seed(seed)
    model = FoTForCausalLM(
        preset_config(
            "debug",
            max_position_embeddings=8,
            last_context_length=6,
            mem_retrieval=retrieval,
            mem_topk=topk,
            **overrides,
        )
    ).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


OTHER = {"topk": "faiss", "faiss": "topk"}


@pytest.mark.parametrize("retrieval", ["topk", "faiss"])
@pytest.mark.parametrize("mem_positionals,n_kv_heads,mem_layers", [(True, 4, [1]), (False, 2, [0, 1])])
def test_topk_below_memory_size_equals_brute_force(monkeypatch, retrieval, mem_positionals, n_kv_heads, mem_layers):
    """k = 3 of up to 43 memory slots (FOT_SPEC §1.3): every query and head attends to its 3 best memory keys, as the
    brute-force selection says, through the torch scan or FAISS; the result is not dense attention."""
    calls = retrieval_calls(monkeypatch)
    model = topk_model(
        0, retrieval, 3, mem_positionals=mem_positionals, num_key_value_heads=n_kv_heads, mem_layers=mem_layers
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 5 * 8 + 6 + 3))  # 5 full windows + 3-token window + local
    with torch.no_grad():
        out = model(ids)
    assert calls[retrieval] > 0 and calls[OTHER[retrieval]] == 0
    for b in range(2):
        ref, n_mem = reference_logits(model, ids[b], 6, topk=3)
        dense, _ = reference_logits(model, ids[b], 6)
        assert (out.logits[b] - ref).abs().max().item() <= 1e-4
        assert (out.logits[b, 8:] - dense[8:]).abs().max().item() > 1e-2  # windows with memory: top-3 is not dense
    assert out.memory.n_tokens == n_mem == 43


@pytest.mark.parametrize("retrieval", ["topk", "faiss"])
def test_topk_below_memory_size_in_generation_equals_brute_force(monkeypatch, retrieval):
    """Greedy generation with k = 3 < M across two local-cache flushes (FOT_SPEC §1.2): each step's scores equal the
    brute force over the tokens so far, with the memory the flushes built (16, then 24, then 32 slots)."""
    W, lcl, k = 8, 6, 3
    model = topk_model(1, retrieval, k, num_key_value_heads=2)
    prompt = torch.randint(1, 512, (2, 2 * W + lcl))  # 2 windows to memory, 6 tokens local
    n_new = 12  # the local cache grows to W, flushes, grows to W again and flushes
    calls = retrieval_calls(monkeypatch)
    with torch.no_grad():
        model(prompt)
    n_prefill, calls[retrieval] = calls[retrieval], 0
    out = model.generate(
        prompt, max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0
    )
    assert calls[retrieval] >= n_prefill + n_new - 1 and calls[OTHER[retrieval]] == 0  # every decoding step
    scores, ids = torch.stack(out.scores, 1), out.sequences  # (B, N, V), (B, P + N)
    assert torch.equal(ids[:, prompt.shape[1] :], scores.argmax(-1))
    local_start, n_flushes, max_dense_gap = 2 * W, 0, 0.0
    for step in range(n_new):
        L = prompt.shape[1] + step
        if L - local_start > W:  # the newest token would overflow the local cache: the cache moves to memory
            local_start, n_flushes = L - 1, n_flushes + 1
        for b in range(2):
            ref, n_mem = reference_logits(model, ids[b, :L], L - local_start, topk=k)
            assert n_mem == local_start
            assert (scores[b, step] - ref[-1]).abs().max().item() <= 1e-4, (step, b)
            dense, _ = reference_logits(model, ids[b, :L], L - local_start)
            max_dense_gap = max(max_dense_gap, (scores[b, step] - dense[-1]).abs().max().item())
    assert n_flushes == 2 and max_dense_gap > 1e-2


@pytest.mark.parametrize("retrieval", ["topk", "faiss"])
def test_topk_ties_between_identical_memory_slots(monkeypatch, retrieval):
    """Memory layer 0 stores k_proj(norm(embedding)) of every token: 4 distinct tokens repeated give identical keys
    and values, so the k-th place is tied in every query; any choice among identical slots is the reference's."""
    calls = retrieval_calls(monkeypatch)
    model = topk_model(2, retrieval, 3, mem_layers=[0, 1])
    ids = torch.tensor([5, 9, 17, 23])[torch.randint(0, 4, (2, 40))]
    with torch.no_grad():
        out = model(ids)
    assert calls[retrieval] > 0
    stats = {}
    for b in range(2):
        ref, _ = reference_logits(model, ids[b], 6, topk=3, stats=stats)
        assert (out.logits[b] - ref).abs().max().item() <= 1e-4
    assert stats["ties"] > 10

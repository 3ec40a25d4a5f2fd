"""memory_attention against a brute-force softmax over concatenated local + memory keys (FOT_SPEC §1)."""

import math

import pytest
import torch

from fotlab.model.memory_attention import MASKED_SCORE, memory_attention, memory_attention_mass


def brute_force(q, k, v, local_mask, mem_k, mem_v, mem_valid, scale=None, keep=None):
    """Concatenate local + memory keys (GQA by repetition) and run one fp32 softmax.

    keep (B, H, T, M) bool: memory slots a query may use (top-k selection); None = all.
    """
    B, H, T, head_dim = q.shape
    rep = H // k.shape[1]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    mem_k, mem_v = mem_k.to(q.dtype), mem_v.to(q.dtype)
    keys = torch.cat([k, mem_k], 2).repeat_interleave(rep, 1)  # (B, H, S+M, Dh)
    values = torch.cat([v, mem_v], 2).repeat_interleave(rep, 1)
    mem_mask = mem_valid[:, None, None, :].expand(B, H, T, -1)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, H, T, S+M)
    scores = scores.masked_fill(~torch.cat([local_mask.expand(B, H, T, -1), mem_mask], -1), MASKED_SCORE)
    if keep is not None:  # unselected memory slots leave the softmax entirely
        scores[..., k.shape[2] :] = scores[..., k.shape[2] :].masked_fill(~keep, -math.inf)
    return torch.softmax(scores, -1).to(q.dtype) @ values


def make_inputs(
    B=2, H=4, n_kv=2, T=6, S=9, M=11, head_dim=8, dtype=torch.float32, mem_dtype=torch.float32, seed=0, mask_heads=1
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, head_dim, generator=g, dtype=dtype)
    k = torch.randn(B, n_kv, S, head_dim, generator=g, dtype=dtype)
    v = torch.randn(B, n_kv, S, head_dim, generator=g, dtype=dtype)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # queries are the last T of S positions
    local_mask = causal[None, None].repeat(B, mask_heads, 1, 1)  # (B, 1|H, T, S)
    local_mask[0, ..., :2] = False  # left padding in row 0
    mem_k = torch.randn(B, n_kv, M, head_dim, generator=g).to(mem_dtype)
    mem_v = torch.randn(B, n_kv, M, head_dim, generator=g).to(mem_dtype)
    mem_valid = torch.rand(B, M, generator=g) > 0.3
    return q, k, v, local_mask, mem_k, mem_v, mem_valid


@pytest.mark.parametrize("grouping", [None, (1, 1), (2, 4), (1, 6), (4, 2), (3, 5)])
@pytest.mark.parametrize("n_kv,mask_heads", [(4, 1), (2, 1), (1, 4), (2, 4)])
def test_dense_equals_brute_force(grouping, n_kv, mask_heads):
    inputs = make_inputs(n_kv=n_kv, mask_heads=mask_heads)
    if mask_heads > 1:
        inputs[3][1, 2, 3:, :] = False  # a head-specific mask
    out = memory_attention(*inputs, grouping=grouping)
    torch.testing.assert_close(out, brute_force(*inputs), atol=1e-6, rtol=1e-6)


def test_fully_masked_rows_are_uniform_not_nan():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs()
    local_mask[:, :, 0] = False  # query 0 sees no local key
    mem_valid[0] = False  # row 0 has no valid memory: its query 0 is fully masked
    out = memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid)
    assert not out.isnan().any()
    torch.testing.assert_close(out, brute_force(q, k, v, local_mask, mem_k, mem_v, mem_valid), atol=1e-6, rtol=1e-6)
    uniform = torch.cat([v[0], mem_v[0]], 1).mean(1)  # (Hkv, Dh): mean over all S+M values
    torch.testing.assert_close(out[0, :, 0], uniform.repeat_interleave(2, 0), atol=1e-6, rtol=1e-6)


def test_no_memory_is_plain_causal_attention():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs()
    empty_k = mem_k[:, :, :0]
    out = memory_attention(q, k, v, local_mask, empty_k, empty_k, mem_valid[:, :0])
    torch.testing.assert_close(out, memory_attention(q, k, v, local_mask, None, None, None))
    mem_valid[:] = False  # all memory masked: same as no memory only up to exp(-1e6) = 0 terms
    torch.testing.assert_close(out, memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=local_mask
    )
    torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=1e-6)


def test_mem_valid_none_means_all_valid():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs()
    mem_valid[:] = True
    for retrieval in ("dense", "topk"):
        torch.testing.assert_close(
            memory_attention(q, k, v, local_mask, mem_k, mem_v, None, retrieval=retrieval, topk=4),
            memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval=retrieval, topk=4),
        )


def test_bf16_memory_is_cast_to_query_dtype():
    inputs = make_inputs(mem_dtype=torch.bfloat16)
    out = memory_attention(*inputs, grouping=(1, 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, brute_force(*inputs), atol=1e-6, rtol=1e-6)
    as_fp32 = list(inputs)
    as_fp32[4], as_fp32[5] = inputs[4].float(), inputs[5].float()
    torch.testing.assert_close(out, memory_attention(*as_fp32), atol=1e-6, rtol=1e-6)


def test_bf16_activations_match_reference():
    inputs = make_inputs(dtype=torch.bfloat16, mem_dtype=torch.bfloat16)
    out = memory_attention(*inputs, grouping=(2, 3))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, brute_force(*inputs), atol=2e-2, rtol=2e-2)


def test_custom_scale():
    inputs = make_inputs()
    torch.testing.assert_close(
        memory_attention(*inputs, scale=0.05), brute_force(*inputs, scale=0.05), atol=1e-6, rtol=1e-6
    )


def topk_keep(q, mem_k, mem_valid, topk):
    """Brute-force top-k selection per (b, h, t): (B, H, T, M) bool."""
    rep = q.shape[1] // mem_k.shape[1]
    scores = q @ mem_k.float().repeat_interleave(rep, 1).transpose(-1, -2)  # (B, H, T, M)
    scores = scores.masked_fill(~mem_valid[:, None, None, :], -math.inf)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(topk, -1).indices, True)


@pytest.mark.parametrize("grouping", [None, (1, 2)])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_topk_equals_brute_force_selection(grouping, n_kv):
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs(n_kv=n_kv, M=40)
    mem_valid[:] = True
    mem_valid[1, :5] = False
    keep = topk_keep(q, mem_k, mem_valid, 3)
    out = memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval="topk", topk=3, grouping=grouping)
    ref = brute_force(q, k, v, local_mask, mem_k, mem_v, mem_valid, keep=keep)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    dense = memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid)
    assert (out - dense).abs().max() > 1e-3  # top-3 of 40 really differs from dense


def test_topk_block_scan_merges_exactly(monkeypatch):
    import fotlab.model.memory_attention as ma

    inputs = make_inputs(M=50)
    whole = memory_attention(*inputs, retrieval="topk", topk=4)
    monkeypatch.setattr(ma, "TOPK_MEMORY_BLOCK", 7)  # 8 blocks, running top-k merge
    torch.testing.assert_close(memory_attention(*inputs, retrieval="topk", topk=4), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("retrieval", ["topk", "faiss"])
def test_topk_with_k_at_least_m_equals_dense(retrieval):
    inputs = make_inputs()
    dense = memory_attention(*inputs)
    for topk in (11, 50):
        torch.testing.assert_close(memory_attention(*inputs, retrieval=retrieval, topk=topk), dense)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_faiss_equals_torch_topk(n_kv):
    """faiss-cpu is in the dev extra: a missing FAISS fails here rather than skipping."""
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs(n_kv=n_kv, M=60, mem_dtype=torch.bfloat16)
    mem_valid[0, :57] = False  # row 0: only 3 valid slots < k = 5 (missing hits stay masked)
    for topk in (1, 5):
        torch_out = memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval="topk", topk=topk)
        faiss_out = memory_attention(
            q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval="faiss", topk=topk, grouping=(1, 3)
        )
        torch.testing.assert_close(faiss_out, torch_out, atol=1e-6, rtol=1e-6)


def test_gradients_match_brute_force():
    inputs = [x.requires_grad_() if x.is_floating_point() else x for x in make_inputs(n_kv=2)]
    out = memory_attention(*inputs, grouping=(1, 2))
    grads = torch.autograd.grad(out.square().sum(), [inputs[i] for i in (0, 1, 2, 4, 5)])
    ref = brute_force(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [inputs[i] for i in (0, 1, 2, 4, 5)])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_gradients_float64():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs(
        B=1, H=2, n_kv=1, T=3, S=4, M=8, head_dim=4, dtype=torch.float64, mem_dtype=torch.float64
    )
    args = [q.requires_grad_(), k.requires_grad_(), v, local_mask, mem_k.requires_grad_(), mem_v.requires_grad_()]

    def fn(q, k, v, mk, mv):
        return memory_attention(q, k, v, local_mask, mk, mv, mem_valid, retrieval="topk", topk=3, grouping=(1, 2))

    assert torch.autograd.gradcheck(fn, (args[0], args[1], args[2], args[4], args[5]), fast_mode=True)


def test_large_memory_is_chunked_and_bounded(monkeypatch):
    import fotlab.model.memory_attention as ma

    monkeypatch.setattr(ma, "SCORE_BUDGET_BYTES", 64 * 1024)  # force many chunks on a small problem
    inputs = make_inputs(M=300, T=16, S=16)
    plan = ma._plan_chunks(inputs[0], inputs[1].shape[1], 16, 300, None, None)
    assert plan.n_heads * plan.n_queries < 4 * 16  # really chunked
    torch.testing.assert_close(memory_attention(*inputs), brute_force(*inputs), atol=1e-6, rtol=1e-6)


def test_automatic_chunks_bound_the_score_tensor_for_64k_memory():
    import fotlab.model.memory_attention as ma

    q = torch.empty(1, 8, 1024, 128)
    for n_kv, topk in [(8, None), (2, None), (8, 128)]:
        plan = ma._plan_chunks(q, n_kv, 1024, 65536, None, topk)
        mem_cols = 65536 if topk is None else plan.mem_block
        score_bytes = plan.n_heads * plan.n_queries * (1024 + mem_cols) * 4
        assert score_bytes <= ma.SCORE_BUDGET_BYTES and plan.n_heads * plan.n_queries >= 64
    assert ma._plan_chunks(q, 2, 1024, 65536, (3, 100), None).n_heads == 2  # rounded to a divisor of G = 4


@pytest.mark.slow
def test_64k_memory_1024_queries_8_heads():
    B, H, T, M, head_dim = 1, 8, 1024, 65536, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, head_dim, generator=g)
    k, v = torch.randn(2, B, H, T, head_dim, generator=g)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    mem_k, mem_v = torch.randn(2, B, H, M, head_dim, generator=g).bfloat16()
    mem_valid = torch.ones(B, M, dtype=torch.bool)
    out = memory_attention(q, k, v, mask, mem_k, mem_v, mem_valid)
    rows = slice(1000, 1003)  # brute force on a few query rows only
    ref = brute_force(q[:, :, rows], k, v, mask[:, :, rows], mem_k, mem_v, mem_valid)
    torch.testing.assert_close(out[:, :, rows], ref, atol=1e-6, rtol=1e-5)


def test_attention_mass_per_segment():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs(M=12)
    segments = torch.arange(12) // 4  # 3 memory segments of 4 slots
    mass = memory_attention_mass(q, k, local_mask, mem_k, mem_valid, segments, grouping=(1, 2))
    assert mass.shape == (2, 4, 6, 4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 4, 6))
    # reference: attention output with values = one-hot of the key's group reproduces the masses
    onehot = torch.nn.functional.one_hot(torch.cat([torch.zeros(9, dtype=torch.long), segments + 1]), 4).float()
    values = onehot[None, None].expand(2, 2, -1, -1)
    ref = brute_force(q, k, values[:, :, :9], local_mask, mem_k, values[:, :, 9:], mem_valid)
    torch.testing.assert_close(mass, ref, atol=1e-6, rtol=1e-6)
    topk_mass = memory_attention_mass(q, k, local_mask, mem_k, mem_valid, segments, retrieval="topk", topk=2)
    torch.testing.assert_close(topk_mass.sum(-1), torch.ones(2, 4, 6))
    assert ((topk_mass[..., 1:] > 0).sum(-1) <= 2).all()  # at most 2 slots -> at most 2 segments


def test_rejects_bad_inputs():
    q, k, v, local_mask, mem_k, mem_v, mem_valid = make_inputs()
    with pytest.raises(ValueError, match="retrieval"):
        memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval="knn")
    with pytest.raises(ValueError, match="topk"):
        memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval="topk")
    with pytest.raises(ValueError, match="multiple"):
        memory_attention(q[:, :3], k, v, local_mask, mem_k, mem_v, mem_valid)
    with pytest.raises(ValueError, match="mem_valid"):
        memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid[:, :3])


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_fused_cpu_path_equals_chunked_path_across_memory_blocks(monkeypatch, n_kv):
    from fotlab.model import memory_attention_fused as fused

    inputs = make_inputs(n_kv=n_kv, M=37, mem_dtype=torch.bfloat16)
    inputs[6][1, 8:24] = False  # row 1: one whole memory block (8..15) and part of the next are invalid
    monkeypatch.setattr(fused, "FUSED_MEMORY_BLOCK", 8)  # 5 memory blocks merged by log-sum-exp
    assert fused.can_fuse(*inputs[:6], "dense")
    out_fused = memory_attention(*inputs)
    q = inputs[0].clone().requires_grad_(True)  # autograd needs the chunked path
    assert not fused.can_fuse(q, *inputs[1:6], "dense")
    out_chunked = memory_attention(q, *inputs[1:])
    torch.testing.assert_close(out_fused, out_chunked.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_fused, brute_force(*inputs), atol=1e-6, rtol=1e-6)


def _all_valid_causal_inputs(device, dtype, n_kv):
    """Inputs the fused CUDA path takes: causal local mask aligned to the last key, every memory slot valid."""
    q, k, v, _, mem_k, mem_v, mem_valid = make_inputs(n_kv=n_kv, M=37, mem_dtype=torch.bfloat16)
    T, S = q.shape[2], k.shape[2]
    local_mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(q.shape[0], 1, T, S)
    inputs = (q.to(dtype), k.to(dtype), v.to(dtype), local_mask, mem_k, mem_v, torch.ones_like(mem_valid))
    return tuple(x.to(device) for x in inputs)


@pytest.mark.parametrize("n_kv", [4, 1])
def test_lower_right_sdpa_equals_chunked_path(n_kv):
    """[memory; local] under one causal mask aligned to the last key is the same softmax (run here on CPU)."""
    from fotlab.model import memory_attention_fused as fused

    q, k, v, local_mask, mem_k, mem_v, mem_valid = _all_valid_causal_inputs("cpu", torch.float32, n_kv)
    q = q.requires_grad_(True)  # keeps memory_attention on the chunked path
    want = memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid)
    got = fused.sdpa_lower_right(q, k, v, mem_k, mem_v, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        fused.sdpa_lower_right(q, k, v, None, None, 0.3),
        memory_attention(q, k, v, local_mask, None, None, None, scale=0.3),
        atol=1e-6,
        rtol=1e-6,
    )
    assert not fused.can_fuse_cuda(q, local_mask, mem_valid, "dense")  # CPU: the CPU paths apply


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_cuda_fused_path_matches_cpu_fp64(dtype, n_kv):
    """On CUDA the fused SDPA path is taken and agrees with brute force in fp64 on CPU (forward and gradient);
    padded memory still takes the chunked path there and agrees too."""
    from fotlab.model import memory_attention_fused as fused

    inputs = _all_valid_causal_inputs("cuda", dtype, n_kv)
    assert fused.can_fuse_cuda(inputs[0], inputs[3], inputs[6], "dense")
    q = inputs[0].clone().requires_grad_(True)
    out = memory_attention(q, *inputs[1:])
    out.float().square().sum().backward()
    ref_q = inputs[0].detach().cpu().double().requires_grad_(True)
    ref_rest = [x.cpu().double() if x.is_floating_point() else x.cpu() for x in inputs[1:]]
    ref = brute_force(ref_q, *ref_rest)
    ref.square().sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(q.grad.cpu().double(), ref_q.grad, atol=5 * tol, rtol=5 * tol)
    padded = list(inputs)
    padded[6] = padded[6].clone()
    padded[6][1, 5:9] = False
    assert not fused.can_fuse_cuda(padded[0], padded[3], padded[6], "dense")
    ref_rest[5] = padded[6].cpu()
    torch.testing.assert_close(
        memory_attention(*padded).cpu().double(), brute_force(inputs[0].cpu().double(), *ref_rest), atol=tol, rtol=tol
    )


# ----- the model's memory-mass option (MemoryMassProbe), used by the distraction ratio r_d --------------------------
@pytest.mark.parametrize("overrides", [{}, {"mem_positionals": False}, {"num_key_value_heads": 2}])
def test_model_memory_mass_matches_brute_force_and_keeps_outputs(overrides):
    """`model(..., memory_mass=probe)`: per memory layer, the softmax mass of the final segment's queries on the local
    keys and on each memory source equals a float64 brute force over [local keys, memory keys]; logits unchanged."""
    from fotlab.model import FoTForCausalLM, MemoryMassProbe, preset_config
    from fotlab.model.layers import apply_rope

    torch.manual_seed(0)
    model = FoTForCausalLM(preset_config("debug", vocab_size=64, mem_dtype="float32", **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        memory = model(torch.randint(0, 64, (1, 24), generator=g), last_context_length=0).memory  # 24 slots
        current = torch.randint(0, 64, (1, 10), generator=g)
        inputs = {}  # the memory layer's own inputs, to recompute its attention by hand
        layer_idx = model.config.mem_layers[0]
        attn = model.model.layers[layer_idx].self_attn
        handle = attn.register_forward_pre_hook(lambda module, args: inputs.update(args=args))
        plain = model(current, memory=memory, last_context_length=10).logits
        segments = torch.arange(3).repeat_interleave(8)  # three sources of 8 slots each
        probe = MemoryMassProbe(segments, 3)
        probed = model(current, memory=memory, last_context_length=10, memory_mass=probe).logits
        handle.remove()
    assert torch.equal(plain, probed)  # the option changes nothing the model computes
    assert set(probe.mass) == set(model.config.mem_layers)
    x, ctx, past, (mem_k, _, mem_valid) = inputs["args"]
    q, _, _, k_all, _ = attn.project(x, past)
    if model.config.mem_positionals:
        q, k_all = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k_all, ctx.cos, ctx.sin)
    rep = q.shape[1] // k_all.shape[1]
    keys = torch.cat([k_all, mem_k.to(k_all.dtype)], 2).repeat_interleave(rep, 1).double()  # (B, H, S+M, Dh)
    scores = q.double() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S+M)
    visible = torch.cat(
        [
            ctx.local_mask.expand(-1, q.shape[1], -1, -1),
            mem_valid[:, None, None, :].expand(-1, q.shape[1], q.shape[2], -1),
        ],
        -1,
    )
    weights = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
    S = k_all.shape[2]
    expected = torch.stack(
        [weights[..., :S].sum(-1)] + [weights[..., S:][..., segments == j].sum(-1) for j in range(3)], -1
    )
    mass = probe.mass[layer_idx]
    assert mass.shape == (1, q.shape[1], 10, 4)
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))

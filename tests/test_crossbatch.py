"""Crossbatch attention against a brute-force per-entry reference (FOT_SPEC §2), plus its schedules."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fotlab.model.crossbatch import CrossBatch, allowed_contexts, crossbatch_attention
from fotlab.spec import CrossBatchSpec
from fotlab.train.crossbatch_schedule import context_mixture, crossbatch_for_step, mixture_fractions


def reference_allowed(b, n, k, stepping):
    """FOT_SPEC §2 formula, written plainly for one entry."""
    if stepping and k > 1:
        step = math.ceil(n / max(k - 1, 1))
        allowed = min((b % k) * step + 1, n)
    else:
        allowed = n
    return min(allowed, b + 1)


def reference_attention(q, k_rot, k_mem, v, cb, key_valid=None):
    """Loop over entries, heads and queries; one fp32 softmax over every visible key."""
    B, H, T, Dh = q.shape
    group = H // k_rot.shape[1]
    n = cb.range + 1
    out = torch.zeros(B, H, T, Dh, dtype=torch.float64)
    for b in range(B):
        allowed = reference_allowed(b, n, cb.packing, cb.stepping)
        for h in range(H):
            kv_head = h // group
            for t in range(T):
                scores, values = [], []
                for c in range(allowed):
                    src = b - c
                    for s in range(T):
                        if c == 0 and s > t:
                            continue  # causal in the own context
                        if key_valid is not None and not key_valid[src, s]:
                            continue
                        key = k_rot[b, kv_head, s] if c == 0 else k_mem[src, kv_head, s]
                        scores.append(float(q[b, h, t].double() @ key.double()) / math.sqrt(Dh))
                        values.append(v[src, kv_head, s].double())
                if not scores:
                    continue  # no visible key: output stays zero
                weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
                out[b, h, t] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


def random_inputs(B, H, Hkv, T, Dh, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dh, generator=gen)
    k_rot = torch.randn(B, Hkv, T, Dh, generator=gen)
    k_mem = torch.randn(B, Hkv, T, Dh, generator=gen)
    v = torch.randn(B, Hkv, T, Dh, generator=gen)
    return q, k_rot, k_mem, v


@pytest.mark.parametrize(
    "cb",
    [
        CrossBatch(0),
        CrossBatch(1),
        CrossBatch(3, 4, True),
        CrossBatch(3, 4, False),
        CrossBatch(6, 4, True),
        CrossBatch(2, 2, True),
        CrossBatch(20, 2, False),
    ],
)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_matches_brute_force(cb, heads):
    H, Hkv = heads
    q, k_rot, k_mem, v = random_inputs(8, H, Hkv, 5, 8, seed=cb.range * 7 + Hkv)
    out = crossbatch_attention(q, k_rot, k_mem, v, cb)
    torch.testing.assert_close(out.double(), reference_attention(q, k_rot, k_mem, v, cb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cb", [CrossBatch(0), CrossBatch(3, 4, True), CrossBatch(2, 1, False)])
def test_matches_brute_force_with_padding(cb):
    q, k_rot, k_mem, v = random_inputs(8, 4, 2, 6, 8, seed=3)
    gen = torch.Generator().manual_seed(11)
    key_valid = torch.rand(8, 6, generator=gen) > 0.3
    key_valid[4, :] = False  # an entry that is all padding: its queries see only other entries (or nothing)
    key_valid[0, :4] = False  # left padding on the first entry: its first queries see no key at all
    out = crossbatch_attention(q, k_rot, k_mem, v, cb, key_valid)
    assert not out.isnan().any()
    torch.testing.assert_close(
        out.double(), reference_attention(q, k_rot, k_mem, v, cb, key_valid), atol=1e-5, rtol=1e-5
    )


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k_rot, k_mem, v = random_inputs(4, 2, 2, 4, 8)
    q.requires_grad_(True)
    key_valid = torch.zeros(4, 4, dtype=torch.bool)
    out = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(3), key_valid)
    assert out.abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_range_zero_is_plain_causal_attention():
    q, k_rot, k_mem, v = random_inputs(3, 4, 2, 7, 8)
    out = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(0, packing=4, stepping=True))
    expected = F.scaled_dot_product_attention(
        q, k_rot.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    torch.testing.assert_close(out, expected)
    # k_mem plays no role when no extra context is visible
    other = crossbatch_attention(q, k_rot, torch.randn_like(k_mem), v, CrossBatch(0))
    torch.testing.assert_close(out, other)
    # explicit all-valid padding takes the masked path and agrees
    padded = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(0), torch.ones(3, 7, dtype=torch.bool))
    torch.testing.assert_close(out, padded)


def test_extra_contexts_change_the_output():
    q, k_rot, k_mem, v = random_inputs(4, 2, 2, 4, 8)
    plain = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(0))
    cross = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(1))
    torch.testing.assert_close(cross[0], plain[0])  # entry 0 never wraps around
    assert (cross[1:] - plain[1:]).abs().max() > 1e-3


def test_gradients_reach_other_entries():
    q, k_rot, k_mem, v = random_inputs(4, 2, 1, 4, 8)
    for x in (q, k_rot, k_mem, v):
        x.requires_grad_(True)
    out = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(1))
    out[2].pow(2).sum().backward()  # loss of entry 2 only
    assert k_mem.grad[1].abs().sum() > 0 and v.grad[1].abs().sum() > 0  # entry b-1 via slot 1
    assert k_mem.grad[0].abs().sum() == 0 and v.grad[0].abs().sum() == 0  # entry b-2 is out of range
    assert k_mem.grad[2].abs().sum() == 0  # own slot uses k_rot, not k_mem
    assert k_rot.grad[2].abs().sum() > 0 and k_rot.grad[1].abs().sum() == 0


def test_bfloat16_close_to_fp32():
    q, k_rot, k_mem, v = random_inputs(8, 4, 2, 6, 16)
    cb = CrossBatch(3, 4, True)
    out = crossbatch_attention(q.bfloat16(), k_rot.bfloat16(), k_mem.bfloat16(), v.bfloat16(), cb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), crossbatch_attention(q, k_rot, k_mem, v, cb), atol=3e-2, rtol=3e-2)


def test_shape_errors():
    q, k_rot, k_mem, v = random_inputs(2, 3, 2, 4, 8)
    with pytest.raises(ValueError):
        crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(1))  # 3 heads over 2 kv heads
    q, k_rot, k_mem, v = random_inputs(2, 4, 2, 4, 8)
    with pytest.raises(ValueError):
        crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(1), torch.ones(2, 5, dtype=torch.bool))


def test_crossbatch_validation():
    assert CrossBatch(3, 4, True).n_contexts == 4
    with pytest.raises(ValueError):
        CrossBatch(-1)
    with pytest.raises(ValueError):
        CrossBatch(1, packing=0)
    with pytest.raises(TypeError):
        CrossBatch(1.5)
    with pytest.raises(TypeError):
        CrossBatch(True)
    with pytest.raises(TypeError):
        CrossBatch(1, 2, stepping=1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="range"):
        CrossBatch(1).range = 2  # frozen


def test_allowed_contexts_table():
    assert allowed_contexts(8, 4, 4, True).tolist() == [1, 2, 3, 4, 1, 3, 4, 4]
    assert allowed_contexts(12, 7, 4, True).tolist() == [1, 2, 3, 4, 1, 4, 7, 7, 1, 4, 7, 7]
    assert allowed_contexts(6, 4, 4, False).tolist() == [1, 2, 3, 4, 4, 4]
    assert allowed_contexts(5, 3, 1, True).tolist() == [1, 2, 3, 3, 3]  # k = 1: stepping has no effect
    assert allowed_contexts(6, 1, 2, True).tolist() == [1] * 6
    assert allowed_contexts(6, 5, 2, True).tolist() == [1, 2, 1, 4, 1, 5]  # k = 2: step = n
    for B, n, k, s in [(16, 5, 4, True), (9, 3, 3, True), (10, 8, 2, False)]:
        assert allowed_contexts(B, n, k, s).tolist() == [reference_allowed(b, n, k, s) for b in range(B)]


def test_context_mixture_matches_spec_table():
    far = context_mixture(16, CrossBatch(3, 4, True))[12:]
    assert far == [(1, 0, 0), (3, 1, 1), (4, 2, 1), (4, 3, 0)]
    far = context_mixture(16, CrossBatch(6, 4, True))[12:]
    assert far == [(1, 0, 0), (4, 1, 2), (7, 2, 4), (7, 3, 3)]
    assert context_mixture(3, CrossBatch(2, 1)) == [(1, 0, 0), (2, 0, 1), (3, 0, 2)]
    assert mixture_fractions(16, CrossBatch(3, 4, True))[(4, 3, 0)] == 0.25


def _schedule(**fields) -> CrossBatchSpec:
    return CrossBatchSpec(**fields)


def test_schedule_switch():
    cb = _schedule(
        range=1, packing=4, stepping=True, switch=[{"at_step": 100, "range": 63}, {"at_step": 10, "range": 7}]
    )
    ranges = [crossbatch_for_step(s, cb).range for s in (0, 9, 10, 99, 100, 5000)]
    assert ranges == [1, 1, 7, 7, 63, 63]
    assert crossbatch_for_step(5000, cb) == CrossBatch(63, 4, True)
    assert crossbatch_for_step(5000, cb, batch_size=16).range == 15  # capped at B - 1
    assert crossbatch_for_step(0, _schedule(range=1)).range == 1


def test_schedule_sampling_is_deterministic_per_step():
    cb = _schedule(range=0, packing=2, sample_from=[1, 127])
    draws = [crossbatch_for_step(s, cb, seed=5).range for s in range(200)]
    assert set(draws) == {1, 127}
    resumed = [crossbatch_for_step(s, cb, seed=5).range for s in range(100, 200)]
    assert resumed == draws[100:]  # a resumed run replays the same ranges
    other_seed = [crossbatch_for_step(s, cb, seed=6).range for s in range(200)]
    assert other_seed != draws
    capped = {crossbatch_for_step(s, cb, batch_size=8).range for s in range(50)}
    assert capped == {1, 7}


def test_schedule_rules_are_the_specs():
    """switch vs sample_from and the bounds are checked once, by the spec, before anything runs."""
    from fotlab.spec import SpecError, parse_spec

    both = {
        "name": "x",
        "train": {"batch_size": 8, "crossbatch": {"switch": [{"at_step": 0, "range": 3}], "sample_from": [1, 2]}},
    }
    with pytest.raises(SpecError, match="train.crossbatch.sample_from"):
        parse_spec(both, check_paths=False)
    with pytest.raises(SpecError, match="sample_from"):
        parse_spec({"name": "x", "train": {"crossbatch": {"sample_from": []}}}, check_paths=False)
    with pytest.raises(ValueError):
        crossbatch_for_step(-1, _schedule(range=1))


@pytest.mark.parametrize(
    "cb, heads, padded",
    [
        (CrossBatch(3, 4, True, "flex"), (4, 2), False),
        (CrossBatch(2, 1, False, "flex"), (2, 2), True),
        (CrossBatch(6, 2, True, "flex"), (2, 1), True),
    ],
)
def test_flex_backend_matches_sdpa_backend(cb, heads, padded):
    """The FlexAttention backend (eager on CPU; T = 128, one flex block per entry) computes the same function.

    Forward only: torch has no CPU backward for flex (its gradients were checked on a GPU against this module's
    SDPA path: relative error ~1e-6 in fp32).
    """
    H, Hkv = heads
    q, k_rot, k_mem, v = random_inputs(5, H, Hkv, 128, 8, seed=2)
    key_valid = None
    if padded:
        key_valid = torch.rand(5, 128, generator=torch.Generator().manual_seed(1)) > 0.3
        key_valid[0, :5] = False  # first queries of entry 0 see nothing
        key_valid[3] = False
    flex = crossbatch_attention(q, k_rot, k_mem, v, cb, key_valid)
    sdpa = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(cb.range, cb.packing, cb.stepping), key_valid)
    assert not flex.isnan().any()
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_backend_block_mask_is_sparse():
    """Blocks an entry cannot see are not visited: with stepping, entry 0 visits only its own diagonal block."""
    from fotlab.model.crossbatch import _flex_block_mask

    allowed = allowed_contexts(4, 4, 4, True)  # [1, 2, 3, 4]
    block_mask = _flex_block_mask(allowed, 128, None)
    partial = block_mask.kv_num_blocks[0, 0].tolist()
    full = block_mask.full_kv_num_blocks[0, 0].tolist()
    assert partial == [1, 1, 1, 1]  # the causal diagonal block of each entry
    assert full == [0, 1, 2, 3]  # allowed[b] - 1 extra contexts, one block each


def test_flex_backend_falls_back_when_seq_len_is_not_a_block_multiple():
    q, k_rot, k_mem, v = random_inputs(4, 2, 2, 5, 8)
    out = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(2, 2, True, "flex"))
    torch.testing.assert_close(
        out.double(), reference_attention(q, k_rot, k_mem, v, CrossBatch(2, 2, True)), atol=1e-5, rtol=1e-5
    )


def test_backend_validation():
    with pytest.raises(ValueError):
        CrossBatch(1, backend="triton")
    cb = _schedule(range=1, packing=2, stepping=True, backend="flex", switch=[{"at_step": 2, "range": 5}])
    assert crossbatch_for_step(3, cb).backend == "flex"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("head_dim", [64, 100])  # 100: LongLLaMA-3B, padded to 104 for the fused SDPA kernels
def test_cuda_backends_match_cpu_fp64(backend, head_dim):
    """Forward and gradients on CUDA (fp32) equal this module's CPU path in fp64, with GQA and padding."""
    inputs = random_inputs(8, 4, 2, 128, head_dim, seed=4)
    key_valid = torch.rand(8, 128, generator=torch.Generator().manual_seed(2)) > 0.2
    key_valid[0, :5] = False
    results = []
    for device, dtype in (("cuda", torch.float32), ("cpu", torch.float64)):
        xs = [x.to(device, dtype).requires_grad_(True) for x in inputs]
        out = crossbatch_attention(
            *xs, CrossBatch(3, 4, True, backend if device == "cuda" else "sdpa"), key_valid.to(device)
        )
        grads = torch.autograd.grad(out.square().sum(), xs)
        results.append([t.detach().cpu().double() for t in (out, *grads)])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_flex_block_mask_with_padding_keeps_clean_blocks_full():
    from fotlab.model.crossbatch import _flex_block_mask

    allowed = allowed_contexts(3, 3, 1, False)  # [1, 2, 3]
    key_valid = torch.ones(3, 256, dtype=torch.bool)  # two blocks per entry
    key_valid[1, 200] = False  # entry 1's second block holds padding
    block_mask = _flex_block_mask(allowed, 256, key_valid)
    # entry 2, second query block: own block 4 (full) + diagonal 5; k_mem blocks of entries 1, 0 (6 + 2..3, 6 + 0..1)
    full = block_mask.full_kv_indices[0, 0, 5, : block_mask.full_kv_num_blocks[0, 0, 5]].tolist()
    partial = block_mask.kv_indices[0, 0, 5, : block_mask.kv_num_blocks[0, 0, 5]].tolist()
    assert sorted(full) == [4, 6, 7, 8] and sorted(partial) == [5, 9]
    q, k_rot, k_mem, v = random_inputs(3, 2, 2, 256, 8, seed=5)
    flex = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(2, backend="flex"), key_valid)
    torch.testing.assert_close(flex, crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(2), key_valid))


def test_flex_backend_with_gradients_on_cpu_falls_back_to_sdpa():
    """torch has no CPU backward for flex: a CPU training step with backend "flex" must still work (via sdpa)."""
    q, k_rot, k_mem, v = random_inputs(4, 2, 2, 128, 8)
    k_mem.requires_grad_(True)
    out = crossbatch_attention(q, k_rot, k_mem, v, CrossBatch(1, backend="flex"))
    out[1].sum().backward()
    assert k_mem.grad[0].abs().sum() > 0
    torch.testing.assert_close(out.detach(), crossbatch_attention(q, k_rot, k_mem.detach(), v, CrossBatch(1)))

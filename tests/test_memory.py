"""FoT memory state: amortised append, value semantics, reset_rows, FIFO capacity, save/load, differentiable mode."""

import pytest
import torch

from fotlab.model.memory import FoTMemory, LayerMemory


def kv(B=2, n_kv=2, T=3, head_dim=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, n_kv, T, head_dim, generator=g).requires_grad_(requires_grad)
    v = torch.randn(B, n_kv, T, head_dim, generator=g).requires_grad_(requires_grad)
    return k, v


def test_append_stores_in_mem_dtype_and_keeps_padding_masked():
    k, v = kv()
    valid = torch.tensor([[False, True, True], [True, True, True]])  # row 0 left-padded
    mem = FoTMemory.empty().append(3, k, v, valid)
    layer = mem[3]
    assert layer.keys.dtype == torch.bfloat16 and layer.values.dtype == torch.bfloat16
    assert mem.n_tokens == 3 and mem.get(5) is None and 3 in mem
    torch.testing.assert_close(layer.keys, k.bfloat16())
    torch.testing.assert_close(layer.values, v.bfloat16())
    k2, v2 = kv(seed=1)
    mem = mem.append(3, k2, v2)  # valid=None: all valid
    assert mem[3].valid.tolist() == [[False, True, True, True, True, True], [True] * 6]
    torch.testing.assert_close(mem[3].keys, torch.cat([k, k2], 2).bfloat16())


@torch.no_grad()
def test_append_is_amortised_geometric_buffer():
    mem = LayerMemory.empty(torch.float32)
    storages, sizes = set(), []
    for i in range(500):
        k, v = kv(T=1, seed=i)
        mem = mem.append(k, v)
        storages.add(mem.keys.untyped_storage().data_ptr())
        sizes.append(mem.buffer_slots)
    assert mem.n_tokens == 500
    assert len(storages) <= 5  # 64 -> 130 -> 262 -> 526: a handful of reallocations, not 500
    distinct = sorted(set(sizes))
    assert all(b >= 2 * a for a, b in zip(distinct, distinct[1:]))  # each growth at least doubles
    assert mem.keys[:, :, 123].equal(kv(T=1, seed=123)[0][:, :, 0])


@torch.no_grad()
def test_old_memories_and_views_are_unchanged_by_later_appends():
    k, v = kv()
    first = LayerMemory.empty(torch.float32).append(k, v)
    view = first.keys
    second = first.append(*kv(seed=1))
    assert second.keys.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()  # shared buffer
    branch = first.append(*kv(seed=2))  # appending to an older memory must not overwrite `second`
    assert first.n_tokens == 3 and view.equal(k)
    torch.testing.assert_close(second.keys[:, :, 3:], kv(seed=1)[0])
    torch.testing.assert_close(branch.keys[:, :, 3:], kv(seed=2)[0])


def test_reset_rows_invalidates_then_compacts():
    mem = FoTMemory.empty(torch.float32)
    for layer in (0, 2):
        mem = mem.append(layer, *kv(T=4))
    reset = mem.reset_rows([1])
    assert reset[0].valid.tolist() == [[True] * 4, [False] * 4]
    assert reset.n_tokens == 4 and mem[0].valid.all()  # the original memory is untouched
    torch.testing.assert_close(reset[2].keys, mem[2].keys)
    reset = reset.append(0, *kv(T=2, seed=3))
    assert reset[0].valid[1].tolist() == [False] * 4 + [True] * 2  # the reset row continues with new tokens
    both = mem.reset_rows(torch.tensor([True, True]))
    assert both.n_tokens == 0 and both[0].keys.shape[2] == 0  # every slot invalid in all rows: dropped
    assert mem.reset_rows([]).n_tokens == 4  # nothing to reset
    partial = mem.append(0, *kv(T=2, seed=4)).reset_rows([0]).reset_rows([1])
    assert partial[0].n_tokens == 0


def test_fifo_capacity_evicts_oldest_first():
    mem = FoTMemory.empty(torch.float32, capacity=10)
    chunks = [kv(T=3, seed=i) for i in range(30)]
    for k, v in chunks:
        mem = mem.append(1, k, v)
    all_keys = torch.cat([k for k, _ in chunks], 2)
    assert mem.n_tokens == 10
    torch.testing.assert_close(mem[1].keys, all_keys[:, :, -10:])  # the newest 10 slots, in order
    assert mem[1].buffer_slots <= 20  # bounded storage
    big = mem.append(1, *kv(T=25, seed=99))  # one append larger than the capacity
    torch.testing.assert_close(big[1].keys, kv(T=25, seed=99)[0][:, :, -10:])


def test_fifo_capacity_differentiable_segments():
    mem = LayerMemory.empty(torch.float32, capacity=5)
    k1, v1 = kv(T=4, requires_grad=True)
    k2, v2 = kv(T=3, seed=1, requires_grad=True)
    mem = mem.append(k1, v1).append(k2, v2)
    assert mem.differentiable and mem.n_tokens == 5
    torch.testing.assert_close(mem.keys, torch.cat([k1[:, :, 2:], k2], 2))


def test_gradient_flows_through_memory_segments():
    k1, v1 = kv(T=3, requires_grad=True)
    k2, v2 = kv(T=2, seed=1, requires_grad=True)
    mem = FoTMemory.empty(torch.float32).append(0, k1, v1).append(0, k2, v2)
    weights = torch.arange(5.0)[None, None, :, None]
    (mem[0].keys * weights).sum().backward()
    assert torch.equal(k1.grad, weights[:, :, :3].expand_as(k1))
    assert torch.equal(k2.grad, weights[:, :, 3:].expand_as(k2))
    detached = mem.detach()
    assert not detached[0].keys.requires_grad and not detached[0].differentiable
    torch.testing.assert_close(detached[0].values, mem[0].values.detach())


def test_bf16_memory_gradient_reaches_fp32_activations():
    k, v = kv(requires_grad=True)
    mem = FoTMemory.empty("bfloat16").append(0, k, v)
    mem[0].values.float().sum().backward()
    assert torch.equal(v.grad, torch.ones_like(v))


def test_buffer_memory_then_grad_append_keeps_old_slots():
    k0, v0 = kv(T=2)
    k1, v1 = kv(T=2, seed=1, requires_grad=True)
    mem = LayerMemory.empty(torch.float32).append(k0, v0).append(k1, v1)
    assert mem.differentiable
    torch.testing.assert_close(mem.keys, torch.cat([k0, k1], 2))
    mem.keys.sum().backward()
    assert k1.grad is not None


def test_save_load_round_trip(tmp_path):
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mem = FoTMemory.empty("bfloat16", capacity=100).append(2, *kv(), valid).append(5, *kv(seed=1), valid)
    mem.save(tmp_path / "mem")
    loaded = FoTMemory.load(tmp_path / "mem")
    assert loaded.dtype == torch.bfloat16 and loaded.capacity == 100 and sorted(loaded.layers) == [2, 5]
    for layer in (2, 5):
        assert loaded[layer].keys.equal(mem[layer].keys)
        assert loaded[layer].values.equal(mem[layer].values)
        assert loaded[layer].valid.equal(mem[layer].valid)
    as_fp32 = FoTMemory.load(tmp_path / "mem", device="cpu", dtype="float32")
    assert as_fp32[2].keys.dtype == torch.float32
    torch.testing.assert_close(as_fp32[2].keys, mem[2].keys.float())
    continued = loaded.append(2, *kv(seed=7))  # a loaded memory keeps growing
    assert continued.n_tokens == 6


def test_to_changes_dtype_and_rejects_bad_shapes():
    mem = FoTMemory.empty(torch.float32).append(0, *kv())
    assert mem.to("cpu", torch.float16)[0].keys.dtype == torch.float16
    with pytest.raises(ValueError, match="do not fit"):
        mem.append(0, *kv(n_kv=3))
    with pytest.raises(ValueError, match="valid"):
        mem.append(0, *kv(), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="capacity"):
        FoTMemory.empty(capacity=0)


def test_memory_feeds_memory_attention():
    from fotlab.model.memory_attention import memory_attention

    k, v = kv(T=5)
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    mem = FoTMemory.empty("bfloat16").append(0, k, v, valid)
    q = torch.randn(2, 4, 2, 4)
    local = torch.ones(2, 1, 2, 2, dtype=torch.bool).tril()
    lk, lv = kv(T=2, seed=5)
    out = memory_attention(q, lk, lv, local, mem[0].keys, mem[0].values, mem[0].valid)
    masked_slot = mem[0].values.float().clone()
    masked_slot[0, :, 0] = 1e3  # a value behind a padding mask must not leak into the output
    out2 = memory_attention(q, lk, lv, local, mem[0].keys, masked_slot, mem[0].valid)
    torch.testing.assert_close(out, out2)


def test_append_after_grad_mode_read_keeps_backward_valid():
    mem = LayerMemory.empty(torch.float32).append(*kv())
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    loss = (q @ mem.keys.transpose(-1, -2)).sum()  # autograd saves the memory view
    grown = mem.append(*kv(seed=1))  # must not write into the saved view's storage
    loss.backward()
    torch.testing.assert_close(q.grad, mem.keys.sum(2, keepdim=True).expand(-1, -1, 5, -1))
    assert grown.n_tokens == 6
    with torch.no_grad():  # no autograd recording: reads do not force copies
        ptr = grown.keys.untyped_storage().data_ptr()
        assert grown.append(*kv(seed=2)).keys.untyped_storage().data_ptr() == ptr

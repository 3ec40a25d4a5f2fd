"""One optimizer step on the real debug FoT model: gradient accumulation, activation checkpointing, NaN stop, bf16."""

import copy

import pytest
import torch

from fotlab.model import FoTForCausalLM, preset_config
from fotlab.model.crossbatch import CrossBatch
from fotlab.train.build import enable_activation_checkpointing
from fotlab.train.runtime import LossNotFiniteError, TrainError
from fotlab.train.steps import evaluate_loss, train_step

V = 259


def _model(seed=0):
    torch.manual_seed(seed)
    return FoTForCausalLM(preset_config("debug", vocab_size=V)).train()


def _batch(B, T, seed, n_ignored):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets.view(-1)[:n_ignored] = -100  # different loss-token counts per micro-batch
    return {"input_ids": ids, "targets": targets}


def _sgd_step(model, batches, crossbatch, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train_step(model, opt, batches, step=1, crossbatch=crossbatch, grad_clip=None, **kwargs)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}  # SGD lr 1: the gradient
    return stats, grads


def test_grad_accumulation_equals_bigger_batch():
    # Stepping with packing 2: entries never look outside their packing group, so 2 x 4 rows == 1 x 8 rows.
    cb = CrossBatch(range=1, packing=2, stepping=True)
    a, b = _batch(4, 16, seed=1, n_ignored=5), _batch(4, 16, seed=2, n_ignored=23)
    big = {k: torch.cat([a[k], b[k]]) for k in a}
    model = _model()
    stats_acc, grads_acc = _sgd_step(copy.deepcopy(model), [a, b], cb)
    stats_big, grads_big = _sgd_step(copy.deepcopy(model), [big], cb)
    assert stats_acc.n_loss_tokens == stats_big.n_loss_tokens == 8 * 16 - 28
    assert stats_acc.loss == pytest.approx(stats_big.loss, rel=1e-5)
    assert stats_acc.grad_norm == pytest.approx(stats_big.grad_norm, rel=1e-4)
    for name in grads_big:
        torch.testing.assert_close(grads_acc[name], grads_big[name], rtol=1e-4, atol=1e-6, msg=name)
    # Sanity: with a per-micro-batch mean (not token-weighted) the gradients would differ.
    assert (a["targets"] != -100).sum() != (b["targets"] != -100).sum()


def test_activation_checkpointing_keeps_gradients_exact():
    cb = CrossBatch(range=3, packing=2)
    batch = _batch(4, 32, seed=3, n_ignored=0)
    model = _model()
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.model.gradient_checkpointing
    stats_plain, grads_plain = _sgd_step(model, [batch], cb)
    stats_ckpt, grads_ckpt = _sgd_step(checkpointed, [batch], cb)
    assert stats_plain.loss == pytest.approx(stats_ckpt.loss, rel=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_memory_gradients_exact():
    # A long input: the first window goes to memory and the last window attends to it (FOT_SPEC §1.1); the
    # reference code cut this gradient under checkpointing.
    ids = torch.randint(0, V, (2, 128), generator=torch.Generator().manual_seed(4))
    model = _model()
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    grads = []
    for m in (model, checkpointed):
        loss = m(ids, last_context_length=64).logits[:, -64:].float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_nan_loss_stops_with_clear_error():
    model = _model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(LossNotFiniteError, match=r"step 7: loss is nan") as info:
        train_step(model, opt, [_batch(2, 16, seed=5, n_ignored=0)], step=7)
    assert isinstance(info.value, TrainError)


def test_bf16_autocast_on_cpu_close_to_fp32():
    batch = _batch(2, 16, seed=6, n_ignored=0)
    model = _model()
    fp32 = evaluate_loss(model, [batch])
    bf16 = evaluate_loss(model, [batch], precision="bf16")
    assert fp32 != bf16  # autocast really ran in bf16
    assert bf16 == pytest.approx(fp32, abs=0.05)
    stats = train_step(model, torch.optim.AdamW(model.parameters()), [batch], step=1, precision="bf16")
    assert torch.isfinite(torch.tensor(stats.loss))
    assert model.training  # evaluate_loss restored train mode


def test_validation_loss_with_no_scored_token_is_nan_not_zero():
    """Validation chunks that hold only the loss-masked part of their documents (e.g. the definitions of a
    dictionary, whose queries fall in later chunks) score nothing: that is NaN, not a perfect loss of 0."""
    import math

    model = _model()
    masked = _batch(2, 16, seed=7, n_ignored=2 * 16)
    assert math.isnan(evaluate_loss(model, [masked]))
    scored = _batch(2, 16, seed=8, n_ignored=8)
    assert evaluate_loss(model, [masked, scored]) == pytest.approx(evaluate_loss(model, [scored]))

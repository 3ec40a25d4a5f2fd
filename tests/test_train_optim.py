"""Optimizers (AdamW, Adafactor, no decay on norms/biases) and lr schedules (constant, inverse-sqrt, cosine)."""

import math
from types import SimpleNamespace

import pytest
import torch

from fotlab.train.optim import build_optimizer, build_scheduler, param_groups


def _opt_spec(name="adamw", lr=1e-2, weight_decay=0.1):
    return SimpleNamespace(name=name, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)


def _sched_spec(name, warmup_steps=0, min_lr_ratio=0.0):
    return SimpleNamespace(name=name, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4, bias=False))


def _lrs(sched_spec, n_steps, total_steps, base_lr=1.0):
    net = _tiny_net()
    opt = build_optimizer(net, _opt_spec(lr=base_lr))
    sched = build_scheduler(opt, sched_spec, total_steps)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])  # lr used by this step
        opt.step()
        sched.step()
    return lrs


def test_no_weight_decay_on_norms_and_biases():
    net = _tiny_net()
    decayed, plain = param_groups(net, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2}
    assert {id(p) for p in plain["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}
    # A step with zero gradients: AdamW decays only the matrices.
    opt = build_optimizer(net, _opt_spec(lr=0.5, weight_decay=0.1))
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, old in zip(net.parameters(), before):
        if p.ndim >= 2:
            torch.testing.assert_close(p, old * (1 - 0.5 * 0.1))
        else:
            torch.testing.assert_close(p, old)


def test_constant_with_warmup():
    assert _lrs(_sched_spec("constant", warmup_steps=4), 6, 100) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert _lrs(_sched_spec("constant"), 3, 100) == pytest.approx([1.0, 1.0, 1.0])


def test_inverse_sqrt_with_warmup():
    lrs = _lrs(_sched_spec("inverse_sqrt", warmup_steps=4), 16, 100, base_lr=2.0)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[15] == pytest.approx(2.0 * math.sqrt(4 / 16))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # decays after the peak
    # The paper's small-model schedule: 1000 warm-up steps, peak at step 999, 1/sqrt afterwards.
    from fotlab.train.optim import inverse_sqrt_factor

    assert inverse_sqrt_factor(999, 1000) == pytest.approx(1.0)
    assert inverse_sqrt_factor(3999, 1000) == pytest.approx(0.5)


def test_cosine_with_warmup_and_min_ratio():
    lrs = _lrs(_sched_spec("cosine", warmup_steps=2, min_lr_ratio=0.1), 10, 10)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[-1] == pytest.approx(0.1)  # min ratio reached at the last step
    mid = 2 + 4  # progress 0.5 at step w - 1 + (total - w) / 2
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[mid - 1] > lrs[mid] > lrs[-1]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_adafactor_runs_and_learns():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = build_optimizer(net, _opt_spec(name="adafactor", lr=1e-1, weight_decay=0.0))
    assert isinstance(opt, torch.optim.Adafactor)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(net(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(_tiny_net(), _opt_spec(name="sgd"))
    opt = build_optimizer(_tiny_net(), _opt_spec())
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, _sched_spec("linear"), 10)

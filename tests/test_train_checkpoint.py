"""Atomic checkpoint IO and exact RNG capture/restore (no model or data layer needed)."""

import json
import random

import numpy as np
import pytest
import torch

from fotlab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from fotlab.train.rng import capture_rng_state, restore_rng_state, seed_everything


class _TiedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, like tie_word_embeddings


def _trained(seed):
    torch.manual_seed(seed)
    net = _TiedNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        loss = net.head(net.norm(net.emb(torch.tensor([1, 2, 3])))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net, opt, sched


def _save(root, step, seed=0, rank_state=None, keep=0):
    net, opt, sched = _trained(seed)
    rank_state = rank_state if rank_state is not None else {"packer": {"pos": torch.tensor([step])}}
    path = save_checkpoint(
        root,
        step,
        model=net,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"metrics": {"train/loss": 1.5}},
        rank_state=rank_state,
        keep=keep,
    )
    return path, net, opt, sched


def test_roundtrip_restores_model_optimizer_scheduler(tmp_path):
    path, net, opt, sched = _save(tmp_path, 7, seed=1)
    assert path.name == "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rank-00000.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    fresh, fresh_opt, fresh_sched = _trained(seed=2)
    state, rank_state = load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["step"] == 7 and state["metrics"] == {"train/loss": 1.5}
    assert rank_state["packer"]["pos"].tolist() == [7]
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.emb.weight  # tie survives loading
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    torch.testing.assert_close(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"], rtol=0, atol=0
    )


def test_keep_last_n_and_latest(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000008"
    assert resolve_checkpoint(tmp_path / "step-00000006") == tmp_path / "step-00000006"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_same_step_saved_twice_is_replaced(tmp_path):
    _save(tmp_path, 3, seed=0)
    path, net, _, _ = _save(tmp_path, 3, seed=5)
    fresh, _, _ = _trained(seed=9)
    load_checkpoint(path, model=fresh)
    assert torch.equal(fresh.emb.weight, net.emb.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    good, net, _, _ = _save(tmp_path, 5, seed=3)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by an object that refuses to serialise)")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path, 10, rank_state={"packer": Unpicklable()})
    # The failed save removed its hidden temp dir; the previous checkpoint is untouched and still the latest.
    assert not (tmp_path / ".tmp-step-00000010").exists()
    assert not (tmp_path / "step-00000010").exists()
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    # A visible dir without its trainer state (e.g. copied by hand, half-finished) is never picked up either.
    (tmp_path / "step-00000020").mkdir()
    (tmp_path / "step-00000020" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    # The next save at that step cleans the leftover temp dir.
    _save(tmp_path, 10)
    assert not (tmp_path / ".tmp-step-00000010").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000010"  # the incomplete step-20 is still ignored


def test_files_are_weights_only_loadable(tmp_path):
    path, *_ = _save(tmp_path, 1)
    for name in ("optimizer.pt", "scheduler.pt", "rank-00000.pt"):
        torch.load(path / name, weights_only=True)
    json.loads((path / "trainer_state.json").read_text())


def test_rng_capture_restore_is_exact(tmp_path):
    seed_everything(123)
    random.random(), np.random.rand(), torch.randn(3), np.random.randn()  # advance, incl. numpy gauss cache
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(2).tolist(), torch.randn(4).tolist(), np.random.randn())
    seed_everything(999)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(2).tolist(), torch.randn(4).tolist(), np.random.randn())
    assert got == expected


def test_sharded_models_are_refused_up_front():
    """A DTensor-sharded (FSDP2-style) model fails fast with a clear message instead of writing bad checkpoints."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fotlab.train.loop_support import check_replicated
    from fotlab.train.runtime import TrainError

    plain = torch.nn.Linear(4, 4)
    check_replicated(plain)  # plain / DDP models pass
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Linear(4, 4)
        sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(TrainError, match="fsdp-sharded models cannot be checkpointed"):
            check_replicated(sharded)
    finally:
        dist.destroy_process_group()


def test_a_save_removes_what_interrupted_saves_left_behind(tmp_path):
    _save(tmp_path, 1)
    for leftover in (".tmp-step-00000002", ".tmp-step-00000005"):  # a crash (or a full disk on another rank)
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"\0" * 100)
    _save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]


def _enospc() -> OSError:
    import errno

    return OSError(errno.ENOSPC, "No space left on device")


def _raised(error: BaseException, context: BaseException | None = None) -> BaseException:
    """`error` as raised while handling `context` (so `__context__` is set as Python sets it)."""
    try:
        try:
            if context is not None:
                raise context
        finally:
            raise error
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_is_disk_full_sees_every_shape_a_full_disk_takes():
    """The shapes measured on a real full tmpfs (train/disk_full.py): Python's OSError, safetensors' message,
    torch.save's RuntimeError over a Python file (OSError in __context__), DCP's per-rank failures."""
    from torch.distributed.checkpoint.api import CheckpointException

    from fotlab.train.disk_full import is_disk_full

    zip_writer = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    torch_save = _raised(RuntimeError(zip_writer), _enospc())
    assert is_disk_full(_enospc())
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_disk_full(torch_save)
    assert is_disk_full(CheckpointException("save", {0: (torch_save, None)}))
    assert not is_disk_full(RuntimeError(zip_writer))
    assert not is_disk_full(_raised(ValueError("bad value"), OSError(13, "Permission denied")))

"""`train()` under real DDP: two gloo processes on CPU, gradient accumulation with no_sync, shared checkpoints."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, spec_dict, out_dir, resume):
    import os
    from pathlib import Path

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fotlab.spec import parse_spec
    from fotlab.train import Runtime, TrainHooks, train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        logs = []
        runtime = Runtime(
            output_dir=Path(out_dir),
            rank=rank,
            world_size=world_size,
            resume_from=Path(out_dir) / "checkpoints" if resume else None,
            wrap_model=lambda m: DistributedDataParallel(m),
        )
        result = train(parse_spec(spec_dict), runtime, TrainHooks(on_log=lambda s, m: logs.append([s, m])))
        Path(out_dir, f"rank{rank}-{int(resume)}.json").write_text(
            json.dumps({"logs": logs, "final_step": result.final_step})
        )
    finally:
        dist.destroy_process_group()


def _run(world_size, spec_dict, out_dir, resume=False):
    mp.start_processes(
        _worker,
        args=(world_size, _free_port(), spec_dict, str(out_dir), resume),
        nprocs=world_size,
        start_method="spawn",
    )
    return [json.loads((out_dir / f"rank{r}-{int(resume)}.json").read_text()) for r in range(world_size)]


def test_ddp_two_ranks_train_checkpoint_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"document {i} says hello to the world. " * (3 + i % 4))
    spec = {
        "name": "ddp",
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 2,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "steps": 4,
            "batch_size": 4,
            "context_length": 32,
            "grad_accum": 2,
            "log_every": 1,
            "eval_every": 2,
            "eval_batches": 1,
            "checkpoint_every": 2,
            "crossbatch": {"range": 1, "packing": 2},
        },
    }
    ranks = _run(2, spec, tmp_path / "out")

    # Losses are averaged over ranks and DDP keeps the replicas equal: every rank reports the same numbers.
    def same_on_all_ranks(logs):
        return [(s, {k: v for k, v in m.items() if "loss" in k or "grad_norm" in k}) for s, m in logs]

    assert same_on_all_ranks(ranks[0]["logs"]) == same_on_all_ranks(ranks[1]["logs"])
    assert [s for s, m in ranks[0]["logs"] if "train/loss" in m] == [1, 2, 3, 4]
    train_logs = [m for _, m in ranks[0]["logs"] if "train/loss" in m]
    assert train_logs[-1]["train/tokens_seen"] == 4 * 2 * 2 * 4 * 32  # steps x accum x ranks x B x T
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000004"
    assert {p.name for p in checkpoint.iterdir()} >= {"rank-00000.pt", "rank-00001.pt", "model.safetensors"}
    packers = [torch.load(checkpoint / f"rank-{r:05d}.pt", weights_only=True)["packer"] for r in (0, 1)]
    assert packers[0]["config"]["rank"] == 0 and packers[1]["config"]["rank"] == 1
    assert ranks[0]["final_step"] == 4

    # Resume both ranks from step 4 and train to step 6; each rank continues from its own data position.
    spec["train"]["steps"] = 6
    resumed = _run(2, spec, tmp_path / "out", resume=True)
    assert [s for s, m in resumed[0]["logs"] if "train/loss" in m] == [5, 6]
    assert resumed[0]["final_step"] == 6

"""Sharded training memory: parameters + gradients + AdamW state per rank, FSDP2 vs DDP, 2 gloo ranks on CPU.

Cases: the same ~106M-parameter FoT model (8 layers, D 768, SwiGLU 2048, vocab 32000, memory layer 4; "tiny":
the CPU-instant shape), trained by 2 spawned processes with fotlab's FSDP2 wrapper (`fotlab.train.sharding`)
or with DDP, one AdamW step per timed step on B 2 x T 128 tokens per rank. After the steps each rank counts the
bytes of what it holds for training: its parameters (its local shard under FSDP), their gradients and the AdamW
state (exp_avg, exp_avg_sq, step). Reported: the maximum over ranks of those bytes (`state_mib_per_rank`, the
issue's target: FSDP <= 0.6x DDP), each part separately, the ranks' peak RSS, and the median wall seconds per
step (the compared metric: both ranks run at once on a shared 2-core machine, so CPU time of one process would
miss the other rank and the communication).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.runner import Case

SHAPES = {
    "full": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        vocab_size=32000,
        mem_layers=[4],
        batch=2,
        seq_len=128,
        warmup=1,
        steps=2,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=512,
        mem_layers=[2],
        batch=2,
        seq_len=32,
        warmup=1,
        steps=1,
    ),
}
WORLD_SIZE = 2


def cases(size: str) -> list[Case]:
    group = f"{WORLD_SIZE} ranks {size}"
    return [
        Case("fsdp_memory", group, name, {"size": size, "strategy": name}, metric="seconds", max_repeats=1)
        for name in ("ddp", "fsdp")
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _mib(tensors) -> float:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors) / 2**20


def _rank(rank: int, port: int, params: dict, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from fotlab.model import FoTConfig, FoTForCausalLM
    from fotlab.model.crossbatch import CrossBatch
    from fotlab.train.sharding import FsdpSettings, apply_fsdp

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        shape = SHAPES[params["size"]]
        fields = {
            k: shape[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
                "mem_layers",
            )
        }
        config = FoTConfig(**fields, max_position_embeddings=shape["seq_len"], last_context_length=shape["seq_len"])
        torch.manual_seed(0)
        model = FoTForCausalLM(config).train()
        n_params = sum(p.numel() for p in model.parameters())
        if params["strategy"] == "fsdp":
            model = apply_fsdp(model, torch.device("cpu"), FsdpSettings())
        else:
            model = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(rank)
        tokens = torch.randint(0, config.vocab_size, (shape["batch"], shape["seq_len"] + 1), generator=g)
        crossbatch = CrossBatch(range=1, packing=2)

        def step() -> None:
            logits = model(tokens[:, :-1], crossbatch=crossbatch).logits  # (B, T, V)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
            optimizer.step()

        seconds = []
        for i in range(shape["warmup"] + shape["steps"]):
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            started = time.perf_counter()
            step()
            dist.barrier()
            if i >= shape["warmup"]:
                seconds.append(time.perf_counter() - started)
        parameters = list(model.parameters())
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        result = {
            "n_params": n_params,
            "params_mib": _mib(parameters),
            "grads_mib": _mib(p.grad for p in parameters if p.grad is not None),
            "optim_mib": _mib(state),
            "seconds": statistics.median(seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        result["state_mib_per_rank"] = result["params_mib"] + result["grads_mib"] + result["optim_mib"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(params: dict) -> dict:
    """Spawn the 2 ranks; the maximum over ranks of every number (the median step time of the slower rank)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(_free_port(), params, out_dir), nprocs=WORLD_SIZE, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}

"""Training step: one optimizer step (forward, backward, AdamW) of FoT with crossbatch against LLaMA.

Cases ("full" model of models.py, fp32, B 4 rows x T 512 tokens, local context T for both):
fotlab with crossbatch (range 3, packing 4, stepping: the LongLLaMA mixture of 1, 3, 4, 4 contexts) in 3 memory
layers (the ratio baseline), fotlab without crossbatch (range 0: the same model as plain causal attention), and
transformers LlamaForCausalLM on the same weights. Each process takes `warmup` steps, then times `steps` steps
and reports their medians (CPU and wall).

`--device cuda`: bf16 autocast over fp32 weights on the GPU at B 8 x T 2048, crossbatch with both attention
backends (SDPA over the gathered contexts, and FlexAttention's block-sparse kernel, compiled), wall seconds,
peak GPU memory.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks import models
from benchmarks.runner import Case, gpu_peak_mib, timed_on

DEVICES = ("cpu", "cuda")
SHAPES = {"full": dict(batch=4, seq_len=512, warmup=1, steps=2), "tiny": dict(batch=4, seq_len=64, warmup=1, steps=2)}
GPU_SHAPES = {
    "full": dict(batch=8, seq_len=2048, warmup=3, steps=10),
    "tiny": dict(batch=4, seq_len=128, warmup=2, steps=2),
}


def cases(size: str, device: str = "cpu") -> list[Case]:
    base = {"size": size, **(SHAPES if device == "cpu" else GPU_SHAPES)[size]}
    group = f"B{base['batch']} T{base['seq_len']}"
    variants = [("fotlab-crossbatch", "crossbatch"), ("fotlab-range0", "range0"), ("hf-llama", "llama")]
    if device != "cpu":
        variants.insert(1, ("fotlab-crossbatch-flex", "crossbatch-flex"))
    return [Case("train_step", group, name, {**base, "impl": impl}) for name, impl in variants]


def _setup(params: dict):
    size = params["size"]
    config = models.fot_config(
        size,
        models.TRAIN_MEM_LAYERS[size],
        max_position_embeddings=params["seq_len"],
        last_context_length=params["seq_len"],
    )
    model = models.build_fot(config)
    crossbatch = None
    if params["impl"] == "llama":
        model = models.llama_twin(model)
    else:
        from fotlab.model.crossbatch import CrossBatch

        backend = "flex" if params["impl"].endswith("-flex") else "sdpa"
        crossbatch = CrossBatch(
            range=3 if params["impl"].startswith("crossbatch") else 0, packing=4, stepping=True, backend=backend
        )
    return model.to(params.get("device", "cpu")).train(), crossbatch


def step(model, optimizer, ids: torch.Tensor, targets: torch.Tensor, crossbatch=None) -> float:
    """One optimizer step (fp32 on CPU, bf16 autocast on CUDA); returns the loss."""
    kwargs = {} if crossbatch is None else {"crossbatch": crossbatch}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
        logits = model(ids, **kwargs).logits  # (B, T, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run(params: dict) -> dict:
    device = params.get("device", "cpu")
    model, crossbatch = _setup(params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = models.random_ids(params["batch"], params["seq_len"] + 1, model.config.vocab_size).to(device)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    for _ in range(params["warmup"]):
        step(model, optimizer, ids, targets, crossbatch)
    times = [timed_on(device, step, model, optimizer, ids, targets, crossbatch)[:2] for _ in range(params["steps"])]
    cpu_seconds, seconds = statistics.median(t[1] for t in times), statistics.median(t[0] for t in times)
    if device == "cpu":
        return {"cpu_seconds": cpu_seconds, "seconds": seconds, "tokens_per_cpu_s": ids.numel() / cpu_seconds}
    return {
        "cpu_seconds": cpu_seconds,
        "seconds": seconds,
        "tokens_per_s": ids.numel() / seconds,
        **gpu_peak_mib(device),
    }

"""Prefill: time to ingest one long prompt and produce next-token logits, and the process's peak RSS.

Cases per length (4k / 16k / 64k tokens; "full" model of models.py, 2 memory layers, bf16 memory):
fotlab dense (the ratio baseline), fotlab top-k (k 128), fotlab FAISS (k 128; not at 64k), the naive
implementation of the same semantics (naive.py), and transformers LlamaForCausalLM on the same weights (plain
full attention: a different, quadratic model, shown where it runs in reasonable time). Everything runs under
inference_mode in fp32 with logits for the last position only; each case's process first runs a short warm-up prompt.

`--device cuda`: the same cases except FAISS (a CPU library here) in bf16 weights on the GPU, LLaMA up to 64k
(SDPA's fused kernels keep its memory linear), timed in wall seconds, with the allocator's peak GPU memory.
"""

from __future__ import annotations

import torch

from benchmarks import models
from benchmarks.runner import Case, current_rss_mib, gpu_peak_mib, peak_rss_mib, timed_on

DEVICES = ("cpu", "cuda")
LENGTHS = {"full": [4096, 16384, 65536], "tiny": [256]}
LLAMA_MAX_LEN = {"full": 16384, "tiny": 256}  # full attention beyond this takes many minutes per run on 2 cores
NAIVE_MAX_LEN = {"full": 16384, "tiny": 256}
TOPK = {"full": 128, "tiny": 8}
SLOW_LEN = 65536  # cases this long run once (max_repeats 1), dense and top-k only


def cases(size: str, device: str = "cpu") -> list[Case]:
    gpu = device != "cpu"
    out = []
    for length in LENGTHS[size]:
        group = f"{length // 1024}k tokens" if length >= 1024 else f"{length} tokens"
        variants = [("fotlab-dense", "dense"), ("fotlab-topk", "topk")]
        if length < SLOW_LEN and not gpu:
            variants.append(("fotlab-faiss", "faiss"))
        if length <= NAIVE_MAX_LEN[size]:
            variants.append(("naive-dense", "naive"))
        if gpu or length <= LLAMA_MAX_LEN[size]:
            variants.append(("hf-llama", "llama"))
        slow = length >= SLOW_LEN and not gpu
        for name, impl in variants:
            params = {"size": size, "length": length, "impl": impl, "topk": TOPK[size]}
            out.append(Case("prefill", group, name, params, max_repeats=1 if slow else None))
    return out


def _model(params: dict):
    impl = params["impl"]
    retrieval = impl if impl in ("topk", "faiss") else "dense"
    config = models.fot_config(
        params["size"], models.PREFILL_MEM_LAYERS[params["size"]], mem_retrieval=retrieval, mem_topk=params["topk"]
    )
    model = models.build_fot(config)
    if impl == "naive":
        from benchmarks import naive

        naive.install()
    if impl == "llama":
        model = models.llama_twin(model, params["length"]).eval()
    return models.to_device(model, params.get("device", "cpu"))


def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) after reading all of `ids` (B, L); memory is built and dropped inside."""
    out = model(ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


def run(params: dict) -> dict:
    torch.manual_seed(0)
    device = params.get("device", "cpu")
    model = _model(params)
    vocab = model.config.vocab_size
    window = models.SHAPES[params["size"]]["max_position_embeddings"]
    with torch.inference_mode():
        prefill(model, models.random_ids(1, 2 * window, vocab, seed=1).to(device))  # warm-up: kernels, allocator
        rss_before = current_rss_mib()
        ids = models.random_ids(1, params["length"], vocab).to(device)
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        seconds, cpu_seconds, logits = timed_on(device, prefill, model, ids)
    assert torch.isfinite(logits).all()
    peak = peak_rss_mib()
    return {
        "cpu_seconds": cpu_seconds,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "prefill_rss_mib": peak - rss_before,
        **gpu_peak_mib(device),
        **(
            {"tokens_per_cpu_s": params["length"] / cpu_seconds}
            if device == "cpu"
            else {"tokens_per_s": params["length"] / seconds}
        ),
    }

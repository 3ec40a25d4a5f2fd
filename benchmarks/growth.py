"""Cost growth: fotlab prefill time and memory as the prompt grows (4k -> 32k tokens here; the
64k point is the prefill benchmark's fotlab-dense row, so it is not run twice), and bytes per token.

One case per length (fotlab dense retrieval, the default; the "full" model of models.py, 2 bf16 memory layers); the
ratio column is relative to the shortest prompt, so linear growth shows as ratio = length ratio. Reported per
case: prefill CPU seconds (ratio column) and wall seconds, `prefill_rss_mib` (peak RSS minus the RSS before the
prompt), `mem_bytes_per_token` (the FoT memory's stored key/value/valid bytes divided by the tokens in memory)
and `alloc_bytes_per_token` (the same for the allocated, capacity-doubling buffers).
"""

from __future__ import annotations

import torch

from benchmarks import models
from benchmarks.runner import Case, current_rss_mib, gpu_peak_mib, peak_rss_mib, timed_on

DEVICES = ("cpu", "cuda")
LENGTHS = {"full": [4096, 8192, 16384, 32768], "tiny": [128, 256]}  # 64k: the prefill benchmark's row
GPU_LENGTHS = {"full": [4096, 16384, 65536, 262144], "tiny": [128, 256]}


def cases(size: str, device: str = "cpu") -> list[Case]:
    lengths = (LENGTHS if device == "cpu" else GPU_LENGTHS)[size]
    return [
        Case(
            "growth",
            "fotlab-dense vs length",
            f"{n // 1024}k" if n >= 1024 else str(n),
            {"size": size, "length": n},
            max_repeats=1 if n >= 32768 and device == "cpu" else None,
        )
        for n in lengths
    ]


def memory_bytes(memory) -> tuple[int, int, int]:
    """(used bytes, allocated bytes, tokens) of a FoTMemory: keys + values + valid over all layers."""
    used = allocated = 0
    for layer in memory.layers.values():
        for tensor in (layer.keys, layer.values, layer.valid):
            used += tensor.numel() * tensor.element_size()
            allocated += tensor.untyped_storage().nbytes()
    return used, allocated, memory.n_tokens


def run(params: dict) -> dict:
    config = models.fot_config(params["size"], models.PREFILL_MEM_LAYERS[params["size"]], mem_retrieval="dense")
    device = params.get("device", "cpu")
    model = models.to_device(models.build_fot(config), device)
    window = config.max_position_embeddings
    with torch.inference_mode():
        warm_up = models.random_ids(1, 2 * window, config.vocab_size, seed=1).to(device)
        model(warm_up, logits_to_keep=1, use_cache=False)
        rss_before = current_rss_mib()
        ids = models.random_ids(1, params["length"], config.vocab_size).to(device)
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        seconds, cpu_seconds, out = timed_on(device, model, ids, logits_to_keep=1, use_cache=False)
    used, allocated, n_tokens = memory_bytes(out.memory)
    peak = peak_rss_mib()
    per_token = (
        {"cpu_us_per_token": 1e6 * cpu_seconds / params["length"]}
        if device == "cpu"
        else {"us_per_token": 1e6 * seconds / params["length"]}
    )
    return {
        "cpu_seconds": cpu_seconds,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "prefill_rss_mib": peak - rss_before,
        "mem_tokens": n_tokens,
        "mem_bytes_per_token": used / max(n_tokens, 1),
        "alloc_bytes_per_token": allocated / max(n_tokens, 1),
        **per_token,
        **gpu_peak_mib(device),
    }

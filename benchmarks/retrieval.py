"""Retrieval: exact top-k inner-product search of 1k queries over 64k keys (Dh 128, fp32).

Cases per k: fotlab's top-k search as used by `memory_attention(retrieval="topk")` (the ratio baseline),
FAISS `IndexFlatIP` (building the index and searching, as fotlab's "faiss" path does on every call), and the
plain `torch.topk(q @ k.T)`. Each process times `calls` calls after one warm-up call and reports the medians
(CPU and wall).
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.runner import Case, timed

SHAPES = {
    "full": dict(n_keys=65536, n_queries=1024, head_dim=128, ks=[10, 128], calls=2),
    "tiny": dict(n_keys=2048, n_queries=64, head_dim=32, ks=[4], calls=2),
}


def cases(size: str) -> list[Case]:
    shape = SHAPES[size]
    out = []
    for k in shape["ks"]:
        params = {key: shape[key] for key in ("n_keys", "n_queries", "head_dim", "calls")} | {"k": k}
        for name in ("fotlab-topk", "faiss-flatip", "torch-matmul-topk"):
            out.append(Case("retrieval", f"k={k}", name, {**params, "impl": name}))
    return out


def search(impl: str, queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """(R, k) slots of the k keys with the largest inner product, for queries (R, Dh) and keys (M, Dh)."""
    if impl == "fotlab-topk":
        from fotlab.model import memory_attention as ma

        qf, mem_k = queries[None, None], keys[None, None]  # (B 1, Hkv 1, R, Dh), (1, 1, M, Dh)
        return ma._topk_dense_scan(qf, mem_k, None, k, 1.0, torch.float32, ma.TOPK_MEMORY_BLOCK)[1][0, 0]
    if impl == "faiss-flatip":
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(keys.shape[-1])
        index.add(keys.numpy())
        return torch.from_numpy(index.search(queries.numpy(), k)[1])
    return torch.matmul(queries, keys.T).topk(k, dim=-1).indices


def data(params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(params["n_keys"], params["head_dim"], generator=gen)
    queries = torch.randn(params["n_queries"], params["head_dim"], generator=gen)
    return queries, keys


def run(params: dict) -> dict:
    queries, keys = data(params)
    search(params["impl"], queries, keys, params["k"])  # warm-up
    times = [timed(search, params["impl"], queries, keys, params["k"])[:2] for _ in range(params["calls"])]
    return {"cpu_seconds": statistics.median(t[1] for t in times), "seconds": statistics.median(t[0] for t in times)}

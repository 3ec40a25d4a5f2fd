"""Dictionary lookup accuracy vs memory size (FOT_SPEC §3, the paper's synthetic retrieval task).

Protocol (per memory size m and sample, seeded):
- A dictionary document from `fotlab.data.synthetic.dictionary_lookup_doc` (records `<k> k1..kK <v> v1..vV`,
  distinct keys, then queries `<q> k <v> v` for keys drawn from the whole dictionary). It holds
  n_defs = m // record_len definitions, i.e. about m definition tokens: `<bos>` + definitions stream through
  memory in windows of at most T tokens (`last_context_length=0`) that hold whole records only (T // record_len
  records a window, the first one (T - 1) // record_len after `<bos>`). A record cut by a window boundary would
  lose its key in the layers below the memory layer (they only see their own window), so the value tokens after
  the cut could not be found by key whatever the memory does; aligned windows measure retrieval alone.
- The first `n_queries` queries (at most T // record_len) then run as the local context, attending to memory.
- Scored on value tokens with greedy argmax: `dict_lookup_acc` = whole values right (exact match of all V tokens),
  `dict_lookup_token_acc` = value tokens right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import line_plot
from fotlab.eval.results import EvalResult
from fotlab.eval.streaming import empty_memory, model_device, progress, resolve_chunk_len, stream_to_memory
from fotlab.names import dictionary_metric
from fotlab.spec.eval import DictionaryEvalSpec


def dictionary_sample(rng: np.random.Generator, memory_size: int, n_queries: int, key_len: int, value_len: int):
    """(definition ids, query ids, value mask over query ids) for about memory_size definition tokens."""
    from fotlab.data.synthetic import dictionary_lookup_doc

    record_len = 2 + key_len + value_len
    n_defs = memory_size // record_len
    if n_defs < 1:
        raise ValueError(f"dictionary lookup: memory size {memory_size} holds no {record_len}-token record")
    ids, mask = dictionary_lookup_doc(rng, doc_len=2 * n_defs * record_len, key_len=key_len, value_len=value_len)
    n_def_tokens = n_defs * record_len
    n_query_tokens = min(n_queries, n_defs) * record_len
    queries = ids[n_def_tokens : n_def_tokens + n_query_tokens]
    value_mask = mask[n_def_tokens : n_def_tokens + n_query_tokens]
    return ids[:n_def_tokens], queries, value_mask


def record_windows(defs: list[int], record_len: int, window_len: int, bos: list[int]) -> list[list[int]]:
    """bos + defs cut into windows of at most window_len tokens, each holding whole records (module docstring)."""
    per_window = window_len // record_len
    first = (window_len - len(bos)) // record_len
    if per_window < 1 or first < 1:
        raise ValueError(f"dictionary lookup: a {window_len}-token window holds no {record_len}-token record")
    windows = [bos + defs[: first * record_len]]
    step = per_window * record_len
    windows += [defs[s : s + step] for s in range(first * record_len, len(defs), step)]
    return [w for w in windows if w]


@torch.no_grad()
def stream_records(model, windows: list[list[int]], memory):
    """Send each window (one forward of at most T tokens) into memory; returns the memory."""
    device = model_device(model)
    for window in windows:
        ids = torch.tensor([window], dtype=torch.long, device=device)  # (1, <= T)
        memory = stream_to_memory(model, ids, memory, ids.shape[1])
    return memory


@torch.no_grad()
def score_queries(model, memory, queries: list[int], value_mask: list[int], value_len: int) -> tuple[int, int, int]:
    """(values all right, value tokens right, n values) of the queries run locally against memory."""
    device = model_device(model)
    ids = torch.tensor([queries], dtype=torch.long, device=device)  # (1, Q)
    logits = model(ids, memory=memory, last_context_length=ids.shape[1], use_cache=False).logits[0]  # (Q, V)
    pred = logits[:-1].argmax(-1)  # prediction of token t + 1
    target = ids[0, 1:]
    scored = torch.tensor(value_mask[1:], dtype=torch.bool, device=device)
    hits = (pred == target)[scored].view(-1, value_len)  # (n_values, value_len)
    return int(hits.all(-1).sum()), int(hits.sum()), hits.shape[0]


def dictionary_lookup_accuracy(
    model,
    tokenizer,
    cfg: DictionaryEvalSpec,
    *,
    output_dir: str | Path,
    seed: int = 0,
    context_length: int | None = None,
    show_progress: bool = False,
) -> EvalResult:
    """Accuracy per memory size. Metrics `eval/dict_lookup_acc/mem_M` and `eval/dict_lookup_token_acc/mem_M`."""
    model.eval()
    T = resolve_chunk_len(model, cfg.chunk_len, context_length)
    record_len = 2 + cfg.key_len + cfg.value_len
    n_queries = max(1, min(cfg.n_queries, T // record_len))
    bos = [tokenizer.bos_token_id] if tokenizer is not None and tokenizer.bos_token_id is not None else []
    rng = np.random.Generator(np.random.PCG64([seed, 0xD1C7]))
    metrics, rows = {}, []
    for m in progress(cfg.memory_sizes, enabled=show_progress, description="dictionary lookup"):
        n_exact = n_tok = n_values = 0
        for _ in range(cfg.n_samples):
            defs, queries, value_mask = dictionary_sample(rng, m, n_queries, cfg.key_len, cfg.value_len)
            memory = stream_records(model, record_windows(defs, record_len, T, bos), empty_memory(model))
            exact, tok, n = score_queries(model, memory, queries, value_mask, cfg.value_len)
            n_exact, n_tok, n_values = n_exact + exact, n_tok + tok, n_values + n
        metrics[dictionary_metric(m)] = n_exact / n_values
        metrics[dictionary_metric(m, per_token=True)] = n_tok / (n_values * cfg.value_len)
        rows.append(
            {
                "memory": m,
                "accuracy": n_exact / n_values,
                "token_accuracy": n_tok / (n_values * cfg.value_len),
                "values": n_values,
            }
        )
    series = {"value exact match": [r["accuracy"] for r in rows], "value tokens": [r["token_accuracy"] for r in rows]}
    figure = line_plot(
        Path(output_dir) / "dictionary_lookup.png",
        cfg.memory_sizes,
        series,
        xlabel="dictionary tokens in memory",
        ylabel="accuracy",
        title=f"dictionary lookup (T = {T})",
        logx=True,
    )
    return EvalResult(
        name="dictionary_lookup",
        metrics=metrics,
        rows=rows,
        figure_path=figure,
        info={"chunk_len": T, "n_queries": n_queries, "seed": seed},
    )

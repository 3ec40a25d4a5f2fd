"""Dictionary lookup accuracy vs memory size (FOT_SPEC §3, the paper's synthetic retrieval task).

Protocol (per memory size m and sample, seeded):
- A dictionary document from `fotlab.data.synthetic.dictionary_lookup_doc` (records `<k> k1..kK <v> v1..vV`,
  distinct keys, then queries `<q> k <v> v` for keys drawn from the whole dictionary). It holds
  n_defs = m // record_len definitions, i.e. about m definition tokens: `<bos>` + definitions stream through
  memory in chunks of T tokens (`last_context_length=0`).
- The first `n_queries` queries (at most T // record_len) then run as the local context, attending to memory.
- Scored on value tokens with greedy argmax: `dict_lookup_acc` = whole values right (exact match of all V tokens),
  `dict_lookup_token_acc` = value tokens right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import line_plot
from fotlab.eval.results import EvalResult, dictionary_metric
from fotlab.eval.spec import DictionaryEvalSpec
from fotlab.eval.streaming import empty_memory, model_device, progress, resolve_chunk_len, stream_to_memory


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
    queries = ids[n_def_tokens:n_def_tokens + n_query_tokens]
    value_mask = mask[n_def_tokens:n_def_tokens + n_query_tokens]
    return ids[:n_def_tokens], queries, value_mask


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


def dictionary_lookup_accuracy(model, tokenizer, cfg: DictionaryEvalSpec, *, output_dir: str | Path, seed: int = 0,
                               context_length: int | None = None, show_progress: bool = False) -> EvalResult:
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
            ids = torch.tensor([bos + defs], dtype=torch.long, device=model_device(model))  # (1, 1 + m')
            memory = stream_to_memory(model, ids, empty_memory(model), T)
            exact, tok, n = score_queries(model, memory, queries, value_mask, cfg.value_len)
            n_exact, n_tok, n_values = n_exact + exact, n_tok + tok, n_values + n
        metrics[dictionary_metric(m)] = n_exact / n_values
        metrics[dictionary_metric(m, per_token=True)] = n_tok / (n_values * cfg.value_len)
        rows.append({"memory": m, "accuracy": n_exact / n_values,
                     "token_accuracy": n_tok / (n_values * cfg.value_len), "values": n_values})
    series = {"value exact match": [r["accuracy"] for r in rows],
              "value tokens": [r["token_accuracy"] for r in rows]}
    figure = line_plot(Path(output_dir) / "dictionary_lookup.png", cfg.memory_sizes, series,
                       xlabel="dictionary tokens in memory", ylabel="accuracy",
                       title=f"dictionary lookup (T = {T})", logx=True)
    return EvalResult(name="dictionary_lookup", metrics=metrics, rows=rows, figure_path=figure,
                      info={"chunk_len": T, "n_queries": n_queries, "seed": seed})

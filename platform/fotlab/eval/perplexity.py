"""Perplexity vs memory size (FOT_SPEC §3).

    python -m fotlab.cli eval experiments/paper/ppl_single_doc.yaml --model DIR     # via the runner

Definition (precise):
- A *stream* is a token sequence: in "single_doc" mode one framed document `<bos> doc <eos>` (memory starts
  empty for each document); in "multi_doc" mode all framed documents concatenated into one stream (memory is
  kept across documents, so other documents act as distractors).
- A stream is read in chunks of T tokens (T = local context). Chunk c runs with the memory left by chunks < c
  (`model(chunk, memory=m, last_context_length=0)`), then its (k, v) enter memory.
- Memory size m caps the memory at the newest m tokens per memory layer (FIFO eviction, `FoTMemory` capacity);
  m = 0 means no memory at all: every chunk is scored on its own, which equals the model's plain perplexity
  of the chunks. The effective context of a token is its local prefix in the chunk plus min(m, history).
- The scored tokens are next-token targets inside the stream (the `<bos>` that follows an `<eos>` in a multi-doc
  stream is not scored). `token_set: all` scores every target of every chunk at every size (the same token set
  for all sizes); `token_set: full_memory` scores only chunks starting at >= max(memory_sizes) tokens into the
  stream, so every size has its full memory available.
- Reported: perplexity = exp(mean NLL over scored tokens) per (mode, memory size).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fotlab.eval.plots import line_plot
from fotlab.eval.results import EvalResult
from fotlab.eval.streaming import (
    TokenScores,
    empty_memory,
    frame_documents,
    model_device,
    progress,
    resolve_chunk_len,
    shifted_targets,
)
from fotlab.names import ppl_metric
from fotlab.spec.eval import PerplexityEvalSpec, perplexity_key


def build_streams(
    docs: list[list[int]], mode: str, bos_id: int | None, eos_id: int | None, max_stream_tokens: int | None = None
) -> list[torch.Tensor]:
    """The token streams of a mode: one per document ("single_doc") or one concatenation ("multi_doc")."""
    framed = frame_documents(docs, bos_id, eos_id)
    streams = framed if mode == "single_doc" else [torch.cat(framed)]
    if max_stream_tokens is not None:
        streams = [s[:max_stream_tokens] for s in streams]
    return [s for s in streams if len(s) >= 2]


@torch.no_grad()
def score_stream(
    model, stream: torch.Tensor, chunk_len: int, memory_size: int, score_from: int = 0, ignore_ids: tuple[int, ...] = ()
) -> TokenScores:
    """Scores of one 1-D stream read in chunks of chunk_len with memory capped at memory_size (0 = no memory);
    only targets at positions >= score_from count."""
    device = model_device(model)
    ids = stream.to(device)
    targets = shifted_targets(ids, ignore_ids)  # (L,)
    targets[:score_from] = -100
    scores = TokenScores()
    memory = empty_memory(model, memory_size) if memory_size > 0 else None
    for s in range(0, len(ids), chunk_len):
        if memory_size == 0:
            memory = None  # every chunk on its own
        out = model(ids[None, s : s + chunk_len], memory=memory, last_context_length=0, use_cache=False)
        memory = out.memory
        scores.add(out.logits[0], targets[s : s + chunk_len])
    return scores


def perplexity_vs_memory(
    model,
    tokenizer,
    cfg: PerplexityEvalSpec,
    docs: list[list[int]],
    *,
    output_dir: str | Path,
    context_length: int | None = None,
    show_progress: bool = False,
) -> EvalResult:
    """Perplexity per (mode, memory size) over `docs` (token id lists). Metrics `eval/{name}_{mode}/mem_{m}`;
    a plot of perplexity vs context (T + m) per mode. `context_length` = training T (default chunk length)."""
    model.eval()
    T = resolve_chunk_len(model, cfg.chunk_len, context_length)
    bos_id, eos_id = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    ignore = (bos_id,) if bos_id is not None else ()
    score_from = max(cfg.memory_sizes) if cfg.token_set == "full_memory" else 0
    metrics, rows, series = {}, [], {}
    for mode in cfg.modes:
        streams = build_streams(docs, mode, bos_id, eos_id, cfg.max_stream_tokens)
        jobs = [(m, st) for m in cfg.memory_sizes for st in streams]
        per_size = {m: TokenScores() for m in cfg.memory_sizes}
        for m, stream in progress(jobs, enabled=show_progress, description=f"{cfg.name} {mode}"):
            start = (score_from // T) * T + (T if score_from % T else 0)  # first chunk with enough history
            per_size[m].merge(score_stream(model, stream, T, m, start, ignore))
        for m, sc in per_size.items():
            if sc.n_tokens == 0:
                continue
            metrics[ppl_metric(cfg.name, mode, m)] = sc.perplexity
            rows.append({"mode": mode, "memory": m, "context": T + m, "ppl": sc.perplexity, "tokens": sc.n_tokens})
        series[mode] = [r["ppl"] for r in rows if r["mode"] == mode]
    if not rows:
        raise ValueError(
            f"perplexity {cfg.name!r}: no token was scored (streams shorter than the scored range {score_from} tokens?)"
        )
    x = [T + m for m in cfg.memory_sizes if any(r["memory"] == m for r in rows)]
    figure = line_plot(
        Path(output_dir) / f"{cfg.name}_{'_'.join(cfg.modes)}_vs_memory.png",
        x,
        series,
        xlabel="context tokens (T + memory)",
        ylabel="perplexity",
        logx=True,
        title=f"{cfg.name} ({', '.join(cfg.modes)}): perplexity vs memory (T = {T})",
    )
    return EvalResult(
        name=perplexity_key(cfg),
        metrics=metrics,
        rows=rows,
        figure_path=figure,
        info={"chunk_len": T, "token_set": cfg.token_set, "n_docs": len(docs)},
    )

"""Distraction ratio r_d (FOT_SPEC §3): how much of a memory layer's attention to memory lands on the relevant context.

Protocol (per sample, seeded; the same samples for every d so the curve is paired):
- Documents are framed `<bos> doc <eos>` and cut into contexts of T tokens. A sample is a document A with >= 2
  contexts and an index c >= 1: the *current* chunk is A[c], the *relevant* context is A[c - 1].
- d contexts enter memory: the relevant one plus d - 1 contexts drawn from other documents (nested: the
  distractors for d are the first d - 1 of one fixed draw), in a random order. Each context's (k, v) are computed
  on its own (empty memory), as crossbatch training presents them.
- The current chunk runs with that memory and a `fotlab.model.MemoryMassProbe`: every memory layer reports the
  attention mass of its queries per memory context (the very weights its output uses), and
  r_d = mass on the relevant context / mass on all memory, per query and head, then averaged.
- A layer that attends uniformly gives exactly 1/d; a standard transformer ~1/d; FoT stays far above.
- (query, head) rows whose memory mass underflows to exactly 0 have no ratio and are not averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import line_plot
from fotlab.eval.results import EvalResult
from fotlab.eval.streaming import empty_memory, frame_documents, model_device, progress, resolve_chunk_len
from fotlab.model import MemoryMassProbe
from fotlab.names import distraction_metric
from fotlab.spec.eval import DistractionEvalSpec


def _contexts(docs: list[list[int]], T: int, bos_id, eos_id) -> list[list[torch.Tensor]]:
    """Per document, its full T-token contexts."""
    out = []
    for stream in frame_documents(docs, bos_id, eos_id):
        out.append([stream[s : s + T] for s in range(0, len(stream) - T + 1, T)])
    return out


def _draw_samples(contexts, n_samples: int, max_d: int, rng: np.random.Generator):
    """[(current, relevant, distractors[max_d - 1], order_seed)]: distractors come from other documents."""
    eligible = [i for i, ctxs in enumerate(contexts) if len(ctxs) >= 2]
    if not eligible:
        raise ValueError("distraction: no document has 2 full contexts (use longer documents or a smaller chunk_len)")
    pool = [(i, j) for i, ctxs in enumerate(contexts) for j in range(len(ctxs))]
    samples = []
    for _ in range(n_samples):
        a = int(rng.choice(eligible))
        c = int(rng.integers(1, len(contexts[a])))
        others = [p for p in pool if p[0] != a]
        if len(others) < max_d - 1:
            raise ValueError(
                f"distraction: d = {max_d} needs {max_d - 1} contexts from other documents, only {len(others)} exist"
            )
        picks = rng.choice(len(others), size=max_d - 1, replace=False)
        distractors = [contexts[others[k][0]][others[k][1]] for k in picks]
        samples.append((contexts[a][c], contexts[a][c - 1], distractors, int(rng.integers(2**31))))
    return samples


@torch.no_grad()
def _memory_of(model, ctxs: list[torch.Tensor], layers: list[int]):
    """FoTMemory holding ctxs (each encoded on its own) one after another in a single batch row."""
    batch = torch.stack(ctxs).to(model_device(model))  # (d, T)
    per_ctx = model(batch, last_context_length=0, use_cache=False, logits_to_keep=1).memory
    memory = empty_memory(model)
    for i in layers:
        lm = per_ctx[i]
        k = lm.keys.transpose(0, 1).reshape(1, lm.keys.shape[1], -1, lm.keys.shape[-1])  # (1, Hkv, d*T, Dh)
        v = lm.values.transpose(0, 1).reshape(1, lm.values.shape[1], -1, lm.values.shape[-1])  # (1, Hkv, d*T, Dh)
        memory = memory.append(i, k, v, lm.valid.reshape(1, -1))
    return memory


def _ratio(mass: torch.Tensor, relevant: int) -> float:
    """mass (B, H, T, 1 + d) -> mean over (query, head) rows of mass[relevant] / mass on all memory. Rows that put
    no mass at all on memory (fp32 underflow: every memory score far below the local ones) have no ratio and are
    left out; NaN when no row attends to memory."""
    mem = mass[..., 1:].double()
    total = mem.sum(-1)
    ok = total > 0
    if not bool(ok.any()):
        return float("nan")
    return float((mem[..., relevant][ok] / total[ok]).mean())


@torch.no_grad()
def distraction_ratio(
    model,
    tokenizer,
    cfg: DistractionEvalSpec,
    docs: list[list[int]],
    *,
    output_dir: str | Path,
    seed: int = 0,
    context_length: int | None = None,
    show_progress: bool = False,
) -> EvalResult:
    """r_d per d (mean over memory layers and samples) and per layer. Metrics `eval/distraction_ratio/d_D` and
    `eval/distraction_ratio/layer_I/d_D`; plot of r_d vs d beside 1/d."""
    model.eval()
    layers = list(cfg.layers if cfg.layers is not None else model.config.mem_layers)
    if not layers or any(i not in model.config.mem_layers for i in layers):
        raise ValueError(f"distraction: layers {layers} must be memory layers of the model {model.config.mem_layers}")
    T = resolve_chunk_len(model, cfg.chunk_len, context_length)
    rng = np.random.Generator(np.random.PCG64([seed, 0xD157]))
    samples = _draw_samples(
        _contexts(docs, T, tokenizer.bos_token_id, tokenizer.eos_token_id), cfg.n_samples, max(cfg.n_contexts), rng
    )
    ratios = {(d, i): [] for d in cfg.n_contexts for i in layers}
    jobs = [(d, s) for d in cfg.n_contexts for s in samples]
    for d, (current, relevant, distractors, order_seed) in progress(
        jobs, enabled=show_progress, description="distraction"
    ):
        order = np.random.Generator(np.random.PCG64(order_seed)).permutation(d)  # slot -> context
        ctxs = [relevant, *distractors[: d - 1]]
        memory = _memory_of(model, [ctxs[k] for k in order], layers)
        probe = MemoryMassProbe(torch.arange(d, device=model_device(model)).repeat_interleave(T), d)  # (d*T,)
        model(
            current[None].to(model_device(model)),
            memory=memory,
            last_context_length=current.shape[0],
            use_cache=False,
            logits_to_keep=1,
            memory_mass=probe,
        )
        rel_slot = int(np.nonzero(order == 0)[0][0])
        for i in layers:
            ratios[(d, i)].append(_ratio(probe.mass[i], rel_slot))
    return _distraction_result(cfg, layers, ratios, T, output_dir)


def _distraction_result(cfg, layers, ratios, T, output_dir) -> EvalResult:
    metrics, rows = {}, []
    for d in cfg.n_contexts:
        per_layer = {i: float(np.mean(ratios[(d, i)])) for i in layers}
        metrics[distraction_metric(d)] = float(np.mean(list(per_layer.values())))
        row = {"d": d, "r_d": metrics[distraction_metric(d)], "1/d": 1.0 / d}
        for i, r in per_layer.items():
            metrics[distraction_metric(d, i)] = r
            row[f"layer {i}"] = r
        rows.append(row)
    series = {"r_d (model)": [r["r_d"] for r in rows], "1/d (uniform)": [1.0 / d for d in cfg.n_contexts]}
    figure = line_plot(
        Path(output_dir) / "distraction_ratio.png",
        cfg.n_contexts,
        series,
        xlabel="contexts in memory d",
        ylabel="r_d",
        title=f"distraction ratio (T = {T})",
        logx=True,
        dashed=("1/d (uniform)",),
    )
    return EvalResult(
        name="distraction",
        metrics=metrics,
        rows=rows,
        figure_path=figure,
        info={"chunk_len": T, "layers": layers, "n_samples": cfg.n_samples},
    )

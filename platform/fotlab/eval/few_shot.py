"""Few-shot in-context classification (TREC-style, FOT_SPEC §3): accuracy vs context length, mean over samplings.

Protocol (seeded):
- Examples (text, label) come from a jsonl / parquet file or an HF dataset (`save_to_disk` dir or hub name).
  Integer labels are named by `label_names` or the dataset's ClassLabel names. Queries are drawn first
  (from `query_split` when given, else held out of the same pool); demonstrations come from the rest.
- Per context length N and sampling: demonstrations (`template` with text and label) are drawn at random and
  appended after `<bos>` while the block stays within N - (longest query + label) tokens; the same block serves
  every query of that sampling.
- Memory-efficient scoring: the block minus its last `keep` tokens streams through memory once per sampling
  (windows of W, as the model does for a long input); then for each query one batched forward runs
  `block tail + query + option` for every label option against that memory (`keep` = last_context_length,
  reduced so the local part fits the window W). The prediction is the option with the highest sum of log-probs
  of its tokens; the query text is the template cut before "{label}" (its trailing space goes with the option).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import line_plot
from fotlab.eval.results import EvalResult
from fotlab.eval.streaming import model_device, progress, stream_to_memory, window_len
from fotlab.names import few_shot_metric
from fotlab.spec.eval import FewShotEvalSpec


def load_examples(cfg: FewShotEvalSpec, split: str | None = None) -> list[tuple[str, str]]:
    """(text, label name) pairs of the configured source (split overrides source.split for kind 'hf')."""
    import datasets

    src = cfg.source
    if src.kind in ("jsonl", "parquet"):
        ds = datasets.load_dataset("json" if src.kind == "jsonl" else "parquet", data_files=src.path, split="train")
    elif src.kind == "hf":
        target = src.path or src.name
        local = Path(str(target)).expanduser()
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            ds = ds[split or src.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(target), src.config, split=split or src.split)
    else:
        raise ValueError(f"few_shot {cfg.name!r}: source kind must be jsonl, parquet or hf, got {src.kind!r}")
    names = cfg.label_names
    feature = ds.features.get(cfg.label_field) if ds.features else None
    if names is None and hasattr(feature, "names"):
        names = list(feature.names)
    pairs = []
    for row in ds:
        label = row[cfg.label_field]
        pairs.append(
            (str(row[src.text_field]), names[label] if names is not None and isinstance(label, int) else str(label))
        )
    return pairs


def _query_parts(template: str, text: str) -> tuple[str, str]:
    """(query prefix without trailing whitespace, that whitespace) of the template cut before {label}."""
    head = template.split("{label}")[0].format(text=text)
    stripped = head.rstrip()
    return stripped, head[len(stripped) :]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _demo_block(bos: list[int], demo_ids: list[list[int]], rng, budget: int) -> list[int]:
    """bos + demonstrations (pre-tokenized) in random order, each added while it fits in `budget` tokens."""
    ids = list(bos)
    for j in rng.permutation(len(demo_ids)):
        piece = demo_ids[int(j)]
        if len(ids) + len(piece) <= budget:
            ids += piece
        if len(ids) >= budget - 2:
            break
    return ids


def _expand_memory(memory, n_rows: int):
    """The 1-row memory repeated for n_rows batch rows."""
    from fotlab.model import FoTMemory

    out = FoTMemory.empty(memory.dtype)
    for i, lm in memory.layers.items():
        if lm.n_tokens:
            out = out.append(
                i, lm.keys.expand(n_rows, -1, -1, -1), lm.values.expand(n_rows, -1, -1, -1), lm.valid.expand(n_rows, -1)
            )
    return out


@torch.no_grad()
def score_options(model, memory, local_ids: list[int], options: list[list[int]]) -> int:
    """Index of the option whose tokens have the highest summed log-prob after local_ids (given memory)."""
    device = model_device(model)
    n_opt, max_len = len(options), max(len(o) for o in options)
    L = len(local_ids) + max_len
    ids = torch.zeros(n_opt, L, dtype=torch.long, device=device)  # (n_opt, L) right-padded
    mask = torch.zeros(n_opt, L, dtype=torch.long, device=device)
    for r, opt in enumerate(options):
        row = local_ids + opt
        ids[r, : len(row)] = torch.tensor(row, device=device)
        mask[r, : len(row)] = 1
    mem = _expand_memory(memory, n_opt) if memory is not None and memory.n_tokens else None
    logits = model(ids, attention_mask=mask, memory=mem, last_context_length=L, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n_opt, L, V)
    scores = []
    for r, opt in enumerate(options):
        pos = torch.arange(len(local_ids) - 1, len(local_ids) - 1 + len(opt), device=device)
        scores.append(float(logp[r, pos, torch.tensor(opt, device=device)].sum()))
    return int(np.argmax(scores))


def few_shot_accuracy(
    model, tokenizer, cfg: FewShotEvalSpec, *, output_dir: str | Path, seed: int = 0, show_progress: bool = False
) -> EvalResult:
    """Accuracy per context length (mean and std over samplings). Metrics `eval/{name}_acc/ctx_N`, `..._acc_std`."""
    model.eval()
    rng = np.random.Generator(np.random.PCG64([seed, 0x1C1]))
    pool = load_examples(cfg)
    if cfg.query_split is not None:
        queries_all, demos = load_examples(cfg, cfg.query_split), pool
    else:
        order = rng.permutation(len(pool))
        n_q = min(cfg.n_queries, len(pool) // 2)
        queries_all, demos = [pool[int(j)] for j in order[:n_q]], [pool[int(j)] for j in order[n_q:]]
    labels = sorted({lab for _, lab in pool + queries_all})
    demo_ids = [_ids(tokenizer, cfg.template.format(text=t, label=lab)) for t, lab in demos]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    W = window_len(model)
    lcl = cfg.last_context_length or int(model.config.last_context_length)
    acc = {N: [] for N in cfg.context_lengths}
    jobs = [(N, s) for N in cfg.context_lengths for s in range(cfg.n_samplings)]
    for N, _ in progress(jobs, enabled=show_progress, description=f"few-shot {cfg.name}"):
        picks = rng.choice(len(queries_all), size=min(cfg.n_queries, len(queries_all)), replace=False)
        queries = [queries_all[int(j)] for j in picks]
        parts = [_query_parts(cfg.template, text) for text, _ in queries]
        q_ids = [_ids(tokenizer, head) for head, _ in parts]
        opt_ids = {ws: [_ids(tokenizer, ws + lab) for lab in labels] for ws in {ws for _, ws in parts}}
        longest = max(len(q) for q in q_ids) + max(len(o) for opts in opt_ids.values() for o in opts)
        block = _demo_block(bos, demo_ids, rng, max(N - longest, 1))
        keep = max(0, min(lcl, W - longest, len(block)))
        memory = (
            stream_to_memory(
                model, torch.tensor([block[: len(block) - keep]], device=model_device(model)), model.new_memory(), W
            )
            if len(block) > keep
            else None
        )
        tail = block[len(block) - keep :]
        n_right = 0
        for (_, label), q, (_, ws) in zip(queries, q_ids, parts):
            n_right += int(labels[score_options(model, memory, tail + q, opt_ids[ws])] == label)
        acc[N].append(n_right / len(queries))
    return _few_shot_result(cfg, acc, len(labels), output_dir)


def _few_shot_result(cfg, acc, n_labels, output_dir) -> EvalResult:
    metrics, rows = {}, []
    for N, values in acc.items():
        metrics[few_shot_metric(cfg.name, N)] = float(np.mean(values))
        metrics[few_shot_metric(cfg.name, N, "acc_std")] = float(np.std(values))
        rows.append(
            {"context": N, "accuracy": float(np.mean(values)), "std": float(np.std(values)), "samplings": len(values)}
        )
    figure = line_plot(
        Path(output_dir) / f"{cfg.name}_few_shot.png",
        list(acc),
        {cfg.name: [r["accuracy"] for r in rows]},
        xlabel="context tokens (demonstrations + query)",
        ylabel="accuracy",
        title=f"{cfg.name}: few-shot accuracy ({n_labels} labels)",
        logx=True,
    )
    return EvalResult(
        name=f"few_shot:{cfg.name}", metrics=metrics, rows=rows, figure_path=figure, info={"n_labels": n_labels}
    )

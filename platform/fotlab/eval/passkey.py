"""Passkey retrieval (FOT_SPEC §3): the Landmark Attention prompt, greedy decoding, exact match.

    fotlab eval SPEC --model DIR      # with `eval: {passkey: {lengths: [1024, 4096], depths: [0, 0.5, 1]}}`

- Prompts come from `fotlab.data.synthetic.passkey_prompt_for_tokens` (task sentence, filler, "The pass key is
  {K}. Remember it. {K} is the pass key.", filler, "What is the pass key? The pass key is"); `<bos>` first.
  Depth d puts the key line after d x (all filler characters); K is uniform in [1, max_passkey], seeded.
- Memory-efficient: one forward streams the prompt (all but the last `last_context_length` tokens go through
  windows into memory) computing logits only for the last position (`logits_to_keep=1`); then greedy decoding
  of len(answer tokens) steps with the returned cache (local cache + memory). Correct only if every token matches.
- The prompt's local part is capped at W - (answer tokens - 1), so the whole answer decodes in the local context:
  the cache flushes a full local context into memory, and with last_context_length = W it would do so after
  the first answer token, leaving the layers without memory only that token to read (`local_prompt_length`).
- Keys come from the evaluation split (`split`: "dev" / "test", `fotlab.data.splits`): passkeys of that split
  only, from its own stream; training passkey documents use "train" keys only, so no evaluated prompt (its key)
  occurs in training. `passkey_trials` gives exactly the (length, depth, key) triples scored.
- Memory or local: a prompt counts as "retrieved from memory" only if the whole key line lies before the prompt's
  local part (`key_in_memory`), i.e. it reached the model through memory alone. `eval/passkey_mem_acc/len_L`
  is the accuracy over those prompts only (with its count); at depth 1.0 the key line sits in the local part and
  such prompts measure local copying, not memory. Chance: one key of ~max_passkey / 10 test keys (~0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import heatmap
from fotlab.eval.results import EvalResult, accuracy_metrics, accuracy_row
from fotlab.eval.streaming import model_device, progress
from fotlab.names import chance_metric, passkey_metric
from fotlab.spec.eval import PasskeyEvalSpec


def passkey_prompt(tokenizer, n_tokens: int, key: int, depth: float):
    """(prompt ids with <bos>, answer ids, PasskeyPrompt) of about n_tokens prompt tokens."""
    from fotlab.data.synthetic import passkey_prompt_for_tokens

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = passkey_prompt_for_tokens(tokenizer, n_tokens - len(bos), key, depth)
    prompt_ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(p.prompt + p.answer, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        answer_ids = full_ids[len(prompt_ids) :]
    else:  # a merge across the boundary: tokenize the answer on its own
        answer_ids = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
    return bos + list(prompt_ids), list(answer_ids), p


def local_prompt_length(config, n_new: int, last_context_length: int | None = None) -> int:
    """Prompt tokens kept local: last_context_length (None = the config's), at most W - (n_new - 1) so decoding
    n_new tokens never flushes the local cache into memory."""
    lcl = config.last_context_length if last_context_length is None else last_context_length
    return max(min(lcl, config.max_position_embeddings - max(n_new - 1, 0)), 0)


@torch.no_grad()
def greedy_answer(model, prompt_ids: list[int], n_new: int, last_context_length: int | None = None) -> list[int]:
    """Greedy continuation of n_new tokens; the prompt is streamed through memory with logits for its last token
    only (its last `local_prompt_length` tokens local), then each new token runs against the returned cache."""
    device = model_device(model)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, L)
    lcl = local_prompt_length(model.config, n_new, last_context_length)
    out = model(ids, last_context_length=lcl, logits_to_keep=1, use_cache=True)
    generated = []
    for step in range(n_new):
        next_id = out.logits[:, -1].argmax(-1)  # (1,)
        generated.append(int(next_id))
        if step + 1 < n_new:
            out = model(next_id[:, None], cache=out.cache, logits_to_keep=1, use_cache=True)
    return generated


def passkey_trials(cfg: PasskeyEvalSpec, seed: int = 0, split: str = "dev") -> dict[tuple[int, float], list[int]]:
    """{(length, depth): the cfg.n_trials passkeys scored there}, drawn from the split's own stream."""
    from fotlab.data.splits import PASSKEY, split_rng
    from fotlab.data.synthetic import draw_passkey

    rng = split_rng(seed, PASSKEY, split)
    cells = [(L, d) for L in cfg.lengths for d in cfg.depths]
    return {cell: [draw_passkey(rng, cfg.max_passkey, split) for _ in range(cfg.n_trials)] for cell in cells}


def key_line_end(tokenizer, prompt_ids: list[int], p) -> int:
    """Token index just after the key line ("The pass key is K. ... is the pass key.") in prompt_ids."""
    info = f"The pass key is {p.key}. Remember it. {p.key} is the pass key."
    end_char = p.prompt.index(info) + len(info)
    n_bos = len(prompt_ids) - len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
    return n_bos + len(tokenizer(p.prompt[:end_char], add_special_tokens=False)["input_ids"])


def key_in_memory(
    model_config, tokenizer, prompt_ids: list[int], answer_len: int, p, last_context_length: int | None = None
) -> bool:
    """True if the whole key line lies before the prompt's local part, i.e. it is read from memory only."""
    local = local_prompt_length(model_config, answer_len, last_context_length)
    return key_line_end(tokenizer, prompt_ids, p) <= len(prompt_ids) - local


def passkey_retrieval(
    model,
    tokenizer,
    cfg: PasskeyEvalSpec,
    *,
    output_dir: str | Path,
    seed: int = 0,
    show_progress: bool = False,
    split: str = "dev",
) -> EvalResult:
    """Accuracy per (length, depth) over cfg.n_trials passkeys of the split. Metrics `eval/passkey_acc/len_L`
    (all prompts of the length), `eval/passkey_acc/len_L/depth_P` (P = depth in percent), `eval/passkey_mem_acc/
    len_L` (prompts whose key line is in memory only), each with its count; a length x depth heatmap."""
    model.eval()
    keys = passkey_trials(cfg, seed, split)
    hits: dict[tuple[int, float], list[tuple[bool, bool]]] = {}  # cell -> [(correct, key in memory)]
    for L, d in progress(list(keys), enabled=show_progress, description="passkey"):
        hits[(L, d)] = []
        for key in keys[(L, d)]:
            prompt_ids, answer_ids, p = passkey_prompt(tokenizer, L, key, d)
            got = greedy_answer(model, prompt_ids, len(answer_ids), cfg.last_context_length)
            in_memory = key_in_memory(model.config, tokenizer, prompt_ids, len(answer_ids), p, cfg.last_context_length)
            hits[(L, d)].append((got == answer_ids, in_memory))
    acc = {cell: float(np.mean([c for c, _ in h])) for cell, h in hits.items()}
    rows = [
        {"length": L, "depth": d, **accuracy_row(sum(c for c, _ in h), len(h)), "key_in_memory": sum(m for _, m in h)}
        for (L, d), h in hits.items()
    ]
    metrics = {chance_metric("passkey_acc"): 0.0, chance_metric("passkey_mem_acc"): 0.0}
    for L in cfg.lengths:
        cells = [hits[(L, d)] for d in cfg.depths]
        metrics.update(
            accuracy_metrics(passkey_metric(L), sum(c for h in cells for c, _ in h), sum(len(h) for h in cells))
        )
        from_memory = [c for h in cells for c, m in h if m]
        if from_memory:
            metrics.update(accuracy_metrics(passkey_metric(L, memory_only=True), sum(from_memory), len(from_memory)))
        for d in cfg.depths:
            metrics.update(accuracy_metrics(passkey_metric(L, d), sum(c for c, _ in hits[(L, d)]), len(hits[(L, d)])))
    grid = [[acc[(L, d)] for L in cfg.lengths] for d in cfg.depths]  # rows = depths, columns = lengths
    figure = heatmap(
        Path(output_dir) / "passkey_heatmap.png",
        grid,
        row_labels=[f"{d:g}" for d in cfg.depths],
        col_labels=[_short(L) for L in cfg.lengths],
        xlabel="prompt length (tokens)",
        ylabel="passkey depth",
        title="passkey retrieval accuracy",
    )
    return EvalResult(
        name="passkey",
        metrics=metrics,
        rows=rows,
        figure_path=figure,
        info={
            "seed": seed,
            "split": split,
            "last_context_length": cfg.last_context_length,
            "chance": f"1 in ~{cfg.max_passkey // 10} {split} keys (exact match of the key)",
        },
    )


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

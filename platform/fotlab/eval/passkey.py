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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fotlab.eval.plots import heatmap
from fotlab.eval.results import EvalResult
from fotlab.eval.streaming import model_device, progress
from fotlab.names import passkey_metric
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


def passkey_retrieval(
    model, tokenizer, cfg: PasskeyEvalSpec, *, output_dir: str | Path, seed: int = 0, show_progress: bool = False
) -> EvalResult:
    """Accuracy per (length, depth) over cfg.n_trials seeded passkeys. Metrics `eval/passkey_acc/len_L` (mean over
    depths) and `eval/passkey_acc/len_L/depth_P` (P = depth in percent); a length x depth heatmap."""
    model.eval()
    rng = np.random.Generator(np.random.PCG64([seed, 0x5EED]))
    cells = [(L, d) for L in cfg.lengths for d in cfg.depths]
    keys = {cell: [int(k) for k in rng.integers(1, cfg.max_passkey + 1, cfg.n_trials)] for cell in cells}
    acc: dict[tuple[int, float], float] = {}
    rows = []
    for L, d in progress(cells, enabled=show_progress, description="passkey"):
        n_correct = 0
        for key in keys[(L, d)]:
            prompt_ids, answer_ids, _ = passkey_prompt(tokenizer, L, key, d)
            got = greedy_answer(model, prompt_ids, len(answer_ids), cfg.last_context_length)
            n_correct += int(got == answer_ids)
        acc[(L, d)] = n_correct / cfg.n_trials
        rows.append({"length": L, "depth": d, "accuracy": acc[(L, d)], "trials": cfg.n_trials})
    metrics = {}
    for L in cfg.lengths:
        metrics[passkey_metric(L)] = float(np.mean([acc[(L, d)] for d in cfg.depths]))
        for d in cfg.depths:
            metrics[passkey_metric(L, d)] = acc[(L, d)]
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
        info={"seed": seed, "last_context_length": cfg.last_context_length},
    )


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

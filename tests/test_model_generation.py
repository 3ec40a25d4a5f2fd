"""Generation with `model.generate()`: cached decoding equals recomputation, across local-cache flushes."""

import torch

from fotlab.model import FoTCache, FoTForCausalLM, preset_config


def debug_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return FoTForCausalLM(preset_config("debug", **overrides)).eval()


def greedy(model, ids, n_new, **kwargs):
    out = model.generate(
        ids,
        max_new_tokens=n_new,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores, dim=1)  # (B, P + N), (B, N, V)


def test_cached_greedy_equals_recomputation_without_cache():
    model = debug_model()
    prompt = torch.randint(1, 512, (2, 20))
    seqs, scores = greedy(model, prompt, 30)  # 50 tokens: no flush (W = 64), prompt all local (<= 32)
    ids = prompt
    with torch.no_grad():
        for step in range(30):
            logits = model(ids, use_cache=False, last_context_length=10**6).logits[:, -1]
            assert (logits - scores[:, step]).abs().max().item() <= 1e-4
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, seqs)


def brute_force_flush_run(model, prompt, n_new):
    """Greedy decoding that recomputes every step from scratch under the flush semantics of FOT_SPEC §1.2:
    the prompt prefix goes to memory window by window, then the local context grows to W and is flushed whole."""
    cfg = model.config
    W, lcl = cfg.max_position_embeddings, cfg.last_context_length
    mem_len = max(prompt.shape[1] - lcl, 0)
    memory = model.new_memory()
    with torch.no_grad():
        if mem_len:
            memory = model(prompt[:, :mem_len], memory=memory, last_context_length=0).memory
        ids, local_start, all_logits, n_flushes = prompt, mem_len, [], 0
        for _ in range(n_new):
            if ids.shape[1] - local_start > W:  # the token just appended would overflow: the local context leaves
                flushed = ids[:, local_start:-1]
                memory = model(flushed, memory=memory, last_context_length=0).memory
                local_start, n_flushes = ids.shape[1] - 1, n_flushes + 1
            logits = model(ids[:, local_start:], memory=memory, use_cache=False, last_context_length=10**6).logits[
                :, -1
            ]
            all_logits.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(all_logits, 1), n_flushes, memory


def test_generation_across_two_flushes_equals_brute_force():
    model = debug_model(seed=1, max_position_embeddings=16, last_context_length=8)
    prompt = torch.randint(1, 512, (2, 13))  # 5 tokens to memory, 8 local
    n_new = 8 + 16 + 6  # local fills to W = 16, flushes, fills again, flushes
    seqs, scores = greedy(model, prompt, n_new)
    ref_ids, ref_logits, n_flushes, ref_memory = brute_force_flush_run(model, prompt, n_new)
    assert n_flushes >= 2
    assert (scores - ref_logits).abs().max().item() <= 1e-4
    assert torch.equal(seqs, ref_ids)


def test_forward_cache_flushes_whole_local_cache():
    model = debug_model(seed=2)
    ids = torch.randint(1, 512, (1, 30))
    with torch.no_grad():
        out = model(ids)
        assert out.cache.n_local == 30 and out.memory.n_tokens == 0
        step = model(torch.randint(1, 512, (1, 34)), cache=out.cache)
        assert step.cache.n_local == 64 and step.memory.n_tokens == 0
        nxt = model(torch.randint(1, 512, (1, 1)), past_key_values=step.cache)
    assert isinstance(nxt.past_key_values, FoTCache)
    assert nxt.cache.n_local == 1 and nxt.memory.n_tokens == 64
    assert nxt.cache.get_seq_length() == 65
    assert step.cache.n_local == 64  # earlier cache objects are not mutated


def test_left_padded_generation_equals_rows_alone():
    model = debug_model(seed=3, num_key_value_heads=2)
    rows = [torch.randint(1, 512, (1, n)) for n in (12, 7)]
    L = 12
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, L - row.shape[1] :], mask[b, L - row.shape[1] :] = row, 1
    batch, _ = greedy(model, ids, 15, attention_mask=mask)
    for b, row in enumerate(rows):
        alone, _ = greedy(model, row, 15)
        assert torch.equal(batch[b, L:], alone[0, row.shape[1] :])


def test_sampling_runs_with_memory_prompt():
    model = debug_model(seed=4)
    prompt = torch.randint(1, 512, (2, 100))  # > W: prefix goes to memory
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=True,
        top_k=20,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    seqs, logits = out.sequences, torch.stack(out.logits, 1)  # (2, 108), (2, 8, V) before the top-k filter
    assert seqs.shape == (2, 108) and torch.equal(seqs[:, :100], prompt)
    with torch.no_grad():
        torch.testing.assert_close(logits[:, 0], model(prompt).logits[:, -1])  # the memory prompt's next logits
    top20 = logits.topk(20, dim=-1).indices  # (2, 8, 20)
    assert (top20 == seqs[:, 100:, None]).any(-1).all()  # every sampled token is one of its step's top 20
    torch.manual_seed(0)
    again = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(again, seqs)  # seeded sampling repeats


def test_generate_from_given_memory():
    """Memory filled chunk by chunk (last_context_length=0), then `generate(..., memory=m)` continues from it."""
    model = debug_model(seed=5)
    document = torch.randint(1, 512, (1, 150))
    memory = model.new_memory()
    with torch.no_grad():
        for chunk in document.split(64, dim=1):
            memory = model(chunk, memory=memory, last_context_length=0).memory
        question = torch.randint(1, 512, (1, 10))
        first = model(question, memory=memory).logits[:, -1]
        without = model(question).logits[:, -1]
    seqs, scores = greedy(model, question, 5, memory=memory)
    assert memory.n_tokens == 150
    assert (scores[:, 0] - first).abs().max().item() <= 1e-5
    assert (scores[:, 0] - without).abs().max().item() > 1e-3
    assert seqs[0, 10].item() == first.argmax(-1).item()

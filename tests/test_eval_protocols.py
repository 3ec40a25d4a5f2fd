"""Evaluation protocols on the tiny "debug" FoT model: each produces metrics + a PNG, and matches a reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fotlab.data import byte_tokenizer
from fotlab.data.synthetic import PASSKEY_FILLER
from fotlab.eval.dictionary import dictionary_lookup_accuracy
from fotlab.eval.distraction import distraction_ratio
from fotlab.eval.few_shot import few_shot_accuracy, score_options
from fotlab.eval.passkey import greedy_answer, passkey_prompt, passkey_retrieval
from fotlab.eval.perplexity import perplexity_vs_memory, score_stream
from fotlab.model import FoTForCausalLM, preset_config
from fotlab.spec.eval import (
    DictionaryEvalSpec,
    DistractionEvalSpec,
    FewShotEvalSpec,
    PasskeyEvalSpec,
    PerplexityEvalSpec,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = preset_config(
        "debug",
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        mem_dtype="float32",
    )
    return FoTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (150, 90, 200, 130, 170)]


def _is_png(path) -> bool:
    return path is not None and path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# ----- perplexity -----------------------------------------------------------------------------------------------
def test_ppl_with_empty_memory_equals_plain_ppl(model):
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids[None], labels=ids[None], last_context_length=30).loss  # all local: vanilla LLaMA
    assert math.isclose(score_stream(model, ids, 64, 0).perplexity, math.exp(float(plain)), rel_tol=1e-5)
    # a longer stream with memory size 0 = every chunk scored on its own (plus the boundary target)
    long_ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(3))
    nll, n = 0.0, 0
    for s in range(0, 150, 50):
        chunk = long_ids[s : s + 51]  # the chunk + the next token as the last label
        with torch.no_grad():
            logits = model(chunk[None, :50], last_context_length=50).logits[0]
        targets = chunk[1:]
        nll += float(torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="sum"))
        n += len(targets)
    assert math.isclose(score_stream(model, long_ids, 50, 0).perplexity, math.exp(nll / n), rel_tol=1e-5)


def test_ppl_memory_changes_scores_and_fifo_cap(model):
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4))
    no_mem = score_stream(model, ids, 40, 0)
    with_mem = score_stream(model, ids, 40, 1000)
    capped_full = score_stream(model, ids, 40, 200)  # cap >= whole history: same as unbounded
    small = score_stream(model, ids, 40, 40)
    assert no_mem.n_tokens == with_mem.n_tokens == 199
    assert not math.isclose(no_mem.nll, with_mem.nll, rel_tol=1e-6)
    assert math.isclose(capped_full.nll, with_mem.nll, rel_tol=1e-6)
    assert not math.isclose(small.nll, with_mem.nll, rel_tol=1e-6)
    # only the first two chunks see <= 40 tokens of history: their scores equal
    first = score_stream(model, ids[:81], 40, 40)
    first_unbounded = score_stream(model, ids[:81], 40, 1000)
    assert math.isclose(first.nll, first_unbounded.nll, rel_tol=1e-6)


def test_perplexity_vs_memory_metrics_and_plot(model, tok, docs, tmp_path):
    cfg = PerplexityEvalSpec(memory_sizes=[0, 32, 96], modes=["single_doc", "multi_doc"], chunk_len=32)
    docs = [d[:100] for d in docs[:3]]
    r = perplexity_vs_memory(model, tok, cfg, docs, output_dir=tmp_path)
    for mode in ("single_doc", "multi_doc"):
        for m in (0, 32, 96):
            assert 1.0 < r.metrics[f"eval/ppl_{mode}/mem_{m}"] < 10 * len(tok)
    assert _is_png(r.figure_path)
    tokens = {row["tokens"] for row in r.rows if row["mode"] == "single_doc"}
    assert len(tokens) == 1  # one token set for every memory size
    # full_memory scores only chunks with >= 96 tokens of history
    full = perplexity_vs_memory(
        model,
        tok,
        cfg.model_copy(update={"token_set": "full_memory", "modes": ["multi_doc"]}),
        docs,
        output_dir=tmp_path,
    )
    n_full = {row["tokens"] for row in full.rows if row["mode"] == "multi_doc"}
    assert len(n_full) == 1 and n_full.pop() < max(row["tokens"] for row in r.rows if row["mode"] == "multi_doc")


# ----- passkey --------------------------------------------------------------------------------------------------
def test_passkey_prompt_is_the_papers_format(tok):
    ids, answer, p = passkey_prompt(tok, 400, 31337, 0.5)
    task = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    lines = p.prompt.split("\n")
    assert lines[0] == task
    assert lines[2] == "The pass key is 31337. Remember it. 31337 is the pass key."
    assert lines[4] == "What is the pass key? The pass key is"
    filler = " ".join([PASSKEY_FILLER] * 20)
    assert PASSKEY_FILLER == (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    )
    assert filler.startswith(lines[1]) and filler.startswith(lines[3])
    assert abs(len(lines[1]) - len(lines[3])) <= 1  # depth 0.5: half the filler characters before the key
    assert p.answer == " 31337" and tok.decode(answer) == " 31337"
    assert ids[0] == tok.bos_token_id and len(ids) <= 400 and len(ids) > 380


def test_greedy_answer_equals_generate(model, tok):
    ids, answer, _ = passkey_prompt(tok, 300, 4242, 0.25)
    got = greedy_answer(model, ids, 5, last_context_length=32)
    ref = model.generate(
        torch.tensor([ids]), max_new_tokens=5, do_sample=False, last_context_length=32, pad_token_id=tok.pad_token_id
    )
    assert got == ref[0, len(ids) :].tolist()


def test_greedy_answer_decodes_in_the_local_context(model, tok):
    """With last_context_length = W the cache would flush after the first answer token; the prompt's local part is
    capped instead, so every answer token equals a full recomputation whose local context holds the whole answer."""
    W = model.config.max_position_embeddings
    ids, _, _ = passkey_prompt(tok, 300, 4242, 0.5)
    got = greedy_answer(model, ids, 6, last_context_length=W)
    lcl = W - 5
    ref = list(ids)
    with torch.no_grad():
        for step in range(6):
            logits = model(torch.tensor([ref]), last_context_length=lcl + step, use_cache=False).logits
            ref.append(int(logits[0, -1].argmax()))
    assert got == ref[len(ids) :]
    flushed = model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, last_context_length=W, pad_token_id=tok.pad_token_id
    )[0, len(ids) :].tolist()
    assert flushed != got  # what decoding with a flush after the first token gives instead (this random model)


def test_passkey_retrieval_metrics_and_heatmap(model, tok, tmp_path):
    cfg = PasskeyEvalSpec(lengths=[256, 512], depths=[0.0, 1.0], n_trials=2, last_context_length=64)
    r = passkey_retrieval(model, tok, cfg, output_dir=tmp_path, seed=0)
    accuracies = {k: v for k, v in r.metrics.items() if k.startswith("eval/passkey_acc/")}
    assert set(accuracies) == {
        "eval/passkey_acc/len_256",
        "eval/passkey_acc/len_512",
        "eval/passkey_acc/len_256/depth_0",
        "eval/passkey_acc/len_256/depth_100",
        "eval/passkey_acc/len_512/depth_0",
        "eval/passkey_acc/len_512/depth_100",
    }
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in accuracies.values())
    assert r.metrics["eval/passkey_acc_n/len_256"] == 4 and r.metrics["eval/passkey_acc_n/len_512/depth_0"] == 2
    assert r.metrics["eval/passkey_acc_chance"] == 0.0
    # W = 64 (debug), 59 prompt tokens local: at depth 1 the key line is in the local part; at depth 0 it is in
    # memory at 512 tokens, but not at 256 (task sentence + key line reach into the last 59 tokens)
    assert [row["key_in_memory"] for row in r.rows] == [0, 0, 2, 0]
    assert r.metrics["eval/passkey_mem_acc_n/len_512"] == 2 and "eval/passkey_mem_acc/len_256" not in r.metrics
    assert all(row["ci95_low"] <= row["accuracy"] <= row["ci95_high"] for row in r.rows)
    assert _is_png(r.figure_path) and len(r.rows) == 4


@pytest.mark.parametrize("last_context_length", [None, 64])
def test_prompts_counted_as_memory_have_no_key_in_the_local_part(model, tok, last_context_length):
    """Every prompt key_in_memory counts as retrieved from memory has its whole key line (both copies of K) before
    the local part: the local tokens, decoded, never contain the key; the others have it in the local part."""
    from fotlab.eval.passkey import key_in_memory, local_prompt_length, passkey_trials

    cfg = PasskeyEvalSpec(
        lengths=[256, 320, 1024],
        depths=[0.0, 0.25, 0.5, 0.75, 0.9, 1.0],
        n_trials=3,
        last_context_length=last_context_length,
    )
    n_memory = n_local = 0
    for (L, d), keys in passkey_trials(cfg, seed=0, split="test").items():
        for key in keys:
            ids, answer, p = passkey_prompt(tok, L, key, d)
            local = ids[len(ids) - local_prompt_length(model.config, len(answer), last_context_length) :]
            local_text = tok.decode(local)
            if key_in_memory(model.config, tok, ids, len(answer), p, last_context_length):
                n_memory += 1
                assert str(key) not in local_text and "pass key is " + str(key) not in local_text
            else:
                n_local += 1
                info = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
                assert any(info[j:] in local_text for j in range(len(info) - 1))  # (the end of) the key line is local
    assert n_memory > 20 and (n_local > 0) == (last_context_length == 64)  # 32 local tokens never hold the key


# ----- distraction ----------------------------------------------------------------------------------------------
def test_uniform_memory_layer_gives_one_over_d(tok, docs, tmp_path):
    torch.manual_seed(0)
    m = FoTForCausalLM(preset_config("debug", vocab_size=len(tok))).eval()
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.weight.zero_()  # all scores 0: uniform attention
    cfg = DistractionEvalSpec(n_contexts=[1, 2, 4, 8], n_samples=2, chunk_len=32)
    r = distraction_ratio(m, tok, cfg, docs, output_dir=tmp_path)
    for d in (1, 2, 4, 8):
        assert r.metrics[f"eval/distraction_ratio/d_{d}"] == pytest.approx(1.0 / d, abs=1e-6)
        assert r.metrics[f"eval/distraction_ratio/layer_1/d_{d}"] == pytest.approx(1.0 / d, abs=1e-6)
    assert _is_png(r.figure_path)


def test_ratio_skips_rows_without_memory_mass():
    from fotlab.eval.distraction import _ratio

    mass = torch.tensor([[[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]]])  # (B, H, T, 1 + d): row 2 has no memory mass
    assert _ratio(mass, 0) == pytest.approx(0.6)
    assert math.isnan(_ratio(mass[..., 1:, :], 0))


def test_distraction_ratio_sees_the_relevant_context(tok, docs, tmp_path):
    """A memory layer whose queries equal its keys (q_proj = k_proj, no RoPE) and whose relevant context repeats
    the current chunk attends mostly to that context: r_d far above 1/d."""
    torch.manual_seed(0)
    m = FoTForCausalLM(preset_config("debug", vocab_size=len(tok), mem_positionals=False)).eval()
    attn = m.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight.copy_(torch.randn_like(attn.k_proj.weight) * 3)
        attn.q_proj.weight.copy_(attn.k_proj.weight)
    # framed <bos> x x <eos> (x: 32 tokens): context 1 = (x31, x0..x30) nearly repeats context 0 = (<bos>, x0..x30);
    # distractor documents are shorter than two contexts, so only the repeated documents are sampled
    repeated = [d[:32] * 2 for d in docs[:3]]
    distractors = [d[:50] for d in docs]
    cfg = DistractionEvalSpec(n_contexts=[1, 2, 4], n_samples=3, chunk_len=32)
    r = distraction_ratio(m, tok, cfg, repeated + distractors, output_dir=tmp_path)
    for d in (2, 4):
        assert r.metrics[f"eval/distraction_ratio/d_{d}"] > 1.0 / d + 0.15  # well above a uniform layer's 1/d


# ----- dictionary lookup ----------------------------------------------------------------------------------------
def test_dictionary_lookup_metrics_and_plot(model, tok, tmp_path):
    cfg = DictionaryEvalSpec(memory_sizes=[40, 120], n_samples=2, n_queries=3, chunk_len=32)
    r = dictionary_lookup_accuracy(model, tok, cfg, output_dir=tmp_path, seed=0)
    accuracies = {k: v for k, v in r.metrics.items() if "_n/" not in k and not k.endswith("_chance")}
    assert set(accuracies) == {
        "eval/dict_lookup_acc/mem_40",
        "eval/dict_lookup_token_acc/mem_40",
        "eval/dict_lookup_acc/mem_120",
        "eval/dict_lookup_token_acc/mem_120",
    }
    assert all(0.0 <= v <= 1.0 for v in accuracies.values())
    assert [row["trials"] for row in r.rows] == [2 * 3, 2 * 3]  # 32-token chunk holds 3 queries of 10 tokens
    assert r.metrics["eval/dict_lookup_acc_n/mem_40"] == 6 and r.metrics["eval/dict_lookup_token_acc_n/mem_40"] == 24
    assert r.metrics["eval/dict_lookup_token_acc_chance"] == pytest.approx(1 / 61)
    assert r.metrics["eval/dict_lookup_acc_chance"] == pytest.approx(61.0**-4)
    assert _is_png(r.figure_path)


# ----- few-shot -------------------------------------------------------------------------------------------------
def test_score_options_matches_full_forward(model):
    local = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    options = [[65, 66], [67], [68, 69, 70]]
    scores = []
    for opt in options:
        ids = torch.tensor([local + opt])
        logp = torch.log_softmax(model(ids, last_context_length=ids.shape[1]).logits[0].float(), -1)
        scores.append(sum(float(logp[len(local) - 1 + j, t]) for j, t in enumerate(opt)))
    assert score_options(model, None, local, options) == max(range(3), key=lambda i: scores[i])


def test_few_shot_accuracy_metrics_and_plot(model, tok, tmp_path):
    path = tmp_path / "icl.jsonl"
    labels = ["NUM", "LOC", "HUM"]
    with path.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"q{i} about {labels[i % 3].lower()}?", "label": labels[i % 3]}) + "\n")
    cfg = FewShotEvalSpec(
        name="trec", source={"kind": "jsonl", "path": str(path)}, context_lengths=[48, 200], n_samplings=2, n_queries=4
    )
    r = few_shot_accuracy(model, tok, cfg, output_dir=tmp_path, seed=0)
    assert set(r.metrics) == {
        "eval/trec_acc/ctx_48",
        "eval/trec_acc_std/ctx_48",
        "eval/trec_acc/ctx_200",
        "eval/trec_acc_std/ctx_200",
        "eval/trec_acc_n/ctx_48",
        "eval/trec_acc_n/ctx_200",
        "eval/trec_acc_chance",
    }
    assert r.metrics["eval/trec_acc_n/ctx_48"] == 2 * min(4, r.info["n_queries"])
    assert r.metrics["eval/trec_acc_chance"] == pytest.approx(1 / 3)
    assert all(0.0 <= r.metrics[f"eval/trec_acc/ctx_{n}"] <= 1.0 for n in (48, 200))
    assert _is_png(r.figure_path)


def test_few_shot_reads_hf_dataset_with_class_labels(model, tok, tmp_path):
    import datasets

    from fotlab.eval.few_shot import load_examples

    features = datasets.Features(
        {"question": datasets.Value("string"), "coarse": datasets.ClassLabel(names=["ABBR", "DESC", "NUM"])}
    )
    ds = datasets.Dataset.from_dict(
        {"question": [f"q {i}?" for i in range(60)], "coarse": [i % 3 for i in range(60)]}, features=features
    )  # 60: the dev tenth of the pool gives the queries
    ds.save_to_disk(str(tmp_path / "trec"))
    cfg = FewShotEvalSpec(
        name="trec",
        source={"kind": "hf", "path": str(tmp_path / "trec"), "text_field": "question"},
        label_field="coarse",
        context_lengths=[48],
        n_samplings=1,
        n_queries=3,
    )
    assert load_examples(cfg)[:3] == [("q 0?", "ABBR"), ("q 1?", "DESC"), ("q 2?", "NUM")]
    r = few_shot_accuracy(model, tok, cfg, output_dir=tmp_path, seed=1)
    assert 0.0 <= r.metrics["eval/trec_acc/ctx_48"] <= 1.0 and r.info["n_labels"] == 3

"""Smoke tests of the benchmark suite: every benchmark's tiny cases run (in-process, to stay fast), the runner
builds medians and ratios from real child processes, and the naive reference computes what fotlab computes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds the `benchmarks` package

from benchmarks import growth, models, naive, prefill, retrieval, runner, train_step, train_step_jax


@pytest.mark.parametrize("module", [retrieval, train_step, train_step_jax])
def test_tiny_cases_run_in_process(module):
    for case in runner.collect_cases([module.__name__.split(".")[-1]], "tiny"):
        metrics = module.run(case.params)
        assert {case.metric, "seconds"} <= set(metrics), case.name  # the runner takes medians and ratios of these
        if "tokens_per_cpu_s" in metrics:  # train_step: tokens of the batch per CPU second
            n_tokens = case.params["batch"] * case.params["seq_len"]
            assert metrics["tokens_per_cpu_s"] * metrics["cpu_seconds"] == pytest.approx(n_tokens), case.name


def test_retrieval_impls_time_the_same_exact_search():
    """The three timed searches return the same top-k slots as a brute-force sort of all scores."""
    params = runner.collect_cases(["retrieval"], "tiny")[0].params
    queries, keys = retrieval.data(params)
    k = params["k"]
    want = (queries @ keys.T).argsort(-1, descending=True)[:, :k].sort(-1).values  # (R, k)
    for impl in ("fotlab-topk", "faiss-flatip", "torch-matmul-topk"):
        got = retrieval.search(impl, queries, keys, k).long().sort(-1).values
        assert torch.equal(got, want), impl


def test_tiny_prefill_and_growth_run():
    for case in runner.collect_cases(["prefill"], "tiny"):
        if case.params["impl"] == "naive":
            continue  # install() patches fotlab for the rest of this process; covered by the child test below
        metrics = prefill.run(case.params)
        assert case.metric in metrics, case.name
        assert metrics["tokens_per_cpu_s"] * metrics["cpu_seconds"] == pytest.approx(case.params["length"]), case.name
    metrics = growth.run(runner.collect_cases(["growth"], "tiny")[-1].params)
    # 2 bf16 memory layers x (key + value) x D 64 x 2 bytes + 2 valid flags = 514 bytes per token in memory
    assert metrics["mem_bytes_per_token"] == 2 * 2 * 64 * 2 + 2
    assert metrics["mem_tokens"] == 256 - 32  # everything but the last local context goes to memory


def test_cuda_cases_time_wall_seconds_and_skip_cpu_only_benchmarks():
    """`--device cuda` (collected here without a GPU: nothing runs): GPU variants, wall-clock metric, device param."""
    skipped = []
    cases = runner.collect_cases(["prefill", "train_step", "retrieval", "overhead"], "tiny", "cuda", skipped.append)
    assert {case.benchmark for case in cases} == {"prefill", "train_step"}
    assert len(skipped) == 2 and all("skipped on cuda" in line for line in skipped)
    assert all(case.params["device"] == "cuda" and case.metric == "seconds" for case in cases)
    assert "fotlab-faiss" not in {case.name for case in cases}  # FAISS is a CPU library here
    assert "fotlab-crossbatch-flex" in {case.name for case in cases if case.benchmark == "train_step"}
    assert all(
        case.metric == "cpu_seconds" and "device" not in case.params
        for case in runner.collect_cases(["prefill"], "tiny")
    )


def test_retrieval_implementations_agree():
    params = {"n_keys": 4096, "n_queries": 32, "head_dim": 32, "k": 8}
    queries, keys = retrieval.data(params)
    found = {
        impl: retrieval.search(impl, queries, keys, 8) for impl in ("fotlab-topk", "faiss-flatip", "torch-matmul-topk")
    }
    reference = found["torch-matmul-topk"].sort(-1).values
    for impl, slots in found.items():
        assert torch.equal(slots.sort(-1).values, reference), impl


def test_topk_search_through_faiss_selects_the_exact_top_k():
    """From 1k query rows and 16k slots fotlab's top-k searches with FAISS; the selection stays exact."""
    from fotlab.model import memory_attention as ma

    params = {"n_keys": ma.FAISS_MIN_SLOTS, "n_queries": ma.FAISS_MIN_ROWS, "head_dim": 32, "k": 16}
    queries, keys = retrieval.data(params)
    assert ma._faiss_wins(queries[None, None], keys.shape[0])
    got = retrieval.search("fotlab-topk", queries, keys, 16).sort(-1).values
    expected = retrieval.search("torch-matmul-topk", queries, keys, 16).sort(-1).values
    assert (got == expected).float().mean() > 0.999  # fp32 summation order may swap exact near-ties only


def test_naive_reference_matches_fotlab_dense():
    """The prefill speed reference computes the same function as fotlab's memory attention."""
    from fotlab.model.memory_attention import memory_attention

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, M, Dh = 2, 4, 2, 16, 40, 8
    q = torch.randn(B, H, T, Dh, generator=gen)
    k, v = torch.randn(B, Hkv, T, Dh, generator=gen), torch.randn(B, Hkv, T, Dh, generator=gen)
    mem_k, mem_v = torch.randn(B, Hkv, M, Dh, generator=gen), torch.randn(B, Hkv, M, Dh, generator=gen)
    mem_valid = torch.rand(B, M, generator=gen) > 0.3
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    expected = memory_attention(q, k, v, mask, mem_k, mem_v, mem_valid)
    got = naive.naive_memory_attention(q, k, v, mask, mem_k, mem_v, mem_valid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llama_twin_has_the_same_weights():
    model = models.build_fot(models.fot_config("tiny", [1]))
    llama = models.llama_twin(model)
    ids = models.random_ids(1, 16, model.config.vocab_size)
    with torch.no_grad():  # within one window and no memory yet, FoT is LLaMA
        torch.testing.assert_close(llama(ids).logits, model(ids, last_context_length=16).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # six child processes: 15-40 s on the busy 2-core box
def test_runner_table_medians_and_ratios(tmp_path):
    """Real child processes: a fast benchmark through the whole runner, JSON included."""
    from benchmarks.__main__ import main

    out = tmp_path / "bench.json"
    records = main(["retrieval", "--size", "tiny", "--repeats", "2", "--json", str(out), "--quiet"])
    assert [r["n_ok"] for r in records] == [2, 2, 2], [r["errors"] for r in records]
    assert records[0]["ratio"] == 1.0 and all(r["ratio"] > 0 for r in records)
    for rec in records:
        assert rec["min"] <= rec["median"]["cpu_seconds"] <= rec["max"]
        assert rec["median"]["peak_rss_mib"] > 50  # a real process with torch loaded
    saved = json.loads(out.read_text())
    assert saved["machine"]["cpus"] >= 1 and len(saved["records"]) == 3


def test_markdown_report_rows():
    from benchmarks.report import markdown

    recs = [
        {
            "benchmark": "b",
            "group": "g",
            "name": n,
            "metric": "cpu_seconds",
            "n_ok": 2,
            "errors": [],
            "median": {"cpu_seconds": s, "peak_rss_mib": 100.0, "seconds": 2 * s},
            "min": s,
            "max": s,
        }
        for n, s in [("x", 2.0), ("y", 3.0)]
    ]
    runner.add_ratios(recs)
    lines = markdown(recs).splitlines()
    assert len(lines) == 4 and "| 1.50x |" in lines[3] and "2 CPU s" in lines[2] and "seconds 6" in lines[3]


def test_add_ratios_per_group():
    recs = [
        {"benchmark": "b", "group": g, "metric": "cpu_seconds", "median": {"cpu_seconds": s}}
        for g, s in [("x", 2.0), ("x", 3.0), ("y", 4.0), ("y", 1.0)]
    ]
    runner.add_ratios(recs)
    assert [r["ratio"] for r in recs] == [1.0, 1.5, 1.0, 0.25]


def test_overhead_commands_share_the_spec(tmp_path):
    from benchmarks import overhead

    direct = overhead.command("train-direct", 3, tmp_path)
    run = overhead.command("fotlab-run", 3, tmp_path)
    assert str(overhead.SPEC) in direct and str(overhead.SPEC) in run
    sets = overhead.overrides(3, tmp_path)
    assert all(s in direct for s in sets) and all(s in run for s in sets)
    assert run[1] == "run" and "--json" in run


def test_longllama_checkpoint_round_trip_and_fotlab_side(tmp_path):
    """prefill_longllama's shared checkpoint (LongLLaMA format) loads in fotlab with the benchmark model's weights;
    the fotlab side of a tiny case runs and leaves its logits for the reference side to compare with."""
    from benchmarks import longllama_ref
    from benchmarks.prefill import prefill as next_logits
    from fotlab.model import FoTForCausalLM

    longllama_ref.configure(None, None)
    assert longllama_ref.cases("tiny") == []  # not configured: skipped, nothing built
    ckpt = longllama_ref.write_checkpoint("tiny", tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "longllama"
    loaded = FoTForCausalLM.from_pretrained(ckpt)
    assert loaded.config.mem_layers == models.PREFILL_MEM_LAYERS["tiny"] and loaded.config.mem_dtype == "bfloat16"
    built = models.build_fot(models.fot_config("tiny", models.PREFILL_MEM_LAYERS["tiny"]), seed=longllama_ref.SEED)
    ids = models.random_ids(1, 200, loaded.config.vocab_size)
    with torch.inference_mode():  # 200 tokens, W 64: memory windows included
        torch.testing.assert_close(next_logits(loaded, ids), next_logits(built, ids), rtol=0, atol=0)
    params = {"size": "tiny", "length": 256, "impl": "fotlab", "ckpt": str(ckpt), "run_id": "t"}
    metrics = longllama_ref.run(params)
    saved = torch.load(longllama_ref._exchange_file(params))
    assert metrics["logits_max_abs"] == saved["logits"].abs().max().item() and "cpu_seconds" in metrics
    assert saved["ids"].shape == (1, 256) and saved["logits"].shape == (1, loaded.config.vocab_size)


@pytest.mark.slow  # two child processes, one of them the reference's interpreter
@pytest.mark.skipif(
    not (os.environ.get("FOTLAB_LONGLLAMA_CODE") and os.environ.get("FOTLAB_LONGLLAMA_PYTHON")),
    reason="set FOTLAB_LONGLLAMA_CODE and FOTLAB_LONGLLAMA_PYTHON to run against the LongLLaMA code",
)
def test_longllama_reference_computes_what_fotlab_computes(tmp_path):
    """With the public LongLLaMA code available: a tiny prefill_longllama run, both sides in child processes,
    gives the same next-token logits."""
    from benchmarks import longllama_ref

    longllama_ref.configure(os.environ["FOTLAB_LONGLLAMA_CODE"], os.environ["FOTLAB_LONGLLAMA_PYTHON"], tmp_path)
    try:
        by_name = {case.name: case for case in longllama_ref.cases("tiny")}
    finally:
        longllama_ref.configure(None, None)
    ours = runner.run_in_subprocess(by_name["fotlab"])
    theirs = runner.run_in_subprocess(by_name["longllama-ref"])
    assert "error" not in ours and "error" not in theirs, (ours, theirs)
    assert theirs["logits_max_abs_diff"] < 1e-4 and theirs["argmax_equal"] == 1
    assert theirs["transformers"].startswith("4.")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_fsdp_memory_shards_params_grads_and_optimizer_state():
    from benchmarks import sharded_memory

    by_name = {case.name: sharded_memory.run(case.params) for case in runner.collect_cases(["fsdp_memory"], "tiny")}
    ddp, fsdp = by_name["ddp"], by_name["fsdp"]
    assert ddp["n_params"] == fsdp["n_params"] and ddp["seconds"] > 0 and fsdp["seconds"] > 0
    assert ddp["params_mib"] == pytest.approx(ddp["n_params"] * 4 / 2**20)  # fp32, fully replicated
    assert ddp["optim_mib"] >= 2 * ddp["params_mib"]  # AdamW: exp_avg + exp_avg_sq (+ step)
    assert fsdp["state_mib_per_rank"] <= 0.6 * ddp["state_mib_per_rank"]

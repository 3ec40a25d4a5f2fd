"""Reported numbers across seeds (`fotlab.eval.seeds`, `fotlab results`): runs in a real MLflow sqlite store."""

import statistics

import pytest
from mlflow import MlflowClient

from fotlab import names
from fotlab.eval.report import generate_report
from fotlab.eval.results import wilson_interval
from fotlab.eval.seeds import seed_groups, summarize


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("paper", artifact_location=str(tmp_path / "artifacts"))


def _run(client, exp, spec, seed, metrics, *, split="test", status="FINISHED", start=0):
    run = client.create_run(exp, start_time=1_000 + start, tags={names.TAG_SPEC_NAME: spec})
    rid = run.info.run_id
    if seed is not None:
        client.log_param(rid, "seed", str(seed))
    client.log_param(rid, "eval.split", split)
    for key, value in metrics.items():
        client.log_metric(rid, key, value)
    client.set_terminated(rid, status)
    return rid


PPL = "eval/ppl_single_doc/mem_64"
ACC, ACC_N, ACC_CHANCE = "eval/passkey_acc/len_256", "eval/passkey_acc_n/len_256", "eval/passkey_acc_chance"


def test_seed_groups_keep_one_finished_test_run_per_seed(tmp_path):
    uri, client, exp = _store(tmp_path)
    kept = {seed: _run(client, exp, "fot", seed, {PPL: 5.0 + seed}, start=10 + seed) for seed in (10, 2, 0)}
    _run(client, exp, "fot", 2, {PPL: 99.0}, start=1)  # an older run of seed 2: replaced by the newer one
    dev = _run(client, exp, "fot", 1, {PPL: 98.0}, split="dev")  # chose variants: never reported
    _run(client, exp, "fot", 3, {PPL: 97.0}, status="FAILED")
    _run(client, exp, "fot", None, {PPL: 96.0})  # no seed recorded
    base = _run(client, exp, "base", 0, {PPL: 7.0})
    runs = client.search_runs([exp])
    groups = seed_groups(runs, "test")
    assert {spec: [r.info.run_id for r in rs] for spec, rs in groups.items()} == {
        "fot": [kept[0], kept[2], kept[10]],  # numeric seed order
        "base": [base],
    }
    assert {spec: [r.info.run_id for r in rs] for spec, rs in seed_groups(runs, "dev").items()} == {"fot": [dev]}


def test_summary_is_mean_sd_and_pooled_wilson_interval(tmp_path):
    uri, client, exp = _store(tmp_path)
    accs = (0.5, 0.75, 1.0)
    for seed, acc in enumerate(accs):
        _run(client, exp, "fot", seed, {PPL: 5.0 + seed, ACC: acc, ACC_N: 4, ACC_CHANCE: 0.01})
    _run(client, exp, "fot", 3, {PPL: 100.0, ACC: 0.0, ACC_N: 4}, split="dev")
    groups = seed_groups(client.search_runs([exp]), "test")
    summary = summarize(groups["fot"])
    ppl, acc = summary["ppl_single_doc"]["mem_64"], summary["passkey_acc"]["len_256"]
    assert ppl.values == (5.0, 6.0, 7.0) and ppl.mean == 6.0 and ppl.sd == pytest.approx(1.0)
    assert ppl.pooled_interval() is None  # a perplexity has no trials
    assert acc.mean == pytest.approx(statistics.fmean(accs))
    assert acc.pooled_interval() == (9, 12, *wilson_interval(9, 12))  # 2 + 3 + 4 of 4 + 4 + 4
    assert "passkey_acc_n" not in summary and "passkey_acc_chance" not in summary

    out = generate_report(uri, tmp_path / "results.md")  # default: the test split
    text = out.read_text()
    low, high = wilson_interval(9, 12)
    assert "| fot (seeds 0, 1, 2) |" in text
    assert f"| len_256 | 0.75 ± 0.25 (0.5, 0.75, 1) [{low:.3g}, {high:.3g}] 9/12 |" in text
    low, high = ppl.t_interval()  # seeds as the sample: 6 ± t(0.975, 2) / sqrt(3)
    assert (low, high) == pytest.approx((6 - 2.4841, 6 + 2.4841), abs=1e-3)
    assert f"| mem_64 | 6 ± 1 (5, 6, 7) [{low:.4g}, {high:.4g}] t |" in text and "Chance level: 0.01." in text
    assert "100" not in text.split("## Runs")[0]  # the dev run's number appears nowhere in the tables
    assert "on the test split" in text


def test_memory_change_is_paired_per_seed_with_a_t_interval(tmp_path):
    """The memory gain is each seed's own change from mem_0: seeds whose perplexities differ a lot but whose gains
    agree give a tight interval on the gain, and the t interval covers the mean with Student's quantile."""
    from scipy.stats import t

    uri, client, exp = _store(tmp_path)
    base = (5.0, 6.0, 8.0)  # a large seed-to-seed spread of the perplexity itself
    for seed, b in enumerate(base):
        _run(client, exp, "fot", seed, {"eval/ppl_single_doc/mem_0": b, PPL: b * (0.9 - 0.01 * seed)})
    summary = summarize(seed_groups(client.search_runs([exp]), "test")["fot"])
    gain = summary["ppl_single_doc (% change from mem_0, per seed)"]["mem_64"]
    assert gain.values == pytest.approx((-10.0, -11.0, -12.0))
    low, high = gain.t_interval()
    half = t.ppf(0.975, 2) * 1.0 / 3**0.5  # sd of (-10, -11, -12) is 1
    assert (low, high) == pytest.approx((-11.0 - half, -11.0 + half))
    assert high < 0  # the gain is beyond seed noise although the raw perplexities overlap widely
    raw = summary["ppl_single_doc"]["mem_64"]
    assert raw.t_interval()[1] > summary["ppl_single_doc"]["mem_0"].t_interval()[0]
    assert "mem_0" not in summary["ppl_single_doc (% change from mem_0, per seed)"]

    text = generate_report(uri, tmp_path / "results.md").read_text()
    assert "#### ppl_single_doc (% change from mem_0, per seed)" in text
    assert f"| mem_64 | -11 ± 1 (-10, -11, -12) [{-11 - half:.4g}, {-11 + half:.4g}] t |" in text

"""run_evaluations on the debug model, logging to a real MLflow sqlite store, `fotlab eval` and the results report."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from fotlab.data import byte_tokenizer
from fotlab.eval.report import generate_report, group_metrics
from fotlab.eval.runner import log_eval_result, result_file_stem, run_evaluations
from fotlab.model import FoTForCausalLM, preset_config
from fotlab.spec.eval import EvalSpec


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return FoTForCausalLM(
        preset_config(
            "debug",
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    icl = tmp_path / "icl.jsonl"
    icl.write_text("".join(json.dumps({"text": f"item {i}", "label": ["A", "B"][i % 2]}) + "\n" for i in range(20)))
    return root, icl


def _eval_spec(corpus) -> dict:
    root, icl = corpus
    local = {"kind": "local", "path": str(root), "glob": "*.txt", "max_docs": 4}
    return {
        "perplexity": [
            {
                "name": "ppl",
                "source": local,
                "memory_sizes": [0, 64],
                "modes": ["multi_doc"],
                "chunk_len": 32,
                "max_stream_tokens": 256,
            },
            {"name": "valppl", "source": {"kind": "validation"}, "memory_sizes": [0, 32], "chunk_len": 32},
        ],
        "passkey": {"lengths": [256], "depths": [0.5], "n_trials": 1},
        "distraction": {"source": local, "n_contexts": [1, 2], "n_samples": 1, "chunk_len": 32},
        "dictionary_lookup": {"memory_sizes": [40], "n_samples": 1, "n_queries": 2, "chunk_len": 32},
        "few_shot": [
            {
                "name": "icl",
                "source": {"kind": "jsonl", "path": str(icl)},
                "context_lengths": [60],
                "n_samplings": 1,
                "n_queries": 2,
            }
        ],
        "progress": False,
    }


@pytest.mark.slow
def test_run_evaluations_all_sections(model, tok, corpus, tmp_path):
    spec = EvalSpec.model_validate(_eval_spec(corpus))
    seen, documents = [], []
    val_docs = [{"input_ids": list(range(100, 180))}, {"input_ids": list(range(50, 120))}]
    results = run_evaluations(
        spec,
        model,
        tok,
        output_dir=tmp_path / "out",
        seed=0,
        validation_docs=val_docs,
        on_result=lambda r: seen.append(r.name),
        on_documents=documents.append,
    )
    assert list(results) == spec.selected() == seen
    # lineage: each distinct document set once (ppl and distraction read the same 4 local documents)
    assert [(d.name, d.n_docs, d.context) for d in documents] == [
        ("eval-local", 4, "evaluation"),
        ("eval-validation", 2, "evaluation"),
    ]
    assert documents[1].n_tokens == 80 + 70 and documents[0].digest != documents[1].digest
    assert "eval/valppl_single_doc/mem_32" in results["perplexity:valppl:single_doc"].metrics
    for name, r in results.items():
        assert r.metrics and r.figure_path.is_file()
        saved = json.loads((tmp_path / "out" / f"{result_file_stem(name)}.json").read_text())
        assert saved["metrics"] == pytest.approx(r.metrics)


def test_validation_source_needs_documents(model, tok, corpus, tmp_path):
    spec = EvalSpec.model_validate({"perplexity": [{"source": {"kind": "validation"}}]})
    with pytest.raises(ValueError, match="validation"):
        run_evaluations(spec, model, tok, output_dir=tmp_path)


@pytest.mark.slow
def test_log_eval_result_and_report(model, tok, corpus, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fotlab import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.setup_experiment(uri, "evaltest", artifact_root=str(tmp_path / "artifacts"))
    run = tracking.start_run(uri, exp, run_name="r1")
    spec = EvalSpec.model_validate(
        {
            **_eval_spec(corpus),
            "perplexity": _eval_spec(corpus)["perplexity"][:1],
            "few_shot": [],
            "distraction": None,
            "dictionary_lookup": None,
        }
    )
    results = run_evaluations(
        spec, model, tok, output_dir=tmp_path / "out", on_result=lambda r: log_eval_result(r, run)
    )
    run.finish()
    logged = MlflowClient(uri).get_run(run.run_id).data.metrics
    expected = {k: v for r in results.values() for k, v in r.metrics.items()}
    assert logged == pytest.approx(expected)
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run.run_id, "eval")}
    assert "eval/ppl_multi_doc_vs_memory.png" in arts and "eval/passkey_heatmap.png" in arts
    monkeypatch.chdir(tmp_path)
    # a relative path, like the CLI default; split=None: this run evaluated no spec split
    out = generate_report(uri, "docs/results.md", run_ids=[run.run_id[:8]], split=None)
    # `fotlab results` writes the same report (its default --out is docs/results.md, relative to the cwd)
    from fotlab import cli

    (tmp_path / "notes.md").write_text("## Status\nhand-written notes\n")
    every_split = ["results", "--tracking-uri", uri, "--split", "all"]
    assert cli.main([*every_split, "--run", run.run_id[:8], "--out", "cli.md", "--notes", "notes.md"]) == 0
    assert "hand-written notes" in (tmp_path / "cli.md").read_text()
    assert cli.main(["results", "--tracking-uri", uri, "--notes", "missing.md"]) == 1
    # a named run is found even when it is not among the newest --max-runs, and a wrong one is an error
    assert (
        cli.main([*every_split, "--run", run.run_id[:8], "--max-runs", "0", "--out", "old.md"]) == 0
        and "r1" in (tmp_path / "old.md").read_text()
    )
    assert cli.main(["results", "--tracking-uri", uri, "--run", "ffffffff", "--out", "none.md"]) == 1
    # the default report reads test-split runs only: this run evaluated no spec split, so it is not reported
    assert cli.main(["results", "--tracking-uri", uri, "--run", run.run_id[:8], "--out", "none.md"]) == 1
    assert not (tmp_path / "none.md").exists()
    text = out.read_text()
    assert "#### ppl_multi_doc" in text and "| mem_64 |" in text and "The paper's numbers" in text
    # accuracies with their Wilson interval and count, chance stated; count/chance companions are no tables
    assert "#### passkey_acc" in text and "#### passkey_acc_n" not in text and "#### passkey_acc_chance" not in text
    passkey_rows = text[text.index("#### passkey_acc\n") :].split("\n\n")[1]
    assert "] n=" in passkey_rows and "Chance level: 0." in text
    link = [line for line in text.splitlines() if line.startswith("![")][0]
    assert (out.parent / link[link.index("(") + 1 : -1]).is_file()


def test_group_metrics_sorts_numerically():
    groups = group_metrics(
        {"eval/ppl_x/mem_1024": 2.0, "eval/ppl_x/mem_64": 3.0, "train/loss": 1.0, "eval/passkey_acc/len_256": 1.0}
    )
    assert groups["ppl_x"] == [("mem_64", 3.0), ("mem_1024", 2.0)]
    assert "loss" not in str(groups)


@pytest.mark.slow
def test_eval_command_from_dir_and_run(model, tok, corpus, tmp_path):
    from mlflow import MlflowClient

    from fotlab import tracking
    from fotlab.orchestrate.commands import EvalError, eval_command

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root, _ = corpus
    spec = {
        "name": "evalcli",
        "model": {"preset": "debug"},
        "data": {"tokenizer": {"kind": "byte"}},
        "tracking": {"uri": uri, "artifact_root": str(tmp_path / "artifacts")},
        "eval": {
            "perplexity": [
                {
                    "source": {"kind": "local", "path": str(root), "glob": "*.txt", "max_docs": 2},
                    "memory_sizes": [0, 32],
                    "chunk_len": 32,
                    "max_stream_tokens": 128,
                }
            ],
            "progress": False,
        },
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    args = argparse.Namespace(spec=str(spec_path), overrides=[], model=str(model_dir), json=True)
    out = eval_command(args)
    assert set(out["metrics"]) == {"eval/ppl_single_doc/mem_0", "eval/ppl_single_doc/mem_32"}
    assert MlflowClient(uri).get_run(out["run_id"]).data.metrics == pytest.approx(out["metrics"])
    # the same model logged as a run's artifacts, evaluated through runs:/ID
    exp = tracking.setup_experiment(uri, "evalcli", artifact_root=str(tmp_path / "artifacts"))
    src = tracking.start_run(uri, exp, run_name="trained")
    src.log_model_dir(model_dir)
    src.finish()
    args.model = f"runs:/{src.run_id}"
    again = eval_command(args)
    assert again["metrics"] == pytest.approx(out["metrics"])
    args.model = str(tmp_path / "nowhere")
    with pytest.raises(EvalError, match="not a saved model directory"):
        eval_command(args)


def test_wilson_interval_known_values_and_report_cells():
    from fotlab.eval.report import accuracy_cell
    from fotlab.eval.results import wilson_interval

    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)  # the textbook 95% Wilson interval of 5/10
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and round(high, 4) == 0.1611  # zero successes: a non-degenerate upper bound
    low, high = wilson_interval(19, 20)
    assert (round(low, 4), round(high, 4)) == (0.7639, 0.9911)
    assert wilson_interval(242, 256)[0] < 242 / 256 < wilson_interval(242, 256)[1]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    assert accuracy_cell(0.5, 10) == "0.5 [0.237, 0.763] n=10"
    assert accuracy_cell(1.25, None) == "1.25"  # perplexities and other non-accuracies: the value alone

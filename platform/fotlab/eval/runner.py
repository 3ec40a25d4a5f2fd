"""Run the evaluations an `EvalSpec` selects, and log their results to MLflow (the only place eval touches tracking).

    results = run_evaluations(spec.eval, model, tokenizer, output_dir=out, seed=spec.seed,
                              context_length=spec.train.context_length, data_spec=spec.data)
    for r in results.values(): log_eval_result(r, tracked_run)        # fotlab.tracking.TrackedRun

`run_spec_evaluations(spec, model, tokenizer, output_dir, run=None)` does both from an `ExperimentSpec`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fotlab.eval.results import EvalResult
from fotlab.spec.eval import EvalSpec, perplexity_key

if TYPE_CHECKING:
    from fotlab.data.lineage import DatasetRecord

EVAL_ARTIFACT_DIR = "eval"  # MLflow artifact folder of eval plots and JSON results


def result_file_stem(name: str) -> str:
    """File-system safe stem of an evaluation name ("perplexity:ppl:single_doc" -> "perplexity_ppl_single_doc")."""
    return name.replace(":", "_").replace("+", "_")


def _needs_validation(eval_spec: EvalSpec) -> bool:
    sources = [p.source for p in eval_spec.perplexity]
    if eval_spec.distraction is not None:
        sources.append(eval_spec.distraction.source)
    return any(s.kind == "validation" for s in sources)


def _validation_docs(data_spec, tokenizer, seed: int):
    """The experiment's validation documents (fotlab.data.build_datasets), or None without a data spec."""
    if data_spec is None:
        return None
    from fotlab.data import build_datasets

    return build_datasets(data_spec, tokenizer, seed)[1]


def _jobs(eval_spec: EvalSpec, model, tokenizer, out: Path, seed: int, context_length, docs_of):
    """[(name, thunk)] of the selected evaluations, in `eval_spec.selected()` order."""
    from fotlab.eval.dictionary import dictionary_lookup_accuracy
    from fotlab.eval.distraction import distraction_ratio
    from fotlab.eval.few_shot import few_shot_accuracy
    from fotlab.eval.passkey import passkey_retrieval
    from fotlab.eval.perplexity import perplexity_vs_memory

    show = eval_spec.progress
    common = dict(output_dir=out, show_progress=show)
    split = eval_spec.split
    jobs: list[tuple[str, Callable[[], EvalResult]]] = []
    for p in eval_spec.perplexity:
        jobs.append(
            (
                perplexity_key(p),
                lambda p=p: perplexity_vs_memory(
                    model, tokenizer, p, docs_of(p.source), context_length=context_length, **common
                ),
            )
        )
    if eval_spec.passkey is not None:
        jobs.append(
            (
                "passkey",
                lambda: passkey_retrieval(model, tokenizer, eval_spec.passkey, seed=seed, split=split, **common),
            )
        )
    if eval_spec.distraction is not None:
        d = eval_spec.distraction
        jobs.append(
            (
                "distraction",
                lambda: distraction_ratio(
                    model, tokenizer, d, docs_of(d.source), seed=seed, context_length=context_length, **common
                ),
            )
        )
    if eval_spec.dictionary_lookup is not None:
        jobs.append(
            (
                "dictionary_lookup",
                lambda: dictionary_lookup_accuracy(
                    model,
                    tokenizer,
                    eval_spec.dictionary_lookup,
                    seed=seed,
                    context_length=context_length,
                    split=split,
                    **common,
                ),
            )
        )
    for f in eval_spec.few_shot:
        jobs.append(
            (f"few_shot:{f.name}", lambda f=f: few_shot_accuracy(model, tokenizer, f, seed=seed, split=split, **common))
        )
    return jobs


def run_evaluations(
    eval_spec: EvalSpec,
    model,
    tokenizer,
    *,
    output_dir: str | Path,
    seed: int = 0,
    context_length: int | None = None,
    validation_docs=None,
    data_spec=None,
    on_result: Callable[[EvalResult], None] | None = None,
    console=None,
    on_documents: Callable[[DatasetRecord], None] | None = None,
) -> dict[str, EvalResult]:
    """Run every selected evaluation in order; returns {name: EvalResult} (names as `eval_spec.selected()`).

    output_dir: plots and `<name>.json` results go here. context_length: the training local context T (the
    default chunk length). validation_docs / data_spec: documents for sources of kind "validation" (built from
    data_spec with `fotlab.data.build_datasets` when not given). on_result: called after each evaluation
    (e.g. to log it). console: a `rich.console.Console` for the tables (None = no printing). on_documents: called
    once per distinct document set an evaluation reads, with its `DatasetRecord` (lineage).
    """
    from fotlab.data.lineage import describe_documents
    from fotlab.eval.documents import load_documents

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not eval_spec.enabled:
        return {}
    if validation_docs is None and _needs_validation(eval_spec):
        validation_docs = _validation_docs(data_spec, tokenizer, seed)
    cache_dir = data_spec.cache_dir if data_spec is not None else None

    described: set[str] = set()

    def docs_of(source):
        docs = load_documents(
            source, tokenizer, validation_docs=validation_docs, cache_dir=cache_dir, split=eval_spec.split
        )
        record = describe_documents(
            docs,
            name=f"eval-{source.kind}",
            context="evaluation",
            source=json.dumps(source.model_dump(mode="json", exclude_defaults=True)),
        )
        if on_documents is not None and record.digest not in described:
            described.add(record.digest)
            on_documents(record)
        return docs

    results = {}
    for name, job in _jobs(eval_spec, model, tokenizer, out, seed, context_length, docs_of):
        result = job()
        result.save_json(out / f"{result_file_stem(name)}.json")
        if console is not None:
            console.print(result.table(name))
        if on_result is not None:
            on_result(result)
        results[name] = result
    return results


def log_eval_result(result: EvalResult, run, step: int = 0) -> dict[str, float]:
    """Log one result to a `fotlab.tracking.TrackedRun`: metrics at `step`, its plot and JSON under `eval/`."""
    import tempfile

    logged = run.log_metrics(result.metrics, step=step)
    if result.figure_path is not None and Path(result.figure_path).is_file():
        run.log_artifact(result.figure_path, EVAL_ARTIFACT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{result_file_stem(result.name)}.json"
        path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
        run.log_artifact(path, EVAL_ARTIFACT_DIR)
    return logged


def run_spec_evaluations(
    spec, model, tokenizer, output_dir: str | Path, *, run=None, step: int = 0, validation_docs=None, console=None
) -> dict[str, EvalResult]:
    """`run_evaluations` with the settings of an `ExperimentSpec` (eval section, seed, train.context_length, data);
    each result is logged to `run` (a `fotlab.tracking.TrackedRun`) when given."""
    on_result = None if run is None else (lambda r: log_eval_result(r, run, step))
    on_documents = None if run is None else (lambda record: run.log_datasets([record]))
    return run_evaluations(
        spec.eval,
        model,
        tokenizer,
        output_dir=output_dir,
        seed=spec.seed,
        context_length=spec.train.context_length,
        validation_docs=validation_docs,
        data_spec=spec.data,
        on_result=on_result,
        console=console,
        on_documents=on_documents,
    )

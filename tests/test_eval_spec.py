"""The `eval:` spec section (fotlab.spec.eval): strict, described, pure pydantic."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, ValidationError

from fotlab.names import metric_name, passkey_metric, ppl_metric
from fotlab.spec.eval import EvalSpec, PasskeyEvalSpec, PerplexityEvalSpec


def _models(cls: type[BaseModel], seen=None):
    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    for f in cls.model_fields.values():
        for arg in [f.annotation, *getattr(f.annotation, "__args__", ())]:
            for inner in [arg, *getattr(arg, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _models(inner, seen)
    return seen


def test_every_field_is_described_and_extra_is_forbidden():
    models = _models(EvalSpec)
    assert {m.__name__ for m in models} >= {
        "EvalSpec",
        "PerplexityEvalSpec",
        "PasskeyEvalSpec",
        "EvalSourceSpec",
        "DistractionEvalSpec",
        "DictionaryEvalSpec",
        "FewShotEvalSpec",
    }
    for m in models:
        assert m.model_config.get("extra") == "forbid", m.__name__
        for name, f in m.model_fields.items():
            assert f.description, f"{m.__name__}.{name} has no description"


def test_parse_and_reject():
    spec = EvalSpec.model_validate(
        {"perplexity": [{"memory_sizes": [1024, 0, 256, 256]}], "passkey": {"lengths": [2048]}, "distraction": {}}
    )
    assert spec.perplexity[0].memory_sizes == [0, 256, 1024]
    assert spec.selected() == ["perplexity:ppl:single_doc", "passkey", "distraction"]
    two = EvalSpec.model_validate({"perplexity": [{"modes": ["single_doc"]}, {"modes": ["multi_doc"]}]})
    assert len(set(two.selected())) == 2
    with pytest.raises(ValidationError, match="collide"):
        EvalSpec.model_validate({"perplexity": [{"modes": ["single_doc"]}, {"modes": ["single_doc", "multi_doc"]}]})
    assert EvalSpec(enabled=False, passkey=PasskeyEvalSpec()).selected() == []
    with pytest.raises(ValidationError, match="memroy_sizes"):
        EvalSpec.model_validate({"perplexity": [{"memroy_sizes": [1]}]})
    with pytest.raises(ValidationError):
        PasskeyEvalSpec(depths=[1.5])
    with pytest.raises(ValidationError):
        PerplexityEvalSpec(memory_sizes=[-1])
    with pytest.raises(ValidationError):
        PerplexityEvalSpec(name="bad name")  # becomes part of a metric name


def test_experiment_spec_uses_this_eval_section():
    from fotlab.spec import ExperimentSpec

    assert ExperimentSpec.model_fields["eval"].annotation is EvalSpec


def test_spec_import_is_pure_pydantic():
    code = "import sys; import fotlab.spec.eval; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_metric_names_are_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    for name in (ppl_metric("ppl", "multi_doc", 4096), passkey_metric(16384, 0.25), metric_name("x", d=0.5)):
        _validate_metric_name(name)
    assert ppl_metric("ppl", "single_doc", 64) == "eval/ppl_single_doc/mem_64"
    assert passkey_metric(16384, 0.25) == "eval/passkey_acc/len_16384/depth_25"
    with pytest.raises(ValueError):
        metric_name("bad@name")

"""JAX training loop on CPU: a few steps from fotlab's data pipeline, the saved model evaluated by PyTorch, exact
resume from an orbax checkpoint, the spec field, and the same first-step loss as the PyTorch loop."""

import json
from pathlib import Path

import jax
import pytest
import torch

from fotlab.errors import FotlabError
from fotlab.spec import parse_spec
from fotlab.train import Runtime, TrainHooks

jax.config.update("jax_platforms", "cpu")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = {
    "name": "jax-tiny",
    "seed": 3,
    "model": {"preset": "debug"},
    "data": {"sources": [{"kind": "embedded", "max_docs": 40}], "tokenizer": {"kind": "byte"}, "validation_docs": 4},
    "train": {
        "framework": "jax",
        "context_length": 32,
        "batch_size": 4,
        "steps": 6,
        "log_every": 2,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "grad_accum": 2,
        "crossbatch": {"range": 3, "packing": 2, "stepping": True},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
    },
}


def run_jax(tmp: Path, overrides=None, resume_from=None, stop_after=None):
    from fotlab.jax.train import train

    raw = json.loads(json.dumps(TINY))
    for key, value in (overrides or {}).items():
        raw["train"][key] = value
    logged, polls = [], []

    def on_log(step, metrics):
        logged.append((step, dict(metrics)))

    def should_stop():  # polled once after every step
        polls.append(1)
        return stop_after is not None and len(polls) >= stop_after

    result = train(
        parse_spec(raw),
        Runtime(output_dir=tmp, resume_from=resume_from),
        TrainHooks(on_log=on_log, should_stop=should_stop),
    )
    return result, logged


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jax_full")
    return tmp, *run_jax(tmp)


def test_saved_model_evaluates_to_logged_val_loss(full_run):
    """The model/ dir loads in FoTForCausalLM; PyTorch's evaluate_loss on the same validation batches and
    crossbatch gives the val/loss the JAX run logged (fp32, 1e-5 relative)."""
    from fotlab.model import FoTForCausalLM
    from fotlab.train.build import build_data, val_batches
    from fotlab.train.loop_support import crossbatch_at
    from fotlab.train.steps import evaluate_loss

    tmp, result, logged = full_run
    assert result.final_step == 6 and not result.stopped_early
    losses = [m["train/loss"] for _, m in logged if "train/loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]
    spec = parse_spec(TINY)
    runtime = Runtime(output_dir=tmp)
    model = FoTForCausalLM.from_pretrained(result.model_dir)
    batches = val_batches(build_data(spec, runtime), spec, runtime)
    for cb, key in (
        (crossbatch_at(spec, 5), "val/loss"),
        (crossbatch_at(spec, 5).__class__(range=0), "val/loss_no_xbatch"),
    ):
        assert evaluate_loss(model, batches, crossbatch=cb) == pytest.approx(result.metrics[key], rel=1e-5)
    assert result.metrics["val/loss"] != result.metrics["val/loss_no_xbatch"]


def test_resume_is_exact(full_run, tmp_path):
    """Stopped after step 3 (checkpoint), resumed: the step-6 loss window (steps 5-6), val/loss and the final
    weights equal the uninterrupted run's (train/loss is a mean over log windows, so step 4's differs)."""
    from safetensors.numpy import load_file

    _, full, full_logged = full_run
    first, _ = run_jax(tmp_path, stop_after=3)
    assert first.stopped_early and first.final_step == 3
    second, logged = run_jax(tmp_path, resume_from=tmp_path / "checkpoints")
    assert second.final_step == 6
    want = {s: m["train/loss"] for s, m in full_logged if "train/loss" in m and s > 4}
    got = {s: m["train/loss"] for s, m in logged if "train/loss" in m}
    assert set(want) <= set(got)
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-6), s
    assert second.metrics["val/loss"] == pytest.approx(full.metrics["val/loss"], rel=1e-6)
    full_weights = load_file(str(full.model_dir / "model.safetensors"))
    resumed = load_file(str(second.model_dir / "model.safetensors"))
    assert all((full_weights[k] == resumed[k]).all() for k in full_weights)


def test_first_step_loss_equals_torch_loop(tmp_path):
    """Same seed, same batches: the JAX loop's first logged loss equals the PyTorch loop's (fp32)."""
    from fotlab.train import train as torch_train

    raw = json.loads(json.dumps(TINY))
    raw["train"].update(steps=1, log_every=1, checkpoint_every=0, framework="torch")
    torch_logged = []
    torch_train(
        parse_spec(raw), Runtime(output_dir=tmp_path / "t"), TrainHooks(on_log=lambda s, m: torch_logged.append(m))
    )
    _, jax_logged = run_jax(tmp_path / "j", {"steps": 1, "log_every": 1, "checkpoint_every": 0})
    assert jax_logged[0][1]["train/loss"] == pytest.approx(torch_logged[0]["train/loss"], rel=1e-5)
    assert jax_logged[0][1]["train/grad_norm"] == pytest.approx(torch_logged[0]["train/grad_norm"], rel=1e-4)


def test_bf16_policy_trains(tmp_path):
    result, logged = run_jax(tmp_path, {"precision": "bf16", "steps": 2, "checkpoint_every": 0, "grad_accum": 1})
    assert result.final_step == 2 and all(torch.isfinite(torch.tensor(m.get("train/loss", 0.0))) for _, m in logged)


def test_spec_framework_field():
    assert parse_spec({"name": "x"}).train.framework == "torch"
    with pytest.raises(FotlabError, match="scaling.use_tpu"):
        parse_spec({"name": "x", "scaling": {"use_tpu": True, "topology": "2x4"}})
    spec = parse_spec({"name": "x", "train": {"framework": "jax"}, "scaling": {"use_tpu": True, "topology": "2x4"}})
    assert spec.scaling.use_tpu
    with pytest.raises(FotlabError, match="scaling.num_workers"):
        parse_spec({"name": "x", "train": {"framework": "jax"}, "scaling": {"num_workers": 2}})
    with pytest.raises(FotlabError, match="train.optimizer.name"):
        parse_spec({"name": "x", "train": {"framework": "jax", "optimizer": {"name": "adafactor"}}})


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("scaling", "strategy", "fsdp"),
        ("scaling", "use_gpu", True),
        ("memory", "retrieval", "topk"),
        ("memory", "capacity", 256),
        ("model", "qk_norm", True),
    ],
)
def test_spec_refuses_what_the_jax_loop_lacks(section, field, value):
    raw = {"name": "x", "train": {"framework": "jax"}, section: {field: value}}
    if (section, field) == ("memory", "retrieval"):
        raw["memory"]["topk"] = 4
    if field == "strategy":
        raw["scaling"]["num_workers"] = 1
    with pytest.raises(FotlabError, match=f"{section}.{field}"):
        parse_spec(raw)
    raw["train"]["framework"] = "torch"  # the same field is fine for the PyTorch loop
    parse_spec(raw)

"""End-to-end `train()` on the debug preset and a tiny local corpus: learning, exact resume, hooks, final model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fotlab import names as M
from fotlab.model import FoTForCausalLM
from fotlab.spec import parse_spec
from fotlab.train import LossNotFiniteError, Runtime, TrainHooks, latest_checkpoint, list_checkpoints, train

SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "a focused transformer keeps a memory of keys and values. ",
    "contrastive training shows the model other documents. ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(14):
        (root / f"doc{i:02d}.txt").write_text(SENTENCES[i % 3] * (4 + i % 5))
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets-cache")


def make_spec(corpus, cache_dir, *, model=None, data=None, memory=None, **train):
    train_section = {
        "steps": 4,
        "batch_size": 4,
        "context_length": 32,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "checkpoint_every": 0,
        "crossbatch": {"range": 1, "packing": 2},
        "optimizer": {"lr": 3e-3},
    }
    train_section.update(train)
    data_section = {
        "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
        "validation_docs": 2,
        "cache_dir": str(cache_dir),
    }
    data_section.update(data or {})
    return parse_spec(
        {
            "name": "test-run",
            "seed": 3,
            "model": model or {"preset": "debug"},
            "data": data_section,
            "memory": memory or {},
            "train": train_section,
        }
    )


class Recorder(TrainHooks):
    """Real hooks that keep what the loop reported."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.logs, self.checkpoints, self.stop_at, self.step = [], [], stop_at, 0

    def on_log(self, step, metrics):
        self.step = step
        self.logs.append((step, dict(metrics)))

    def on_checkpoint(self, step, path, metrics):
        self.checkpoints.append((step, path))

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at

    def losses(self):
        return {step: m[M.TRAIN_LOSS] for step, m in self.logs if M.TRAIN_LOSS in m}


def test_loss_falls_and_final_model_loads(corpus, cache_dir, tmp_path):
    spec = make_spec(
        corpus,
        cache_dir,
        steps=24,
        log_every=4,
        eval_every=12,
        checkpoint_every=12,
        optimizer={"lr": 1e-2},
        schedule={"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
    )
    hooks = Recorder()
    result = train(spec, Runtime(output_dir=tmp_path), hooks)
    losses = hooks.losses()
    assert sorted(losses) == [4, 8, 12, 16, 20, 24]
    assert losses[24] < losses[4] - 1.0, losses  # a repetitive corpus is learned quickly
    train_logs = [m for _, m in hooks.logs if M.TRAIN_LOSS in m]
    assert set(train_logs[0]) == {
        M.TRAIN_LOSS,
        M.LR,
        M.GRAD_NORM,
        M.TOKENS_PER_S,
        M.STEP_TIME_S,
        M.CROSSBATCH_RANGE,
        M.TOKENS_SEEN,
    }
    assert train_logs[-1][M.TOKENS_SEEN] == 24 * 4 * 32 and train_logs[0][M.CROSSBATCH_RANGE] == 1.0
    assert train_logs[-1][M.LR] == pytest.approx(1e-2 * 0.1)  # cosine reaches min_lr_ratio at the last step
    assert train_logs[0][M.LR] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 21))))
    val_logs = [(s, m) for s, m in hooks.logs if M.VAL_LOSS in m]
    assert [s for s, _ in val_logs] == [12, 24]
    assert val_logs[1][1][M.VAL_LOSS] < val_logs[0][1][M.VAL_LOSS]
    assert val_logs[1][1][M.VAL_LOSS] != val_logs[1][1][M.VAL_LOSS_NO_XBATCH]  # range 1 vs range 0 differ
    assert val_logs[1][1][M.VAL_PPL] == pytest.approx(math.exp(val_logs[1][1][M.VAL_LOSS]))

    assert result.final_step == 24 and not result.stopped_early
    assert result.metrics[M.TRAIN_LOSS] == losses[24] and M.VAL_LOSS in result.metrics
    assert [s for s, _ in hooks.checkpoints] == [12, 24]
    assert [p.name for p in list_checkpoints(result.checkpoint_dir)] == ["step-00000012", "step-00000024"]
    state = json.loads((result.checkpoint_dir / "step-00000024" / "trainer_state.json").read_text())
    assert state["step"] == 24 and state["metrics"][M.TRAIN_LOSS] == losses[24]

    model = FoTForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert model.config.mem_layers == [1] and model.config.vocab_size == len(tokenizer)
    final_weights = load_file(str(result.checkpoint_dir / "step-00000024" / "model.safetensors"))
    weights = model.state_dict()
    assert set(final_weights) == set(weights)  # the exported model is exactly the final checkpoint's weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, final_weights[name]), name
    ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "the quick brown"
    with torch.no_grad():
        logits = model(ids).logits  # (1, L, V)
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_resume_continues_exactly(corpus, cache_dir, tmp_path):
    """Stop after step 3, resume from the checkpoint: steps 4..6 reproduce an uninterrupted run bit for bit."""
    kwargs = dict(
        steps=6,
        grad_accum=2,
        checkpoint_every=0,
        crossbatch={"range": 1, "packing": 2, "sample_from": [0, 1, 3]},
        optimizer={"name": "adafactor", "lr": 1e-2},
        schedule={"name": "inverse_sqrt", "warmup_steps": 2},
    )
    full = Recorder()
    train(make_spec(corpus, cache_dir, **kwargs), Runtime(output_dir=tmp_path / "full"), full)

    first = Recorder(stop_at=3)
    stopped = train(make_spec(corpus, cache_dir, **kwargs), Runtime(output_dir=tmp_path / "split"), first)
    assert stopped.stopped_early and stopped.final_step == 3
    assert stopped.metrics[M.TRAIN_LOSS] == full.losses()[3]
    assert latest_checkpoint(stopped.checkpoint_dir).name == "step-00000003"

    second = Recorder()
    resumed = train(
        make_spec(corpus, cache_dir, **kwargs),
        Runtime(output_dir=tmp_path / "split", resume_from=stopped.checkpoint_dir),
        second,
    )
    assert resumed.final_step == 6
    assert first.losses() == {s: full.losses()[s] for s in (1, 2, 3)}
    assert second.losses() == {s: full.losses()[s] for s in (4, 5, 6)}  # exact float equality
    ranges = {s: m[M.CROSSBATCH_RANGE] for s, m in full.logs if M.TRAIN_LOSS in m}
    assert len(set(ranges.values())) > 1  # sampled ranges really varied (and were reproduced)


def test_nan_loss_stops_training(corpus, cache_dir, tmp_path):
    from fotlab.data import byte_tokenizer
    from fotlab.model import preset_config

    bad = FoTForCausalLM(preset_config("debug", vocab_size=259))
    with torch.no_grad():
        bad.model.layers[1].self_attn.q_proj.weight.fill_(float("inf"))
    bad.save_pretrained(tmp_path / "bad")
    byte_tokenizer().save_pretrained(tmp_path / "bad")
    spec = make_spec(
        corpus,
        cache_dir,
        model={"init_from": str(tmp_path / "bad")},
        data={"tokenizer": {"kind": "pretrained", "path": str(tmp_path / "bad")}},
    )
    with pytest.raises(LossNotFiniteError, match=r"^step 1: loss is nan"):
        train(spec, Runtime(output_dir=tmp_path / "out"))
    assert latest_checkpoint(tmp_path / "out" / "checkpoints") is None


def _tiny_llama_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fotlab.data import byte_tokenizer

    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return llama


def test_init_from_tiny_hf_llama(corpus, cache_dir, tmp_path):
    """Fine-tune an HF LLaMA dir with memory layer 1: with crossbatch range 0 the first loss is LLaMA's own."""
    from fotlab.train.build import build_data

    llama = _tiny_llama_dir(tmp_path / "llama")
    spec = make_spec(
        corpus,
        cache_dir,
        steps=3,
        crossbatch={"range": 0, "packing": 2},
        model={"init_from": str(tmp_path / "llama")},
        memory={"layers": [1]},
        data={"tokenizer": {"kind": "pretrained", "path": str(tmp_path / "llama")}},
    )
    hooks = Recorder()
    result = train(spec, Runtime(output_dir=tmp_path / "out"), hooks)

    first_batch = build_data(spec, Runtime(output_dir=tmp_path / "unused")).train_packer.next_batch()
    with torch.no_grad():
        logits = llama(first_batch["input_ids"]).logits  # (B, T, V)
    llama_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), first_batch["targets"].flatten(), ignore_index=-100
    ).item()
    assert hooks.losses()[1] == pytest.approx(llama_loss, rel=1e-5)

    tuned = FoTForCausalLM.from_pretrained(result.model_dir)
    assert tuned.config.mem_layers == [1] and tuned.config.num_key_value_heads == 2
    assert not torch.equal(tuned.lm_head.weight, llama.lm_head.weight)  # it trained
    # With crossbatch range 1 the memory layer sees another context: the first loss is no longer LLaMA's.
    spec_x = make_spec(
        corpus,
        cache_dir,
        steps=1,
        crossbatch={"range": 1, "packing": 2},
        model={"init_from": str(tmp_path / "llama")},
        memory={"layers": [1]},
        data={"tokenizer": {"kind": "pretrained", "path": str(tmp_path / "llama")}},
    )
    hooks_x = Recorder()
    train(spec_x, Runtime(output_dir=tmp_path / "out-x"), hooks_x)
    assert hooks_x.losses()[1] != pytest.approx(llama_loss, rel=1e-6)

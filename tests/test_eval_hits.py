"""The evaluations observe hits: a model that provably answers, run through the real evaluation code, gets the exact
accuracies it should (1.0, 0.0 and partial ones), so the "correct" branch of every protocol runs and is counted.

The model is `CopyLM`, an induction head written in plain Python (not a stand-in for FoT, which has its own
tests): the next token is the one that followed the most recent earlier occurrence of the longest suffix of what it
can see. What it sees arrives only through the evaluation's own plumbing: a real `FoTMemory` (token ids stored as
one-dimensional keys of layer 0, filled by the evaluation's streaming calls), the local cache the evaluation hands
back for greedy decoding, and the local tokens of each call. So it answers a passkey, a dictionary query or a
few-shot question exactly when the evaluation delivered the needed tokens, and its knobs remove known parts of that
view to give known partial scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from fotlab.data import byte_tokenizer
from fotlab.eval.dictionary import dictionary_lookup_accuracy
from fotlab.eval.few_shot import few_shot_accuracy
from fotlab.eval.passkey import passkey_retrieval
from fotlab.model import FoTMemory, preset_config
from fotlab.spec.eval import DictionaryEvalSpec, FewShotEvalSpec, PasskeyEvalSpec

MIN_MATCH, MAX_MATCH = 3, 24  # suffix lengths (tokens) the copy rule tries, longest first
CONFIDENCE = 10.0  # logit of the predicted token (all others 0)


@dataclass
class CopyCache:
    """What greedy decoding hands back: the memory and the local tokens (B, n_local), plus decoding steps so far."""

    memory: FoTMemory
    local: torch.Tensor
    n_steps: int = 0


class CopyLM(torch.nn.Module):
    """Induction-head LM over memory + local tokens (module docstring). Knobs, each a known blind spot:
    reach: sees only the last `reach` tokens (None = all); memory_until: local positions >= this do not see memory;
    copy_local: may copy from earlier local tokens (False = only from memory); answer_steps: after this many
    cached decoding steps it predicts `unknown` instead."""

    def __init__(self, tok, W=64, lcl=32, reach=None, memory_until=None, copy_local=True, answer_steps=None):
        super().__init__()
        self.config = preset_config(
            "debug", vocab_size=len(tok), max_position_embeddings=W, last_context_length=lcl, mem_dtype="float32"
        )
        self.unknown = tok.pad_token_id  # never part of an answer
        self.reach, self.memory_until, self.copy_local, self.answer_steps = (
            reach,
            memory_until,
            copy_local,
            answer_steps,
        )
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # evaluations read the device off a parameter
        self.n_memory_calls = 0

    def new_memory(self) -> FoTMemory:
        return FoTMemory.empty(self.config.mem_dtype)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        memory=None,
        cache=None,
        last_context_length=None,
        use_cache=None,
        logits_to_keep=0,
        **_,
    ):
        B, L = input_ids.shape
        valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask[:, -L:].bool()
        memory = cache.memory if cache is not None else (memory if memory is not None else self.new_memory())
        past_local = cache.local if cache is not None else input_ids[:, :0]
        lcl = self.config.last_context_length if last_context_length is None else last_context_length
        n_mem = 0 if cache is not None else max(L - lcl, 0)  # with a cache every new token stays local
        n_keep = L if not logits_to_keep else min(logits_to_keep, L)
        step = 0 if cache is None else cache.n_steps + 1
        if n_mem:  # as in FoT, the windows go to memory first and the local tokens then see them
            self.n_memory_calls += 1
            ids = input_ids[:, :n_mem].float()[:, None, :, None]  # (B, 1, n_mem, 1): token ids as keys
            memory = memory.append(0, ids, ids, valid[:, :n_mem])
        logits = torch.zeros(B, n_keep, self.config.vocab_size)
        for b in range(B):
            mem_tokens = self._memory_tokens(memory, b)
            for i, t in enumerate(range(L - n_keep, L)):  # (predictions inside the windows are never used)
                local = past_local[b].tolist() + input_ids[b, n_mem : t + 1][valid[b, n_mem : t + 1]].tolist()
                logits[b, i, self._predict(mem_tokens, local, t - n_mem, step)] = CONFIDENCE
        new_cache = CopyCache(memory, torch.cat([past_local, input_ids[:, n_mem:]], 1), step) if use_cache else None
        return SimpleNamespace(logits=logits, memory=memory, cache=new_cache)

    @staticmethod
    def _memory_tokens(memory: FoTMemory, b: int) -> list[int]:
        layer = memory.get(0)
        if layer is None or layer.n_tokens == 0:
            return []
        return layer.keys[b, 0, :, 0][layer.valid[b]].long().tolist()

    def _predict(self, mem_tokens: list[int], local: list[int], position: int, step: int) -> int:
        """Next token after `local` (its last token at local `position`), copying from memory and local tokens."""
        if self.answer_steps is not None and step >= self.answer_steps:
            return self.unknown
        sees_memory = self.memory_until is None or position < self.memory_until
        history = (mem_tokens if sees_memory else []) + local
        first = 0 if self.reach is None else max(len(history) - self.reach, 0)
        n_sources = len(history) - 1 if self.copy_local else len(mem_tokens) if sees_memory else 0
        for n in range(min(MAX_MATCH, len(history) - 1), MIN_MATCH - 1, -1):
            suffix = history[-n:]
            for start in range(n_sources - 1 - n, first - 1, -1):  # most recent first; history[start + n] copied
                if history[start : start + n] == suffix:
                    return history[start + n]
        return self.unknown


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def accuracies(metrics: dict[str, float]) -> dict[str, float]:
    """The accuracy metrics alone: without their companions (trial counts `F_n`, chance level `F_chance`) and the
    memory-only passkey family, which their own assertions check."""
    return {
        k: v
        for k, v in metrics.items()
        if k.split("/")[1].rsplit("_", 1)[-1] not in ("n", "chance") and "passkey_mem_acc" not in k
    }


# ----- passkey --------------------------------------------------------------------------------------------------
def test_passkey_hits_are_counted_exactly(tok, tmp_path):
    """The full view answers every prompt: 1.0 everywhere; the key line reaches the model through memory (the
    prompt is longer than the local context)."""
    model = CopyLM(tok)
    cfg = PasskeyEvalSpec(lengths=[300, 600], depths=[0.0, 0.5, 1.0], n_trials=2)
    r = passkey_retrieval(model, tok, cfg, output_dir=tmp_path, seed=0)
    assert accuracies(r.metrics) == {
        f"eval/passkey_acc/len_{L}{d}": 1.0 for L in (300, 600) for d in ("", "/depth_0", "/depth_50", "/depth_100")
    }
    assert r.metrics["eval/passkey_acc_n/len_300"] == 6 and r.metrics["eval/passkey_acc_n/len_600/depth_50"] == 2
    assert model.n_memory_calls == 12  # every prompt went through memory
    assert [row["accuracy"] for row in r.rows] == [1.0] * 6


def test_passkey_partial_accuracy_of_a_length(tok, tmp_path):
    """Seeing only the last 200 tokens, the model finds the key only where it sits near the end: at 1024 tokens
    only depth 1.0 of four depths (0.25 of the length); at 300 tokens everywhere."""
    model = CopyLM(tok, reach=200)
    cfg = PasskeyEvalSpec(lengths=[300, 1024], depths=[0.0, 0.25, 0.5, 1.0], n_trials=2)
    m = passkey_retrieval(model, tok, cfg, output_dir=tmp_path, seed=1).metrics
    assert m["eval/passkey_acc/len_300"] == 1.0
    assert m["eval/passkey_acc/len_1024"] == 0.25
    assert [m[f"eval/passkey_acc/len_1024/depth_{p}"] for p in (0, 25, 50, 100)] == [0.0, 0.0, 0.0, 1.0]


def test_passkey_needs_every_answer_token(tok, tmp_path):
    """An answer right in its first 3 tokens and wrong after (" 31337" is 6 byte tokens) is a miss."""
    cfg = PasskeyEvalSpec(lengths=[300], depths=[0.5], n_trials=3, max_passkey=99999)
    r = passkey_retrieval(CopyLM(tok, answer_steps=3), tok, cfg, output_dir=tmp_path, seed=2)
    assert r.metrics["eval/passkey_acc/len_300"] == 0.0
    r = passkey_retrieval(CopyLM(tok, answer_steps=6), tok, cfg, output_dir=tmp_path, seed=2)
    assert r.metrics["eval/passkey_acc/len_300"] == 1.0


# ----- dictionary lookup ----------------------------------------------------------------------------------------
def test_dictionary_hits_are_counted_exactly(tok, tmp_path):
    """Definitions stream through memory in windows; queries copy their values from memory only: 1.0."""
    model = CopyLM(tok, copy_local=False)
    cfg = DictionaryEvalSpec(memory_sizes=[40, 200], n_samples=2, n_queries=3, chunk_len=32)
    r = dictionary_lookup_accuracy(model, tok, cfg, output_dir=tmp_path, seed=0)
    assert accuracies(r.metrics) == {
        "eval/dict_lookup_acc/mem_40": 1.0,
        "eval/dict_lookup_token_acc/mem_40": 1.0,
        "eval/dict_lookup_acc/mem_200": 1.0,
        "eval/dict_lookup_token_acc/mem_200": 1.0,
    }
    assert [row["trials"] for row in r.rows] == [2 * 3, 2 * 3]


@pytest.mark.parametrize("memory_until,exact,per_token", [(10, 0.25, 0.25), (8, 0.0, 3 / 16), (0, 0.0, 0.0)])
def test_dictionary_partial_accuracies(tok, tmp_path, memory_until, exact, per_token):
    """4 queries of 10 tokens (`<q> k1..k4 <v> v1..v4`) run locally; memory visible to the first `memory_until`
    local positions only: 10 = the first query's 4 values (0.25 exact, 0.25 of the tokens); 8 = its first 3 value
    tokens (none exact, 3/16 of the tokens); 0 = nothing."""
    model = CopyLM(tok, memory_until=memory_until, copy_local=False)
    cfg = DictionaryEvalSpec(memory_sizes=[100], n_samples=1, n_queries=4, chunk_len=40)
    m = dictionary_lookup_accuracy(model, tok, cfg, output_dir=tmp_path, seed=3).metrics
    assert accuracies(m) == {"eval/dict_lookup_acc/mem_100": exact, "eval/dict_lookup_token_acc/mem_100": per_token}


# ----- few-shot -------------------------------------------------------------------------------------------------
def _few_shot_source(tmp_path, query_phrases):
    """A saved HF DatasetDict: train = demonstrations about 'num' (NUM) and 'hum' (HUM); test = the queries."""
    import datasets

    def rows(items):
        return {"text": [t for t, _ in items], "label": [lab for _, lab in items]}

    demos = [(f"q{i} about {'num' if i % 2 else 'hum'}?", "NUM" if i % 2 else "HUM") for i in range(30)]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows(demos)), "test": datasets.Dataset.from_dict(rows(query_phrases))}
    )
    dd.save_to_disk(str(tmp_path / "icl"))
    return {"kind": "hf", "path": str(tmp_path / "icl"), "split": "train"}


def test_few_shot_hits_and_partial_accuracy(tok, tmp_path):
    """Queries: 'num' (demonstrated) and three 'loc' whose label LOC no demonstration shows (never right); the model
    copies from memory only, so hits come from demonstrations the evaluation streamed there: 0.25 when
    demonstrations fit the context, 0.0 when none fits (48 tokens: every option scores the same, the first label
    HUM wins)."""
    queries = [
        ("q100 about num?", "NUM"),
        ("q101 about loc?", "LOC"),
        ("q102 about loc?", "LOC"),
        ("q103 about loc?", "LOC"),
    ]
    cfg = FewShotEvalSpec(
        name="trec",
        source=_few_shot_source(tmp_path, queries),
        query_split="test",
        context_lengths=[48, 400],
        n_samplings=2,
        n_queries=4,
    )
    model = CopyLM(tok, copy_local=False)
    r = few_shot_accuracy(model, tok, cfg, output_dir=tmp_path, seed=0)
    assert accuracies(r.metrics) == {
        "eval/trec_acc/ctx_48": 0.0,
        "eval/trec_acc_std/ctx_48": 0.0,
        "eval/trec_acc/ctx_400": 0.25,
        "eval/trec_acc_std/ctx_400": 0.0,
    }
    assert model.n_memory_calls > 0  # the demonstrations went through memory


def test_few_shot_all_right_when_every_label_is_demonstrated(tok, tmp_path):
    queries = [("q200 about num?", "NUM"), ("q201 about hum?", "HUM"), ("q202 about num?", "NUM")]
    cfg = FewShotEvalSpec(
        name="icl",
        source=_few_shot_source(tmp_path, queries),
        query_split="test",
        context_lengths=[400],
        n_samplings=2,
        n_queries=3,
    )
    """Both labels demonstrated in memory: 1.0; the same model blind to memory ties every option, so the first
    label (HUM) wins: 1 of 3."""
    r = few_shot_accuracy(CopyLM(tok, copy_local=False), tok, cfg, output_dir=tmp_path, seed=5)
    assert r.metrics["eval/icl_acc/ctx_400"] == 1.0
    blind = few_shot_accuracy(CopyLM(tok, copy_local=False, memory_until=0), tok, cfg, output_dir=tmp_path, seed=5)
    assert blind.metrics["eval/icl_acc/ctx_400"] == pytest.approx(1 / 3)

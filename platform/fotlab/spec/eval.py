"""The `eval:` section of an experiment spec: which evaluations run after training (or with `fotlab eval`).

Pure pydantic (no torch, no fotlab imports): `fotlab.spec.ExperimentSpec.eval` is an `EvalSpec`.
Every evaluation is optional; an empty `eval:` section runs nothing. Lengths and sizes are in tokens.

    eval:
      perplexity:
        - {name: ppl, memory_sizes: [0, 256, 1024], modes: [single_doc, multi_doc]}
      passkey: {lengths: [1024, 4096], depths: [0.0, 0.5, 1.0], n_trials: 2}
      distraction: {n_contexts: [1, 2, 4, 8]}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SourceKind = Literal["validation", "embedded", "local", "jsonl", "parquet", "hf", "repeat"]
PplMode = Literal["single_doc", "multi_doc"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class RepeatSourceFields(_Strict):
    """Fields of the synthetic "repeat" source (shared by training and evaluation sources): natural text with
    exact long-range repeats, cut from the embedded corpus (or from `path` + `glob`); `fotlab.data.synthetic`."""

    doc_len: int = Field(
        512,
        gt=0,
        description="Synthetic tasks: document length in tokens (repeat: characters, "
        "one token each with the byte tokenizer).",
    )
    span_len: int = Field(64, gt=0, description="repeat: characters per span (a repeat copies a whole span).")
    repeat_prob: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="repeat: probability that a span (after the "
        "first) copies an earlier span instead of being a fresh slice.",
    )
    max_gap: int = Field(
        1,
        ge=1,
        description="repeat: a copy repeats the span 1..max_gap spans back (log-uniform); "
        "1 with repeat_prob 1 repeats one slice through the whole document.",
    )
    seed: int = Field(0, ge=0, description="repeat: generator seed (the documents do not depend on the run seed).")

    @model_validator(mode="after")
    def _span_fits(self):
        if getattr(self, "kind", None) == "repeat" and self.doc_len < self.span_len:
            raise ValueError(f"repeat: doc_len ({self.doc_len}) must be >= span_len ({self.span_len})")
        return self


class EvalSourceSpec(RepeatSourceFields):
    """Where an evaluation reads its documents from."""

    kind: SourceKind = Field(
        "validation",
        description=(
            "'validation': the experiment's held-out validation documents (data.validation_docs); 'embedded': the "
            "files of the built-in offline corpus in eval.split's file partition (training on the embedded corpus, "
            "or on 'repeat' spans cut from it, reads only its train partition); "
            "'local': a directory of text files (path + glob); 'jsonl' / 'parquet': a file "
            "with a text field; 'hf': a Hugging Face dataset (name, config, split); 'repeat': max_docs synthetic "
            "documents with exact long-range repeats (doc_len, span_len, repeat_prob, max_gap, seed)."
        ),
    )
    path: str | None = Field(
        None,
        description="Directory or file for kind local / jsonl / parquet (repeat: the "
        "base text files, default the embedded corpus).",
    )
    glob: str | None = Field(
        None,
        description="File pattern under `path` for kind 'local' (each file one "
        "document; default '**/*.txt'); repeat: as in the data section's sources.",
    )
    text_field: str = Field("text", description="Field holding the document text (jsonl / parquet / hf).")
    name: str | None = Field(None, description="Hugging Face dataset name for kind 'hf'.")
    config: str | None = Field(None, description="Hugging Face dataset config name for kind 'hf'.")
    split: str = Field("validation", description="Dataset split for kind 'hf'.")
    max_docs: int | None = Field(32, ge=1, description="Use at most this many documents (None = all).")
    min_doc_tokens: int = Field(0, ge=0, description="Skip documents shorter than this many tokens.")


class PerplexityEvalSpec(_Strict):
    """Perplexity vs memory size (FOT_SPEC §3). Documents are read chunk by chunk (chunk = local context); after
    each chunk its (k, v) enter memory. Memory size m caps the memory at the newest m tokens (FIFO)."""

    name: str = Field(
        "ppl", pattern=r"^[A-Za-z0-9_]+$", description="Metric prefix, e.g. 'ppl' gives eval/ppl_single_doc/mem_1024."
    )
    source: EvalSourceSpec = Field(default_factory=EvalSourceSpec, description="Documents to score.")
    memory_sizes: list[int] = Field(
        [0, 256, 1024], min_length=1, description="Memory caps in tokens per memory layer (0 = no memory)."
    )
    modes: list[PplMode] = Field(
        ["single_doc"],
        min_length=1,
        description=(
            "'single_doc': memory cleared before every document; 'multi_doc': one stream of all documents "
            "(<eos><bos> between them), memory kept across documents (other documents act as distractors)."
        ),
    )
    chunk_len: int | None = Field(
        None,
        ge=1,
        description=("Local context T: tokens per chunk (None = train.context_length, else the model's window W)."),
    )
    token_set: Literal["all", "full_memory"] = Field(
        "all",
        description=(
            "'all': every target token of every stream is scored at every memory size (one token set for all "
            "sizes; early tokens have less history than the cap). 'full_memory': score only chunks whose history "
            "in the stream is >= max(memory_sizes), so every size is fully used (same token set for all sizes)."
        ),
    )
    max_stream_tokens: int | None = Field(None, ge=1, description="Truncate every stream to this many tokens.")

    @field_validator("memory_sizes")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(m < 0 for m in v):
            raise ValueError("memory sizes must be >= 0")
        return sorted(set(v))


class PasskeyEvalSpec(_Strict):
    """Passkey retrieval in the Landmark Attention / FoT prompt format (FOT_SPEC §3); greedy, exact match."""

    lengths: list[int] = Field(
        [1024, 2048, 4096],
        min_length=1,
        description="Prompt lengths in tokens (up to 256k; longer prompts stream through memory).",
    )
    depths: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="Passkey depth as a fraction of the filler placed before it (0..1).",
    )
    n_trials: int = Field(
        2,
        ge=1,
        description="Prompts (random passkeys of the eval split) per (length, depth) "
        "cell; prompts per length = n_trials x len(depths) (100+ for reported numbers).",
    )
    last_context_length: int | None = Field(
        None,
        ge=1,
        description=(
            "Tokens of the prompt kept local (not sent to memory); None = the model config's last_context_length."
        ),
    )
    max_passkey: int = Field(50000, ge=1, description="Passkeys are drawn uniformly from [1, max_passkey].")

    @field_validator("depths")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must lie in [0, 1]")
        return v


class DistractionEvalSpec(_Strict):
    """Distraction ratio r_d (FOT_SPEC §3): attention mass of a chunk's queries on the relevant context (previous
    chunk of the same document) among d contexts in memory (d - 1 from other documents)."""

    source: EvalSourceSpec = Field(default_factory=EvalSourceSpec, description="Documents to draw contexts from.")
    n_contexts: list[int] = Field([1, 2, 4, 8, 16], min_length=1, description="Values of d (contexts in memory).")
    chunk_len: int | None = Field(None, ge=1, description="Context length (None = train.context_length or W).")
    n_samples: int = Field(8, ge=1, description="(document, chunk) samples averaged per d.")
    layers: list[int] | None = Field(None, description="Memory layers to measure (None = all memory layers).")


class DictionaryEvalSpec(_Strict):
    """Dictionary lookup accuracy vs memory size (FOT_SPEC §3): key-value records stream through memory in windows
    of whole records (no record cut at a window boundary), then the last chunk asks for values of random earlier
    keys; scored on the value tokens (greedy argmax)."""

    memory_sizes: list[int] = Field(
        [256, 1024, 4096], min_length=1, description="Tokens of dictionary definitions placed before the queries."
    )
    n_samples: int = Field(4, ge=1, description="Independent dictionaries per memory size.")
    n_queries: int = Field(16, ge=1, description="Queries asked after each dictionary.")
    chunk_len: int | None = Field(None, ge=1, description="Local context T (None = train.context_length or W).")
    key_len: int = Field(4, ge=1, description="Tokens per key (paper: 4).")
    value_len: int = Field(4, ge=1, description="Tokens per value (paper: 4).")


class FewShotEvalSpec(_Strict):
    """Few-shot in-context classification (TREC-style): fill the context with demonstrations, score each label by
    the likelihood of its tokens, accuracy vs context length averaged over samplings of demonstrations."""

    name: str = Field("icl", pattern=r"^[A-Za-z0-9_]+$", description="Metric prefix, e.g. eval/trec_acc/ctx_2048.")
    source: EvalSourceSpec = Field(
        default_factory=lambda: EvalSourceSpec(kind="jsonl"),
        description="Labelled examples (kind jsonl / parquet / hf).",
    )
    label_field: str = Field("label", description="Field holding the label (string, or int with label_names).")
    label_names: list[str] | None = Field(None, description="Names of integer labels (hf ClassLabel names if None).")
    query_split: str | None = Field(None, description="hf split to draw queries from (None = same as demonstrations).")
    context_lengths: list[int] = Field([512, 1024], min_length=1, description="Tokens of demonstrations + query.")
    n_samplings: int = Field(3, ge=1, description="Random demonstration samplings averaged (paper: 20).")
    n_queries: int = Field(20, ge=1, description="Queries scored per sampling.")
    template: str = Field(
        "Question: {text}\nType: {label}\n\n",
        description=("Demonstration template with {text} and {label}; the query is the same text cut before {label}."),
    )
    last_context_length: int | None = Field(
        None,
        ge=1,
        description=("Tokens kept local (the rest goes to memory); None = the model config's last_context_length."),
    )


def perplexity_key(p: PerplexityEvalSpec) -> str:
    """Unique name of a perplexity evaluation: `perplexity:{name}:{mode+mode}`."""
    return f"perplexity:{p.name}:{'+'.join(p.modes)}"


class EvalSpec(_Strict):
    """Evaluations run after training and by `fotlab eval` (each section optional)."""

    enabled: bool = Field(True, description="Run the evaluations below (False skips them all).")
    split: Literal["dev", "test"] = Field(
        "dev",
        description=(
            "Which held-out partition the evaluation items come from (fotlab.data.splits): dictionary definitions, "
            "passkeys, the files of the embedded corpus and the base files of 'repeat' sources, few-shot queries. "
            "Both are disjoint from training data (training only reads 'train' items). 'dev': for choosing variants "
            "(learning rate, data, steps, d) -- every exploratory run; 'test': only for the numbers you report, "
            "never for choosing. "
            "Sources of kind 'validation' are the held-out documents of data.validation_docs in either case."
        ),
    )
    perplexity: list[PerplexityEvalSpec] = Field(
        default_factory=list, description="Perplexity-vs-memory evaluations (one per source)."
    )
    passkey: PasskeyEvalSpec | None = Field(None, description="Passkey retrieval accuracy vs length x depth.")
    distraction: DistractionEvalSpec | None = Field(None, description="Distraction ratio r_d vs d.")
    dictionary_lookup: DictionaryEvalSpec | None = Field(None, description="Dictionary lookup accuracy vs memory.")
    few_shot: list[FewShotEvalSpec] = Field(default_factory=list, description="Few-shot ICL accuracy vs context.")
    progress: bool = Field(True, description="Show rich/tqdm progress bars for long evaluations.")

    @model_validator(mode="after")
    def _unique_metric_names(self) -> EvalSpec:
        pairs = [(p.name, mode) for p in self.perplexity for mode in p.modes]
        dup = {pair for pair in pairs if pairs.count(pair) > 1}
        if dup:
            name, mode = sorted(dup)[0]
            raise ValueError(
                f"perplexity: two entries named {name!r} both run mode {mode!r} (their metrics would "
                "collide); give one another name"
            )
        names = [f.name for f in self.few_shot]
        if len(set(names)) < len(names):
            raise ValueError("few_shot: entry names must be unique (they prefix the metric names)")
        return self

    def selected(self) -> list[str]:
        """Names of the evaluations this spec runs, in run order (unique; also their result file names)."""
        if not self.enabled:
            return []
        names = [perplexity_key(p) for p in self.perplexity]
        names += [n for n in ("passkey", "distraction", "dictionary_lookup") if getattr(self, n) is not None]
        return names + [f"few_shot:{f.name}" for f in self.few_shot]

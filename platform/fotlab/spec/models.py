"""The experiment spec tree: pydantic v2 models, strict (unknown keys are errors), every field described.

Design choices:
- A minimal spec is `name: x`: every other field has a default that trains the "debug" preset on the embedded
  corpus with the byte tokenizer.
- Model/memory fields left at None mean "keep the preset's (or the `init_from` checkpoint's) value"; so the
  spec can override one knob without restating the shape. `fotlab.spec.model_overrides(spec)` turns them into
  `FoTConfig` keyword arguments.
- Cross-field checks (memory layer vs number of layers, crossbatch vs batch, paths that must exist) live in
  `fotlab.spec.checks` and run as the last validation step of `ExperimentSpec`.
- Field descriptions become the JSON Schema text (`fotlab schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fotlab.spec.eval import EvalSpec, RepeatSourceFields  # the eval section (pure pydantic)

__all__ = [
    "StrictModel",
    "ModelSpec",
    "MemorySpec",
    "SourceSpec",
    "TokenizerSpec",
    "DataSpec",
    "CrossBatchSwitch",
    "CrossBatchSpec",
    "OptimizerSpec",
    "ScheduleSpec",
    "TrainSpec",
    "EvalSpec",
    "ScalingSpec",
    "StorageSpec",
    "FailureSpec",
    "TrackingSpec",
    "ExperimentSpec",
]

SourceKind = Literal["embedded", "local", "jsonl", "parquet", "hf", "dictionary_lookup", "passkey", "repeat"]


class StrictModel(BaseModel):
    """Base of every spec section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(StrictModel):
    """Which FoT model to build: a named preset and/or a checkpoint, plus optional shape overrides."""

    preset: str | None = Field(
        None,
        description="Named model shape: 'debug', 'tiny', '37m', '184m', '3b', '7b' "
        "(fotlab.model.presets). None with no init_from means 'debug'.",
    )
    init_from: str | None = Field(
        None,
        description="Start from weights: a local directory (fotlab, LongLLaMA or "
        "HF LLaMA format), a Hugging Face hub id, or a model in the MLflow store: "
        "'runs:/RUN_ID' (a run's logged model) or 'models:/NAME/latest' (see "
        "tracking.register_model), downloaded once before training. Paths that start "
        "with '/', './', '../' or '~' are checked to exist.",
    )
    hidden_size: int | None = Field(None, gt=0, description="Model dim D (None = preset/checkpoint value).")
    intermediate_size: int | None = Field(None, gt=0, description="SwiGLU FFN width (None = preset value).")
    num_hidden_layers: int | None = Field(None, gt=0, description="Number of decoder layers (None = preset value).")
    num_attention_heads: int | None = Field(None, gt=0, description="Attention heads H (None = preset value).")
    num_key_value_heads: int | None = Field(None, gt=0, description="Key/value heads for GQA (None = H).")
    max_position_embeddings: int | None = Field(
        None, gt=0, description="Window W: positions per window (None = preset value)."
    )
    rope_theta: float | None = Field(None, gt=0, description="RoPE base (None = preset value).")
    rms_norm_eps: float | None = Field(None, gt=0, description="RMSNorm epsilon (None = preset value).")
    tie_word_embeddings: bool | None = Field(
        None, description="Share input embedding and lm_head weights (None = preset value, untied by default)."
    )
    qk_norm: bool | None = Field(
        None,
        description="Cosine attention with a learnable per-head temperature "
        "(the paper's small-model variant; None = preset/checkpoint value, off).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype of the model.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (memory gradients stay exact)."
    )


class MemorySpec(StrictModel):
    """FoT memory layers: which layers attend to memory and how (FOT_SPEC §1)."""

    layers: list[int] | None = Field(
        None,
        description="0-based indices of memory layers (None = preset/checkpoint "
        "value; [] = no memory layers, a plain LLaMA baseline).",
    )
    retrieval: Literal["dense", "topk", "faiss"] | None = Field(
        None,
        description="How memory layers read memory: "
        "dense attention, exact top-k (torch) or top-k via "
        "FAISS (None = preset value, else 'dense').",
    )
    topk: int | None = Field(
        None,
        gt=0,
        description="k for 'topk'/'faiss' retrieval: memory entries each query keeps, per head (None = preset value).",
    )
    dtype: Literal["bfloat16", "float32", "float16"] | None = Field(
        None, description="Storage dtype of memory keys/values (None = preset value, bfloat16)."
    )
    positionals: bool | None = Field(
        None,
        description="False = no RoPE at all in memory layers (paper's small-model variant; None = preset value, True).",
    )
    last_context_length: int | None = Field(
        None, ge=0, description="Tokens of a long input kept local rather than sent to memory (None = preset value)."
    )
    capacity: int | None = Field(
        None, gt=0, description="Max memory slots per layer, FIFO eviction beyond it (None = unbounded)."
    )
    attention_grouping: tuple[int, int] | None = Field(
        None,
        description="Compute memory attention in chunks of "
        "(heads, queries) to bound peak memory (None = kernel default).",
    )


class SourceSpec(StrictModel, RepeatSourceFields):
    """One corpus source; several sources are mixed by weight."""

    kind: SourceKind = Field(
        "embedded",
        description="embedded: the small corpus shipped with fotlab (no network; training reads its train file "
        "partition, evaluations its dev / test files); "
        "local: a directory + glob, one document per file; jsonl/parquet: files with a text "
        "field; hf: a Hugging Face dataset; dictionary_lookup/passkey: synthetic tasks; repeat: "
        "natural text with exact long-range repeats (span_len, repeat_prob, max_gap, seed).",
    )
    path: str | None = Field(
        None,
        description="local/jsonl/parquet: a file or directory (checked to exist unless "
        "it is a URL like s3://...); relative paths are relative to the working directory.",
    )
    glob: str | None = Field(
        None,
        description="Files to read under a directory `path` (local: each file one "
        "document; default '**/*.txt'). repeat: the base files under `path` (default "
        "'**/*.txt') or, without `path`, a subset of the embedded corpus (e.g. '*.py': the "
        "top-level stdlib modules only; default all of it).",
    )
    text_field: str = Field("text", description="Column/key holding the document text (jsonl, parquet, hf).")
    name: str | None = Field(
        None,
        description="hf: dataset name on the hub (or give `path`: a local dataset directory saved with save_to_disk).",
    )
    config: str | None = Field(None, description="hf: dataset configuration name.")
    data_dir: str | None = Field(
        None, description="hf: `data_dir` passed to load_dataset (e.g. 'data/python' for The Stack)."
    )
    split: str = Field("train", description="hf: dataset split to read.")
    streaming: bool = Field(False, description="hf: stream the dataset instead of downloading it whole.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the training mixture.")
    min_doc_tokens: int = Field(
        0, ge=0, description="Drop documents shorter than this many tokens (counted after tokenisation)."
    )
    max_docs: int | None = Field(
        None,
        gt=0,
        description="Keep at most this many documents, train + validation, after the length filter (None = all).",
    )
    n_docs: int = Field(64, gt=0, description="Synthetic tasks: number of documents to generate.")
    key_len: int = Field(4, gt=0, description="dictionary_lookup: tokens per key.")
    value_len: int = Field(4, gt=0, description="dictionary_lookup: tokens per value.")
    max_passkey: int = Field(50000, gt=0, description="passkey: pass keys are drawn uniformly from [1, max_passkey].")


class TokenizerSpec(StrictModel):
    """The tokenizer: byte-level (no training), a BPE trained on the corpus, or a pretrained one."""

    kind: Literal["byte", "bpe", "pretrained"] = Field(
        "byte",
        description="byte: 256 bytes + <bos>/<eos>/<pad>; "
        "bpe: byte-level BPE trained on the training texts; "
        "pretrained: load from `path` with AutoTokenizer.",
    )
    path: str | None = Field(
        None,
        description="pretrained: tokenizer directory or hub id (required); bpe: where "
        "the trained tokenizer is saved and reloaded from.",
    )
    vocab_size: int = Field(4096, gt=0, description="bpe: vocabulary size to train (specials included).")


def _default_sources() -> list[SourceSpec]:
    return [SourceSpec(kind="embedded")]


class DataSpec(StrictModel):
    """Training data: sources, tokenizer, validation split and preprocessing."""

    sources: list[SourceSpec] = Field(
        default_factory=_default_sources,
        min_length=1,
        description="Corpus sources mixed by weight (default: the embedded corpus).",
    )
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer settings.")
    validation_docs: int = Field(8, ge=0, description="Documents held out for validation loss.")
    num_proc: int = Field(1, gt=0, description="Processes for dataset tokenization (datasets.map num_proc).")
    cache_dir: str | None = Field(
        None, description="Cache for tokenised datasets and trained BPE tokenizers (None = ~/.cache/fotlab/datasets)."
    )


class CrossBatchSwitch(StrictModel):
    """From step `at_step` on, use crossbatch range `range`."""

    at_step: int = Field(..., ge=0, description="First training step using the new range.")
    range: int = Field(..., ge=0, description="Crossbatch range from that step on.")


class CrossBatchSpec(StrictModel):
    """FoT crossbatch training (FOT_SPEC §2): memory layers also see other contexts of the same batch."""

    range: int = Field(
        0, ge=0, description="Extra contexts per entry (d - 1); 0 = plain causal attention. Must be < train.batch_size."
    )
    packing: int = Field(
        1,
        gt=0,
        description="k: consecutive chunks of one document per k batch rows (train.batch_size must be a multiple).",
    )
    stepping: bool = Field(
        False,
        description="Limit the contexts of entry b by its position in the packing "
        "group (LongLLaMA's mixture, FOT_SPEC §2).",
    )
    switch: list[CrossBatchSwitch] = Field(
        default_factory=list, description="Change the range at given steps (e.g. start with d <= 8, later d >= 64)."
    )
    sample_from: list[int] | None = Field(
        None,
        min_length=1,
        description="Draw the range per step uniformly from this set instead (e.g. [1, 127]); None = off.",
    )
    backend: Literal["sdpa", "flex"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (one SDPA call with a "
        "block mask) or flex (FlexAttention, skips masked blocks; worth it on "
        "GPUs with large ranges; needs context_length % 128 == 0).",
    )


class OptimizerSpec(StrictModel):
    """Optimizer settings."""

    name: Literal["adamw", "adafactor"] = Field("adamw", description="adamw (torch.optim.AdamW) or adafactor.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied to norms/biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")


class ScheduleSpec(StrictModel):
    """Learning-rate schedule (multiplies optimizer.lr)."""

    name: Literal["constant", "inverse_sqrt", "cosine"] = Field("constant", description="Schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final lr as a fraction of the peak.")


class TrainSpec(StrictModel):
    """The training loop."""

    context_length: int = Field(64, gt=0, description="Local context T per row (<= the model window W).")
    batch_size: int = Field(8, gt=0, description="Rows per worker per micro-step (B).")
    grad_accum: int = Field(1, gt=0, description="Micro-steps accumulated per optimizer step.")
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    crossbatch: CrossBatchSpec = Field(default_factory=CrossBatchSpec, description="FoT crossbatch settings.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (None = off).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Compute precision (bf16 = autocast).")
    log_every: int = Field(10, gt=0, description="Report training metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0 = only at the end).")
    eval_batches: int = Field(4, gt=0, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept (older ones are deleted).")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss or gradient norm: stop (the run fails naming the step; checkpoints kept) "
        "or skip the step's update (counted as train/skipped_steps).",
    )
    framework: Literal["torch", "jax"] = Field(
        "torch",
        description="Training framework: torch (PyTorch, DDP/FSDP) or jax (fotlab.jax; required for scaling.use_tpu).",
    )


class FsdpSpec(StrictModel):
    """FSDP2 settings (`scaling.strategy: fsdp`; see fotlab/train/sharding.py)."""

    reshard_after_forward: bool = Field(
        True,
        description="Free gathered parameters after each layer's forward "
        "(all-gather again in backward): less memory, more communication.",
    )
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters, gradients and optimizer state in host memory (GPU runs only)."
    )


class ScalingSpec(StrictModel):
    """Ray Train scaling (ray.train.ScalingConfig)."""

    num_workers: int = Field(1, ge=0, description="Training workers (0 = run in the driver process, for tests).")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic training: after a lost worker or node, restart with as few as this many workers "
        "instead of waiting for num_workers to fit again (and grow back when they do). Each worker keeps "
        "train.batch_size, so the global batch follows the worker count. None = always num_workers.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 2} (None = Ray's default)."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Data-parallel wrapper for multi-worker runs "
        "(fsdp: FSDP2 per decoder layer, sharded DCP checkpoints).",
    )
    fsdp: FsdpSpec | None = Field(None, description="FSDP2 settings (strategy fsdp only).")
    use_tpu: bool = Field(False, description="Run on TPU hosts.")
    topology: str | None = Field(None, description="TPU topology, e.g. '4x4' (use_tpu only).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'TPU-V5E' or 'H100'.")


class StorageSpec(StrictModel):
    """Where Ray Train keeps checkpoints and results."""

    path: str | None = Field(
        None,
        description="Run storage (local dir or s3://, gs://; None = "
        "<project-or-cwd>/.fotlab/runs). Multi-node runs need shared storage.",
    )
    filesystem: str | None = Field(
        None, description="pyarrow filesystem for `path` when not inferable (e.g. 's3' for MinIO)."
    )


class FailureSpec(StrictModel):
    """Fault tolerance (ray.train.FailureConfig)."""

    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = forever).")


class TrackingSpec(StrictModel):
    """MLflow tracking."""

    uri: str | None = Field(
        None, description="Tracking URI (None = $MLFLOW_TRACKING_URI, else sqlite:///<project-or-cwd>/mlflow.db)."
    )
    experiment: str | None = Field(None, description="MLflow experiment name (None = the spec's name).")
    artifact_root: str | None = Field(
        None,
        description="Artifact location for a new experiment (None = "
        "'mlartifacts' beside a sqlite db; the server's default otherwise).",
    )
    run_name: str | None = Field(None, description="MLflow run name (None = MLflow's generated name).")
    system_metrics: bool = Field(
        True,
        description="Log system metrics (CPU, memory, disk, network; GPU with "
        "nvidia-ml-py) of the driver host every 10 s, as MLflow `system/...` metrics.",
    )
    flush_timeout_s: float = Field(
        180.0,
        ge=0,
        le=86400,
        description=(
            "Metrics reach the tracking server from a background thread that keeps them through an outage (training "
            "never waits for the server). At the end of training, and of the run, wait at most this many seconds "
            "for those still queued; what has not arrived by then is saved to <output>/undelivered_metrics.jsonl "
            "for `fotlab runs deliver FILE`, and the run ends without further calls to the server."
        ),
    )
    log_model: bool = Field(True, description="Log the final model directory (HF format) as run artifacts.")
    register_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description=(
            "Also register the logged model in the store's MLflow model registry under this name (a new version per "
            "run), so another spec can start from it: model.init_from: models:/NAME/latest. Needs log_model."
        ),
    )


class ExperimentSpec(StrictModel):
    """One experiment: a model, its data and training, evaluations, scaling and tracking."""

    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Experiment name (letters, digits, '_', '-', '.'); default MLflow experiment.",
    )
    description: str = Field("", description="Free text shown with the run.")
    seed: int = Field(0, ge=0, description="Seed for weights, data order and crossbatch sampling.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow run tags.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model shape and initial weights.")
    memory: MemorySpec = Field(default_factory=MemorySpec, description="FoT memory layers.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training loop.")
    eval: EvalSpec = Field(
        default_factory=EvalSpec,
        description="Evaluations run after training and by `fotlab eval` (section defined in fotlab.spec.eval).",
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train scaling.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Checkpoint/result storage.")
    failure: FailureSpec = Field(default_factory=FailureSpec, description="Fault tolerance.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking.")

    @model_validator(mode="after")
    def _cross_field(self, info) -> ExperimentSpec:
        from fotlab.spec.checks import first_problem  # local: checks imports this module

        context = info.context or {}
        problem = first_problem(self, check_paths=context.get("check_paths", True))
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return self

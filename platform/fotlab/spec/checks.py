"""Cross-field checks of an `ExperimentSpec`: each problem is (dotted field, what is wrong).

The model shape is resolved the way training will resolve it: the preset's declared fields (`fotlab.presets`,
plain data, so validating imports no torch) or a local `init_from` directory's `config.json`, then the spec's
overrides; fields a preset leaves out take FoTConfig's defaults (GQA off, dense retrieval). When the shape cannot
be known (remote checkpoint) the shape checks are skipped rather than guessed.

Paths: local/jsonl/parquet `path`s must exist unless they are URLs (`s3://...`); an hf `path`,
`model.init_from` and `data.tokenizer.path` are checked only when they are explicitly local ('/', './', '../',
'~'), anything else is a hub id or remote path resolved where the run executes. `check_paths=False`
(`fotlab validate --no-check-paths`) skips every existence check, for specs meant for another machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Problem = tuple[str, str]

# ModelSpec / MemorySpec field -> FoTConfig keyword.
_MODEL_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "qk_norm",
)
_MEMORY_FIELDS = {
    "layers": "mem_layers",
    "retrieval": "mem_retrieval",
    "topk": "mem_topk",
    "dtype": "mem_dtype",
    "positionals": "mem_positionals",
    "last_context_length": "last_context_length",
    "capacity": "mem_capacity",
    "attention_grouping": "mem_attention_grouping",
}


def model_overrides(spec) -> dict[str, Any]:
    """`FoTConfig` keyword overrides the spec sets (model shape + memory), leaving out fields left at None.

    Training builds its config as `preset_config(spec.model.preset or "debug", **model_overrides(spec))`
    or `FoTForCausalLM.from_pretrained(spec.model.init_from, **model_overrides(spec))`.
    """
    out = {f: getattr(spec.model, f) for f in _MODEL_FIELDS if getattr(spec.model, f) is not None}
    for field, key in _MEMORY_FIELDS.items():
        value = getattr(spec.memory, field)
        if value is not None:
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


BYTE_VOCAB_SIZE = 259  # fotlab.data.tokenizer's byte tokenizer: 256 bytes + <bos> <eos> <pad> (a test checks it)


def looks_local(path: str) -> bool:
    """True for paths the user clearly meant as local files ('/', './', '../', '~'); hub ids and URLs are not."""
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..")


def _is_url(path: str) -> bool:
    return "://" in path


def resolved_shape(spec) -> tuple[dict[str, Any] | None, str]:
    """The base model fields (before spec overrides) and where they came from, or (None, why unknown)."""
    init_from = spec.model.init_from
    if init_from is not None:
        config_file = Path(init_from).expanduser() / "config.json"
        if not config_file.is_file():
            return None, f"checkpoint {init_from!r}"
        try:
            return json.loads(config_file.read_text()), f"checkpoint {init_from!r}"
        except (OSError, ValueError):
            return None, f"checkpoint {init_from!r}"
    from fotlab.presets import PRESETS

    name = spec.model.preset or "debug"
    if name not in PRESETS:
        return None, f"preset {name!r}"
    return dict(PRESETS[name]), f"preset {name!r}"


def _declared(spec) -> dict[str, Any]:
    """Fields the preset table or checkpoint config states explicitly (not FoTConfig's defaults)."""
    if spec.model.init_from is not None:
        base, _ = resolved_shape(spec)
        return base or {}
    from fotlab.presets import PRESETS

    return dict(PRESETS.get(spec.model.preset or "debug", {}))


def _model_problems(spec, check_paths: bool = True) -> Iterator[Problem]:
    preset = spec.model.preset
    if preset is not None and spec.model.init_from is not None:
        yield "model.preset", "set both preset and init_from; a checkpoint brings its own shape (drop preset)"
    if preset is not None:
        from fotlab.presets import PRESETS

        if preset not in PRESETS:
            yield "model.preset", f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})"
            return
    init_from = spec.model.init_from
    if check_paths and init_from is not None and looks_local(init_from) and not Path(init_from).expanduser().exists():
        yield "model.init_from", f"directory {init_from!r} does not exist"
    base, origin = resolved_shape(spec)
    if base is None:
        return
    shape = {**base, **model_overrides(spec)}
    n_layers = int(shape.get("num_hidden_layers", 0))
    for i, layer in enumerate(shape.get("mem_layers") or []):
        if not 0 <= int(layer) < n_layers:
            where = "memory.layers" + (f"[{i}]" if spec.memory.layers is not None else f" ({origin})")
            yield where, f"layer index {layer} is outside 0..{n_layers - 1} (model has {n_layers} layers, {origin})"
    n_heads, dim = shape.get("num_attention_heads"), shape.get("hidden_size")
    if n_heads and dim and shape.get("head_dim") in (None, dim // int(n_heads)) and dim % n_heads:
        yield "model.num_attention_heads", f"hidden_size {dim} is not divisible by {n_heads} heads"
    n_kv = shape.get("num_key_value_heads") or n_heads
    if n_heads and n_kv and n_heads % n_kv:
        yield "model.num_key_value_heads", f"{n_heads} attention heads are not divisible by {n_kv} kv heads"
    window = shape.get("max_position_embeddings")
    if window and spec.train.context_length > window:
        yield (
            "train.context_length",
            f"{spec.train.context_length} exceeds the model window W = "
            f"max_position_embeddings = {window} ({origin}); lower it or set model.max_position_embeddings",
        )
    retrieval = shape.get("mem_retrieval", "dense")
    if retrieval in ("topk", "faiss") and spec.memory.topk is None and _declared(spec).get("mem_topk") is None:
        yield "memory.topk", f"required for retrieval {retrieval!r}"
    if retrieval == "dense" and spec.memory.topk is not None:
        yield "memory.topk", "set, but memory.retrieval is 'dense' (topk only applies to 'topk'/'faiss')"


def _crossbatch_problems(spec) -> Iterator[Problem]:
    train, cb = spec.train, spec.train.crossbatch
    batch = train.batch_size
    if batch % cb.packing:
        yield "train.batch_size", f"{batch} is not a multiple of train.crossbatch.packing = {cb.packing}"
    limit = f"must be < train.batch_size = {batch} (entry b sees at most b earlier entries)"
    if cb.range >= batch:
        yield "train.crossbatch.range", f"{cb.range} {limit}"
    for i, sw in enumerate(cb.switch):
        if sw.range >= batch:
            yield f"train.crossbatch.switch[{i}].range", f"{sw.range} {limit}"
        if sw.at_step >= train.steps:
            yield f"train.crossbatch.switch[{i}].at_step", f"{sw.at_step} is past the last step ({train.steps})"
    for i, r in enumerate(cb.sample_from or []):
        if not 0 <= r < batch:
            yield f"train.crossbatch.sample_from[{i}]", f"{r} must be in 0..{batch - 1} (train.batch_size = {batch})"
    if cb.sample_from and cb.switch:
        yield "train.crossbatch.sample_from", "use either switch or sample_from, not both"
    if cb.backend == "flex" and train.context_length % 128:
        yield "train.crossbatch.backend", f"flex needs train.context_length % 128 == 0 (got {train.context_length})"


def _source_problems(source, field: str, check_paths: bool) -> Iterator[Problem]:
    if source.kind in ("local", "jsonl", "parquet"):
        if source.path is None:
            yield f"{field}.path", f"required for kind {source.kind!r}"
        elif check_paths and not _is_url(source.path) and not Path(source.path).expanduser().exists():
            yield f"{field}.path", f"{source.path!r} does not exist"
    if source.kind == "hf":
        path = getattr(source, "path", None)
        if source.name is None and path is None:
            yield f"{field}.name", "required for kind 'hf' (a hub dataset name, or `path` to a local dataset)"
        elif check_paths and path is not None and looks_local(path) and not Path(path).expanduser().exists():
            yield f"{field}.path", f"{path!r} does not exist"


def _eval_sources(eval_spec) -> Iterator[tuple[str, Any]]:
    """(dotted field, source) of every evaluation that reads documents (the eval section: fotlab.spec.eval)."""
    for name, section in eval_spec:
        items = section if isinstance(section, list) else [section]
        for i, item in enumerate(items):
            source = getattr(item, "source", None)
            if source is not None:
                yield (f"eval.{name}[{i}].source" if isinstance(section, list) else f"eval.{name}.source"), source


def _data_problems(spec, check_paths: bool) -> Iterator[Problem]:
    for i, source in enumerate(spec.data.sources):
        yield from _source_problems(source, f"data.sources[{i}]", check_paths)
    for field, source in _eval_sources(spec.eval):
        yield from _source_problems(source, field, check_paths)
    tok = spec.data.tokenizer
    if tok.kind == "pretrained":
        if tok.path is None:
            yield "data.tokenizer.path", "required for kind 'pretrained' (e.g. the init_from directory)"
        elif check_paths and looks_local(tok.path) and not Path(tok.path).expanduser().exists():
            yield "data.tokenizer.path", f"{tok.path!r} does not exist"
    if tok.kind == "byte" and spec.model.init_from is not None:
        base, origin = resolved_shape(spec)  # unknown (remote, MLflow): checked when the model is built
        if base is not None and base.get("vocab_size") != BYTE_VOCAB_SIZE:
            yield (
                "data.tokenizer.kind",
                (
                    f"'byte' cannot feed {origin} (vocab_size {base.get('vocab_size')}, not "
                    "a byte-level fotlab model); use kind: pretrained"
                ),
            )


def _scaling_problems(spec) -> Iterator[Problem]:
    sc = spec.scaling
    if sc.use_gpu and sc.use_tpu:
        yield "scaling.use_tpu", "use_gpu and use_tpu are both true; pick one"
    if sc.topology is not None and not sc.use_tpu:
        yield "scaling.topology", "only applies with scaling.use_tpu: true"
    if sc.fsdp is not None and sc.strategy != "fsdp":
        yield "scaling.fsdp", f"only applies with scaling.strategy: fsdp (strategy is {sc.strategy})"
    if sc.min_workers is not None and not 1 <= sc.min_workers <= sc.num_workers:
        yield "scaling.min_workers", f"must be between 1 and scaling.num_workers ({sc.num_workers})"
    if sc.min_workers is not None and sc.use_tpu:
        yield "scaling.min_workers", "elastic training is not supported on TPU slices (a slice runs whole)"
    if sc.strategy == "fsdp" and sc.num_workers == 0:
        yield "scaling.strategy", "fsdp needs Ray Train workers (num_workers >= 1); num_workers 0 runs in-process"
    if sc.fsdp is not None and sc.fsdp.cpu_offload and not sc.use_gpu:
        yield (
            "scaling.fsdp.cpu_offload",
            "only applies with scaling.use_gpu: true (CPU runs keep everything in host memory already)",
        )
    if spec.tracking.register_model and not spec.tracking.log_model:
        yield "tracking.register_model", "registers the logged model, but tracking.log_model is false"


def _framework_problems(spec) -> Iterator[Problem]:
    """`train.framework: jax` (fotlab.jax): what the JAX loop does not have; TPUs only through it. Crossbatch
    rules are the framework's common ones (`_crossbatch_problems`); shapes a preset sets are checked when the JAX
    model is built (`fotlab.jax.model.JaxFoTConfig.from_dict`)."""
    sc, jax = spec.scaling, spec.train.framework == "jax"
    if sc.use_tpu and not jax:
        yield "scaling.use_tpu", "TPU training runs the JAX path; set train.framework: jax"
    if not jax:
        return
    if spec.train.optimizer.name != "adamw":
        yield "train.optimizer.name", "train.framework jax supports adamw only"
    if sc.use_gpu:
        yield "scaling.use_gpu", "train.framework jax runs on TPU or CPU; use train.framework torch for GPUs"
    if sc.num_workers > 1 and not sc.use_tpu:
        yield (
            "scaling.num_workers",
            "train.framework jax on CPU runs one worker (Ray initialises jax.distributed only for TPU workers)",
        )
    if sc.strategy == "fsdp":
        yield "scaling.strategy", "fsdp is the PyTorch path; train.framework jax shards over its own device mesh"
    if spec.memory.retrieval not in (None, "dense"):
        yield "memory.retrieval", f"train.framework jax has dense memory retrieval only (got {spec.memory.retrieval!r})"
    if spec.memory.capacity is not None:
        yield "memory.capacity", "train.framework jax has no memory capacity limit; leave it unset"
    if spec.model.qk_norm:
        yield "model.qk_norm", "train.framework jax has no qk_norm"


def problems(spec, check_paths: bool = True) -> Iterator[Problem]:
    """Every cross-field problem of `spec`, in a fixed order (model, crossbatch, data, scaling, framework)."""
    yield from _model_problems(spec, check_paths)
    yield from _crossbatch_problems(spec)
    yield from _data_problems(spec, check_paths)
    yield from _scaling_problems(spec)
    yield from _framework_problems(spec)


def first_problem(spec, check_paths: bool = True) -> Problem | None:
    """The first cross-field problem, or None when the spec is consistent."""
    return next(problems(spec, check_paths), None)

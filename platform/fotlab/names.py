"""Every MLflow metric and tag name fotlab writes, declared once (imports nothing: train, eval, tracking and the
CLI share it without pulling in torch or mlflow).

    from fotlab import names
    names.ppl_metric("ppl", "single_doc", 4096)          # "eval/ppl_single_doc/mem_4096"
    names.parse_metric_name("eval/ppl_single_doc/mem_4096")  # ("ppl_single_doc", {"mem": "4096"})

MLflow accepts only `[/\\w.\\- :]` in metric names, so evaluation parameters are written `key_value` path parts:
`eval/ppl_single_doc/mem_4096`, `eval/passkey_acc/len_16384`, `eval/distraction_ratio/d_8`.
"""

from __future__ import annotations

import re
from typing import Any

# ----- training metrics (reported by the loop through TrainHooks.on_log) ----------------------------------------
# train/*: means over the `log_every` steps since the last report (loss averaged over ranks).
TRAIN_LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"  # global norm before clipping, last step of the window
TOKENS_PER_S = "train/tokens_per_s"  # input tokens per second of step time, all ranks together
STEP_TIME_S = "train/step_time_s"  # mean seconds per optimizer step
CROSSBATCH_RANGE = "train/crossbatch_range"  # range of the last step of the window
TOKENS_SEEN = "train/tokens_seen"  # input tokens consumed so far, all ranks together
SKIPPED_STEPS = "train/skipped_steps"  # steps dropped for a NaN/inf loss so far (train.nonfinite: skip)
CHECKPOINT_TIME_S = "train/checkpoint_time_s"  # seconds the last checkpoint took to write (all ranks, barriers)
VAL_LOSS = "val/loss"  # validation loss with the crossbatch of the current step
VAL_PPL = "val/ppl"  # exp(val/loss)
VAL_LOSS_NO_XBATCH = "val/loss_no_xbatch"  # crossbatch range 0: the gap to val/loss is what memory adds
TRAIN_METRICS = (
    TRAIN_LOSS,
    LR,
    GRAD_NORM,
    TOKENS_PER_S,
    STEP_TIME_S,
    CROSSBATCH_RANGE,
    TOKENS_SEEN,
    VAL_LOSS,
    VAL_PPL,
    VAL_LOSS_NO_XBATCH,
)
SUMMARY_METRICS = (TRAIN_LOSS, VAL_LOSS, VAL_PPL, TOKENS_PER_S)  # shown by `fotlab runs list`
# ----- the MLflow Model (pyfunc) of a fotlab model: columns, params, loader -----------------------------------
PROMPT_COLUMN = "prompt"  # pyfunc input: one prompt per row
COMPLETION_COLUMN = "completion"  # pyfunc output: its greedy completion
DEFAULT_MAX_NEW_TOKENS = 32
PYFUNC_LOADER = "fotlab.serving"  # the module MLflow imports to load the model (`_load_pyfunc`)

TRAIN_TIME_S = "time/train_s"  # wall time of training (pipeline)
EVAL_TIME_S = "time/eval_s"  # wall time of the spec's evaluations (pipeline)

# ----- tags -----------------------------------------------------------------------------------------------------
TAG_VERSION = "fotlab.version"
TAG_SPEC_NAME = "fotlab.spec_name"
TAG_KIND = "fotlab.kind"  # "run" | "trial" | "reproduce" | "eval"
TAG_MODEL = "fotlab.model"  # the model a `fotlab eval` run evaluated
TAG_SWEEP = "fotlab.sweep"
TAG_ERROR = "fotlab.error"
TAG_RESUMABLE = "fotlab.resumable"
TAG_RAY_RUN_NAME = "fotlab.ray_run_name"  # the Ray Train run a `fotlab run` continues on --resume
TAG_STORAGE_PATH = "fotlab.storage_path"
TAG_REGISTERED_VERSION = "fotlab.registered_version"  # "NAME/VERSION" once the model is registered
TAG_TRIAL_ID = "fotlab.trial_id"
TAG_SWEEP_ROLE = "fotlab.sweep_role"  # "parent" | "trial"
TAG_SWEEP_DIR = "fotlab.sweep_dir"
TAG_STOPPED_EARLY = "fotlab.stopped_early"
TAG_RESUMED_FROM = "fotlab.resumed_from"  # the checkpoint a restored trial continued from
TAG_ADOPTED_FROM_TRIAL = "fotlab.adopted_from_trial"  # a lost trial's id, whose child run a restored trial took over
TAG_BEST_TRIAL = "fotlab.best_trial_id"
TAG_BEST_RUN = "fotlab.best_run_id"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_NOTE = "mlflow.note.content"
SWEEP_PARAM_PREFIX = "sweep/"  # a trial's swept fields, again as params `sweep/<field>`

# ----- evaluation metrics (one function per family; every evaluation builds its names through these) -----------
EVAL_PREFIX = "eval"
_VALID = re.compile(r"^[/\w.\- :]*$")


def metric_name(family: str, **params: Any) -> str:
    """`metric_name("ppl_single_doc", mem=4096)` -> "eval/ppl_single_doc/mem_4096" (valid MLflow metric name)."""
    parts = [EVAL_PREFIX, family] + [f"{k}_{_fmt(v)}" for k, v in params.items()]
    name = "/".join(parts)
    if not _VALID.match(name):
        raise ValueError(f"metric name {name!r} has characters MLflow rejects")
    return name


def parse_metric_name(name: str) -> tuple[str, dict[str, str]] | None:
    """The inverse of `metric_name`: "eval/ppl_single_doc/mem_4096" -> ("ppl_single_doc", {"mem": "4096"});
    None for a name that is not an evaluation metric. A part without `key_value` form is kept as {part: ""}."""
    parts = name.split("/")
    if len(parts) < 2 or parts[0] != EVAL_PREFIX or not parts[1]:
        return None
    params = {}
    for part in parts[2:]:
        key, sep, value = part.rpartition("_")
        params.update({key: value} if sep and key else {part: ""})
    return parts[1], params


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def ppl_metric(name: str, mode: str, memory_size: int) -> str:
    """Perplexity of evaluation `name` in `mode` ("single_doc" | "multi_doc") with memory capped at memory_size."""
    return metric_name(f"{name}_{mode}", mem=memory_size)


def passkey_metric(length: int, depth: float | None = None, memory_only: bool = False) -> str:
    """Passkey accuracy at prompt length (mean over depths when depth is None, else one depth in percent); memory_only:
    over the prompts whose key line lies in memory, not in the local part (`passkey_mem_acc`)."""
    if memory_only:
        return metric_name("passkey_mem_acc", len=length)
    if depth is None:
        return metric_name("passkey_acc", len=length)
    return metric_name("passkey_acc", len=length, depth=int(round(depth * 100)))


COUNT_SUFFIX, CHANCE_SUFFIX = "_n", "_chance"


def count_metric(accuracy_metric: str) -> str:
    """The trial-count companion of an accuracy metric: eval/F/params -> eval/F_n/params."""
    parts = accuracy_metric.split("/")
    return "/".join([parts[0], parts[1] + COUNT_SUFFIX, *parts[2:]])


def chance_metric(family: str) -> str:
    """The chance level of an accuracy family F: eval/F_chance."""
    return metric_name(family + CHANCE_SUFFIX)


def distraction_metric(n_contexts: int, layer: int | None = None) -> str:
    """Distraction ratio r_d with d = n_contexts (mean over memory layers when layer is None)."""
    if layer is None:
        return metric_name("distraction_ratio", d=n_contexts)
    return metric_name("distraction_ratio", layer=layer, d=n_contexts)


def dictionary_metric(memory_size: int, per_token: bool = False) -> str:
    """Dictionary lookup accuracy (whole value exact match, or per value token) with memory_size dictionary tokens."""
    return metric_name("dict_lookup_token_acc" if per_token else "dict_lookup_acc", mem=memory_size)


def few_shot_metric(name: str, context_len: int, stat: str = "acc") -> str:
    """Few-shot accuracy (stat "acc" = mean over samplings, "acc_std" = std) at context_len tokens."""
    return metric_name(f"{name}_{stat}", ctx=context_len)

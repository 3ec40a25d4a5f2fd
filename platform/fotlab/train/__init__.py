"""fotlab.train: the plain FoT training loop and its parts (no Ray / MLflow imports).

    from fotlab.train import train, Runtime, TrainHooks
    result = train(spec, Runtime(output_dir=Path("runs/demo")), TrainHooks(on_log=print))

Modules: `loop` (train: setup -> build -> fit), `build` (tokenizer, data, model), `steps` (one optimizer step,
validation loss), `optim` (optimizers, lr schedules), `checkpoint` (atomic checkpoints), `rng` (seeding, RNG
state), `runtime` (Runtime, TrainHooks, TrainResult, errors), metric names in `fotlab.names`,
`crossbatch_schedule` (which CrossBatch each step uses).
"""

from fotlab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from fotlab.train.loop import train
from fotlab.train.optim import build_optimizer, build_scheduler
from fotlab.train.runtime import LossNotFiniteError, Runtime, TrainError, TrainHooks, TrainResult, unwrap_model

__all__ = [
    "LossNotFiniteError",
    "Runtime",
    "TrainError",
    "TrainHooks",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "unwrap_model",
]

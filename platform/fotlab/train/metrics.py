"""Names of the metrics the training loop reports through `TrainHooks.on_log` (declared once, here).

- train/*: means over the `log_every` steps since the last report (loss averaged over ranks).
- val/loss: validation loss with the crossbatch of the current step (the same contexts training sees).
- val/loss_no_xbatch: validation loss with crossbatch range 0 (plain causal attention) — the gap between the two
  shows how much the memory layers use the other contexts.
"""

LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"  # global norm before clipping, last step of the window
TOKENS_PER_S = "train/tokens_per_s"  # input tokens per second of step time, all ranks together
STEP_TIME_S = "train/step_time_s"  # mean seconds per optimizer step
CROSSBATCH_RANGE = "train/crossbatch_range"  # range of the last step of the window
TOKENS_SEEN = "train/tokens_seen"  # input tokens consumed so far, all ranks together
VAL_LOSS = "val/loss"
VAL_PPL = "val/ppl"  # exp(val/loss)
VAL_LOSS_NO_XBATCH = "val/loss_no_xbatch"

ALL = (LOSS, LR, GRAD_NORM, TOKENS_PER_S, STEP_TIME_S, CROSSBATCH_RANGE, TOKENS_SEEN, VAL_LOSS, VAL_PPL,
       VAL_LOSS_NO_XBATCH)

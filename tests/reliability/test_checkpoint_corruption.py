"""R4: a corrupted replicated checkpoint (truncated, bytes flipped, a file deleted) is detected at resume through
the sha256/size manifest in trainer_state.json; the previous intact checkpoint is used with a warning naming the bad
one, on a real tiny training run (the real loop, real safetensors/torch files).
Run: pytest tests/reliability/test_checkpoint_corruption.py
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fotlab.spec import parse_spec
from fotlab.train import Runtime, TrainHooks, train
from fotlab.train.checkpoint import STATE_FILE, checkpoint_problem

pytestmark = pytest.mark.slow


def _spec(corpus: Path, cache_dir: Path, steps: int):
    return parse_spec(
        {
            "name": "reliab-ckpt",
            "seed": 5,
            "model": {"preset": "debug"},
            "data": {
                "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
                "validation_docs": 2,
                "cache_dir": str(cache_dir),
            },
            "train": {"steps": steps, "batch_size": 2, "context_length": 32, "log_every": 1, "eval_batches": 1,
                      "checkpoint_every": 1, "keep_checkpoints": 5, "crossbatch": {"range": 0}},
        }
    )  # fmt: skip


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # same size, other bytes
    path.write_bytes(bytes(data))


def _delete(path: Path) -> None:
    path.unlink()


CORRUPTIONS = {
    "truncate-model": ("model.safetensors", _truncate, "bytes, the manifest says"),
    "flip-model": ("model.safetensors", _flip, "sha256"),
    "flip-optimizer": ("optimizer.pt", _flip, "sha256"),
    "delete-rank-state": ("rank-00000.pt", _delete, "is missing"),
}


class StepLog(TrainHooks):
    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def on_log(self, step, metrics):
        if "train/loss" in metrics:
            self.steps.append(step)


@pytest.fixture(scope="module")
def three_checkpoints(tiny_corpus, tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (step-1, step-2, step-3)."""
    out = tmp_path_factory.mktemp("ckpt-run")
    result = train(_spec(tiny_corpus, out / "cache", 3), Runtime(output_dir=out / "run"))
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == [f"step-0000000{i}" for i in (1, 2, 3)]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(fault, three_checkpoints, tiny_corpus, tmp_path, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints / "run", run_dir)
    root = run_dir / "checkpoints"
    newest = root / "step-00000003"
    name, corrupt, expected = CORRUPTIONS[fault]
    manifest = json.loads((newest / STATE_FILE).read_text())["files"]
    assert {"bytes", "sha256"} <= set(manifest[name])  # written by the save, last
    corrupt(newest / name)
    assert expected in (checkpoint_problem(newest) or "")

    hooks = StepLog()
    with caplog.at_level(logging.WARNING, logger="fotlab.train.checkpoint"):
        result = train(_spec(tiny_corpus, three_checkpoints / "cache", 4), Runtime(output_dir=run_dir,
                       resume_from=root), hooks)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "step-00000003" in r.getMessage()]
    assert len(warnings) == 1 and name in warnings[0], caplog.text
    assert result.final_step == 4
    assert hooks.steps == [3, 4], hooks.steps  # resumed from step 2: step 3 replayed, nothing loaded from the bad one
    print(f"R4 measured ({fault}): warning '{warnings[0]}'; resumed from step-00000002; steps run {hooks.steps}")


@pytest.mark.timeout(120)
def test_every_checkpoint_corrupt_stops_with_one_line(three_checkpoints, tiny_corpus, tmp_path):
    import shutil

    from fotlab.train.checkpoint import find_resumable

    root = tmp_path / "checkpoints"
    shutil.copytree(three_checkpoints / "run" / "checkpoints", root)
    for step_dir in root.iterdir():
        _flip(step_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as err:
        find_resumable(root)
    assert "\n" not in str(err.value)
    print(f"R4 measured (all corrupt): {err.value}")

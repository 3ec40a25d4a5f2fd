"""R7: the disk fills up while a run writes a checkpoint, its final model, or the model's MLflow copy.

The run's storage (`storage.path`, and for the artifact case the MLflow artifact root) is a real 8 MB tmpfs mounted
under tmp_path (root is needed: `mount -t tmpfs`; without it the test fails, it does not skip). A real `fotlab run`
child process fills the tmpfs with a filler file at a chosen moment, leaving less room than the next write needs:
- checkpoint: at the start of step 4 (checkpoints every 2 steps, `keep_checkpoints: 1`), 1 MB left: the rank state
  and the weights of step-4 fit, its optimizer state (~1.1 MB, written by `torch.save`) does not;
- model: just before the final model is saved, 0.2 MB left: the weights (~0.54 MB, safetensors) do not fit;
- artifacts: just after the final model is saved, 0.2 MB left: MLflow's copy into its artifact store does not fit.
Each time: exit 1, one `fotlab run:` line saying what could not be written, the free space and what is intact, no
traceback; no partial checkpoint or model left; the previous checkpoint verifies against its sha256 manifest; the
MLflow run FAILED and tagged resumable. Then the filler is deleted and `fotlab run SPEC --resume RUN` finishes the same
MLflow run with one train/loss point per step.
Run: pytest tests/reliability/test_disk_full.py
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fotlab import names as M

pytestmark = pytest.mark.slow
N_STEPS = 6
TMPFS_SIZE = "8m"  # two 1.65 MB checkpoints (the new one is written before the old one is pruned) + a 0.55 MB model
# phase -> (bytes the filler leaves free, what the line says could not be written, checkpoints kept)
PHASES = {
    "checkpoint": (1_000_000, "checkpoint step-00000004 could not be written", ["step-00000002"]),
    "model": (200_000, "the final model could not be written", ["step-00000006"]),
    "artifacts": (200_000, "the model could not be copied into the MLflow artifact store", ["step-00000006"]),
}

# `fotlab run` whose training writes a filler file into the tmpfs once, at the phase's moment, and appends the number
# of every step it trains to a file (argv: phase or "none", filler path, bytes to leave free, steps file, then the
# fotlab arguments).
FILLING_FOTLAB = """
import os, sys
from pathlib import Path
from fotlab.train import loop
phase, filler, leave, trained = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
def fill():
    if filler.exists():
        return
    stat = os.statvfs(filler.parent)
    with open(filler, "wb") as handle:
        handle.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave)))
real_step, real_save = loop.train_step, loop.save_final_model
def train_step(*args, **kwargs):
    if phase == "checkpoint" and kwargs["step"] == 4:
        fill()
    with open(trained, "a") as handle:
        handle.write(f"{kwargs['step']}\\n")
    return real_step(*args, **kwargs)
def save_final_model(*args, **kwargs):
    if phase == "model":
        fill()
    saved = real_save(*args, **kwargs)
    if phase == "artifacts":
        fill()
    return saved
loop.train_step, loop.save_final_model = train_step, save_final_model
sys.argv = ["fotlab", *sys.argv[5:]]
from fotlab.cli import entry
entry()
"""


def fotlab_filling(phase: str, filler: Path, leave: int, trained: Path, args: list[str]):
    """`fotlab run ...` in a child process that fills the disk at `phase` (FILLING_FOTLAB)."""
    argv = [sys.executable, "-c", FILLING_FOTLAB, phase, str(filler), str(leave), str(trained), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=filler.parent.parent)


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"R7 needs root to mount a small tmpfs (mount -t tmpfs): {done.stderr.strip()}", pytrace=False)


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)  # busy: detach now, freed when released


def sha256_ok(step_dir: Path) -> bool:
    """The checkpoint's files match the sha256 manifest in its trainer_state.json (checked here, not by fotlab)."""
    manifest = json.loads((step_dir / "trainer_state.json").read_text())["files"]
    digests = {name: hashlib.sha256((step_dir / name).read_bytes()).hexdigest() for name in manifest}
    return bool(manifest) and all(digests[name] == entry["sha256"] for name, entry in manifest.items())


def files_under(root: Path, skip: Path) -> dict[str, int]:
    """{folder: number of files} under `root` (not `skip`), the run's folder named RUN and MLflow ids ID."""
    counts: dict[str, int] = {}
    for path in root.rglob("*"):
        if path.is_file() and path != skip:
            folder = re.sub(r"reliab-disk-[0-9-]+-[0-9a-f]{6}", "RUN", str(path.parent.relative_to(root)))
            folder = re.sub(r"\b(m-)?[0-9a-f]{32}\b", "ID", folder)
            counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("phase", list(PHASES))
def test_disk_full_fails_with_one_line_keeps_the_last_checkpoint_and_resumes(phase, tiny_spec, tmp_path, mlflow_uri):
    leave, what, kept = PHASES[phase]
    store = tmp_path / "store"
    mount_tmpfs(store, TMPFS_SIZE)
    try:
        spec = tiny_spec("reliab-disk", steps=N_STEPS, checkpoint_every=2, keep_checkpoints=1)
        data = yaml.safe_load(spec.read_text())
        data["storage"]["path"] = str(store / "runs")
        if phase == "artifacts":
            data["tracking"]["artifact_root"] = str(store / "mlartifacts")
        spec.write_text(yaml.safe_dump(data))
        filler = store / "filler"
        fotlab_args = ["run", str(spec), "--no-progress"]
        failed = fotlab_filling(phase, filler, leave, tmp_path / "trained-1", fotlab_args)
        err = failed.stderr
        lines = [line for line in err.splitlines() if line.startswith("fotlab run:")]
        assert failed.returncode == 1 and len(lines) == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = lines[0]
        assert what in line and "no space left on device (" in line and " MB free" in line, line
        assert f"the {'previous' if phase == 'checkpoint' else 'last'} checkpoint {kept[0]} is intact" in line, line

        client = MlflowClient(mlflow_uri)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        run_id = run.info.run_id
        assert run.info.status == "FAILED" and run.data.tags[M.TAG_RESUMABLE] == "true", run.data.tags
        assert f"once space is freed, resume with `fotlab run {spec} --resume {run_id}`" in line, line
        checkpoints = sorted(p for p in store.rglob("step-*") if p.is_dir())
        assert [p.name for p in checkpoints] == kept and sha256_ok(checkpoints[0])
        assert not list(store.rglob(".tmp-*")), "a partial write was left behind"
        if phase == "model":
            assert not [p for p in store.rglob("model") if p.is_dir()], "a model folder without the final model"
        free_at_failure = line.split("no space left on device (")[1].split(" MB free")[0]
        left = files_under(store, filler)
        logged_at_failure = [m.step for m in client.get_metric_history(run_id, M.TRAIN_LOSS)]

        filler.unlink()  # free the space
        resumed = fotlab_filling("none", filler, 0, tmp_path / "trained-2", [*fotlab_args, "--resume", run_id])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        trained = tmp_path / "trained-2"
        retrained = [int(n) for n in trained.read_text().split()] if trained.exists() else []
        kept_step = int(kept[0].removeprefix("step-"))
        assert retrained == list(range(kept_step + 1, N_STEPS + 1)), retrained  # resumed from the kept checkpoint
        replayed = [n for n in retrained if n <= max(logged_at_failure)]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags[M.TAG_RESUMABLE] == "false"
        steps = [m.step for m in client.get_metric_history(run_id, M.TRAIN_LOSS)]
        assert sorted(steps) == list(range(1, N_STEPS + 1)), steps  # one point per step, none lost, none doubled
        model_dirs = [p for p in (store / "runs").rglob("model") if p.is_dir() and (p / "config.json").is_file()]
        assert len(model_dirs) == 1 and (model_dirs[0] / "model.safetensors").is_file()
        print(
            f"R7 measured ({phase}): exit {failed.returncode}; '{line}'; free at failure {free_at_failure} MB; "
            f"checkpoint kept {kept[0]} (sha256 manifest verifies); files left in the storage {left}; "
            f"train/loss steps logged at failure {logged_at_failure}; run {run.info.status} after --resume, "
            f"train/loss steps {sorted(steps)}; resumed from {kept[0]}, steps trained again {replayed}"
        )
    finally:
        unmount(store)

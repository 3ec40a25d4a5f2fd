"""`scaling.fsdp` / `scaling.strategy: fsdp`: invalid combinations are one-line errors from `fotlab validate`
naming the field; the LongLLaMA recipes with FSDP settings validate."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "experiments" / "longllama_3b_finetune.yaml"


def _validate(*overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fotlab.cli", "validate", str(RECIPE)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (
            ["scaling.strategy=ddp", "scaling.fsdp.reshard_after_forward=false"],
            "scaling.fsdp",
            "only applies with scaling.strategy: fsdp",
        ),
        (
            ["scaling.use_gpu=false", "scaling.fsdp.cpu_offload=true"],
            "scaling.fsdp.cpu_offload",
            "only applies with scaling.use_gpu: true",
        ),
        (["scaling.num_workers=0"], "scaling.strategy", "fsdp needs Ray Train workers"),
        (["scaling.fsdp.reshard=true"], "scaling.fsdp.reshard", ""),
    ],
)
def test_invalid_fsdp_settings_name_the_field(overrides, field, words):
    result = _validate(*overrides)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f": {field}: " in lines[0] and words in lines[0], lines[0]


def test_recipe_with_fsdp_settings_validates():
    result = _validate("scaling.fsdp.reshard_after_forward=false", "scaling.fsdp.cpu_offload=true")
    assert result.returncode == 0, result.stderr

"""`Runtime`: the environment the training loop gets; its device is always a torch.device."""

import dataclasses
from pathlib import Path

import pytest
import torch

from fotlab.train import Runtime


def test_device_name_becomes_torch_device(tmp_path):
    runtime = Runtime(output_dir=tmp_path, device="cpu")
    assert isinstance(runtime.device, torch.device)
    assert runtime.device == torch.device("cpu")
    assert Runtime(output_dir=tmp_path, device="cuda:1").device == torch.device("cuda", 1)  # no CUDA needed to name one


def test_default_and_given_device(tmp_path):
    assert Runtime(output_dir=tmp_path).device == torch.device("cpu")
    given = torch.device("meta")
    assert Runtime(output_dir=tmp_path, device=given).device == given


def test_device_set_later_and_replace_convert(tmp_path):
    runtime = Runtime(output_dir=tmp_path)
    runtime.device = "meta"
    assert runtime.device == torch.device("meta")
    moved = dataclasses.replace(runtime, device="cpu")
    assert moved.device == torch.device("cpu") and runtime.device == torch.device("meta")  # each instance its own
    assert moved == Runtime(output_dir=tmp_path, device=torch.device("cpu"))


def test_bad_device_and_rank_are_errors(tmp_path):
    with pytest.raises(RuntimeError, match="nonsense"):
        Runtime(output_dir=tmp_path, device="nonsense")
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        Runtime(output_dir=Path(tmp_path), rank=2, world_size=2)

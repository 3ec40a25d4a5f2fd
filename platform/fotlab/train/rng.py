"""Seeding and exact capture/restore of every RNG the loop touches (python, numpy, torch CPU, CUDA).

The captured state holds only tensors, ints, floats and None, so a checkpoint can be read back with
`torch.load(weights_only=True)` (no pickled numpy objects).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The current state of every global RNG, as weights_only-loadable values."""
    py_version, py_words, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True gives the tuple form for the global (MT19937) generator
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python_version": py_version,
        "python_words": torch.tensor(py_words, dtype=torch.int64),  # (625,)
        "python_gauss": py_gauss,
        "numpy_kind": np_kind,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),  # (624,)
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every global RNG back into `state` (from `capture_rng_state`)."""
    py_words = tuple(int(w) for w in state["python_words"].tolist())
    random.setstate((state["python_version"], py_words, state["python_gauss"]))
    np_keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["numpy_kind"], np_keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Errors that describe a user mistake (bad spec, missing file, unknown run).

The CLI prints any `FotlabError` as one line on stderr and exits non-zero, without a traceback; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")  # config.json keys that ask for code outside fotlab


class FotlabError(Exception):
    """Base class for mistakes the user can fix (the message is the whole story, one line)."""


class SpecError(FotlabError, ValueError):
    """An experiment spec that cannot be loaded or does not validate: `<file>: <dotted.field>: <what is wrong>`."""


class DiskFullError(FotlabError):
    """A checkpoint, the final model or its MLflow copy did not fit on its filesystem (ENOSPC / EDQUOT): the partial
    write was removed, what was there before is intact, and the run resumes once space is freed."""


class RemoteCodeError(FotlabError):
    """A model directory that asks for custom code (auto_map / trust_remote_code): fotlab never runs it."""


def check_no_remote_code(model_dir: str | Path) -> None:
    """Raise `RemoteCodeError` when the directory's config.json asks for code outside fotlab/transformers (an
    unreadable config.json is left to the loader, which reports it)."""
    config_file = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError):
        return
    asked = [key for key in REMOTE_CODE_KEYS if isinstance(config, dict) and config.get(key)]
    if asked:
        raise RemoteCodeError(
            f"{config_file}: asks for custom code ({', '.join(asked)}); fotlab loads only its own "
            "model classes and never runs code shipped with a model"
        )

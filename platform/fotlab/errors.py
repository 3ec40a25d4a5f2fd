"""Errors that describe a user mistake (bad spec, missing file, unknown run).

The CLI prints any `FotlabError` as one line on stderr and exits non-zero, without a traceback; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FotlabError(Exception):
    """Base class for mistakes the user can fix (the message is the whole story, one line)."""


class SpecError(FotlabError, ValueError):
    """An experiment spec that cannot be loaded or does not validate: `<file>: <dotted.field>: <what is wrong>`."""

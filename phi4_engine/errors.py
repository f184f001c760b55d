"""Errors that reach users as one line, each kind with its own exit code:

1 other engine errors, 2 spec / usage / plugin, 3 data, 4 non-finite loss or gradient,
5 checkpoint integrity or write failure.
"""

from __future__ import annotations


class EngineError(Exception):
    """A failure the user can act on; the CLI prints ``str(error)`` and exits ``exit_code``."""

    exit_code = 1


class SpecError(EngineError):
    """The spec (or a --set override) is invalid. Message names the spec path and field."""

    exit_code = 2


class PluginError(EngineError):
    """A plugin failed to load, registered a duplicate kind, or raised in a hook."""

    exit_code = 2


class DataError(EngineError):
    """Bad input data; the message names file:line."""

    exit_code = 3


class UsageError(EngineError):
    """A command-line argument (or its Python API twin) is invalid; nothing was changed."""

    exit_code = 2


class NonFiniteError(EngineError):
    """A loss or gradient was NaN/inf: every rank stopped before the optimizer step; the stage's
    ``nonfinite.json`` names the step, the batch and the parameters. The last checkpoint is intact."""

    exit_code = 4


class CheckpointError(EngineError):
    """A checkpoint failed its sha256 manifest (or could not be written); the file is named."""

    exit_code = 5

"""Errors that reach users as one line (exit code 2 for spec/usage errors)."""

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

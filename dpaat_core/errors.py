"""The library's error types that several layers share. Each message names the file or setting and the problem."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


class RunError(ValueError):
    """A run folder or one of its files is missing, corrupt or refused; the message names the file and the problem."""


class ImportProblem(RunError):
    """The architecture, the weights file or a setting does not fit: the message names the problem."""

"""User-facing errors.

Every error a user can fix (bad config, unreadable image, missing weights, unsatisfiable resources) is a
``DefectflowError`` whose message says what to do next. The CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


class DefectflowError(Exception):
    """An error the user can act on. ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  -> {hint}")


class ConfigError(DefectflowError):
    """A config file or a --set override is malformed or invalid."""


class StorageError(DefectflowError):
    """A URI cannot be read or written (missing object, no credentials, bad endpoint)."""


class DataError(DefectflowError):
    """Input data is unusable: unreadable/huge image, mask/image mismatch, unknown layout."""


class WeightsError(DefectflowError):
    """Model weights are missing, unreadable or do not match the architecture."""


class ResourceError(DefectflowError):
    """The requested cluster resources (CPUs, GPUs, workers) cannot be satisfied."""

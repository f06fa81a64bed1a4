"""The exception tree of thunderline-lab.

Every error the package raises on purpose derives from one base, so callers can
catch ``ThunderlineLabError`` and the CLI can turn any of them into clean lines::

    ThunderlineLabError
    ├── EventValidationError      an event (or wire payload) broke a rule; lists every error
    ├── StoreError                the trial store could not read or write the lab database
    ├── ConfigError               a study config or setting is malformed (names file and key)
    ├── SpectralNormError         a spectral-norm request that cannot be honoured correctly
    ├── TrainingError             training could not run (bad data, bad model config)
    ├── StudyError                an Optuna study could not be created, resumed or run
    ├── TrackingError             MLflow logging or sync failed (never raised into training)
    ├── GatewayError              the HTTP gateway or its client failed
    └── NotebookExecutionError    a papermill run failed (names notebook, cell, saved copy)

Third-party errors (sqlite3, optuna, mlflow, papermill) are translated at the
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "GatewayError",
    "NotebookExecutionError",
    "SpectralNormError",
    "StoreError",
    "StudyError",
    "ThunderlineLabError",
    "TrackingError",
    "TrainingError",
    "did_you_mean",
]


class ThunderlineLabError(Exception):
    """Base class of every error thunderline-lab raises on purpose."""

    def lines(self) -> list[str]:
        """The error as one or more human-readable lines (the CLI prints these)."""
        return [str(self)]


class StoreError(ThunderlineLabError):
    """The trial store could not read or write the lab database."""


class ConfigError(ThunderlineLabError):
    """A study config or setting is malformed; the message names the file and key."""


class SpectralNormError(ThunderlineLabError):
    """A spectral-norm request that cannot be honoured correctly (refused, never silently wrong)."""


class TrainingError(ThunderlineLabError):
    """Training could not run (bad data, bad model config)."""


class StudyError(ThunderlineLabError):
    """An Optuna study could not be created, resumed or run."""


class TrackingError(ThunderlineLabError):
    """MLflow logging or sync failed."""


class GatewayError(ThunderlineLabError):
    """The HTTP gateway or its client failed."""


class NotebookExecutionError(ThunderlineLabError):
    """A papermill run failed: names the notebook, the failing cell and the saved executed copy."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of ``name`` among ``known``, else ``""``:
    the hint every "unknown name" error of the package ends with."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

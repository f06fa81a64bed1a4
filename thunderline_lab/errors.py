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
import re
from collections.abc import Iterable
from typing import Any

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
    "closest_names",
    "did_you_mean",
    "value_text",
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


def closest_names(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The names of ``known`` closest to ``name``, closest first and at most ``n``: the same
    name but for case or punctuation, then near misses (``difflib``, similarity >= ``cutoff``),
    then the names ``name`` begins (``val_acc`` -> ``val_accuracy``), then those with a word
    that ``name`` begins (``nll`` -> ``test_nll``); the two last shortest first, and only for
    a ``name`` of two letters or more. Ties go by name (among near misses, the same letters in
    another order first). ``name`` itself is never among them.

    Example:
        >>> closest_names("val_acc", ["epochs", "test_accuracy", "val_accuracy"])
        ['val_accuracy']
        >>> closest_names("nll", ["lr", "test_nll", "train_nll"])
        ['test_nll', 'train_nll']
    """
    known = sorted({k for k in known if k != name})

    def squash(s: str) -> str:
        return re.sub(r"[\W_]+", "", s.casefold())

    def by_length(names: Iterable[str]) -> list[str]:
        return sorted(names, key=lambda k: (len(k), k))

    asked = squash(name)
    close = [k for k in known if squash(k) == asked]
    near = difflib.get_close_matches(name, known, n=len(known) or 1, cutoff=cutoff)
    close += sorted(  # as similar: the same letters in another order (lwo -> low, not log)
        near,
        key=lambda k: (
            -difflib.SequenceMatcher(None, name, k).ratio(),
            sorted(k) != sorted(name),
            k,
        ),
    )
    if len(asked) >= 2:
        close += by_length(k for k in known if squash(k).startswith(asked))
        word = re.compile(r"(?:^|(?<=[\W_]))" + re.escape(name.casefold()))
        close += by_length(k for k in known if word.search(k.casefold()))
    return list(dict.fromkeys(close))[:n]


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> str:
    """`` (did you mean 'x'?)`` for a near miss of ``name`` among ``known`` (the ``n``
    closest, :func:`closest_names`: ``'x' or 'y'``), else ``""``: the hint every "unknown
    name" error of the package ends with.

    Example:
        >>> did_you_mean("val_acc", ["epochs", "val_accuracy"])
        " (did you mean 'val_accuracy'?)"
    """
    close = closest_names(name, known, n=n)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def value_text(value: Any) -> str:
    """A value as an error names what it got: ``the text 'false'``, ``the int 0``, ``None``
    (a notebook parameter papermill passed as text is told apart from the bool it meant)."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"the {type(value).__name__} {value!r}"

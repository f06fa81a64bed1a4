"""Optuna studies of spectral normalisation on vs off, paired and persistent.

:func:`run_study` runs (or resumes) an Optuna study whose trials are :func:`train_trial`
calls. The search space (:class:`SearchSpace`) has ``spectral_norm ∈ {False, True}``, a
log-uniform ``spectral_norm_coeff`` suggested only when SN is on (and ``conv_sn_mode`` for
CNNs), the learning rate, depth, width, dropout and weight decay.

Designs:

``"paired"`` (default)
    Each configuration the sampler proposes is also run as its *twin* with SN flipped and the
    same seed: the twin is enqueued as an Optuna waiting trial with the same parameters, so
    any worker may pick it up. Twins share ``pair_id`` and ``seed`` and differ in
    ``spectral_norm`` (``arm`` is ``"sn_on"`` / ``"sn_off"``); when SN is flipped on, the
    coefficient is suggested in the twin. With several ``seeds`` every arm also runs at each
    seed (``pair_id`` is per seed, ``group_id`` per configuration).
``"tpe"``
    Plain TPE: every trial is sampled (extra seeds are still enqueued as replicates).

Bookkeeping: ``model_run_id`` = ``study`` = the study name; ``trial_id`` =
``trial_<number:04d>``. Optuna callbacks publish ``ml.trial.complete`` (status
``completed`` / ``pruned`` / ``cancelled``) and ``ml.trial.failed`` (``error_type``
``diverged``, ``stale``, or the exception class); the objective publishes ``ml.trial.start``
and :func:`train_trial` the ``ml.run.*`` events. Trial user attributes carry ``trial_id``,
``model_run_id``, ``pair_id``, ``seed``, ``arm``, every research metric,
``mlflow_run_id`` (when MLflow logging is on) and ``batch_id`` (run by ``thunderline-lab
run``: :data:`BATCH_ATTR`), so optuna-dashboard shows them.

Storage: by default the lab's ``optuna.journal`` (Optuna's ``JournalStorage`` on a
``JournalFileBackend``), safe for many local worker processes without SQLite lock errors and
opened directly by ``optuna-dashboard`` (``thunderline-lab dashboard``). A ``postgresql://``
(or any SQLAlchemy) URL uses Optuna's ``RDBStorage`` for several machines. Both record a
heartbeat for running trials; a trial whose worker died (its process is gone on this host,
or its heartbeat is older than the grace period) is marked failed (``ml.trial.failed`` with
``error_type="stale"``) and re-enqueued with the same parameters.

``n_trials`` is the total number of finished trials the study should have: completed,
pruned and failed trials count; stale and cancelled ones do not (they are retried). Re-running
a finished study does nothing; N workers calling :func:`run_study` with the same arguments
share the work, and never run past the budget: a new configuration takes its part of the
budget under the group lock, and a worker whose trial finds the budget taken by the others'
running, waiting and finished trials stands down (Optuna keeps that trial as failed, marked
``surplus``: no event, not counted). A budget that is not a multiple of the group size
(2 × seeds paired, seeds unpaired) leaves the last group short; a resume with a larger
``n_trials`` first enqueues the members that group misses, then samples new configurations.

Example:
    >>> result = run_study("sn-demo", lab="/tmp/tl-demo-lab", n_trials=4, epochs=3)
    ... # doctest: +SKIP
    >>> result.counts["completed"] + result.counts["pruned"]  # doctest: +SKIP
    4
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import re
import socket
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import optuna
import pandas as pd
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from thunderline_lab import events
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import (
    ConfigError,
    StudyError,
    ThunderlineLabError,
    TrackingError,
    did_you_mean,
    value_text,
)
from thunderline_lab.lab import Lab
from thunderline_lab.training import EvalSettings, StopFlag, TrialResult, train_trial

if TYPE_CHECKING:
    from thunderline_lab.data import Dataset

__all__ = [
    "BATCH_ATTR",
    "BATCH_ENV",
    "DEFAULT_SEARCH_SPACE",
    "Design",
    "ParamSpec",
    "SearchSpace",
    "StudyResult",
    "TrainFn",
    "budget_split",
    "check_study_parameters",
    "count_trials",
    "dashboard_command",
    "make_storage",
    "run_study",
    "settings_change",
    "studies",
    "study_settings",
    "trial_id_for",
]

log = logging.getLogger(__name__)

Design = Literal["paired", "tpe"]
TrainFn = Callable[..., TrialResult]
"""Anything with :func:`~thunderline_lab.training.train_trial`'s signature."""

_STATUS_ATTR = "status"  # our own verdict on a trial, kept in its user attrs
_HOST = socket.gethostname()

BATCH_ENV = "THUNDERLINE_LAB_BATCH"
"""The environment variable naming the batch run (``thunderline-lab run``) whose worker
runs the study: :func:`~thunderline_lab.batch.run_batch` sets it for each worker's kernel."""
BATCH_ATTR = "batch_id"
"""The user attribute of a trial holding :data:`BATCH_ENV` of the process that ran it (only
when set): a batch run counts its own trials by it, not those another run of the same study
finished meanwhile (two terminals, two machines sharing a lab)."""


def trial_id_for(number: int) -> str:
    """The lab's trial id of Optuna trial ``number``.

    Example:
        >>> trial_id_for(7)
        'trial_0007'
    """
    return f"trial_{number:04d}"


# =============================================================================================
# Search space
# =============================================================================================

_LOG_BY_DEFAULT = {"lr", "weight_decay", "spectral_norm_coeff", "width"}
_INT_PARAMS = {"depth", "width", "batch_size", "n_power_iterations", "kernel_size"}


# The keys of a search-space parameter given as a table (:meth:`ParamSpec.parse`).
_SPEC_KEYS = ("low", "high", "log", "choices", "value")


def _unknown_names(
    where: str, unknown: Sequence[str], what: str, known: Iterable[str]
) -> ConfigError:
    """``<where><name>: unknown <what> (did you mean 'x'?)`` for each unknown name, then
    ``known: a, b, ...``: the error of a misspelt search-space parameter or key."""
    known = list(known)
    said = [f"{where}{name}: unknown {what}{did_you_mean(name, known)}" for name in unknown]
    return ConfigError("; ".join(said) + f"; known: {', '.join(sorted(known))}")


def _withoutvalue_text(rule: str, value: Any) -> str:
    """``rule`` (a model or trainer check's message) without its closing ``, got <value>``:
    the search-space error names the value before it, once."""
    shown = {repr(value), str(value)}
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # as the model holds it: a float (dropout 5 -> 5.0) or an int (depth 200.0 -> 200)
        with contextlib.suppress(OverflowError):  # (an int too large for a float)
            number = float(value)
            shown.add(str(number))
            if number.is_integer():
                shown.add(str(int(number)))
    for got in sorted(shown, key=len, reverse=True):
        if rule.endswith(f", got {got}"):
            return rule[: -len(f", got {got}")]
    return rule


@dataclass(frozen=True)
class ParamSpec:
    """How one hyper-parameter is chosen: fixed, a float/int range, or categorical.

    Attributes:
        kind: ``"fixed"``, ``"float"``, ``"int"`` or ``"categorical"``.
        value: The fixed value.
        low: Lower bound of a range.
        high: Upper bound of a range.
        log: Sample the range log-uniformly.
        choices: Options of a categorical parameter.
    """

    kind: Literal["fixed", "float", "int", "categorical"]
    value: Any = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, name: str, spec: Any) -> ParamSpec:
        """Read a spec: a scalar (fixed), ``[low, high]`` (range), a list of strings or
        booleans (categorical), or a table ``{low, high, log}`` / ``{choices}`` /
        ``{value}``.

        Raises:
            ConfigError: A malformed spec (the message names the parameter).

        Example:
            >>> ParamSpec.parse("lr", [1e-4, 1e-2]).log
            True
            >>> ParamSpec.parse("spectral_norm", [False, True]).kind
            'categorical'
        """
        if isinstance(spec, ParamSpec):
            return spec
        want_int = name in _INT_PARAMS
        if isinstance(spec, Mapping):
            unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
            if unknown:
                raise _unknown_names(f"search_space.{name}.", unknown, "key", _SPEC_KEYS)
            if "value" in spec:
                return cls("fixed", value=spec["value"])
            if "choices" in spec:
                choices = tuple(spec["choices"])
                if not choices:
                    raise ConfigError(f"search_space.{name}: choices is empty")
                return cls("categorical", choices=choices)
            if "low" in spec and "high" in spec:
                return cls._range(name, spec["low"], spec["high"], spec.get("log"), want_int)
            raise ConfigError(
                f"search_space.{name}: give value, choices, or low and high (got {dict(spec)})"
            )
        if isinstance(spec, list | tuple):
            items = tuple(spec)
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)
            if len(items) == 2 and numeric:
                return cls._range(name, items[0], items[1], None, want_int)
            if not items:
                raise ConfigError(f"search_space.{name}: an empty list")
            return cls("categorical", choices=items)
        if spec is None:
            raise ConfigError(f"search_space.{name}: no value")
        return cls("fixed", value=spec)

    @classmethod
    def _range(cls, name: str, low: Any, high: Any, log_: Any, want_int: bool) -> ParamSpec:
        try:
            lo, hi = float(low), float(high)
        except (TypeError, ValueError):
            raise ConfigError(
                f"search_space.{name}: low and high must be numbers, got {low!r}, {high!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ConfigError(f"search_space.{name}: need finite low <= high, got [{lo}, {hi}]")
        use_log = (name in _LOG_BY_DEFAULT) if log_ is None else bool(log_)
        if use_log and lo <= 0:
            raise ConfigError(
                f"search_space.{name}: a log-uniform range needs low > 0, got {lo} "
                "(set log = false, or a positive low)"
            )
        if want_int:
            if not (lo.is_integer() and hi.is_integer()):
                raise ConfigError(f"search_space.{name}: integer bounds expected, got [{lo}, {hi}]")
            return cls("int", low=lo, high=hi, log=use_log)
        return cls("float", low=lo, high=hi, log=use_log)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Ask ``trial`` for this parameter (fixed values are returned, not suggested)."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.low == self.high:
            return int(self.low) if self.kind == "int" else self.low
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def to_dict(self) -> Any:
        """The TOML/JSON form (the inverse of :meth:`parse`)."""
        if self.kind == "fixed":
            return {"value": self.value}
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        low: float | int = int(self.low) if self.kind == "int" else self.low
        high: float | int = int(self.high) if self.kind == "int" else self.high
        return {"low": low, "high": high, "log": self.log}


def _spec(value: Any) -> Callable[[], ParamSpec]:
    return lambda: value


@dataclass(frozen=True)
class SearchSpace:
    """The hyper-parameters of a study; each one fixed, a range, or categorical.

    Build it from a dict or a TOML table with :meth:`from_dict` / :meth:`from_toml`; any
    field may be given as a scalar (fixed), ``[low, high]``, a list of choices, or
    ``{low, high, log}`` / ``{choices}`` / ``{value}``. ``lr``, ``weight_decay``, ``width``
    and ``spectral_norm_coeff`` are log-uniform by default. ``spectral_norm_coeff`` and
    ``conv_sn_mode`` are only suggested when SN is on (``conv_sn_mode`` only for CNNs).

    Example:
        >>> space = SearchSpace.from_dict({"lr": [1e-3, 1e-2], "depth": 2, "dropout": 0.0})
        >>> space.depth.kind, space.lr.log
        ('fixed', True)
    """

    spectral_norm: ParamSpec = field(
        default_factory=_spec(ParamSpec("categorical", choices=(False, True)))
    )
    spectral_norm_coeff: ParamSpec = field(
        # σ of these small layers is ~1-2: above 2 the soft bound rarely engages and the
        # SN arm would train exactly like its twin.
        default_factory=_spec(ParamSpec("float", low=0.5, high=2.0, log=True))
    )
    lr: ParamSpec = field(default_factory=_spec(ParamSpec("float", low=3e-4, high=1e-2, log=True)))
    weight_decay: ParamSpec = field(
        default_factory=_spec(ParamSpec("float", low=1e-6, high=1e-2, log=True))
    )
    depth: ParamSpec = field(default_factory=_spec(ParamSpec("int", low=1, high=3)))
    width: ParamSpec = field(default_factory=_spec(ParamSpec("int", low=32, high=128, log=True)))
    dropout: ParamSpec = field(default_factory=_spec(ParamSpec("float", low=0.0, high=0.3)))
    activation: ParamSpec = field(default_factory=_spec(ParamSpec("fixed", value="relu")))
    batchnorm: ParamSpec = field(default_factory=_spec(ParamSpec("fixed", value=False)))
    conv_sn_mode: ParamSpec = field(
        default_factory=_spec(ParamSpec("categorical", choices=("operator", "matrix")))
    )
    n_power_iterations: ParamSpec = field(default_factory=_spec(ParamSpec("fixed", value=1)))
    batch_size: ParamSpec = field(default_factory=_spec(ParamSpec("fixed", value=64)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSpace:
        """Build from a dict (e.g. a study config's ``[search_space]`` table).

        Raises:
            ConfigError: Unknown names or malformed specs.
        """
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted({str(k) for k in data} - set(known))
        if unknown:
            raise _unknown_names("search_space.", unknown, "parameter", known)
        return cls(**{k: ParamSpec.parse(k, v) for k, v in data.items()})

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], table: str = "search_space") -> SearchSpace:
        """Read the ``[search_space]`` table of a TOML study config (missing table: defaults).

        Raises:
            ConfigError: Unreadable file or malformed table (names the file).
        """
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read study config: {exc}") from exc
        try:
            return cls.from_dict(doc.get(table, {}))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON form of every parameter."""
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)}

    def with_fixed(self, **values: Any) -> SearchSpace:
        """A copy with some parameters fixed (e.g. ``spectral_norm=True``)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in values.items():
            if k not in data:
                raise _unknown_names("search_space.", [k], "parameter", data)
            data[k] = ParamSpec("fixed", value=v)
        return SearchSpace(**data)

    def check(self, architecture: str = "mlp") -> None:
        """Refuse values no trial could run with, before any trial runs: every fixed value,
        choice and range bound is checked by the rules the model (``ModelConfig``) and the
        trainer apply to a trial's own values (else each trial would fail on it, one by one).

        Raises:
            ConfigError: ``search_space.<name>: <value>: <the rule>`` (the value said once).

        Example:
            >>> try:
            ...     SearchSpace.from_dict({"dropout": [0.0, 5.0]}).check()
            ... except ConfigError as exc:
            ...     print(exc)
            search_space.dropout: 5.0: ModelConfig.dropout must be in [0, 1)
        """
        from thunderline_lab.models import ModelConfig
        from thunderline_lab.training import check_settings

        trainer = {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 64}
        for f in fields(self):
            spec: ParamSpec = getattr(self, f.name)
            if spec.kind == "fixed":
                values: tuple[Any, ...] = (spec.value,)
            elif spec.kind == "categorical":
                values = spec.choices
            else:
                values = tuple({int(v) if spec.kind == "int" else v for v in (spec.low, spec.high)})
            for value in values:
                try:
                    if f.name in trainer:
                        check_settings(**{**trainer, f.name: value})
                    else:
                        ModelConfig(architecture=architecture, **{f.name: value})
                except ConfigError as exc:
                    raise ConfigError(
                        f"search_space.{f.name}: {value!r}: {_withoutvalue_text(str(exc), value)}"
                    ) from None
                except (TypeError, ValueError) as exc:  # (a value of a kind no rule names)
                    raise ConfigError(f"search_space.{f.name}: {value!r}: {exc}") from None

    def suggest(self, trial: optuna.Trial, architecture: str = "mlp") -> dict[str, Any]:
        """Suggest every parameter; conditional ones only when they apply.

        Returns:
            All values, suggested and fixed, by name.

        Example:
            >>> study = optuna.create_study()
            >>> space = SearchSpace.from_dict({"spectral_norm": False})
            >>> "spectral_norm_coeff" in space.suggest(study.ask())
            False
        """
        out: dict[str, Any] = {
            "spectral_norm": bool(self.spectral_norm.suggest(trial, "spectral_norm"))
        }
        if out["spectral_norm"]:
            out["spectral_norm_coeff"] = float(
                self.spectral_norm_coeff.suggest(trial, "spectral_norm_coeff")
            )
            if architecture == "cnn":
                out["conv_sn_mode"] = self.conv_sn_mode.suggest(trial, "conv_sn_mode")
        for name in (
            "lr",
            "weight_decay",
            "depth",
            "width",
            "dropout",
            "activation",
            "batchnorm",
            "n_power_iterations",
            "batch_size",
        ):
            out[name] = getattr(self, name).suggest(trial, name)
        return out


DEFAULT_SEARCH_SPACE = SearchSpace()
"""The default space: SN on/off, coeff 0.5–2 (log), lr 3e-4–1e-2 (log), depth 1–3, width
32–128 (log), dropout 0–0.3, weight decay 1e-6–1e-2 (log)."""


# =============================================================================================
# Storage with heartbeats and stale-trial detection
# =============================================================================================


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _dead_local_worker(trial: FrozenTrial) -> bool:
    """The trial's worker process ran on this host and is gone."""
    host, pid = trial.user_attrs.get("worker_host"), trial.user_attrs.get("worker_pid")
    if host != _HOST or not isinstance(pid, int) or pid == os.getpid():
        return False
    return not _pid_alive(pid)


class _LabJournalStorage(JournalStorage):
    """Optuna's journal storage plus heartbeats and stale-trial handling, and batched writes.

    Optuna offers heartbeats only for RDB storages, with one thread per trial. Here one
    long-lived thread per :func:`run_study` call (:meth:`start_heartbeat`) appends a
    ``heartbeat`` system attribute to the trials this process is running every
    ``heartbeat_interval`` seconds. :meth:`fail_stale` marks failed the running trials whose
    worker process is gone on this host, or whose last beat (or start) is older than
    ``grace_period`` seconds, and calls the stale callback for each trial it failed (a
    trial failed by another worker first is skipped, so each is reported once).

    ``set_trial_user_attrs(..., defer=True)`` queues many user attributes (one standard
    ``SET_TRIAL_USER_ATTR`` journal line each) to be written together with this process's next
    journal append (the next ``trial.report`` or the final state change): every append is one
    locked, fsynced write, and the fsync is what a journal operation costs. Appends of one
    process are serialised by the storage's lock, so the queued lines always precede the
    operation that carries them.
    """

    def __init__(
        self,
        path: str,
        *,
        heartbeat_interval: int,
        grace_period: int,
        stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None,
    ) -> None:
        super().__init__(_BatchingFileBackend(path))
        self.path = path
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_callback = stale_callback
        self.running: set[int] = set()
        self._hb_stop = threading.Event()
        self._flush_due = 0.0
        self._hb_cond = threading.Condition()
        self._hb_thread: threading.Thread | None = None

    # -- heartbeat --------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Start the heartbeat thread (a no-op if it runs)."""
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(
            target=self._beat, name="thunderline-heartbeat", daemon=True
        )
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread."""
        self._hb_stop.set()
        with self._hb_cond:
            self._hb_cond.notify()
        if self._hb_thread is not None:
            self._hb_thread.join()
            self._hb_thread = None

    def _beat(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_interval
        while not self._hb_stop.is_set():
            with self._hb_cond:
                now = time.monotonic()
                due = min(next_beat, self._flush_due) if self._flush_due else next_beat
                if due > now:
                    self._hb_cond.wait(due - now)
            if self._hb_stop.is_set():
                return
            now = time.monotonic()
            if self._flush_due and now >= self._flush_due:
                # A trial started a while ago and nothing has written its queued attributes
                # (worker identity) yet: write them now, off the training thread.
                self._flush_due = 0.0
                try:
                    self.flush()
                except Exception:
                    log.warning("could not write queued trial attributes", exc_info=True)
            if now >= next_beat:
                next_beat = now + self.heartbeat_interval
                for trial_id in list(self.running):
                    try:
                        self.set_trial_system_attr(trial_id, "heartbeat", time.time())
                    except Exception:  # finished (or failed as stale) meanwhile
                        log.debug("heartbeat for trial %s not recorded", trial_id, exc_info=True)

    def wake(self, delay: float = 0.5) -> None:
        """Have the heartbeat thread write the queued attributes in ``delay`` s (if still queued).

        A trial's first ``trial.report`` usually carries them before that, at no extra cost.
        """
        with self._hb_cond:
            self._flush_due = time.monotonic() + delay
            self._hb_cond.notify()

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """Running trials whose worker is gone (this host) or silent past the grace period."""
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in self.running:
                continue
            if _dead_local_worker(t):
                stale.append(t._trial_id)
                continue
            beat = t.system_attrs.get("heartbeat")
            start = t.datetime_start.timestamp() if t.datetime_start else now
            last = max(float(beat), start) if isinstance(beat, int | float) else start
            if now - last > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def fail_stale(self, study: optuna.Study) -> list[int]:
        """Fail the stale trials of ``study``; returns the ids this call failed.

        Failing a trial and enqueuing its retry (the stale callback) happen under the group
        lock (:func:`_group_lock`): a worker completing cut groups meanwhile would otherwise
        see the member failed, not yet retried, and enqueue it a second time.
        """
        failed = []
        with _group_lock(self, study.study_name):
            for trial_id in self.stale_trial_ids(study._study_id):
                try:
                    if self.set_trial_state_values(trial_id, state=TrialState.FAIL):
                        failed.append(trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another worker failed it first
            if self.stale_callback is not None:
                for trial_id in failed:
                    self.stale_callback(study, self.get_trial(trial_id))
        return failed

    # -- batched writes ---------------------------------------------------------------------
    def set_trial_user_attrs(
        self, trial_id: int, attrs: Mapping[str, Any], *, defer: bool = False
    ) -> None:
        """Write many user attributes in one append (or with the next one, ``defer=True``)."""
        from optuna.storages.journal._storage import JournalOperation

        if not attrs:
            return
        backend = cast(_BatchingFileBackend, self._backend)
        with self._thread_lock:
            worker_id = self._replay_result.worker_id
            backend.queue(
                {
                    "op_code": JournalOperation.SET_TRIAL_USER_ATTR,
                    "worker_id": worker_id,
                    "trial_id": trial_id,
                    "user_attr": {key: value},
                }
                for key, value in attrs.items()
            )
            if not defer:
                self._flush_locked()

    def set_study_user_attrs(self, study_id: int, attrs: Mapping[str, Any]) -> None:
        """Write many study user attributes in one append."""
        from optuna.storages.journal._storage import JournalOperation

        backend = cast(_BatchingFileBackend, self._backend)
        with self._thread_lock:
            worker_id = self._replay_result.worker_id
            backend.queue(
                {
                    "op_code": JournalOperation.SET_STUDY_USER_ATTR,
                    "worker_id": worker_id,
                    "study_id": study_id,
                    "user_attr": {key: value},
                }
                for key, value in attrs.items()
            )
            self._flush_locked()

    def flush(self) -> None:
        """Write what is queued now."""
        with self._thread_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        backend = cast(_BatchingFileBackend, self._backend)
        if backend.pending:
            backend.append_logs([])
            self._sync_with_backend()


class _BatchingFileBackend(JournalFileBackend):
    """A journal file backend that writes queued log lines with the next append."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.pending: list[dict[str, Any]] = []

    def queue(self, logs: Iterable[dict[str, Any]]) -> None:
        self.pending.extend(logs)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        batch, self.pending = [*self.pending, *logs], []
        if batch:
            super().append_logs(batch)


class _LabRDBStorage(RDBStorage):
    """Optuna's RDB storage whose stale check also fails trials of dead local workers, and
    which on an SQLite file serialises taking a waiting trial.

    Optuna takes a waiting trial by reading its state and writing RUNNING in one
    transaction, ``FOR UPDATE``: a row lock on PostgreSQL and MariaDB, nothing on SQLite,
    where two workers could both read WAITING and both run the trial (the second's tell then
    fails: "Cannot tell a COMPLETE trial"). On an SQLite file that step takes a lock file next
    to the database (``<db>.pop``), as the group lock does (:func:`_group_lock_for`).
    """

    @functools.cached_property
    def _pop_lock_path(self) -> str | None:
        url = self.engine.url
        database = url.database or ":memory:"
        if (
            url.get_backend_name() != "sqlite"
            or database == ":memory:"
            or "mode=memory" in database
        ):
            return None
        return os.path.abspath(database) + ".pop"

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        path = self._pop_lock_path if state == TrialState.RUNNING else None
        if path is None:
            return super().set_trial_state_values(trial_id, state, values)
        with _file_lock(path):
            return super().set_trial_state_values(trial_id, state, values)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = set(super()._get_stale_trial_ids(study_id))
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if _dead_local_worker(t):
                stale.add(t._trial_id)
        return sorted(stale)


def make_storage(
    storage: str | os.PathLike[str] | BaseStorage | None = None,
    *,
    lab: Lab | None = None,
    heartbeat_interval: int = 10,
    grace_period: int | None = None,
    stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> BaseStorage:
    """The Optuna storage of a study: the lab's journal file by default, or an RDB URL.

    Args:
        storage: ``None`` (the lab's ``optuna.journal``), a journal file path, an SQLAlchemy
            URL (``postgresql+psycopg2://user:pw@host:5432/db``, ``sqlite:///x.db``), or a
            storage object (used as is).
        lab: The lab whose journal is the default.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without a heartbeat before a trial counts as stale
            (default ``6 × heartbeat_interval``).
        stale_callback: Called with ``(study, frozen_trial)`` for each trial failed as stale.

    Raises:
        StudyError: The storage cannot be opened (e.g. PostgreSQL unreachable), or is no
            Optuna storage: a trial store (Optuna would add its tables to it), an SQLite or
            other file given as a journal (journal lines would corrupt it), a folder, "".
            Nothing is written then.

    Example:
        >>> s = make_storage(lab=Lab.resolve("/tmp/tl-doc-lab"))  # doctest: +SKIP
        >>> type(s).__name__  # doctest: +SKIP
        '_LabJournalStorage'
    """
    if isinstance(storage, BaseStorage):
        return storage
    grace = grace_period if grace_period is not None else 6 * heartbeat_interval
    if storage is not None and not str(storage).strip():
        raise StudyError(f"the Optuna storage is empty: give {_STORAGE_FORMS}")
    if storage is None or "://" not in str(storage):
        path = Path(storage) if storage is not None else (lab or Lab.resolve()).optuna_journal
        problem = _journal_problem(path, lab)
        if problem is not None:
            raise StudyError(
                f"cannot open the Optuna journal {path}: {problem}; nothing was written"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return _LabJournalStorage(
                str(path),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace,
                stale_callback=stale_callback,
            )
        except OSError as exc:
            raise StudyError(f"cannot open the Optuna journal {path}: {exc}") from exc
    url = str(storage)
    problem = _storage_url_problem(url, lab)
    if problem is not None:
        raise StudyError(
            f"cannot open Optuna storage {_redact(url)}: {problem}; nothing was written"
        )
    engine_kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite"):
        engine_kwargs["pool_pre_ping"] = True
    else:
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _LabRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=stale_callback,
            )
    except Exception as exc:
        raise StudyError(f"cannot open Optuna storage {_redact(url)}: {exc}") from exc


def _storage_url_problem(url: str, lab: Lab | None) -> str | None:
    """Why the SQLAlchemy URL ``url`` must not be opened as an Optuna storage, or None: an
    SQLite file that is a trial store (Optuna would add its tables to it, and its ``trials``
    table clashes with the store's), a folder or not SQLite."""
    from thunderline_lab.tracking import _sqlite_database_path, _sqlite_database_problem

    path = _sqlite_database_path(url)
    if path is None:
        return None
    return _sqlite_database_problem(path, lab=lab, role="an Optuna storage")


def _journal_problem(path: Path, lab: Lab | None) -> str | None:
    """Why ``path`` must not be opened as an Optuna journal file (journal lines appended to a
    database, or to another file, would corrupt it), or None."""
    from thunderline_lab.tracking import _is_sqlite_file, _trial_store_problem

    problem = _trial_store_problem(path, lab=lab, role="an Optuna journal file")
    if problem is not None or not path.is_file():
        return problem
    if _is_sqlite_file(path):
        return (
            "it is an SQLite database, not an Optuna journal file "
            f"(as an Optuna RDB storage: sqlite:///{path.resolve()})"
        )
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 16)  # a journal's first line creates a study: short
    except OSError:
        return None  # opening it says why
    if not first.endswith(b"\n"):
        return None  # empty, or a first line still being written: not to be judged
    try:
        op = json.loads(first)
    except ValueError:
        op = None
    if isinstance(op, dict) and "op_code" in op:
        return None
    return f"{path.resolve()} is not an Optuna journal file (JSON lines of op_codes)"


def _redact(url: str) -> str:
    """The URL without its password."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def _set_user_attrs(
    study: optuna.Study, trial_id: int, attrs: Mapping[str, Any], *, defer: bool = False
) -> None:
    storage = study._storage
    if isinstance(storage, _LabJournalStorage):
        storage.set_trial_user_attrs(trial_id, attrs, defer=defer)
        return
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


# =============================================================================================
# Counting
# =============================================================================================


def _counts_toward_total(t: FrozenTrial) -> bool:
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get(_STATUS_ATTR) == "failed"


def count_trials(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by state, plus ``finished``: the ones that count toward ``n_trials``.

    ``failed`` counts trials that failed on their own (diverged, errors); ``stale`` and
    ``cancelled`` trials (failed in Optuna, retried by the lab) are counted separately.

    Example:
        >>> count_trials([])["finished"]
        0
    """
    out = dict.fromkeys(
        ("completed", "pruned", "failed", "stale", "cancelled", "running", "waiting"), 0
    )
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out["completed"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        elif t.state == TrialState.FAIL:
            status = t.user_attrs.get(_STATUS_ATTR)
            if status == _SURPLUS:
                continue  # never part of the study (see _plan_group)
            if status == "failed":
                out["failed"] += 1
            elif status == "cancelled":
                out["cancelled"] += 1
            else:
                out["stale"] += 1
    out["finished"] = out["completed"] + out["pruned"] + out["failed"]
    return out


# =============================================================================================
# Running a study
# =============================================================================================


@dataclass
class StudyResult:
    """What :func:`run_study` did.

    Attributes:
        study: The :class:`optuna.Study` (its storage stays usable).
        trials: The study's trials from the lab's store (``expand=True`` columns such as
            ``metrics.val_accuracy``), or Optuna's ``trials_dataframe()`` when reporting
            through a gateway.
        counts: :func:`count_trials` of the study at the end.
        n_run: Trials this call ran.
        stopped: Why the loop ended: ``"done"``, ``"should_stop"``, ``"timeout"``.
        storage: Where the Optuna study lives (password redacted).
        elapsed_s: Wall-clock seconds of this call.
    """

    study: optuna.Study
    trials: pd.DataFrame
    counts: dict[str, int]
    n_run: int
    stopped: str
    storage: str
    elapsed_s: float

    @property
    def name(self) -> str:
        return self.study.study_name


class _StopRequested(Exception):
    """The should_stop flag was set during a trial (Optuna marks it failed; we retry it)."""


class _TrialFailed(Exception):
    """The trial failed on its own (diverged, error); recorded, the study goes on."""


class _OverBudget(Exception):
    """A new configuration's trial found the budget taken by other workers' trials: Optuna
    marks it failed, it is marked :data:`_SURPLUS`, and its worker stops."""


_SURPLUS = "surplus"  # _STATUS_ATTR of a trial that was never part of the study
# A new configuration's part of the budget, set on its first trial when planned (its whole
# group, or what the budget has left): its members yet to come count toward n_trials
_GROUP_SIZE_ATTR = "group_size"


@dataclass
class _Context:
    name: str
    study: optuna.Study | None
    bus: EventBus
    space: SearchSpace
    design: Design
    seeds: tuple[int, ...]
    n_trials: int
    architecture: str
    dataset: str | Dataset
    epochs: int
    patience: int | None
    pruning: bool
    should_stop: StopFlag | None
    trainer: TrainFn
    evaluation: EvalSettings | None
    train_kwargs: dict[str, Any]
    tracker: Any = None
    progress: Callable[..., Any] | None = None
    results: dict[int, TrialResult] = field(default_factory=dict)
    parameters: dict[int, dict[str, Any]] = field(default_factory=dict)
    closed_tracker: bool = False
    datasets: dict[int, Any] = field(default_factory=dict)
    n_run: int = 0
    consecutive_errors: int = 0
    stopped: str = "done"
    error: BaseException | None = None

    # -- helpers ------------------------------------------------------------------------------
    def publish(self, name: str, **payload: Any) -> None:
        try:
            event = events.make_event(
                name,
                model_run_id=self.name,
                study=self.name,
                correlation_id=f"{self.name}/{payload.get('trial_id')}",
                **payload,
            )
        except ThunderlineLabError:
            log.exception("could not build %s event", name)
            return
        self.bus.publish(event)

    def stop_requested(self) -> bool:
        flag = self.should_stop
        if flag is None:
            return False
        if isinstance(flag, threading.Event):
            return flag.is_set()
        return bool(flag())

    def dataset_for(self, seed: int) -> Any:
        if not isinstance(self.dataset, str):
            return self.dataset
        if seed not in self.datasets:
            from thunderline_lab.data import load_dataset

            self.datasets[seed] = load_dataset(
                self.dataset, seed=seed, **({"image": True} if self.architecture == "cnn" else {})
            )
        return self.datasets[seed]

    @property
    def dataset_name(self) -> str:
        return self.dataset if isinstance(self.dataset, str) else self.dataset.name


def _budget_used(trials: Sequence[FrozenTrial]) -> int:
    """How much of ``n_trials`` is taken: per group, its members that finished, wait or run,
    or the part of the budget it reserved when it was planned (:data:`_GROUP_SIZE_ATTR`:
    its members yet to come, such as the replicates its SN leader enqueues later), whichever
    is more; plus finished and waiting trials of no group. A new configuration's trial that
    has not planned yet takes no part: it checks the budget when it does, and stands down
    when nothing is left (:func:`_plan_group`), so workers starting side by side do not
    each take a part."""
    return _taken(*_budget_parts(trials))


def _taken(loose: int, members: dict[str, int], reserved: dict[str, int]) -> int:
    """The budget taken by :func:`_budget_parts`' parts: per group, the more of its members
    and its reservation."""
    return loose + sum(max(members.get(g, 0), reserved.get(g, 0)) for g in members | reserved)


def _budget_parts(
    trials: Sequence[FrozenTrial],
) -> tuple[int, dict[str, int], dict[str, int]]:
    """(trials of no group that count, members that count per group, reservation per group)."""
    loose = 0
    members: dict[str, int] = {}
    reserved: dict[str, int] = {}
    for t in trials:
        group = t.user_attrs.get("group_id")
        size = t.user_attrs.get(_GROUP_SIZE_ATTR)
        if group is not None and isinstance(size, int):
            reserved[str(group)] = max(reserved.get(str(group), 0), size)
        if t.state == TrialState.RUNNING:
            counts = group is not None
        else:
            counts = t.state == TrialState.WAITING or _counts_toward_total(t)
        if not counts:
            continue
        if group is None:
            loose += 1
        else:
            members[str(group)] = members.get(str(group), 0) + 1
    return loose, members, reserved


def _group_room(study: optuna.Study, group_id: str | None, n_trials: int) -> int:
    """How many more members ``group_id`` may enqueue: what is left of its own reservation,
    plus what the budget has free (a resume with a larger n_trials completing a cut group)."""
    loose, members, reserved = _budget_parts(study.get_trials(deepcopy=False))
    used = _taken(loose, members, reserved)
    own = 0 if group_id is None else reserved.get(group_id, 0) - members.get(group_id, 0)
    return max(own, 0) + max(n_trials - used, 0)


def _arm(sn: bool) -> str:
    return "sn_on" if sn else "sn_off"


def _params_for_arm(params: Mapping[str, Any], sn: bool) -> dict[str, Any]:
    """Suggested parameters for the other arm: SN flipped, SN-only parameters dropped."""
    out = {k: v for k, v in params.items() if k not in ("spectral_norm_coeff", "conv_sn_mode")}
    out["spectral_norm"] = sn
    if sn and params.get("spectral_norm"):
        for k in ("spectral_norm_coeff", "conv_sn_mode"):
            if k in params:
                out[k] = params[k]
    return out


def _enqueue(
    study: optuna.Study, params: Mapping[str, Any], attrs: Mapping[str, Any], n_trials: int
) -> bool:
    """Enqueue a member of ``attrs["group_id"]`` if its reservation or the budget has room."""
    group = attrs.get("group_id")
    if _group_room(study, None if group is None else str(group), n_trials) <= 0:
        return False
    study.enqueue_trial(dict(params), user_attrs=dict(attrs))
    return True


def _plan_group(ctx: _Context, trial: optuna.Trial, values: Mapping[str, Any]) -> dict[str, Any]:
    """Group attributes of this trial; enqueue the twin / replicate seeds it is responsible for."""
    study = trial.study
    attrs = trial.user_attrs
    sn = bool(values["spectral_norm"])
    suggested = dict(trial.params)
    seeds = ctx.seeds
    if "group_id" in attrs:  # an enqueued twin or replicate
        seed = int(attrs["seed"])
        if attrs.get("leader") and len(seeds) > 1:  # SN-on twin: its coefficient is known now
            with _group_lock(study._storage, study.study_name):  # (a budget check, then enqueue)
                # A retried leader (stale, cancelled) finds the replicates its first run
                # enqueued.
                have = _group_states(study.get_trials(deepcopy=False)).get(attrs["group_id"])
                for s in seeds[1:]:
                    if have is not None and (s, _arm(sn)) in have.members:
                        continue
                    _enqueue(
                        study,
                        suggested,
                        _member_attrs(attrs["group_id"], s, sn, ctx.design),
                        ctx.n_trials,
                    )
        return {**_member_attrs(attrs["group_id"], seed, sn, ctx.design), **_retry_attrs(attrs)}

    group_id = f"g{trial.number:04d}"
    seed = seeds[0]
    with _group_lock(study._storage, study.study_name):
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        used = _budget_used(others)
        if used >= ctx.n_trials:
            # another worker's trials (running, waiting, finished) fill the budget: this one,
            # asked for by a worker that started alongside them, is not part of the study
            study._storage.set_trial_user_attr(trial._trial_id, _STATUS_ATTR, _SURPLUS)
            raise _OverBudget(f"trial {trial.number}: the budget of {ctx.n_trials} is taken")
        # the whole group's part of the budget, or what is left of it (the last group)
        size = min((2 if ctx.design == "paired" else 1) * len(seeds), ctx.n_trials - used)
        _set_user_attrs(study, trial._trial_id, {"group_id": group_id, _GROUP_SIZE_ATTR: size})
        _enqueue_group(ctx, trial, suggested, sn, group_id, seed, size)
    return _member_attrs(group_id, seed, sn, ctx.design)


def _enqueue_group(
    ctx: _Context,
    trial: optuna.Trial,
    suggested: Mapping[str, Any],
    sn: bool,
    group_id: str,
    seed: int,
    size: int,
) -> None:
    """Enqueue a new configuration's twin and replicate seeds, within its reservation of
    ``size`` trials (itself and, in a paired study on several seeds with an SN-off first
    trial, the replicates its SN twin enqueues once it knows its coefficient)."""
    study, seeds = trial.study, ctx.seeds
    members: list[tuple[Mapping[str, Any], dict[str, Any]]] = []
    if ctx.design == "paired":
        twin_sn = not sn
        twin_leader = twin_sn and len(seeds) > 1
        twin_attrs = _member_attrs(group_id, seed, twin_sn, ctx.design)
        if twin_leader:
            twin_attrs["leader"] = True
        members.append((_params_for_arm(suggested, twin_sn), twin_attrs))
        for s in seeds[1:]:
            members.append((suggested, _member_attrs(group_id, s, sn, ctx.design)))
            if not twin_leader:
                members.append(
                    (
                        _params_for_arm(suggested, twin_sn),
                        _member_attrs(group_id, s, twin_sn, ctx.design),
                    )
                )
    else:
        for s in seeds[1:]:
            members.append((suggested, _member_attrs(group_id, s, sn, ctx.design)))
    for params, member_attrs in members[: max(size - 1, 0)]:  # (its reservation holds them)
        if not _enqueue(study, params, member_attrs, ctx.n_trials):
            break


@dataclass
class _GroupState:
    """One group (configuration) of a study as a resume sees it.

    Attributes:
        members: ``(seed, arm)`` of the members that finished (counted), run or wait; a
            stale or cancelled trial stands for nothing (its retry is a member of its own).
        params: Per arm, the parameters of a finished member (what a missing member of that
            arm is enqueued with).
        busy: A member runs: it may still be enqueuing the group's other members.
    """

    members: set[tuple[int, str]] = field(default_factory=set)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    busy: bool = False


def _group_states(trials: Sequence[FrozenTrial]) -> dict[str, _GroupState]:
    """The groups of a study's trials, by ``group_id``."""
    groups: dict[str, _GroupState] = {}
    for t in trials:
        attrs = t.user_attrs
        group = attrs.get("group_id")
        if group is None:
            if t.state == TrialState.RUNNING:
                # A new configuration: it enqueues its members before its (deferred)
                # attributes are written; its group id is its number's.
                groups.setdefault(f"g{t.number:04d}", _GroupState()).busy = True
            continue
        state = groups.setdefault(str(group), _GroupState())
        seed, arm = attrs.get("seed"), attrs.get("arm")
        if t.state == TrialState.RUNNING:
            state.busy = True
        elif _counts_toward_total(t):
            if arm is not None:
                state.params.setdefault(str(arm), dict(t.params))
        elif t.state != TrialState.WAITING:
            continue  # stale or cancelled: its retry, if any, is its own trial
        if seed is not None and arm is not None:
            state.members.add((int(seed), str(arm)))
    return groups


_GROUP_LOCK_TIMEOUT = 30
"""Seconds a worker waits for the group lock before it goes ahead without it (a holder that
hangs, or whose death the database has not noticed yet): as long as Optuna's journal lock
file waits before it breaks a lock."""

_held = threading.local()  # the group locks this thread holds (see _group_lock)
_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()
_warned_dialects: set[str] = set()


@contextlib.contextmanager
def _group_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """Serialise reading which members a group misses and enqueuing them.

    Worker processes resuming side by side (``thunderline-lab run --workers N``, or workers
    on several machines sharing PostgreSQL) would each read the same cut groups and each
    enqueue the same members; a worker re-enqueuing a stale or cancelled trial would race
    them the same way. The lock makes each read-then-enqueue atomic, per storage:

    * the lab's journal: a lock file next to it (``optuna.journal.groups.lock``: Optuna's own
      NFS-safe open lock, which a waiting worker breaks after :data:`_GROUP_LOCK_TIMEOUT`
      seconds in case its holder died);
    * PostgreSQL: a transaction-level advisory lock keyed by the study name
      (``pg_advisory_xact_lock``) on a connection of its own, so other studies do not wait.
      It is released when the lock's transaction ends, and by the server when the
      holder's connection dies; a waiter gives up after :data:`_GROUP_LOCK_TIMEOUT` seconds
      (``lock_timeout``), warns and goes ahead;
    * MySQL / MariaDB: a named lock (``GET_LOCK``) keyed by the study name, on a connection
      of its own (released by the server when it dies);
    * an SQLite file: a lock file next to the database, as for the journal;
    * in-memory storages: a lock of this process (no other process sees them). Other
      dialects get that too, with a warning: workers in other processes may then enqueue a
      member twice.

    Re-entrant within a thread (failing a stale trial under the lock retries it, which
    takes the lock again).
    """
    lock_id, lock = _group_lock_for(storage, study_name)
    held: set[tuple[Any, ...]] = _held.__dict__.setdefault("ids", set())
    if lock_id in held:
        yield
        return
    with lock:
        held.add(lock_id)
        try:
            yield
        finally:
            held.discard(lock_id)


def _group_lock_for(
    storage: BaseStorage, study_name: str
) -> tuple[tuple[Any, ...], contextlib.AbstractContextManager[None]]:
    """``(identity, lock)`` of the group lock of a study in ``storage`` (not yet taken)."""
    if isinstance(storage, _LabJournalStorage):
        path = storage.path + ".groups"
        return ("file", path), _file_lock(path)
    if isinstance(storage, RDBStorage):
        engine = storage.engine
        dialect = engine.dialect.name
        where = str(engine.url)  # (password masked)
        if dialect == "postgresql":
            key = _advisory_lock_key(study_name)
            return (dialect, where, key), _pg_advisory_lock(engine, key, study_name)
        if dialect in ("mysql", "mariadb"):
            name = f"thunderline-lab:{_advisory_lock_key(study_name) & (2**64 - 1):016x}"
            return (dialect, where, name), _mysql_named_lock(engine, name, study_name)
        database = engine.url.database or ":memory:"
        if dialect == "sqlite" and database != ":memory:" and "mode=memory" not in database:
            path = os.path.abspath(database) + ".groups"
            return ("file", path), _file_lock(path)
        if dialect != "sqlite" and dialect not in _warned_dialects:
            _warned_dialects.add(dialect)
            log.warning(
                "no cross-process group lock for %s storages: workers resuming side by side "
                "may enqueue a member of a cut group twice",
                dialect,
            )
    return ("process", study_name), _process_lock(study_name)


def _advisory_lock_key(study_name: str) -> int:
    """A signed 64-bit key for the study's group lock (PostgreSQL advisory locks)."""
    digest = hashlib.blake2b(f"thunderline-lab groups {study_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    lock = JournalFileOpenLock(path, grace_period=_GROUP_LOCK_TIMEOUT)
    lock.acquire()
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # broken meanwhile by a worker that waited
            lock.release()


def _lock_connection(engine: Any, study_name: str) -> Any:
    """A connection of its own for a group lock, apart from the storage's sessions."""
    import sqlalchemy as sa

    try:
        return engine.connect()
    except sa.exc.SQLAlchemyError as exc:
        raise StudyError(f"study {study_name!r}: cannot take the group lock: {exc}") from exc


@contextlib.contextmanager
def _pg_advisory_lock(engine: Any, key: int, study_name: str) -> Iterator[None]:
    import sqlalchemy as sa

    conn = _lock_connection(engine, study_name)
    try:
        try:
            conn.execute(
                sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                {"ms": f"{_GROUP_LOCK_TIMEOUT * 1000}ms"},
            )
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        except sa.exc.SQLAlchemyError as exc:
            pgcode = getattr(getattr(exc, "orig", None), "pgcode", None)
            if pgcode != "55P03":  # lock_not_available: lock_timeout ran out
                raise StudyError(
                    f"study {study_name!r}: cannot take the group lock: {exc}"
                ) from exc
            conn.rollback()
            log.warning(
                "study %r: the group lock (PostgreSQL advisory lock %d) was held for more "
                "than %d s; going ahead without it",
                study_name,
                key,
                _GROUP_LOCK_TIMEOUT,
            )
        yield
    finally:
        # Ending the transaction releases the lock; so does the server if the connection died.
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            conn.rollback()
        conn.close()


@contextlib.contextmanager
def _mysql_named_lock(engine: Any, name: str, study_name: str) -> Iterator[None]:
    import sqlalchemy as sa

    conn = _lock_connection(engine, study_name)
    got = None
    try:
        try:
            got = conn.execute(
                sa.text("SELECT GET_LOCK(:name, :timeout)"),
                {"name": name, "timeout": _GROUP_LOCK_TIMEOUT},
            ).scalar()
        except sa.exc.SQLAlchemyError as exc:
            raise StudyError(f"study {study_name!r}: cannot take the group lock: {exc}") from exc
        if got != 1:
            log.warning(
                "study %r: the group lock (MySQL lock %s) was not free within %d s; "
                "going ahead without it",
                study_name,
                name,
                _GROUP_LOCK_TIMEOUT,
            )
        yield
    finally:
        try:
            if got == 1:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        except sa.exc.SQLAlchemyError:
            conn.invalidate()  # a session's lock must not go back to the pool with it
        finally:
            conn.close()


@contextlib.contextmanager
def _process_lock(study_name: str) -> Iterator[None]:
    with _process_locks_guard:
        lock = _process_locks.setdefault(study_name, threading.Lock())
    acquired = lock.acquire(timeout=_GROUP_LOCK_TIMEOUT)
    if not acquired:
        log.warning(
            "study %r: the group lock was held for more than %d s; going ahead without it",
            study_name,
            _GROUP_LOCK_TIMEOUT,
        )
    try:
        yield
    finally:
        if acquired:
            lock.release()


def _missing_members(
    group_id: str, group: _GroupState, ctx: _Context
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(params, attrs)`` of each member a group lacks, first seed first.

    Paired: both arms at every seed; unpaired: the group's arm at every seed. A missing arm
    takes the other arm's configuration, SN flipped. When the SN arm never ran its
    coefficient is still to be suggested: as for the twin of an SN-off configuration, one
    member (the first seed, ``leader``) is enqueued and enqueues the other seeds with it.
    """
    arms = ("sn_off", "sn_on") if ctx.design == "paired" else tuple(sorted(group.params))
    plan: dict[str, tuple[dict[str, Any], tuple[int, ...], bool]] = {}
    for arm in arms:
        sn = arm == "sn_on"
        seeds = tuple(s for s in ctx.seeds if (s, arm) not in group.members)
        if not seeds:
            continue
        if arm in group.params:
            plan[arm] = (group.params[arm], seeds, False)
            continue
        params = _params_for_arm(group.params[_arm(not sn)], sn)
        if not sn or len(ctx.seeds) == 1:
            plan[arm] = (params, seeds, False)
        elif len(seeds) == len(ctx.seeds):  # no SN member at all: a leader suggests it
            plan[arm] = (params, ctx.seeds[:1], True)
        # else an SN member waits (the leader): it enqueues the other seeds when it runs
    out = []
    for seed in ctx.seeds:
        for arm, (params, seeds, leader) in plan.items():
            if seed in seeds:
                attrs = _member_attrs(group_id, seed, arm == "sn_on", ctx.design)
                if leader:
                    attrs["leader"] = True
                out.append((params, attrs))
    return out


def _complete_open_pairs(study: optuna.Study, ctx: _Context) -> int:
    """Enqueue the members of groups an earlier run's budget cut, before any new
    configuration is sampled; returns how many were enqueued.

    A group is whole when it has each arm (paired) or its one arm (unpaired) at every seed;
    an n_trials that is not a multiple of the group size leaves the last group short.
    Completing it lets every pair be compared (same group and seed, both arms) and keeps
    each arm's seeds balanced: seeds draw different data splits, so a configuration seen at
    the first seed only weighs that split more. The unpaired design has the same gap, and
    there the missing members' parameters (coefficient included) are known from the others.

    Only groups with a finished member and none running count: a running member may still
    be enqueuing the others (a new configuration, a leader its replicates), and a dead
    worker's is failed as stale and retried first. A waiting member counts as present, so
    none is enqueued twice, and workers resuming side by side take turns
    (:func:`_group_lock`). ``n_trials`` bounds what is enqueued, as for every member.
    """
    if ctx.design != "paired" and len(ctx.seeds) == 1:
        return 0  # groups of one trial
    added = 0
    with _group_lock(study._storage, study.study_name):
        groups = _group_states(study.get_trials(deepcopy=False))
        budget_left = True
        for group_id, group in sorted(groups.items()):
            if group.busy or not group.params:
                continue
            for params, attrs in _missing_members(group_id, group, ctx):
                budget_left = _enqueue(study, params, attrs, ctx.n_trials)
                if not budget_left:
                    break
                added += 1
            if not budget_left:
                break
    if added:
        log.info(
            "study %r: %d trials enqueued to complete groups an earlier run's budget cut",
            ctx.name,
            added,
        )
    return added


def _member_attrs(group_id: str, seed: int, sn: bool, design: Design) -> dict[str, Any]:
    attrs: dict[str, Any] = {"group_id": group_id, "seed": int(seed), "arm": _arm(sn)}
    if design == "paired":
        attrs["pair_id"] = f"{group_id}_s{seed}"
    return attrs


def _retry_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {"retry_of": attrs["retry_of"]} if "retry_of" in attrs else {}


def _event_parameters(values: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(values)
    params.setdefault("spectral_norm_coeff", None)
    params.update({k: v for k, v in group.items() if k != "leader"})
    return params


def _model_config(ctx: _Context, values: Mapping[str, Any]) -> Any:
    from thunderline_lab.models import ModelConfig

    cfg: dict[str, Any] = {
        "architecture": ctx.architecture,
        "depth": int(values["depth"]),
        "width": int(values["width"]),
        "activation": values["activation"],
        "dropout": float(values["dropout"]),
        "batchnorm": bool(values["batchnorm"]),
        "spectral_norm": bool(values["spectral_norm"]),
        "n_power_iterations": int(values["n_power_iterations"]),
    }
    if values["spectral_norm"]:
        cfg["spectral_norm_coeff"] = float(values["spectral_norm_coeff"])
        if "conv_sn_mode" in values:
            cfg["conv_sn_mode"] = values["conv_sn_mode"]
    return ModelConfig.from_dict(cfg)


def _make_objective(ctx: _Context) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        storage = trial.study._storage
        running = storage.running if isinstance(storage, _LabJournalStorage) else set()
        running.add(trial._trial_id)
        try:
            return _run_objective(ctx, trial)
        finally:
            running.discard(trial._trial_id)

    return objective


def _run_objective(ctx: _Context, trial: optuna.Trial) -> float:
    study = trial.study
    number = trial.number
    trial_id = trial_id_for(number)
    # who runs the trial, written at once (not with the deferred attributes below): a worker
    # killed before its first heartbeat is then known dead by the next run on this host,
    # instead of only after the grace period
    who: dict[str, Any] = {"worker_host": _HOST, "worker_pid": os.getpid()}
    batch = os.environ.get(BATCH_ENV)
    if batch:  # (its retry, if any, carries the batch of the run that retries it)
        who[BATCH_ATTR] = batch
    _set_user_attrs(study, trial._trial_id, who)
    values = ctx.space.suggest(trial, ctx.architecture)
    group = _plan_group(ctx, trial, values)
    seed = int(group["seed"])
    sn = bool(values["spectral_norm"])
    coeff = values.get("spectral_norm_coeff") if sn else None
    parameters = {
        **_event_parameters(values, group),
        "architecture": ctx.architecture,
        "dataset": ctx.dataset_name,
        "epochs": ctx.epochs,
        "patience": ctx.patience,
        "design": ctx.design,
    }
    ctx.parameters[number] = parameters
    _set_user_attrs(
        study,
        trial._trial_id,
        {
            "trial_id": trial_id,
            "model_run_id": ctx.name,
            **{k: v for k, v in group.items() if k != "leader"},
        },
        defer=True,  # written by the heartbeat thread (or with the first report), not here
    )
    if isinstance(study._storage, _LabJournalStorage):
        study._storage.wake()
    ctx.publish(
        "ml.trial.start",
        trial_id=trial_id,
        spectral_norm=sn,
        spectral_norm_coeff=coeff,
        parameters=parameters,
    )

    def report(epoch: int, val_loss: float) -> bool:
        if not math.isfinite(val_loss):
            return False
        trial.report(val_loss, epoch)
        return ctx.pruning and trial.should_prune()

    started = time.perf_counter()
    try:
        result = ctx.trainer(
            _model_config(ctx, values),
            ctx.dataset_for(seed),
            bus=ctx.bus,
            model_run_id=ctx.name,
            trial_id=trial_id,
            study=ctx.name,
            epochs=ctx.epochs,
            lr=float(values["lr"]),
            weight_decay=float(values["weight_decay"]),
            batch_size=int(values["batch_size"]),
            seed=seed,
            patience=ctx.patience,
            parameters=parameters,
            report=report,
            should_stop=ctx.should_stop,
            evaluation=ctx.evaluation,
            keep_model=ctx.tracker is not None,  # MLflow gets the state_dict and σ table
            **ctx.train_kwargs,
        )
    except KeyboardInterrupt:
        # Optuna marks the trial failed and re-raises; record it as cancelled (not counted),
        # report it and enqueue it again so the next run picks it up.
        _finish_attrs(study, trial._trial_id, "cancelled", {}, None, None)
        if isinstance(study._storage, _LabJournalStorage):
            study._storage.flush()
        ctx.publish(
            "ml.trial.complete",
            status="cancelled",
            trial_id=trial_id,
            spectral_norm=sn,
            spectral_norm_coeff=coeff,
            parameters=parameters,
        )
        with contextlib.suppress(Exception):
            _retry(study, study._storage.get_trial(trial._trial_id), ctx)
        ctx.stopped = "interrupted"
        raise
    except Exception as exc:
        duration_ms = round(1000 * (time.perf_counter() - started))
        message = f"{type(exc).__name__}: {exc}"
        log.exception("trial %s of study %s failed", trial_id, ctx.name)
        result = TrialResult(
            status="failed",
            error=message[:2000],
            error_type=type(exc).__name__,
            duration_ms=duration_ms,
        )
    if result.model is not None:
        _log_artifacts(ctx, trial_id, result)
        result.model = None  # only MLflow needed it; don't hold every trial's weights
    ctx.results[number] = result
    mlflow_run_id = _mlflow_run_id(ctx, trial_id)
    _finish_attrs(
        study,
        trial._trial_id,
        result.status,
        result.metrics,
        result.error_type,
        result.error,
        duration_ms=result.duration_ms,
        mlflow_run_id=mlflow_run_id,
    )
    if result.status == "pruned":
        raise optuna.TrialPruned(f"pruned at epoch {len(result.history) - 1}")
    if result.status == "cancelled":
        raise _StopRequested("stopped by should_stop")
    if result.status == "failed":
        raise _TrialFailed(result.error or result.error_type or "failed")
    value = result.metrics.get("best_val_loss")
    if value is None or not math.isfinite(value):
        raise _TrialFailed("no finite validation loss")
    return float(value)


def _log_artifacts(ctx: _Context, trial_id: str, result: TrialResult) -> None:
    """Queue the trial's MLflow artifacts; a failure here never fails the trial."""
    log_artifacts = getattr(ctx.tracker, "log_artifacts", None)
    model = result.model
    if log_artifacts is None or model is None or result.status not in ("completed", "pruned"):
        return
    try:
        from thunderline_lab.spectral import layer_sigmas

        log_artifacts(
            trial_id,
            model=model,
            sigma_table=layer_sigmas(model),
            history=result.history,
            model_run_id=ctx.name,
        )
    except Exception:
        log.exception("could not queue MLflow artifacts of %s", trial_id)


def _finish_attrs(
    study: optuna.Study,
    trial_id: int,
    status: str,
    metrics: Mapping[str, float],
    error_type: str | None,
    error: str | None,
    *,
    duration_ms: int | None = None,
    mlflow_run_id: str | None = None,
) -> None:
    attrs: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    attrs[_STATUS_ATTR] = status
    if duration_ms is not None:
        attrs["duration_ms"] = int(duration_ms)
    if error_type:
        attrs["error_type"] = error_type
        attrs["error_message"] = (error or "")[:2000]
    if mlflow_run_id:
        attrs["mlflow_run_id"] = mlflow_run_id
    try:
        _set_user_attrs(study, trial_id, attrs, defer=True)  # written with the final state
    except Exception:  # a trial failed as stale by another worker cannot be updated
        log.warning("could not record the results of trial %s", trial_id, exc_info=True)


def _mlflow_run_id(ctx: _Context, trial_id: str) -> str | None:
    lookup = getattr(ctx.tracker, "run_id_for", None)
    if lookup is None:
        return None
    try:
        try:  # the run is made in the logger's thread, usually long before the trial ends
            value = lookup(ctx.name, trial_id, timeout=0.5)
        except TypeError:
            value = lookup(ctx.name, trial_id)
    except Exception:
        log.warning("tracking: no MLflow run id for %s", trial_id, exc_info=True)
        return None
    return str(value) if value else None


def _trial_payload(t: FrozenTrial) -> dict[str, Any]:
    params = dict(t.params)
    sn = bool(params.get("spectral_norm", False))
    attrs = t.user_attrs
    params.update(
        {k: attrs[k] for k in ("group_id", "pair_id", "seed", "arm", "retry_of") if k in attrs}
    )
    params.setdefault("spectral_norm_coeff", None)
    duration = None
    if t.datetime_start and t.datetime_complete:
        duration = max(0, round((t.datetime_complete - t.datetime_start).total_seconds() * 1000))
    payload: dict[str, Any] = {
        "trial_id": trial_id_for(t.number),
        "spectral_norm": sn,
        "spectral_norm_coeff": params["spectral_norm_coeff"] if sn else None,
        "parameters": params,
    }
    if duration is not None:
        payload["duration_ms"] = int(attrs.get("duration_ms", duration))
    if attrs.get("mlflow_run_id"):
        payload["mlflow_run_id"] = attrs["mlflow_run_id"]
    return payload


def _finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class _EventCallback:
    """Optuna callback: publishes ``ml.trial.complete`` / ``ml.trial.failed`` for each trial."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def __call__(self, study: optuna.Study, t: FrozenTrial) -> None:
        ctx = self.ctx
        if t.user_attrs.get(_STATUS_ATTR) == _SURPLUS:
            return  # nothing to report (the stop rule then sees whether trials wait for it)
        result = ctx.results.pop(t.number, None)
        payload = _trial_payload(t)
        if t.number in ctx.parameters:
            payload["parameters"] = ctx.parameters.pop(t.number)
        metrics = _finite_metrics(result.metrics if result is not None else {})
        if result is not None:
            payload["duration_ms"] = result.duration_ms
        ctx.n_run += 1
        if t.state == TrialState.COMPLETE:
            ctx.consecutive_errors = 0
            ctx.publish("ml.trial.complete", status="completed", metrics=metrics, **payload)
        elif t.state == TrialState.PRUNED:
            ctx.consecutive_errors = 0
            ctx.publish("ml.trial.complete", status="pruned", metrics=metrics, **payload)
        elif t.user_attrs.get(_STATUS_ATTR) == "cancelled":
            ctx.publish("ml.trial.complete", status="cancelled", metrics=metrics, **payload)
            _retry(study, t, ctx)
            ctx.stopped = "should_stop"
            study.stop()
        else:
            error_type = (result.error_type if result else None) or t.user_attrs.get(
                "error_type", "error"
            )
            message = (result.error if result else None) or t.user_attrs.get(
                "error_message", "trial failed"
            )
            if error_type == "diverged":
                ctx.consecutive_errors = 0
            else:
                ctx.consecutive_errors += 1
            ctx.publish(
                "ml.trial.failed",
                error_type=str(error_type),
                error_message=str(message),
                metrics=metrics,
                **payload,
            )
        if ctx.progress is not None:
            try:
                done = count_trials(study.get_trials(deepcopy=False))["finished"]
                ctx.progress(done, ctx.n_trials, t)
            except Exception:
                log.exception("progress callback failed")


class _StopCallback:
    """Optuna callback: stop once no trial waits and the budget is taken (finished, running
    and reserved: :func:`_budget_used`), on should_stop, on errors."""

    def __init__(self, ctx: _Context, max_consecutive_errors: int) -> None:
        self.ctx = ctx
        self.max_errors = max_consecutive_errors

    def __call__(self, study: optuna.Study, t: FrozenTrial) -> None:
        ctx = self.ctx
        if ctx.stop_requested():
            ctx.stopped = "should_stop"
            study.stop()
            return
        if self.max_errors and ctx.consecutive_errors >= self.max_errors:
            ctx.stopped = "errors"
            study.stop()
            return
        if isinstance(study._storage, _LabJournalStorage):
            study._storage.fail_stale(study)  # (Optuna does this itself for RDB storages)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and _budget_used(trials) >= ctx.n_trials:  # nothing left to ask for
            study.stop()


class _TrialCallback:
    """The one Optuna callback (one deep copy of the trial): events, then the stop rules."""

    def __init__(self, ctx: _Context, max_consecutive_errors: int) -> None:
        self.events = _EventCallback(ctx)
        self.stop = _StopCallback(ctx, max_consecutive_errors)

    def __call__(self, study: optuna.Study, t: FrozenTrial) -> None:
        self.events(study, t)
        self.stop(study, t)


def _retry(study: optuna.Study, t: FrozenTrial, ctx: _Context) -> bool:
    """Enqueue a trial that did not finish (stale, cancelled) again with the same parameters.

    Its group attributes come along (a primary whose attributes were never written keeps
    its group id and the first seed), so the retry stays paired with its twin. Under the
    group lock (:func:`_group_lock`), and not when another trial already stands for the
    member (a worker completing cut groups saw it failed before this retry).
    """
    attrs: dict[str, Any] = {
        k: t.user_attrs[k]
        for k in ("group_id", "pair_id", "seed", "arm", "leader")
        if k in t.user_attrs
    }
    attrs.setdefault("group_id", f"g{t.number:04d}")
    attrs.setdefault("seed", ctx.seeds[0])
    attrs.setdefault("arm", _arm(bool(t.params.get("spectral_norm", False))))
    if ctx.design == "paired":
        attrs.setdefault("pair_id", f"{attrs['group_id']}_s{attrs['seed']}")
    attrs["retry_of"] = t.number
    try:
        with _group_lock(study._storage, study.study_name):
            others = [u for u in study.get_trials(deepcopy=False) if u.number != t.number]
            group = _group_states(others).get(str(attrs["group_id"]))
            if group is not None and (int(attrs["seed"]), str(attrs["arm"])) in group.members:
                log.info(
                    "trial %s not re-enqueued: group %s has its member (seed %s, %s) already",
                    t.number,
                    attrs["group_id"],
                    attrs["seed"],
                    attrs["arm"],
                )
                return False
            return _enqueue(study, t.params, attrs, ctx.n_trials)
    except Exception:
        log.exception("could not re-enqueue trial %s", t.number)
        return False


def _stale_callback_for(ctx: _Context) -> Callable[[optuna.Study, FrozenTrial], None]:
    def on_stale(study: optuna.Study, t: FrozenTrial) -> None:
        payload = _trial_payload(t)
        payload.pop("duration_ms", None)
        ctx.publish(
            "ml.trial.failed",
            error_type="stale",
            error_message=(
                f"worker {t.user_attrs.get('worker_host', '?')}:"
                f"{t.user_attrs.get('worker_pid', '?')} stopped reporting; "
                "trial marked failed and re-enqueued"
            ),
            **payload,
        )
        _retry(study, t, ctx)

    return on_stale


def _fail_stale(study: optuna.Study) -> None:
    storage = study._storage
    if isinstance(storage, _LabJournalStorage):
        storage.fail_stale(study)
        return
    # Under the group lock, as on the journal: a worker completing cut groups meanwhile
    # would see a member failed and not yet retried. (Optuna also fails stale trials before
    # each trial it starts, without the lock: there `_retry` takes it and finds the member.)
    with (
        _group_lock(storage, study.study_name),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _attach_tracking(bus: EventBus, lab: Lab, name: str, store: Any) -> Any:
    try:
        from thunderline_lab import tracking
    except ImportError as exc:
        raise TrackingError(
            f"mlflow=True needs thunderline_lab.tracking, which cannot be imported: {exc}"
        ) from exc
    attach = getattr(tracking, "attach", None)
    if attach is None:
        raise TrackingError(
            "thunderline_lab.tracking has no attach(bus, *, lab, experiment) function"
        )
    if store is None:
        return attach(bus, lab=lab, experiment=name)
    return attach(bus, lab=lab, experiment=name, store=store)


def _attach_gateway(bus: EventBus, url: str, lab: Lab) -> Any:
    try:
        from thunderline_lab.gateway import EventClient
    except ImportError as exc:  # pragma: no cover - the gateway ships with the package
        raise StudyError(f"gateway={url!r} needs thunderline_lab.gateway: {exc}") from exc
    lab.root.mkdir(parents=True, exist_ok=True)
    client = EventClient(url, spool=lab.root / "gateway-spool.jsonl")
    client.attach(bus)
    return client


class _InlineFlush:
    """Appends a :class:`StoreWriter`'s buffer from the publishing thread every ``interval`` s.

    Subscribed after the writer, so the event that triggers a flush is already buffered. The
    run's end flushes the rest. Fewer, larger SQLite transactions also make the journal's
    fsyncs cheaper on a shared disk.
    """

    def __init__(self, writer: Any, bus: EventBus, interval: float = 0.25) -> None:
        self.writer = writer
        self.bus = bus
        self.interval = interval
        self._last = time.monotonic()
        self._sub = bus.subscribe("*", self._on_event, name="StoreWriter.flush")

    def _on_event(self, _event: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.writer.flush(raise_errors=False)

    def close(self) -> None:
        self.bus.unsubscribe(self._sub)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _items(value: Any) -> list[Any] | None:
    """A sequence's items as a list (a list, a tuple, a range, a numpy array); None for a
    string, bytes, a mapping or anything not iterable."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping):
        return list(value)
    return None


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    """The seeds as ints: distinct integers, at least one."""
    items = _items(seeds)
    if items is None:  # papermill's -p seeds 0 (an int) or -p seeds "[0, 1]" (text)
        raise ConfigError(
            f"seeds: expected a list of distinct integers such as [0, 1], got {value_text(seeds)} "
            "(papermill: -y 'seeds: [0, 1]'; thunderline-lab run: -p seeds '[0, 1]')"
        )
    if (
        not items
        or not all(isinstance(s, int | numbers.Integral) and not isinstance(s, bool) for s in items)
        or len(set(items)) != len(items)
    ):
        raise ConfigError(f"seeds: must be distinct integers (at least one), got {seeds!r}")
    out = tuple(int(s) for s in items)
    wild = [s for s in out if not -(2**63) <= s < 2**64]  # what torch.manual_seed takes
    if wild:
        raise ConfigError(f"seeds: {wild[0]} is out of range (-2**63 <= seed < 2**64)")
    return out


def _with_conv_sn_modes(
    space: SearchSpace, modes: Sequence[str] | None, architecture: str
) -> SearchSpace:
    """``space`` with ``conv_sn_mode`` chosen among ``modes`` (a CNN study's SN modes).

    Raises:
        ConfigError: ``modes`` given for another architecture than ``cnn`` (an MLP's
            trials would be logged with a mode they never used, kept with the study), or
            not a list of known modes.
    """
    if modes is None:
        return space
    from thunderline_lab.models import CONV_SN_MODES

    items = _items(modes)
    if not items or any(m not in CONV_SN_MODES for m in items):
        raise ConfigError(
            f"conv_sn_modes: must be a list of {', '.join(map(repr, CONV_SN_MODES))}, got {modes!r}"
        )
    if architecture != "cnn":
        raise ConfigError(
            f"conv_sn_modes: only for a CNN study (the SN mode of its convolutions); this "
            f"study's architecture is {architecture!r}: leave conv_sn_modes None (got {modes!r})"
        )
    return SearchSpace.from_dict({**space.to_dict(), "conv_sn_mode": {"choices": items}})


def check_study_parameters(params: Mapping[str, Any]) -> None:
    """Refuse, before any worker starts, what :func:`run_study` (and so each worker's
    notebook) would: a study notebook's ``search_space``, ``conv_sn_modes``, ``seeds`` and
    ``epochs``, as ``thunderline-lab run`` reads them from a study config and ``-p``.

    Raises:
        ConfigError: naming the parameter (``search_space.lr: 'fast': ...``, ``seeds: ...``).
    """
    architecture = params.get("architecture", "mlp")
    if "search_space" in params or "conv_sn_modes" in params:
        space = SearchSpace.from_dict(params.get("search_space") or None)
        space = _with_conv_sn_modes(space, params.get("conv_sn_modes"), architecture)
        space.check(architecture if architecture in ("mlp", "cnn") else "mlp")
    if "seeds" in params:
        _check_seeds(params["seeds"])
    epochs = params.get("epochs", 1)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs: must be an integer >= 1, got {epochs!r}")


def _check_design(
    name: str, design: str, seeds: Sequence[int], n_trials: int, epochs: int, space: SearchSpace
) -> tuple[int, ...]:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("a study needs a non-empty name")
    if design not in ("paired", "tpe"):
        raise ConfigError(f"design must be 'paired' or 'tpe', got {design!r}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    out = _check_seeds(seeds)
    if design == "paired" and space.spectral_norm.kind == "fixed":
        raise ConfigError(
            "the paired design flips spectral_norm: search_space.spectral_norm cannot be fixed "
            "(use design='tpe' to study one arm)"
        )
    split = budget_split(design, out, n_trials)
    if split is not None:
        log.warning("study %r: %s", name, split)
    return out


def budget_split(design: str, seeds: Sequence[int], n_trials: int) -> str | None:
    """What a budget that is not a multiple of the group size (2 × seeds paired, seeds
    unpaired) leaves short, said as a warning; None when every group is whole.

    Example:
        >>> budget_split("paired", [0], 4) is None
        True
        >>> budget_split("paired", [0], 3)[:40]
        'n_trials=3 is not a multiple of 2 (each '
    """
    group = (2 if design == "paired" else 1) * len(seeds)
    if not group or n_trials % group == 0:
        return None
    runs = (
        "with SN on and off" + (f" for {len(seeds)} seeds" if len(seeds) > 1 else "")
        if design == "paired"
        else f"for {len(seeds)} seeds"
    )
    return (
        f"n_trials={n_trials} is not a multiple of {group} (each configuration runs {runs}): "
        f"the last configuration will miss {group - n_trials % group} of its trials (a resume "
        f"with a larger n_trials runs them first); n_trials={n_trials + group - n_trials % group} "
        "keeps every group whole"
    )


def _study_attrs(
    dataset: str,
    architecture: str,
    design: str,
    seeds: tuple[int, ...],
    space: SearchSpace,
    epochs: int,
) -> dict[str, Any]:
    # JSON-normal (lists, not tuples), as a resumed study reads them back from its storage
    return json.loads(
        json.dumps(
            {
                "dataset": dataset,
                "architecture": architecture,
                "design": design,
                "seeds": list(seeds),
                "search_space": space.to_dict(),
                "epochs": epochs,
            }
        )
    )


# What a resumed study must keep: trials made otherwise are not comparable with its others.
_FIXED_ATTRS = ("dataset", "architecture", "design", "seeds", "epochs", "search_space")


def run_study(
    name: str,
    *,
    lab: str | os.PathLike[str] | Lab | None = None,
    dataset: str | Dataset = "digits",
    architecture: str = "mlp",
    n_trials: int = 24,
    epochs: int = 30,
    design: Design = "paired",
    seeds: Sequence[int] = (0,),
    search_space: SearchSpace | Mapping[str, Any] | None = None,
    conv_sn_modes: Sequence[str] | None = None,
    storage: str | os.PathLike[str] | BaseStorage | None = None,
    bus: EventBus | None = None,
    gateway: str | None = None,
    mlflow: bool = False,
    should_stop: StopFlag | None = None,
    pruning: bool | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    sampler_seed: int | None = None,
    timeout: float | None = None,
    progress: Callable[[int, int, FrozenTrial], Any] | None = None,
    patience: int | None = 5,
    evaluation: EvalSettings | None = None,
    threads: int | None = 1,
    heartbeat_interval: int = 10,
    grace_period: int | None = None,
    max_consecutive_errors: int = 3,
    trainer: TrainFn | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
) -> StudyResult:
    """Run, or resume, an Optuna study of spectral normalisation on vs off.

    Args:
        name: The study name (= ``model_run_id`` and ``study`` of every event).
        lab: The lab directory (default ``$THUNDERLINE_LAB_HOME`` or ``./lab``): its trial
            store receives the events, its ``optuna.journal`` holds the study.
        dataset: A registered dataset name (loaded per seed; images for CNNs) or a
            :class:`~thunderline_lab.data.Dataset`.
        architecture: ``"mlp"`` or ``"cnn"``.
        n_trials: The total number of finished trials (completed + pruned + failed) the study
            should have; what is already there counts.
        epochs: Maximum epochs per trial.
        design: ``"paired"`` (each configuration also runs with SN flipped, same seed) or
            ``"tpe"`` (plain TPE).
        seeds: Seeds every configuration runs with (one trial per seed and arm).
        search_space: A :class:`SearchSpace` or its dict form (default
            :data:`DEFAULT_SEARCH_SPACE`).
        conv_sn_modes: CNN only: the ``conv_sn_mode`` choices (e.g. ``("operator",
            "matrix")``); overrides the search space's.
        storage: ``None`` for the lab's journal; a ``postgresql+psycopg2://...`` URL (any
            SQLAlchemy URL) for Optuna's RDB storage; a journal file path; or a storage.
        bus: The event bus (created if None). The lab's store writer is attached to it
            (unless ``gateway`` is given).
        gateway: Report events through ``thunderline_lab.gateway.EventClient`` to this URL
            (token from ``$THUNDERLINE_LAB_TOKEN``) instead of the local store.
        mlflow: Attach ``thunderline_lab.tracking``'s MLflow logger to the bus (True or
            False; anything else, such as the text ``'false'``, is refused).
        should_stop: Checked between trials and between epochs; when set the running trial
            is recorded as cancelled (and re-enqueued for the next run) and the call returns.
        pruning: Prune on the intermediate validation loss (median rule by default).
            ``None`` (the default): on for ``tpe``, off for ``paired`` — pruning one twin on
            the study-wide median breaks its pair and biases the comparison towards the arm
            that learns faster early; pass ``True`` to prune paired studies anyway.
        pruner: A custom Optuna pruner (default ``MedianPruner(n_startup_trials=4,
            n_warmup_steps=3)``).
        sampler: A custom Optuna sampler (default multivariate TPE with constant liar).
        sampler_seed: Seed of the default sampler (offset by the trials already in the
            study, so a resumed study does not replay its first proposals).
        timeout: Stop starting new trials after this many seconds.
        progress: Called ``progress(done, n_trials, frozen_trial)`` after every trial.
        patience: Early-stopping patience in epochs (``None``: off).
        evaluation: What the final evaluation measures.
        threads: ``torch.set_num_threads`` while the study runs (1: one core per worker
            process, the fastest for these small models; ``None`` leaves it alone).
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without heartbeat before a trial is stale (default 6 ×
            interval); trials of dead workers on this host are detected at once.
        max_consecutive_errors: Stop (and raise :class:`StudyError`) after this many trials
            in a row failed with an error other than divergence (0: never).
        trainer: Replaces :func:`train_trial` (same signature); for tests and benchmarks.
        train_kwargs: Extra keyword arguments passed to the trainer.

    Returns:
        A :class:`StudyResult`.

    Raises:
        ConfigError: Bad arguments, or a study of that name made with another dataset,
            architecture or design.
        StudyError: The storage cannot be opened, or trials keep failing with errors.
        TrackingError: ``mlflow=True`` but the tracking module is unavailable.

    Example:
        >>> r = run_study("demo", lab="/tmp/tl-lab", n_trials=2, epochs=2)  # doctest: +SKIP
        >>> r.counts["finished"]  # doctest: +SKIP
        2
    """
    started = time.perf_counter()
    if not isinstance(mlflow, bool):  # "false" (papermill's -p mlflow false) would log
        raise ConfigError(f"mlflow: expected True or False, got {value_text(mlflow)}")
    space = (
        search_space
        if isinstance(search_space, SearchSpace)
        else SearchSpace.from_dict(search_space)
    )
    if architecture not in ("mlp", "cnn"):
        raise ConfigError(f"architecture must be 'mlp' or 'cnn', got {architecture!r}")
    from thunderline_lab.data import available_datasets

    if isinstance(dataset, str) and dataset not in available_datasets():
        # refused before any trial runs (each trial would fail on it, one by one)
        raise ConfigError(
            f"unknown dataset {dataset!r}; available: {', '.join(available_datasets())}"
        )
    space = _with_conv_sn_modes(space, conv_sn_modes, architecture)
    space.check(architecture)
    seeds_t = _check_design(name, design, seeds, n_trials, epochs, space)
    the_lab = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    the_lab.root.mkdir(parents=True, exist_ok=True)
    bus = bus if bus is not None else EventBus()

    ctx = _Context(
        name=name,
        study=None,
        bus=bus,
        space=space,
        design=design,
        seeds=seeds_t,
        n_trials=n_trials,
        architecture=architecture,
        dataset=dataset,
        epochs=epochs,
        patience=patience,
        pruning=(design != "paired") if pruning is None else pruning,
        should_stop=should_stop,
        trainer=trainer or train_trial,
        evaluation=evaluation,
        train_kwargs=dict(train_kwargs or {}),
        progress=progress,
    )
    the_storage = make_storage(
        storage,
        lab=the_lab,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        stale_callback=_stale_callback_for(ctx),
    )
    storage_label = (
        str(getattr(the_storage, "path", None) or the_lab.optuna_journal)
        if isinstance(the_storage, JournalStorage)
        else _redact(str(storage))
    )

    with contextlib.ExitStack() as stack:
        writer = None
        store: Any = None
        if gateway:
            client = _attach_gateway(bus, gateway, the_lab)
            stack.callback(client.close)
        else:
            from thunderline_lab.store import StoreWriter

            store = stack.enter_context(the_lab.store())
            # No background thread: a writer thread competing for the GIL with the training
            # loop's many small journal writes costs more than the appends themselves. The
            # publishing thread appends what is buffered every `interval` seconds instead.
            writer = StoreWriter(store, bus, background=False)
            stack.callback(writer.close)
            flusher = _InlineFlush(writer, bus)
            stack.callback(flusher.close)
        if mlflow:
            ctx.tracker = _attach_tracking(bus, the_lab, name, store if writer else None)
            stack.callback(_close_tracker, ctx)  # no-op if closed below

        study = _open_study(
            name,
            the_storage,
            ctx,
            sampler,
            sampler_seed,
            pruner,
            # (the batch runner's pre-check makes them with the same function: one rule)
            study_settings(
                dataset=ctx.dataset_name,
                architecture=architecture,
                design=design,
                seeds=seeds_t,
                search_space=search_space,
                conv_sn_modes=conv_sn_modes,
                epochs=epochs,
            ),
        )
        ctx.study = study
        _fail_stale(study)  # trials of dead workers: failed, reported and re-enqueued
        _complete_open_pairs(study, ctx)  # members of groups an earlier, smaller budget cut
        if isinstance(the_storage, _LabJournalStorage):
            the_storage.start_heartbeat()
            stack.callback(the_storage.stop_heartbeat)

        counts = count_trials(study.get_trials(deepcopy=False))
        if counts["finished"] >= n_trials:
            ctx.stopped = "done"
        elif ctx.stop_requested():
            ctx.stopped = "should_stop"
        else:
            with _torch_threads(threads), _quiet_optuna():
                try:
                    study.optimize(
                        _make_objective(ctx),
                        timeout=timeout,
                        catch=(_TrialFailed, _StopRequested, _OverBudget),
                        callbacks=[_TrialCallback(ctx, max_consecutive_errors)],
                        gc_after_trial=False,
                    )
                except KeyboardInterrupt:
                    raise
                except ThunderlineLabError:
                    raise
                except Exception as exc:
                    raise StudyError(
                        f"study {name!r} stopped: {type(exc).__name__}: {exc}"
                    ) from exc
            if timeout is not None and ctx.stopped == "done":
                c = count_trials(study.get_trials(deepcopy=False))
                # (another worker's trials still running also leave finished < n_trials)
                out_of_time = time.perf_counter() - started >= timeout
                if c["finished"] < n_trials and not ctx.stop_requested() and out_of_time:
                    ctx.stopped = "timeout"
        if ctx.tracker is not None:
            _close_tracker(ctx)  # its run-id links land in the store before we read it
        if isinstance(the_storage, _LabJournalStorage):
            the_storage.flush()
        if writer is not None:
            writer.flush()
            trials_df = store.trials(study=name, expand=True)
        else:
            trials_df = study.trials_dataframe()

    counts = count_trials(study.get_trials(deepcopy=False))
    if ctx.stopped == "errors":
        raise StudyError(
            f"study {name!r}: {ctx.consecutive_errors} trials in a row failed with errors "
            "(not divergence); see ml.trial.failed events / the trials' error_message"
        )
    return StudyResult(
        study=study,
        trials=trials_df,
        counts=counts,
        n_run=ctx.n_run,
        stopped=ctx.stopped,
        storage=storage_label,
        elapsed_s=time.perf_counter() - started,
    )


def _close_tracker(ctx: _Context) -> None:
    tracker = ctx.tracker
    if tracker is None or ctx.closed_tracker:
        return
    ctx.closed_tracker = True
    closer = getattr(tracker, "close", None)
    if callable(closer):
        try:
            closer()
        except Exception:
            log.warning("closing the MLflow logger failed", exc_info=True)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    recorded = _LabRecordedFailures()
    optimize_log.addFilter(recorded)
    try:
        yield
    finally:
        optimize_log.removeFilter(recorded)
        optuna.logging.set_verbosity(before)


_OPTUNA_TRIAL_FAILED = re.compile(r"Trial (\d+) failed with ")


class _LabRecordedFailures(logging.Filter):
    """Drops Optuna's two warnings ("Trial N failed with parameters ... because of the
    following error" with its traceback, then "Trial N failed with value None") for a trial
    the lab ended itself: a clean stop (the Stop button, ``should_stop``: the trial is
    cancelled and retried) or a failure it records (``ml.trial.failed``, with the error in
    the trial table). In a notebook the traceback of a Stop read as a crash. Any other
    failure of a trial is still logged by Optuna."""

    def __init__(self) -> None:
        super().__init__()
        self._dropped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        m = _OPTUNA_TRIAL_FAILED.match(message)
        if m is None:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, _StopRequested | _TrialFailed | _OverBudget):
            self._dropped.add(m.group(1))
            return False
        if m.group(1) in self._dropped and message.startswith(
            f"Trial {m.group(1)} failed with value"
        ):
            self._dropped.discard(m.group(1))
            return False
        return True


def _open_study(
    name: str,
    storage: BaseStorage,
    ctx: _Context,
    sampler: optuna.samplers.BaseSampler | None,
    sampler_seed: int | None,
    pruner: optuna.pruners.BasePruner | None,
    attrs: Mapping[str, Any],
) -> optuna.Study:
    try:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    except Exception as exc:
        raise StudyError(f"cannot read studies from the Optuna storage: {exc}") from exc
    n_existing = existing[name].n_trials if name in existing else 0
    if sampler is None:
        seed = None if sampler_seed is None else sampler_seed + n_existing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True
            )
    if pruner is None:
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3)
            if ctx.pruning
            else optuna.pruners.NopPruner()
        )
    with warnings.catch_warnings(), _quiet_optuna():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                direction="minimize",
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        except Exception as exc:
            raise StudyError(f"cannot create or load study {name!r}: {exc}") from exc
    have = study.user_attrs
    if not have:
        if isinstance(storage, _LabJournalStorage):
            storage.set_study_user_attrs(study._study_id, attrs)
        else:
            for k, v in attrs.items():
                study.set_user_attr(k, v)
    else:
        change = settings_change(name, have, attrs)
        if change is not None:
            raise ConfigError(change[1])
    return study


def study_settings(
    *,
    dataset: str,
    architecture: str,
    design: str,
    seeds: Any,
    search_space: SearchSpace | Mapping[str, Any] | None,
    conv_sn_modes: Sequence[str] | None,
    epochs: int,
) -> dict[str, Any]:
    """The settings :func:`run_study` keeps with a study (its Optuna user attrs), made from
    the arguments it would be given: what a resume of the study must keep
    (:func:`settings_change`). The batch runner checks them before any worker starts.

    Raises:
        ConfigError: a search space or seeds that run_study would refuse.
    """
    space = (
        search_space
        if isinstance(search_space, SearchSpace)
        else SearchSpace.from_dict(search_space or None)
    )
    space = _with_conv_sn_modes(space, conv_sn_modes, architecture)
    return _study_attrs(dataset, architecture, design, _check_seeds(seeds), space, epochs)


def settings_change(
    name: str, have: Mapping[str, Any], now: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The first setting study ``name`` was made with (``have``) that ``now`` changes, and
    the message refusing the resume; None when a resume keeps them (a study made before a
    setting was kept does not have it).

    Example:
        >>> settings_change("s", {"epochs": 2}, {"epochs": 3, "dataset": "digits"})[0]
        'epochs'
    """
    for k in _FIXED_ATTRS:
        if k in have and have[k] != now.get(k):
            return k, (
                f"study {name!r} was made with {_attr_change(k, have[k], now.get(k))}: its "
                "trials would not be comparable; use another study name"
            )
    return None


def _attr_change(key: str, was: Any, now: Any) -> str:
    """``key=was, not now``; for two mappings (the search space) only the entries that
    differ, as ``key.sub: was, not now`` (two whole search spaces are a page of text)."""
    if not (isinstance(was, Mapping) and isinstance(now, Mapping)):
        return f"{key}={was!r}, not {now!r}"
    parts = [
        _attr_change(f"{key}.{sub}", was.get(sub, "(none)"), now.get(sub, "(none)"))
        for sub in sorted(set(was) | set(now), key=str)
        if was.get(sub, _MISSING_ATTR) != now.get(sub, _MISSING_ATTR)
    ]
    return "; ".join(parts) or f"{key}={was!r}, not {now!r}"


_MISSING_ATTR = object()


def studies(lab: str | os.PathLike[str] | Lab | None = None) -> pd.DataFrame:
    """The Optuna studies in a lab's journal: name, trials, best value.

    Example:
        >>> studies("/tmp/empty-lab").empty  # doctest: +SKIP
        True
    """
    the_lab = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    if not the_lab.optuna_journal.exists():
        return pd.DataFrame(columns=["study", "n_trials", "best_value"])
    storage = JournalStorage(JournalFileBackend(str(the_lab.optuna_journal)))
    rows = []
    for s in optuna.get_all_study_summaries(storage):
        best = s.best_trial.value if s.best_trial is not None else None
        rows.append({"study": s.study_name, "n_trials": s.n_trials, "best_value": best})
    return pd.DataFrame(rows, columns=["study", "n_trials", "best_value"])


def dashboard_command(
    lab: str | os.PathLike[str] | Lab | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    storage: str | None = None,
) -> list[str]:
    """The ``optuna-dashboard`` command line for a lab's journal, or for ``storage``: an
    SQLAlchemy URL or an Optuna journal file (what :func:`make_storage` takes).

    Nothing is created: the dashboard shows a storage that is there. A storage that is not
    one (a trial store, which optuna-dashboard would add its tables to; a missing file) is
    refused before optuna-dashboard could make it or die in a traceback.

    Raises:
        StudyError: The lab has no Optuna journal yet (run a study first), or ``storage`` is
            no Optuna storage (the message names ``--storage``).

    Example:
        >>> dashboard_command("/tmp/lab")[-3:]  # doctest: +SKIP
        ['--storage-class', 'JournalFileStorage', '/tmp/lab/optuna.journal']
    """
    import shutil
    import sys

    exe = shutil.which("optuna-dashboard") or str(
        Path(sys.executable).with_name("optuna-dashboard")
    )
    base = [exe, "--host", host, "--port", str(port)]
    the_lab = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    if storage is not None:
        return [*base, *_dashboard_storage(storage, the_lab)]
    journal = the_lab.optuna_journal
    if not journal.exists():
        raise StudyError(f"no Optuna journal at {journal}: run a study first (thunderline-lab run)")
    return [*base, "--storage-class", "JournalFileStorage", str(journal)]


def _not_an_optuna_database(path: Path) -> str | None:
    """Why the SQLite file ``path`` (a trial store already ruled out) is no Optuna storage to
    show, or None: missing (a mistyped path?) or without Optuna's tables (another tool's)."""
    from thunderline_lab.tracking import _table_columns

    if not path.exists():
        return f"no database file {path} (a mistyped path?)"
    if "schema_version" not in _table_columns(path, "version_info"):
        return f"{path} holds no Optuna storage (none of Optuna's tables)"
    return None


_STORAGE_FORMS = (
    "an SQLAlchemy URL (postgresql+psycopg2://user@host/db, sqlite:///path/to.db) or an "
    "Optuna journal file"
)


def _dashboard_storage(storage: str, lab: Lab) -> list[str]:
    """optuna-dashboard's ``--storage-class`` and storage arguments for ``--storage``."""
    label = f"--storage {_redact(storage)}"
    if not storage.strip():
        raise StudyError(f"--storage is empty: give {_STORAGE_FORMS}")
    if "://" in storage:
        from thunderline_lab.tracking import _sqlite_database_path

        problem = _storage_url_problem(storage, lab)
        path = _sqlite_database_path(storage)
        if problem is None and path is not None:  # optuna-dashboard would make the file, tables
            problem = _not_an_optuna_database(path)
        if problem is not None:
            raise StudyError(f"{label}: {problem}; nothing was written")
        return ["--storage-class", "RDBStorage", storage]
    path = Path(storage).resolve()  # as make_storage takes it (a journal path, no URL)
    problem = _journal_problem(path, lab)
    if problem is not None:
        raise StudyError(f"{label}: {problem}; nothing was written")
    if not path.is_file():
        what = f"{path} is not a file" if path.exists() else f"no journal file {path}"
        raise StudyError(f"{label}: not a URL (no ://) and {what}; give {_STORAGE_FORMS}")
    return ["--storage-class", "JournalFileStorage", str(path)]

"""MLflow mirror of the lab: logging that never slows training, and two-way sync.

Each study is an MLflow experiment (named after the study) holding one parent run; each
trial is a nested run (``mlflow.parentRunId``) carrying

* params: every hyperparameter of the trial that applies to it, ``spectral_norm`` and
  ``spectral_norm_coeff`` included (MLflow's ``str`` form: ``True``, ``0.01``; dicts and lists
  as JSON). A setting that means nothing for the trial is left out rather than logged as
  ``None`` or as a default that was never used: the spectral-norm settings
  (``spectral_norm_coeff``, ``n_power_iterations``, ``conv_sn_mode``, ``sn_layers``) of a
  trial without SN, the convolution settings (``kernel_size``, ``pooling``,
  ``conv_sn_mode``) of an MLP;
* metrics: every ``ml.run.metric`` series point at its step, with the event's timestamp, and
  the trial's summary metrics (``ml.trial.complete`` / ``failed``) as ``final/<name>``
  (``final/test_accuracy``...) so they never mix into the per-epoch series;
* tags: ``trial_id``, ``model_run_id``, ``study``, ``constraint_method``
  (``spectral_norm`` | ``none``), ``trial_status`` and ``thunderline.*`` bookkeeping;
* artifacts: ``model/state_dict.pt``, ``sigma/sigma_table.csv`` (per-layer σ) and
  ``plots/learning_curve.png``.

Where MLflow lives: by default a SQLite backend inside the lab, no server needed::

    lab/mlflow.db          tracking backend        lab/mlartifacts/   artifacts
    mlflow ui --backend-store-uri sqlite:///lab/mlflow.db      # browse it

(``lab/mlflow.db.lock`` lets one process at a time open a SQLite backend, so that
processes logging at once to a new one do not all create its tables: :func:`_schema_lock`.)

``MLFLOW_TRACKING_URI=http://host:5000`` (or ``tracking_uri=``) switches to a tracking server.

Logging (:class:`MLflowLogger`) subscribes to ``ml.*`` on the bus. The bus handler only
appends the event to a deque (well under a microsecond); a background thread folds events
into per-trial state and talks to MLflow in batches (``log_batch``, at most 1000 metrics a
request, flushed every ``flush_interval`` seconds and at trial end). Every MLflow exception is
caught on that thread: a server outage puts the logger offline with exponential back-off and
marks the affected trials for reconciliation; training never waits and never fails. HTTP
servers are spoken to with a small REST client with short timeouts and *no* retries (MLflow's
own client retries a dead server for minutes); the retry policy is the outbox. Other backends
(the lab's SQLite) run MlflowClient in a child process: SQLAlchemy spends ~0.1 s of CPU per
1000 metrics, which in-process would be taken from the training thread through the GIL.

The parent run of a study carries the study's settings as params: ``study`` and the settings
``run_study`` refuses to change on a resume (``design``, ``dataset``, ``architecture``,
``epochs``, when every trial agrees). What grows as trials are added is in tags, which MLflow
lets us update (params are write-once): ``n_trials`` (trials of the study in the lab),
``seeds`` and ``search_space`` (per hyperparameter, ``[min, max]`` of the numbers the trials
used, else the values they used).

The outbox lives in the lab's trial store (``lab.db``), in three tables this module owns, all
per tracking URI (each MLflow a lab is mirrored to holds its own complete copy):

``mlflow_studies``    per study and URI: the experiment id and parent run id
``mlflow_outbox``     per URI and trial: ``state`` pending | synced, the MLflow run id, and
                      ``synced_events``, how many of the trial's events that MLflow reflects
``mlflow_artifacts``  per URI, trial and artifact file: the run it was uploaded to and the
                      file's sha256

Artifacts wait in ``lab/mlflow_outbox/<model_run_id>/<trial_id>/`` (the spool) until every
tracking URI the trial's study is mirrored to has them (a URI the study was ever logged or
synced to counts); then the spooled files are removed. A URI that starts mirroring the study
after that gets them from another URI's copy: a folder on this machine (a file store, the
lab's SQLite backend) is copied, a tracking server's is downloaded. Each upload is recorded,
so a re-sync sends no file twice (a file logged again with new content is sent again).
A URI that will never be synced again (a retired MLflow) would keep every new trial's
artifacts in the spool: :func:`forget_tracking_uri` (``mlflow-sync --forget URI``) drops its
rows from the three tables and frees the spooled files the remaining URIs hold.

URIs are compared in one spelling (a local path as an absolute ``file://`` URI, a server
without its trailing ``/``), so ``./mlruns`` and ``file:///abs/mlruns`` are one store and
``./mlruns`` run from two folders are two. The trial store's ``mlflow_run_id`` stays the
link to the first MLflow the trial reached; :func:`mlflow_links` gives any URI's runs.

A trial of a mirrored study (one mirrored to any URI) is pending for a URI when it has no
synced row for that URI, or when the store holds
more of its events than ``synced_events`` (events appended later, e.g. by another process).
:func:`sync` (``thunderline-lab mlflow-sync``) re-derives everything from the store, which has
every param, metric point and tag: it finds the trial's run by its ``trial_id`` tag (or creates
it), logs only the params and metric points MLflow does not have yet, and marks the trial
synced. Pushing twice, or after a partly applied batch, duplicates nothing. Metric points carry
the event's own timestamp, so even a batch replayed by a lost response is an exact duplicate
that MLflow's SQL store drops.

Pull: runs in the lab's experiments that the store does not know (a user's own
``mlflow.start_run``) are adopted as trials: ``ml.trial.*`` events (``ml.run.*`` when the run
does not say whether it used spectral normalization) with deterministic ids, so re-pulling
is idempotent. A run made outside the lab that carries the ``trial_id`` and ``model_run_id``
tags of a known trial is matched to it instead: its metric points missing from the store are
added, and its run id is linked.

Write-back of ``mlflow_run_id``: once a trial's run exists, the logger publishes an
``ml.run.start`` stating only ``mlflow_run_id`` (id ``mlflow:...``, deterministic; metadata
``{"mlflow_link": true}``). Of the lifecycle events it is the one whose payload makes no
claims beyond the link: ``spectral_norm`` is optional there (``ml.trial.start`` would have to
restate it, and the logger may not know it), and the store's fold takes only
``min(started_at)`` from it, so status and timestamps are untouched. ``ml.run.stop`` would
imply completion.

Example:
    >>> from thunderline_lab.bus import EventBus
    >>> from thunderline_lab.lab import Lab
    >>> bus = EventBus()
    >>> with MLflowLogger(bus, lab=Lab.resolve("/tmp/lab"), study="sn-ab") as mlf:  # doctest: +SKIP
    ...     run_study(..., bus=bus)
    ...     mlf.run_id_for("trial_0003")
    '5c0f...'
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import mimetypes
import os
import pickle
import posixpath
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from thunderline_lab import events
from thunderline_lab.errors import TrackingError

if TYPE_CHECKING:
    import pandas as pd

    from thunderline_lab.bus import EventBus, Subscription
    from thunderline_lab.lab import Lab
    from thunderline_lab.store import TrialStore

__all__ = [
    "FINAL_PREFIX",
    "LINK_ID_PREFIX",
    "ForgetReport",
    "MLflowLogger",
    "RunRecord",
    "SyncReport",
    "TrialSnapshot",
    "attach",
    "forget_tracking_uri",
    "mlflow_links",
    "mlflow_ui_command",
    "run_url",
    "sync",
]

log = logging.getLogger(__name__)

FINAL_PREFIX = "final/"
"""Summary metrics of a trial are logged as ``final/<name>`` (step 0)."""
LINK_ID_PREFIX = "mlflow:"
"""Ids of events this module makes (links, pulled runs); they are never pushed back."""
SOURCE = "thunderline_lab.tracking"

TAG_TRIAL_ID = "trial_id"
TAG_MODEL_RUN_ID = "model_run_id"
TAG_STUDY = "study"
TAG_CONSTRAINT = "constraint_method"
TAG_STATUS = "trial_status"
TAG_ROLE = "thunderline.role"
TAG_SOURCE = "thunderline.source"
TAG_LAB = "thunderline.lab"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
SOURCE_VALUE = "thunderline-lab"

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_STORE_TS = "%Y-%m-%dT%H:%M:%S.%fZ"
_MLFLOW_STATUS = {
    "completed": "FINISHED",
    "pruned": "FINISHED",
    "cancelled": "KILLED",
    "failed": "FAILED",
}
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "ENDPOINT_NOT_FOUND",
    }
)
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_EVENT_METRIC = re.compile(r"[A-Za-z0-9_\-. /]+")  # what an ml.run.metric name may be

_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS mlflow_studies (
    study TEXT NOT NULL,
    tracking_uri TEXT NOT NULL,
    experiment_id TEXT,
    parent_run_id TEXT,
    updated_at TEXT,
    PRIMARY KEY (study, tracking_uri)
);
CREATE TABLE IF NOT EXISTS mlflow_outbox (
    tracking_uri TEXT NOT NULL,
    model_run_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    study TEXT,
    state TEXT NOT NULL,
    mlflow_run_id TEXT,
    artifact_uri TEXT,
    synced_events INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at TEXT,
    PRIMARY KEY (tracking_uri, model_run_id, trial_id)
);
CREATE TABLE IF NOT EXISTS mlflow_artifacts (
    tracking_uri TEXT NOT NULL,
    model_run_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    mlflow_run_id TEXT NOT NULL,
    artifact_uri TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    PRIMARY KEY (tracking_uri, model_run_id, trial_id, path)
);
"""
_OUTBOX_COLUMNS = (
    "model_run_id, trial_id, study, state, mlflow_run_id, artifact_uri, synced_events, "
    "attempts, last_error, updated_at"
)
# Params that mean something only with spectral normalization, or only for a CNN.
_SN_ONLY_PARAMS = frozenset(
    {"spectral_norm_coeff", "n_power_iterations", "conv_sn_mode", "sn_layers"}
)
_CNN_ONLY_PARAMS = frozenset({"kernel_size", "pooling", "conv_sn_mode"})
# The study settings run_study refuses to change on a resume: the parent run's params.
_STUDY_PARAMS = ("design", "dataset", "architecture", "epochs")
# Per-trial bookkeeping of a study's design, not part of its search space.
_DESIGN_PARAMS = frozenset({"seed", "pair_id", "group_id", "arm", "retry_of"})
_SPOOL_META = "meta.json"  # a spool folder's trial (model_run_id, trial_id, study)
_PART = ".part"  # a spooled file still being written


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _ms(ts: datetime) -> int:
    """Epoch milliseconds of an aware datetime (exact integer arithmetic)."""
    return (ts - _EPOCH) // _MS


def _store_ts_ms(text: str | None) -> int | None:
    if not text:
        return None
    try:
        dt = datetime.strptime(text, _STORE_TS).replace(tzinfo=UTC)
    except ValueError:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
    return _ms(dt)


def _from_ms(ms: int | None) -> datetime:
    if ms is None:
        return events.utcnow()
    return _EPOCH + timedelta(milliseconds=int(ms))


def _now_text() -> str:
    return events.utcnow().strftime(_STORE_TS)


def _slug(text: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:80] or "x"
    if clean == text:
        return clean
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _uri_key(uri: str) -> str:
    """One spelling per MLflow, so the outbox keeps one copy per store.

    A local path (``./mlruns``) or ``file:`` URI becomes an absolute ``file://`` URI: the same
    store spelt two ways is one copy, and ``./mlruns`` run from two folders is two. A server
    loses its trailing ``/``; other URIs (``sqlite:///...``, ``databricks``) are kept as given.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return uri.rstrip("/")
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path)).expanduser().resolve().as_uri()
    if parsed.scheme == "" or (os.name == "nt" and len(parsed.scheme) == 1):  # C:\...
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _param_value(value: Any) -> str:
    """MLflow's string form of a parameter value (``str`` for scalars, JSON otherwise)."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_VALUE]


def _parse_param(text: str) -> Any:
    """Inverse of :func:`_param_value` for values read back from MLflow."""
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
        return value if math.isfinite(value) else text
    except ValueError:
        pass
    if text[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


def _valid_key(key: str) -> bool:
    norm = posixpath.normpath(key)
    return bool(key) and len(key) <= 250 and norm == key and not key.startswith(("/", ".."))


def _param_key(key: str) -> str | None:
    """A parameter/tag key MLflow accepts (bad characters become ``_``), or None."""
    clean = _BAD_KEY_CHARS.sub("_", str(key))[:250]
    if not _valid_key(clean):
        clean = clean.replace("/", "_").strip(".") or ""
    return clean if _valid_key(clean) else None


@functools.lru_cache(maxsize=4096)
def _metric_key_ok(key: str) -> bool:
    return _valid_key(key) and _BAD_KEY_CHARS.search(key) is None


def _applicable(params: Mapping[str, Any], spectral_norm: bool | None = None) -> dict[str, Any]:
    """The parameters that apply to a trial (see :meth:`TrialSnapshot.mlflow_params`)."""
    sn = params.get("spectral_norm") if spectral_norm is None else spectral_norm
    architecture = params.get("architecture")
    cnn = not isinstance(architecture, str) or architecture == "cnn"
    return {
        k: v
        for k, v in params.items()
        if not (k in _SN_ONLY_PARAMS and (v is None or sn is False))
        and not (k in _CNN_ONLY_PARAMS and (v is None or not cnn))
    }


def _sn_from(params: Mapping[str, Any], tags: Mapping[str, str]) -> bool | None:
    raw = params.get("spectral_norm")
    if isinstance(raw, bool):
        return raw
    method = tags.get(TAG_CONSTRAINT)
    if method == "spectral_norm":
        return True
    if method == "none":
        return False
    return None


def _pull_id(*parts: Any) -> str:
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"{LINK_ID_PREFIX}{digest}"


def _silence_mlflow_logging() -> None:
    # The SQLite backend's first use runs alembic migrations that log at INFO; keep a
    # user's explicit configuration, quieten only loggers nobody configured.
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Backends: one tiny interface over MLflow, REST (servers) or MlflowClient (SQLite, others)
# ---------------------------------------------------------------------------------------------


class _BackendError(Exception):
    """An MLflow call failed; ``transient`` says whether retrying later can help."""

    def __init__(self, message: str, *, transient: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code


@dataclass
class RunRecord:
    """What the lab needs to know of an MLflow run."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    artifact_uri: str
    run_name: str | None
    lifecycle_stage: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


Point = tuple[str, float, int, int]  # key, value, timestamp ms, step


class _Backend:
    """The handful of MLflow operations the mirror uses."""

    uri: str

    def get_experiment_by_name(self, name: str) -> tuple[str, dict[str, str]] | None:
        raise NotImplementedError

    def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None
    ) -> str:
        raise NotImplementedError

    def list_experiments(self) -> list[tuple[str, str, dict[str, str]]]:
        raise NotImplementedError

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str) -> list[RunRecord]:
        raise NotImplementedError

    def get_run(self, run_id: str) -> RunRecord | None:
        raise NotImplementedError

    def create_run(
        self, experiment_id: str, start_ms: int, tags: Mapping[str, str], run_name: str
    ) -> RunRecord:
        raise NotImplementedError

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        raise NotImplementedError

    def set_status(self, run_id: str, status: str, end_ms: int | None) -> None:
        raise NotImplementedError

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        raise NotImplementedError

    def log_artifact(self, run: RunRecord, local_file: Path, artifact_path: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""

    # -- shared -------------------------------------------------------------------------

    def wants_artifact_location(self) -> bool:
        return False


def _tags_list(tags: Mapping[str, str] | None) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in (tags or {}).items()]


def _kv(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {i["key"]: i.get("value") for i in items or ()}


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


class _RestBackend(_Backend):
    """MLflow's REST API over httpx: short timeouts, no retries (the outbox retries)."""

    def __init__(self, uri: str, *, timeout: float = 10.0) -> None:
        import httpx

        self.uri = uri.rstrip("/")
        headers = {"User-Agent": "thunderline-lab"}
        auth: Any = None
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user:
            auth = httpx.BasicAuth(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=self.uri,
            headers=headers,
            auth=auth,
            verify=not insecure,
            timeout=httpx.Timeout(timeout, connect=min(3.0, timeout)),
        )

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        endpoint: str,
        body: Mapping[str, Any] | None = None,
        *,
        api: str = "/api/2.0/mlflow/",
    ) -> dict[str, Any]:
        url = api + endpoint
        try:
            if method == "GET":
                resp = self._http.get(url, params=dict(body or {}))
            else:
                resp = self._http.post(url, json=dict(body or {}))
        except self._httpx.HTTPError as exc:
            raise _BackendError(
                f"{self.uri}: {endpoint}: {type(exc).__name__}: {exc}", transient=True
            ) from exc
        if resp.status_code == 200:
            try:
                js = resp.json() if resp.content else {}
            except ValueError:
                js = None
            if not isinstance(js, dict):  # e.g. a web page: the URI is not MLflow's API
                raise _BackendError(
                    f"{self.uri}: {endpoint}: the answer is not MLflow's (not a JSON object: "
                    f"{resp.text[:60]!r}); is {self.uri} an MLflow tracking server?",
                    transient=False,
                )
            return js
        try:
            err = resp.json()
            code, message = err.get("error_code"), err.get("message", resp.text)
        except ValueError:
            code, message = None, resp.text[:200]
        transient = resp.status_code >= 500 or resp.status_code == 429
        if code in _PERMANENT_CODES:
            transient = False
        raise _BackendError(
            f"{self.uri}: {endpoint}: HTTP {resp.status_code} {code}: {message}",
            transient=transient,
            code=code,
        )

    @staticmethod
    def _run(js: Mapping[str, Any]) -> RunRecord:
        info, data = js.get("info", {}), js.get("data", {})
        return RunRecord(
            run_id=info.get("run_id") or info["run_uuid"],
            experiment_id=str(info.get("experiment_id")),
            status=info.get("status", "RUNNING"),
            start_time=_int_or_none(info.get("start_time")),
            end_time=_int_or_none(info.get("end_time")),
            artifact_uri=info.get("artifact_uri", ""),
            run_name=info.get("run_name"),
            lifecycle_stage=info.get("lifecycle_stage", "active"),
            params={k: str(v) for k, v in _kv(data.get("params")).items()},
            tags={k: str(v) for k, v in _kv(data.get("tags")).items()},
            metrics={k: float(v) for k, v in _kv(data.get("metrics")).items()},
        )

    def get_experiment_by_name(self, name: str) -> tuple[str, dict[str, str]] | None:
        try:
            js = self._call("GET", "experiments/get-by-name", {"experiment_name": name})
        except _BackendError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        exp = js["experiment"]
        if exp.get("lifecycle_stage", "active") != "active":
            return None
        return str(exp["experiment_id"]), _kv(exp.get("tags"))

    def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None
    ) -> str:
        body: dict[str, Any] = {"name": name, "tags": _tags_list(tags)}
        if artifact_location:
            body["artifact_location"] = artifact_location
        return str(self._call("POST", "experiments/create", body)["experiment_id"])

    def list_experiments(self) -> list[tuple[str, str, dict[str, str]]]:
        out: list[tuple[str, str, dict[str, str]]] = []
        token = None
        while True:
            body: dict[str, Any] = {"max_results": 1000, "view_type": "ACTIVE_ONLY"}
            if token:
                body["page_token"] = token
            js = self._call("POST", "experiments/search", body)
            for exp in js.get("experiments", []):
                out.append((str(exp["experiment_id"]), exp["name"], _kv(exp.get("tags"))))
            token = js.get("next_page_token")
            if not token:
                return out

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str) -> list[RunRecord]:
        out: list[RunRecord] = []
        token = None
        while True:
            body: dict[str, Any] = {
                "experiment_ids": list(experiment_ids),
                "filter": filter_string,
                "max_results": 1000,
                "run_view_type": "ACTIVE_ONLY",
            }
            if token:
                body["page_token"] = token
            js = self._call("POST", "runs/search", body)
            out.extend(self._run(r) for r in js.get("runs", []))
            token = js.get("next_page_token")
            if not token:
                return out

    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            run = self._run(self._call("GET", "runs/get", {"run_id": run_id})["run"])
        except _BackendError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run if run.lifecycle_stage == "active" else None

    def create_run(
        self, experiment_id: str, start_ms: int, tags: Mapping[str, str], run_name: str
    ) -> RunRecord:
        js = self._call(
            "POST",
            "runs/create",
            {
                "experiment_id": experiment_id,
                "start_time": start_ms,
                "run_name": run_name,
                "tags": _tags_list(tags),
            },
        )
        return self._run(js["run"])

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self._call(
            "POST",
            "runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [
                    {"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in metrics
                ],
                "params": _tags_list(params),
                "tags": _tags_list(tags),
            },
        )

    def set_status(self, run_id: str, status: str, end_ms: int | None) -> None:
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if end_ms is not None:
            body["end_time"] = end_ms
        self._call("POST", "runs/update", body)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        out: list[tuple[int, float, int]] = []
        token = None
        while True:
            body: dict[str, Any] = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                body["page_token"] = token
            js = self._call("GET", "metrics/get-history", body)
            for m in js.get("metrics", []):
                out.append((int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0))))
            token = js.get("next_page_token")
            if not token:
                return out

    def _proxied(self, artifact_uri: str, path: str) -> str:
        """The address of an ``mlflow-artifacts:`` artifact on this server."""
        parsed = urlparse(artifact_uri)
        base = self.uri
        if parsed.netloc:
            base = f"{urlparse(self.uri).scheme}://{parsed.netloc}"
        return f"{base}/api/2.0/mlflow-artifacts/artifacts/" + posixpath.join(
            parsed.path.lstrip("/"), path
        )

    def download_artifact(self, artifact_uri: str, path: str, dest: Path) -> None:
        """Save ``path`` of a run whose artifacts this server proxies (``mlflow-artifacts:``)."""
        url = self._proxied(artifact_uri, path)
        try:
            resp = self._http.get(url)
        except self._httpx.HTTPError as exc:
            raise _BackendError(f"artifact download {url}: {exc}", transient=True) from exc
        if resp.status_code != 200:
            raise _BackendError(
                f"artifact download {url}: HTTP {resp.status_code}",
                transient=resp.status_code >= 500,
            )
        try:
            dest.write_bytes(resp.content)
        except OSError as exc:
            raise _BackendError(f"artifact download to {dest}: {exc}", transient=True) from exc

    def log_artifact(self, run: RunRecord, local_file: Path, artifact_path: str) -> None:
        uri = run.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme == "mlflow-artifacts":
            url = self._proxied(uri, posixpath.join(artifact_path, local_file.name))
            mime = mimetypes.guess_type(local_file.name)[0] or "application/octet-stream"
            try:
                with open(local_file, "rb") as fh:
                    resp = self._http.put(url, content=fh.read(), headers={"Content-Type": mime})
            except (OSError, self._httpx.HTTPError) as exc:
                raise _BackendError(f"artifact upload {url}: {exc}", transient=True) from exc
            if resp.status_code != 200:
                raise _BackendError(
                    f"artifact upload {url}: HTTP {resp.status_code}",
                    transient=resp.status_code >= 500,
                )
        elif parsed.scheme in ("", "file"):
            root = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
            target = root / artifact_path
            try:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local_file, target / local_file.name)
            except OSError as exc:
                raise _BackendError(f"artifact copy to {target}: {exc}", transient=True) from exc
        else:  # s3://, gs://, ...: MLflow's artifact repositories know them
            try:
                from mlflow.store.artifact.artifact_repository_registry import (
                    get_artifact_repository,
                )

                get_artifact_repository(uri).log_artifact(str(local_file), artifact_path)
            except Exception as exc:
                raise _BackendError(f"artifact upload to {uri}: {exc}", transient=True) from exc


# How long a process waits for another to finish creating an MLflow database's tables.
_SCHEMA_LOCK_TIMEOUT_S = 300.0


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Hold ``<database>.lock``, beside a ``sqlite`` URI's database, while MLflow opens it.

    MLflow's SQL store creates its tables on first use after checking, without a lock,
    whether they exist: processes opening a new database at once (the workers of
    ``run --workers 2``, each logging its trials) all run the migrations, and all but one
    fail half-way ("duplicate column name: step", "table trace_info already exists"),
    leaving their trials to the outbox. Under this lock one process makes the tables and
    the next finds them made. Other URIs (servers, file stores, other databases): no lock.

    Raises:
        _BackendError: (transient) another process held the lock for
            ``_SCHEMA_LOCK_TIMEOUT_S`` seconds.
    """
    path = _sqlite_database_path(uri)
    lock = None
    if path is not None and os.name == "posix" and path.parent.is_dir():
        with contextlib.suppress(OSError):  # a read-only folder: MLflow cannot make tables
            lock = open(f"{path}.lock", "a")  # noqa: SIM115 (closed below, releasing it)
    if lock is None:
        yield
        return
    import fcntl

    with lock:
        deadline = time.monotonic() + _SCHEMA_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _BackendError(
                        f"{uri}: {path}.lock: another process has been creating MLflow's "
                        f"tables for {_SCHEMA_LOCK_TIMEOUT_S:.0f}s",
                        transient=True,
                    ) from None
                time.sleep(0.05)
        yield  # (closing the file releases the lock)


class _ClientBackend(_Backend):
    """MlflowClient for non-HTTP URIs (the lab's SQLite backend, databases, file stores)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        _silence_mlflow_logging()
        # MlflowClient opens its store (a new database: creates its tables) at once
        with _schema_lock(uri):
            try:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=uri)
            except Exception as exc:
                raise _BackendError(f"{uri}: {exc}", transient=True) from exc

    def wants_artifact_location(self) -> bool:
        return True

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            code = getattr(exc, "error_code", None)
            raise _BackendError(
                f"{self.uri}: {what}: {exc}", transient=code not in _PERMANENT_CODES, code=code
            ) from exc

    @staticmethod
    def _run(run: Any) -> RunRecord:
        info, data = run.info, run.data
        return RunRecord(
            run_id=info.run_id,
            experiment_id=str(info.experiment_id),
            status=str(info.status),
            start_time=info.start_time,
            end_time=info.end_time,
            artifact_uri=info.artifact_uri or "",
            run_name=info.run_name,
            lifecycle_stage=info.lifecycle_stage,
            params=dict(data.params),
            tags=dict(data.tags),
            metrics={k: float(v) for k, v in data.metrics.items()},
        )

    def get_experiment_by_name(self, name: str) -> tuple[str, dict[str, str]] | None:
        exp = self._guard("get experiment", lambda: self._client.get_experiment_by_name(name))
        if exp is None or exp.lifecycle_stage != "active":
            return None
        return str(exp.experiment_id), dict(exp.tags)

    def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None
    ) -> str:
        return str(
            self._guard(
                "create experiment",
                lambda: self._client.create_experiment(
                    name, artifact_location=artifact_location, tags=dict(tags)
                ),
            )
        )

    def list_experiments(self) -> list[tuple[str, str, dict[str, str]]]:
        out: list[tuple[str, str, dict[str, str]]] = []
        token = None
        while True:
            page = self._guard(
                "search experiments",
                functools.partial(
                    self._client.search_experiments, max_results=1000, page_token=token
                ),
            )
            out.extend((str(e.experiment_id), e.name, dict(e.tags)) for e in page)
            token = page.token
            if not token:
                return out

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str) -> list[RunRecord]:
        out: list[RunRecord] = []
        token = None
        while True:
            page = self._guard(
                "search runs",
                functools.partial(
                    self._client.search_runs,
                    list(experiment_ids),
                    filter_string,
                    max_results=1000,
                    page_token=token,
                ),
            )
            out.extend(self._run(r) for r in page)
            token = page.token
            if not token:
                return out

    def get_run(self, run_id: str) -> RunRecord | None:
        try:
            run = self._guard("get run", lambda: self._client.get_run(run_id))
        except _BackendError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        rec = self._run(run)
        return rec if rec.lifecycle_stage == "active" else None

    def create_run(
        self, experiment_id: str, start_ms: int, tags: Mapping[str, str], run_name: str
    ) -> RunRecord:
        return self._run(
            self._guard(
                "create run",
                lambda: self._client.create_run(
                    experiment_id, start_time=start_ms, tags=dict(tags), run_name=run_name
                ),
            )
        )

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._guard(
            "log batch",
            lambda: self._client.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, s) for k, v, ts, s in metrics],
                params=[Param(k, v) for k, v in (params or {}).items()],
                tags=[RunTag(k, v) for k, v in (tags or {}).items()],
                synchronous=True,
            ),
        )

    def set_status(self, run_id: str, status: str, end_ms: int | None) -> None:
        self._guard(
            "update run", lambda: self._client.set_terminated(run_id, status, end_time=end_ms)
        )

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        hist = self._guard("metric history", lambda: self._client.get_metric_history(run_id, key))
        return [(int(m.step), float(m.value), int(m.timestamp)) for m in hist]

    def log_artifact(self, run: RunRecord, local_file: Path, artifact_path: str) -> None:
        self._guard(
            "log artifact",
            lambda: self._client.log_artifact(run.run_id, str(local_file), artifact_path),
        )


class _ProcessBackend(_Backend):
    """MlflowClient in a child process, so its Python work never holds this process's GIL.

    The SQLite backend spends ~0.1 s of CPU in SQLAlchemy per 1000 metrics; in the training
    process that time is taken from the training thread. The child is a plain
    ``python -c`` (no re-import of the caller's ``__main__``), speaking length-prefixed
    pickles over its stdin/stdout; it exits when its stdin closes. A call that times out or
    a dead child is a transient error; the next call starts a new child.
    """

    def __init__(self, uri: str, *, timeout: float = 120.0, first_timeout: float = 600.0) -> None:
        self.uri = uri
        self.timeout = timeout
        self.first_timeout = first_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._fresh = True

    def wants_artifact_location(self) -> bool:
        return True

    def _start(self) -> subprocess.Popen[bytes]:
        code = "from thunderline_lab.tracking import _io_worker_main; _io_worker_main()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, self.uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._fresh = True
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)

    def _call(self, name: str, *args: Any) -> Any:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        if proc is None:
            self._kill()
            proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        timeout = self.first_timeout if self._fresh else self.timeout
        try:
            data = pickle.dumps((name, args))
            proc.stdin.write(len(data).to_bytes(8, "big") + data)
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no answer in {timeout:.0f}s")
            head = proc.stdout.read(8)
            if len(head) < 8:
                raise EOFError("the MLflow worker process exited")
            reply = pickle.loads(proc.stdout.read(int.from_bytes(head, "big")))
        except (OSError, EOFError, TimeoutError, pickle.UnpicklingError) as exc:
            self._kill()
            raise _BackendError(f"{self.uri}: {name}: {exc}", transient=True) from exc
        self._fresh = False
        if reply[0] == "ok":
            return reply[1]
        raise _BackendError(reply[1], transient=reply[2], code=reply[3])

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def get_experiment_by_name(self, name: str) -> tuple[str, dict[str, str]] | None:
        return self._call("get_experiment_by_name", name)

    def create_experiment(
        self, name: str, tags: Mapping[str, str], artifact_location: str | None
    ) -> str:
        return str(self._call("create_experiment", name, dict(tags), artifact_location))

    def list_experiments(self) -> list[tuple[str, str, dict[str, str]]]:
        return self._call("list_experiments")

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str) -> list[RunRecord]:
        return self._call("search_runs", list(experiment_ids), filter_string)

    def get_run(self, run_id: str) -> RunRecord | None:
        return self._call("get_run", run_id)

    def create_run(
        self, experiment_id: str, start_ms: int, tags: Mapping[str, str], run_name: str
    ) -> RunRecord:
        return self._call("create_run", experiment_id, start_ms, dict(tags), run_name)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self._call("log_batch", run_id, list(metrics), dict(params or {}), dict(tags or {}))

    def set_status(self, run_id: str, status: str, end_ms: int | None) -> None:
        self._call("set_status", run_id, status, end_ms)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        return self._call("metric_history", run_id, key)

    def log_artifact(self, run: RunRecord, local_file: Path, artifact_path: str) -> None:
        self._call("log_artifact", run, local_file, artifact_path)


def _io_worker_main() -> None:
    """The MLflow worker process of :class:`_ProcessBackend` (reads calls from stdin)."""
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = sys.argv[-1]
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the protocol
    backend: _ClientBackend | None = None
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        name, args = pickle.loads(inp.read(int.from_bytes(head, "big")))
        try:
            if backend is None:
                backend = _ClientBackend(uri)
            reply: tuple[Any, ...] = ("ok", getattr(backend, name)(*args))
        except _BackendError as exc:
            reply = ("err", str(exc), exc.transient, exc.code)
        except Exception as exc:
            reply = ("err", f"{uri}: {name}: {type(exc).__name__}: {exc}", True, None)
        data = pickle.dumps(reply)
        out.write(len(data).to_bytes(8, "big") + data)
        out.flush()


def _missing_database_folder(uri: str) -> Path | None:
    """The folder a ``sqlite:///`` URI's database would be in, when there is no such folder
    (MLflow would make it, and a new empty database, for a mistyped path); else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    folder = Path(path).expanduser().parent
    return None if folder.is_dir() else folder


# A SQLite file whose ``events`` table has these columns (store.py's event log) is a lab's
# trial store, whatever its name: MLflow or Optuna, given it, would add their tables to it.
# These helpers are here rather than in the store because MLflow URIs (here) and Optuna
# storage URLs (study.py) both need them.
_TRIAL_STORE_EVENT_COLUMNS = frozenset(
    {"seq", "id", "name", "timestamp", "model_run_id", "trial_id", "body"}
)
_SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_database_path(url: str) -> Path | None:
    """The database file (absolute) of an SQLAlchemy ``sqlite`` URL (``sqlite:///rel.db``,
    ``sqlite:////abs.db``, ``sqlite+pysqlite:///...``), as SQLite would open it; None for
    other URLs, in-memory databases and URLs SQLAlchemy cannot parse (left to the tool)."""
    if not re.match(r"sqlite(\+\w+)?://", url):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None  # file: URIs (uri=true) name their file their own way: left to SQLite
    return Path(os.path.abspath(database))


def _is_sqlite_file(path: Path) -> bool:
    """Whether ``path`` starts with SQLite's header (False for an empty file: SQLite would
    take it as a new database)."""
    try:
        with path.open("rb") as f:
            return f.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
    except OSError:
        return False


def _table_columns(path: Path, table: str) -> set[str]:
    """The columns of ``table`` in the SQLite file ``path`` (empty: no such table, or not
    SQLite), read without writing anything: ``immutable`` opens no -wal/-shm files
    (``mode=ro`` would create them for a WAL database, and leave them); when a -wal file is
    there (a writer has the database open) ``mode=ro`` reads it too, creating nothing new."""
    if not _is_sqlite_file(path):
        return set()
    wal = Path(f"{path}-wal").exists()
    try:
        uri = f"{path.absolute().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
        conn = sqlite3.connect(uri, uri=True)
        try:
            return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()


def _is_trial_store(path: Path) -> bool:
    """Whether the SQLite file ``path`` holds a trial store's event log."""
    return _table_columns(path, "events") >= _TRIAL_STORE_EVENT_COLUMNS


def _trial_store_problem(path: Path, *, lab: Lab | None, role: str) -> str | None:
    """Why ``path`` must not be opened as ``role`` (e.g. "an Optuna storage") because it is a
    trial store: ``lab``'s own (in any spelling: relative, through a symlink) or any other
    lab's. None if it is not one."""
    real = path.resolve()
    if lab is not None and real == lab.db_path.resolve():
        return f"that is the lab's trial store ({lab.db_path.name}), not {role}"
    if _is_trial_store(real):
        return f"that is a thunderline-lab trial store (its events table), not {role}"
    return None


def _sqlite_database_problem(path: Path, *, lab: Lab | None = None, role: str) -> str | None:
    """Why the SQLite database ``path`` must not be opened as ``role``, or None: a trial store
    (see :func:`_trial_store_problem`), a folder or a file that is not SQLite (the tool would
    fail only after minutes of retries, or in a traceback). A missing file is no problem here.
    """
    problem = _trial_store_problem(path, lab=lab, role=role)
    if problem is not None:
        return problem
    real = path.resolve()
    if real.is_dir():
        return f"{real} is a folder, not a database file"
    if real.is_file() and real.stat().st_size and not _is_sqlite_file(real):
        return f"{real} is not an SQLite database"
    return None


def _open_backend(uri: str, *, isolate: bool = False) -> _Backend:
    """REST for servers; MlflowClient otherwise (in a child process when ``isolate``)."""
    path = _sqlite_database_path(uri)
    problem = path and _sqlite_database_problem(path, role="an MLflow database")
    if problem:  # a safety net for the logger: sync refuses these before opening anything
        raise _BackendError(f"{uri}: {problem}", transient=False)
    if uri.startswith(("http://", "https://")):
        return _RestBackend(uri)
    if isolate and os.name == "posix":
        return _ProcessBackend(uri)
    return _ClientBackend(uri)


# ---------------------------------------------------------------------------------------------
# The outbox (two tables in the lab's trial store database)
# ---------------------------------------------------------------------------------------------


class _Outbox:
    """Sync bookkeeping in the trial store's SQLite file, on a connection of its own.

    A file store gets a private connection (so this thread never joins the store's own
    transactions); an in-memory store shares ``store.conn`` under the store's lock. The trial
    rows written and read are those of ``tracking_uri`` (a :func:`_uri_key`).
    """

    def __init__(
        self,
        path: str | Path | None,
        store: TrialStore | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        self.uri = tracking_uri
        self._lock: Any
        if store is not None and store.path == ":memory:":
            self.conn = store.conn
            self._lock = getattr(store, "_lock", threading.RLock())
            self._own = False
        else:
            db = str(store.path if store is not None else path)
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                db, timeout=120.0, isolation_level=None, check_same_thread=False
            )
            self.conn.execute("PRAGMA busy_timeout = 120000")
            if db != ":memory:":
                self.conn.execute("PRAGMA journal_mode = WAL")  # as the TrialStore keeps it
            self._lock = threading.RLock()
            self._own = True
        self._write(self._create)

    def _create(self) -> None:
        """Create the tables; migrate those of a lab made before they were per tracking URI."""
        outbox_cols = [r[1] for r in self.conn.execute("PRAGMA table_info(mlflow_outbox)")]
        study_keys = [r[1] for r in self.conn.execute("PRAGMA table_info(mlflow_studies)") if r[5]]
        old_studies = study_keys == ["study"]
        if old_studies:
            self.conn.execute("ALTER TABLE mlflow_studies RENAME TO mlflow_studies_v1")
        if outbox_cols and "tracking_uri" not in outbox_cols:
            self.conn.execute("ALTER TABLE mlflow_outbox RENAME TO mlflow_outbox_v1")
        for statement in _OUTBOX_SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)
        if old_studies:
            self.conn.execute(
                "INSERT INTO mlflow_studies (study, tracking_uri, experiment_id, parent_run_id, "
                "updated_at) SELECT study, tracking_uri, experiment_id, parent_run_id, "
                "updated_at FROM mlflow_studies_v1"
            )
            self.conn.execute("DROP TABLE mlflow_studies_v1")
            # The URIs as the user spelt them, in this process's spelling (a relative path is
            # taken from here: a wrong guess only costs one reconciling sync, never a copy).
            for (uri,) in list(
                self.conn.execute("SELECT DISTINCT tracking_uri FROM mlflow_studies")
            ):
                self.conn.execute(
                    "UPDATE mlflow_studies SET tracking_uri = ? WHERE tracking_uri = ?",
                    (_uri_key(uri), uri),
                )
        if outbox_cols and "tracking_uri" not in outbox_cols:
            # A trial's row belongs to the URI its study was mirrored to. Rows of no mirrored
            # study (runs adopted from an experiment the lab does not mirror) are dropped: the
            # URI they were pulled from is not known, and they hold nothing the store lacks
            # (the run id is in the adopted trial's events). The next pull of that experiment
            # records them again (:func:`_pull_run`).
            self.conn.execute(
                f"INSERT INTO mlflow_outbox (tracking_uri, {_OUTBOX_COLUMNS}) "
                "SELECT COALESCE("
                "(SELECT s.tracking_uri FROM mlflow_studies s WHERE s.study = o.study), "
                "(SELECT s.tracking_uri FROM mlflow_studies s WHERE s.study = o.model_run_id)"
                ") AS uri, "
                f"{', '.join('o.' + c.strip() for c in _OUTBOX_COLUMNS.split(','))} "
                "FROM mlflow_outbox_v1 o WHERE uri IS NOT NULL"
            )
            self.conn.execute("DROP TABLE mlflow_outbox_v1")

    def _key_uri(self) -> str:
        if self.uri is None:
            raise TrackingError("the MLflow outbox was opened without a tracking URI")
        return self.uri

    def close(self) -> None:
        if self._own:
            with self._lock:
                self.conn.close()

    def _write(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            deadline = time.monotonic() + 120.0
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if time.monotonic() > deadline or "locked" not in str(exc):
                        raise
                    time.sleep(0.05)
            try:
                out = fn()
                self.conn.execute("COMMIT")
                return out
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self.conn.execute(sql, params))

    # -- studies --------------------------------------------------------------------------

    def mark_study(
        self,
        study: str,
        tracking_uri: str,
        experiment_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self._write(
            lambda: self.conn.execute(
                "INSERT INTO mlflow_studies (study, tracking_uri, experiment_id, parent_run_id, "
                "updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (study, tracking_uri) DO UPDATE SET "
                "experiment_id = COALESCE(excluded.experiment_id, mlflow_studies.experiment_id), "
                "parent_run_id = COALESCE(excluded.parent_run_id, mlflow_studies.parent_run_id), "
                "updated_at = excluded.updated_at",
                (study, tracking_uri, experiment_id, parent_run_id, _now_text()),
            )
        )

    def studies(self, uri: str | None = None) -> dict[str, tuple[str, str | None, str | None]]:
        """Per study: URI, experiment id, parent run id; those of ``uri``, else of the URI
        each study was last mirrored to (any URI: the study is mirrored)."""
        rows = self.query(
            "SELECT study, tracking_uri, experiment_id, parent_run_id FROM mlflow_studies "
            "WHERE ? IS NULL OR tracking_uri = ? ORDER BY updated_at, tracking_uri",
            (uri, uri),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # -- trials ---------------------------------------------------------------------------

    def mark_pending(
        self,
        key: tuple[str, str],
        study: str | None,
        *,
        run_id: str | None = None,
        artifact_uri: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record that the trial is not fully in MLflow (keeps a synced row synced when only
        its run id is being noted)."""
        state = "pending" if run_id is None or error else None
        uri = self._key_uri()
        self._write(
            lambda: self.conn.execute(
                "INSERT INTO mlflow_outbox (tracking_uri, model_run_id, trial_id, study, state, "
                "mlflow_run_id, artifact_uri, attempts, last_error, updated_at) "
                "VALUES (?, ?, ?, ?, COALESCE(?, 'pending'), ?, ?, ?, ?, ?) "
                "ON CONFLICT (tracking_uri, model_run_id, trial_id) DO UPDATE SET "
                "state = COALESCE(?, mlflow_outbox.state), "
                "study = COALESCE(excluded.study, mlflow_outbox.study), "
                "mlflow_run_id = COALESCE(excluded.mlflow_run_id, mlflow_outbox.mlflow_run_id), "
                "artifact_uri = COALESCE(excluded.artifact_uri, mlflow_outbox.artifact_uri), "
                "attempts = mlflow_outbox.attempts + excluded.attempts, "
                "last_error = COALESCE(excluded.last_error, mlflow_outbox.last_error), "
                "updated_at = excluded.updated_at",
                (
                    uri,
                    *key,
                    study,
                    state,
                    run_id,
                    artifact_uri,
                    1 if error else 0,
                    error,
                    _now_text(),
                    state,
                ),
            )
        )

    def mark_synced(
        self, key: tuple[str, str], study: str | None, run_id: str, n_events: int
    ) -> None:
        uri = self._key_uri()
        self._write(
            lambda: self.conn.execute(
                "INSERT INTO mlflow_outbox (tracking_uri, model_run_id, trial_id, study, state, "
                "mlflow_run_id, synced_events, last_error, updated_at) "
                "VALUES (?, ?, ?, ?, 'synced', ?, ?, NULL, ?) "
                "ON CONFLICT (tracking_uri, model_run_id, trial_id) DO UPDATE SET "
                "state = 'synced', "
                "study = COALESCE(excluded.study, mlflow_outbox.study), "
                "mlflow_run_id = excluded.mlflow_run_id, "
                "synced_events = MAX(mlflow_outbox.synced_events, excluded.synced_events), "
                "last_error = NULL, updated_at = excluded.updated_at",
                (uri, *key, study, run_id, n_events, _now_text()),
            )
        )

    def outbox(
        self, uri: str | None = None
    ) -> dict[tuple[str, str], tuple[str, str | None, int, str | None, str | None]]:
        """Per trial of ``uri`` (default: this outbox's): state, run id, synced_events,
        last_error, artifact_uri."""
        rows = self.query(
            "SELECT model_run_id, trial_id, state, mlflow_run_id, synced_events, last_error, "
            "artifact_uri FROM mlflow_outbox WHERE tracking_uri = ?",
            (uri or self._key_uri(),),
        )
        return {(r[0], r[1]): (r[2], r[3], int(r[4]), r[5], r[6]) for r in rows}

    # -- reads of the store's tables ------------------------------------------------------

    def event_counts(self) -> dict[tuple[str, str], int]:
        """Events per trial that MLflow should reflect (not ones this module made)."""
        rows = self.query(
            "SELECT model_run_id, trial_id, COUNT(*) FROM events "
            "WHERE name LIKE 'ml.%' AND model_run_id IS NOT NULL AND trial_id IS NOT NULL "
            "AND substr(id, 1, ?) != ? GROUP BY model_run_id, trial_id",
            (len(LINK_ID_PREFIX), LINK_ID_PREFIX),
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def metric_points(self, key: tuple[str, str]) -> list[tuple[str, int, float, str]]:
        return self.query(
            "SELECT name, step, value, timestamp FROM metrics "
            "WHERE model_run_id = ? AND trial_id = ? ORDER BY name, step",
            key,
        )

    # -- artifacts ------------------------------------------------------------------------

    def mirror_uris(self, studies: Iterable[str | None]) -> set[str]:
        """Every tracking URI any of ``studies`` is mirrored to."""
        names = sorted({s for s in studies if s})
        if not names:
            return set()
        rows = self.query(
            "SELECT DISTINCT tracking_uri FROM mlflow_studies "
            f"WHERE study IN ({', '.join('?' * len(names))})",
            names,
        )
        return {r[0] for r in rows}

    def artifact_copies(
        self, key: tuple[str, str] | None = None
    ) -> dict[tuple[str, str], dict[str, dict[str, _ArtifactCopy]]]:
        """Per trial (``key``'s, else every one), per tracking URI, per artifact path: the
        copy that URI's run of the trial was given."""
        rows = self.query(
            "SELECT model_run_id, trial_id, tracking_uri, path, digest, mlflow_run_id, "
            "artifact_uri, uploaded_at FROM mlflow_artifacts "
            "WHERE ? IS NULL OR (model_run_id = ? AND trial_id = ?)",
            (None, None, None) if key is None else (key[0], *key),
        )
        out: dict[tuple[str, str], dict[str, dict[str, _ArtifactCopy]]] = {}
        for mr, tid, uri, path, *copy in rows:
            out.setdefault((mr, tid), {}).setdefault(uri, {})[path] = _ArtifactCopy(*copy)
        return out

    def mark_artifact(self, key: tuple[str, str], path: str, digest: str, run: RunRecord) -> None:
        """Record that this URI's run of the trial holds ``path`` with content ``digest``."""
        uri = self._key_uri()
        self._write(
            lambda: self.conn.execute(
                "INSERT OR REPLACE INTO mlflow_artifacts (tracking_uri, model_run_id, trial_id, "
                "path, digest, mlflow_run_id, artifact_uri, uploaded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uri, *key, path, digest, run.run_id, run.artifact_uri, _now_text()),
            )
        )


# ---------------------------------------------------------------------------------------------
# What a trial should look like in MLflow, and pushing it there idempotently
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialSnapshot:
    """Everything MLflow should hold for one trial (built from events or from the store)."""

    model_run_id: str
    trial_id: str
    study: str | None = None
    spectral_norm: bool | None = None
    spectral_norm_coeff: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    error_type: str | None = None
    error_message: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, dict[int, tuple[float, int]]] = field(default_factory=dict)
    started_ms: int | None = None
    ended_ms: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_run_id, self.trial_id)

    def mlflow_params(self) -> dict[str, str]:
        """The run's params: the trial's hyperparameters that apply to it, spectral_norm and
        its coeff included.

        A trial's parameters hold every field of its model config and the study's
        conditional parameters, applicable or not (``spectral_norm_coeff=None`` or a default
        coefficient in the SN-off arm, ``kernel_size`` in an MLP). Logged, they would read as
        settings the trial used, and MLflow params can never be corrected; so the SN settings
        of a trial without SN, the CNN settings of another architecture, and a conditional
        parameter stated as None are left out.
        """
        merged: dict[str, Any] = dict(self.parameters)
        if self.spectral_norm is not None:  # the trial's own flag, as its tags state it
            merged.setdefault("spectral_norm", self.spectral_norm)
        if "spectral_norm_coeff" not in merged and self.spectral_norm_coeff is not None:
            merged["spectral_norm_coeff"] = self.spectral_norm_coeff
        out: dict[str, str] = {}
        for k, v in _applicable(merged, self.spectral_norm).items():
            key = _param_key(k)
            if key is not None:
                out[key] = _param_value(v)
        return out

    def mlflow_tags(self, ctx: _Context | None) -> dict[str, str]:
        """The run's tags: the cross-references to the lab plus the trial's status."""
        tags = {
            TAG_TRIAL_ID: self.trial_id,
            TAG_MODEL_RUN_ID: self.model_run_id,
            TAG_RUN_NAME: self.trial_id,
            TAG_ROLE: "trial",
            TAG_SOURCE: SOURCE_VALUE,
            TAG_STATUS: self.status,
        }
        if self.study:
            tags[TAG_STUDY] = self.study
        if self.spectral_norm is not None:
            tags[TAG_CONSTRAINT] = "spectral_norm" if self.spectral_norm else "none"
        if ctx is not None:
            tags[TAG_PARENT] = ctx.parent_run_id
            tags[TAG_LAB] = ctx.lab_tag
        if self.error_type:
            tags["error_type"] = self.error_type
        if self.error_message:
            tags["error_message"] = self.error_message[:MAX_TAG_VALUE]
        return {k: v[:MAX_TAG_VALUE] for k, v in tags.items()}

    def all_points(self) -> list[Point]:
        return [
            (k, v, ts, step)
            for k, steps in self.series.items()
            if _metric_key_ok(k)
            for step, (v, ts) in sorted(steps.items())
        ]

    def summary_points(self, skip: Mapping[str, float]) -> list[Point]:
        ts = self.ended_ms or self.started_ms or _ms(events.utcnow())
        return [
            (FINAL_PREFIX + k, float(v), ts, 0)
            for k, v in sorted(self.metrics.items())
            if _metric_key_ok(FINAL_PREFIX + k)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and skip.get(k) != float(v)
        ]


@dataclass
class _Context:
    """Where a study lives in MLflow."""

    study: str
    experiment_id: str
    parent_run_id: str
    lab_tag: str


@dataclass
class _RunSync:
    """A trial's mirror state: what MLflow should have, and what it is known to have."""

    snap: TrialSnapshot
    run: RunRecord | None = None
    logged_params: dict[str, str] = field(default_factory=dict)
    logged_tags: dict[str, str] = field(default_factory=dict)
    logged_summary: dict[str, float] = field(default_factory=dict)
    logged_status: str | None = None
    pending: list[Point] = field(default_factory=list)
    reconcile: bool = False
    conflicts: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    trial_status: str | None = None
    run_status: str | None = None
    broken: str | None = None
    artifacts_dir: Path | None = None
    synced_mark: int = -1
    linked: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None


@dataclass
class _PushStats:
    created: bool = False
    points: int = 0
    params: int = 0
    conflicts: list[str] = field(default_factory=list)


def _trial_filter(snap: TrialSnapshot) -> str:
    clauses = []
    for tag, value in ((TAG_TRIAL_ID, snap.trial_id), (TAG_MODEL_RUN_ID, snap.model_run_id)):
        if "'" not in value and "\\" not in value:
            clauses.append(f"tags.`{tag}` = '{value}'")
    return " and ".join(clauses)


def _find_run(backend: _Backend, ctx: _Context, snap: TrialSnapshot) -> RunRecord | None:
    runs = [
        r
        for r in backend.search_runs([ctx.experiment_id], _trial_filter(snap))
        if r.tags.get(TAG_TRIAL_ID) == snap.trial_id
        and r.tags.get(TAG_MODEL_RUN_ID) == snap.model_run_id
        and r.tags.get(TAG_ROLE) != "study"
    ]
    if not runs:
        return None
    return min(runs, key=lambda r: (r.start_time or 0, r.run_id))


def _reconcile(
    backend: _Backend, ctx: _Context, rs: _RunSync, stats: _PushStats, *, search: bool
) -> None:
    """Find the trial's run (or create it) and compute exactly what MLflow lacks.

    ``search=False`` (a trial never sent before, no failed request) creates the run
    without looking for it first.
    """
    snap = rs.snap
    run = backend.get_run(rs.run.run_id) if rs.run is not None else None
    if run is None and search:
        run = _find_run(backend, ctx, snap)
    if run is None:
        tags = snap.mlflow_tags(ctx)
        run = backend.create_run(
            ctx.experiment_id, snap.started_ms or _ms(events.utcnow()), tags, snap.trial_id
        )
        stats.created = True
        rs.run = run
        rs.logged_params, rs.logged_tags, rs.logged_summary = {}, dict(tags), {}
        rs.logged_status = None
        rs.pending = snap.all_points()
        rs.reconcile = False
        return
    rs.run = run
    rs.logged_params = dict(run.params)
    rs.logged_tags = dict(run.tags)
    rs.logged_summary = {
        k[len(FINAL_PREFIX) :]: v for k, v in run.metrics.items() if k.startswith(FINAL_PREFIX)
    }
    rs.logged_status = run.status if run.end_time else None
    pending: list[Point] = []
    for key, steps in snap.series.items():
        if not _metric_key_ok(key):
            continue
        have = (
            {s for s, _v, _t in backend.metric_history(run.run_id, key)}
            if key in (run.metrics)
            else set()
        )
        pending.extend((key, v, ts, s) for s, (v, ts) in sorted(steps.items()) if s not in have)
    rs.pending = pending
    rs.reconcile = False


def _push(
    backend: _Backend,
    ctx: _Context,
    rs: _RunSync,
    *,
    flush_points: bool = True,
    stats: _PushStats | None = None,
) -> _PushStats:
    """Bring a trial's run up to date: run, params, tags, metric points, final status.

    Idempotent: only what MLflow is not known to have is sent. Raises :class:`_BackendError`.
    """
    stats = stats or _PushStats()
    snap = rs.snap
    if rs.run is None or rs.reconcile:
        _reconcile(backend, ctx, rs, stats, search=rs.reconcile)
    assert rs.run is not None
    run_id = rs.run.run_id
    want_params = snap.mlflow_params()
    new_params = {k: v for k, v in want_params.items() if k not in rs.logged_params}
    for k, v in want_params.items():
        if k in rs.logged_params and rs.logged_params[k] != v and k not in rs.conflicts:
            rs.conflicts.add(k)
            stats.conflicts.append(
                f"{snap.model_run_id}/{snap.trial_id}: param {k}: MLflow has "
                f"{rs.logged_params[k]!r}, the lab {v!r} (MLflow params are immutable)"
            )
    items = list(new_params.items())
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        chunk = dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        backend.log_batch(run_id, params=chunk)
        rs.logged_params.update(chunk)
        stats.params += len(chunk)
    want_tags = snap.mlflow_tags(ctx)
    new_tags = list((k, v) for k, v in want_tags.items() if rs.logged_tags.get(k) != v)
    for i in range(0, len(new_tags), MAX_PARAMS_TAGS_PER_BATCH):
        tchunk = dict(new_tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        backend.log_batch(run_id, tags=tchunk)
        rs.logged_tags.update(tchunk)
    terminal = snap.status != "running"
    if flush_points or terminal:
        points = rs.pending + snap.summary_points(rs.logged_summary)
        sent = 0
        try:
            for i in range(0, len(points), MAX_METRICS_PER_BATCH):
                chunk_pts = points[i : i + MAX_METRICS_PER_BATCH]
                backend.log_batch(run_id, metrics=chunk_pts)
                sent += len(chunk_pts)
                stats.points += len(chunk_pts)
                for name, value, _ts, _s in chunk_pts:
                    if name.startswith(FINAL_PREFIX):
                        rs.logged_summary[name[len(FINAL_PREFIX) :]] = value
        finally:
            rs.pending = [p for p in points[sent:] if not p[0].startswith(FINAL_PREFIX)]
    want_status = _MLFLOW_STATUS.get(snap.status)
    if want_status is not None and rs.logged_status != want_status:
        backend.set_status(run_id, want_status, snap.ended_ms)
        rs.logged_status = want_status
    return stats


def _up_to_date(rs: _RunSync) -> bool:
    snap = rs.snap
    return (
        rs.run is not None
        and not rs.reconcile
        and not rs.pending
        and snap.status != "running"
        and rs.logged_status == _MLFLOW_STATUS.get(snap.status)
        and all(k in rs.logged_params for k in snap.mlflow_params())
        and not snap.summary_points(rs.logged_summary)
    )


def _ensure_context(
    backend: _Backend, study: str, lab: Lab, known: tuple[str | None, str | None] = (None, None)
) -> _Context:
    """Find or create the study's experiment and parent run."""
    lab_tag = str(lab.root)
    found = backend.get_experiment_by_name(study)
    if found is None:
        location = None
        if backend.wants_artifact_location():
            location = (lab.mlflow_artifacts / _slug(study)).as_uri()
        try:
            exp_id = backend.create_experiment(
                study, {TAG_LAB: lab_tag, "thunderline.study": study}, location
            )
        except _BackendError as exc:  # created concurrently by another worker
            again = backend.get_experiment_by_name(study)
            if again is None:
                raise exc from None
            exp_id = again[0]
    else:
        exp_id = found[0]
    parent_id = known[1] if known[0] == exp_id else None
    if parent_id is not None and backend.get_run(parent_id) is None:
        parent_id = None
    if parent_id is None:
        parents = [
            r
            for r in backend.search_runs([exp_id], f"tags.`{TAG_ROLE}` = 'study'")
            if r.tags.get(TAG_ROLE) == "study"
        ]
        if parents:
            parent_id = min(parents, key=lambda r: (r.start_time or 0, r.run_id)).run_id
        else:
            parent_id = backend.create_run(
                exp_id,
                _ms(events.utcnow()),
                {
                    TAG_ROLE: "study",
                    TAG_STUDY: study,
                    TAG_MODEL_RUN_ID: study,
                    TAG_SOURCE: SOURCE_VALUE,
                    TAG_LAB: lab_tag,
                },
                study,
            ).run_id
    return _Context(study, exp_id, parent_id, lab_tag)


def _study_summary(
    study: str, trial_params: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, str], dict[str, str]]:
    """The parent run's params and summary tags, from the parameters of the study's trials.

    Params are write-once in MLflow, so they hold only what cannot change: the study's name
    and the settings ``run_study`` keeps fixed across resumes, when every trial states the
    same value. The rest grows as trials are added and goes in tags: ``n_trials``, ``seeds``
    and ``search_space`` (``[min, max]`` of a numeric hyperparameter the trials varied, else
    the values they used; a value of None is a parameter that did not apply).
    """
    trial_params = [_applicable(p) for p in trial_params]
    params = {"study": _param_value(study)}
    for k in _STUDY_PARAMS:
        values = {_param_value(p[k]) for p in trial_params if p.get(k) is not None}
        if len(values) == 1 and all(p.get(k) is not None for p in trial_params):
            params[k] = values.pop()
    tags = {"n_trials": str(len(trial_params))}
    seeds = {p["seed"] for p in trial_params if type(p.get("seed")) is int}
    if seeds:
        tags["seeds"] = json.dumps(sorted(seeds))
    space: dict[str, Any] = {}
    names = sorted({k for p in trial_params for k in p} - set(_STUDY_PARAMS) - _DESIGN_PARAMS)
    for k in names:
        used = [p[k] for p in trial_params if p.get(k) is not None]
        numbers = [v for v in used if isinstance(v, int | float) and not isinstance(v, bool)]
        if not used:
            continue
        if len(numbers) == len(used) and min(numbers) != max(numbers):
            space[k] = [min(numbers), max(numbers)]
        else:
            distinct = {json.dumps(v, sort_keys=True, default=str): v for v in used}
            space[k] = [distinct[t] for t in sorted(distinct)][:20]
    text = json.dumps(space, sort_keys=True, default=str)
    if len(text) <= MAX_TAG_VALUE:  # else too many parameters to show: left out, not cut
        tags["search_space"] = text
    return params, tags


def _push_study(
    backend: _Backend, ctx: _Context, params: Mapping[str, str], tags: Mapping[str, str]
) -> tuple[int, list[str]]:
    """Give the study's parent run its params (those it lacks) and summary tags.

    Returns:
        How many params were logged, and the params MLflow holds with another value.
    """
    parent = backend.get_run(ctx.parent_run_id)
    if parent is None:
        return 0, []
    new = {k: v for k, v in params.items() if k not in parent.params}
    conflicts = [
        f"{ctx.study}: study param {k}: MLflow has {parent.params[k]!r}, the lab {v!r} "
        "(MLflow params are immutable)"
        for k, v in params.items()
        if k in parent.params and parent.params[k] != v
    ]
    changed = {k: v for k, v in tags.items() if parent.tags.get(k) != v}
    if new or changed:
        backend.log_batch(ctx.parent_run_id, params=new, tags=changed)
    return len(new), conflicts


def _link_event(key: tuple[str, str], study: str | None, run: RunRecord) -> events.Event:
    """The write-back: an ``ml.run.start`` stating only the trial's ``mlflow_run_id``."""
    return events.run_start(
        id=_pull_id("link", key[0], key[1], run.run_id),
        source=SOURCE,
        model_run_id=key[0],
        trial_id=key[1],
        study=study,
        mlflow_run_id=run.run_id,
        metadata={
            "mlflow_link": True,
            "mlflow_experiment_id": run.experiment_id,
            "mlflow_artifact_uri": run.artifact_uri,
        },
    )


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------


def _spool_root(lab: Lab) -> Path:
    return lab.root / "mlflow_outbox"


def _spool_dir(lab: Lab, key: tuple[str, str]) -> Path:
    return _spool_root(lab) / _slug(key[0]) / _slug(key[1])


@contextlib.contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A temporary name to write ``path`` under, renamed into place once complete (a crash
    never leaves half a file for the upload to take as the artifact)."""
    part = path.with_name(path.name + _PART)
    try:
        yield part
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _write_artifacts(
    directory: Path,
    key: tuple[str, str],
    study: str | None,
    *,
    state_dict: Any = None,
    sigma_table: Any = None,
    history: Any = None,
    series: Mapping[str, Mapping[int, tuple[float, int]]] | None = None,
    title: str = "",
) -> list[Path]:
    """Write a trial's artifacts into its spool folder (see :func:`_mirror_artifacts` for how
    long they stay)."""
    directory.mkdir(parents=True, exist_ok=True)
    with _written_whole(directory / _SPOOL_META) as part:
        part.write_text(json.dumps({"model_run_id": key[0], "trial_id": key[1], "study": study}))
    written = []
    if state_dict is not None:
        import torch

        path = directory / "model" / "state_dict.pt"
        path.parent.mkdir(exist_ok=True)
        with _written_whole(path) as part:
            torch.save(state_dict, part)
        written.append(path)
    if sigma_table is not None:
        path = directory / "sigma" / "sigma_table.csv"
        path.parent.mkdir(exist_ok=True)
        with _written_whole(path) as part:
            sigma_table.to_csv(part, index=False)
        written.append(path)
    curves = _curves(history, series)
    if curves:
        path = directory / "plots" / "learning_curve.png"
        path.parent.mkdir(exist_ok=True)
        with _written_whole(path) as part:
            _plot_learning_curve(curves, part, title)
        written.append(path)
    return written


def _curves(
    history: Any, series: Mapping[str, Mapping[int, tuple[float, int]]] | None
) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    records: list[Mapping[str, Any]] = []
    if history is not None:
        if hasattr(history, "to_dict"):
            records = history.to_dict("records")
        else:
            records = [dict(r) for r in history]
    if records:
        for i, rec in enumerate(records):
            x = rec.get("epoch", rec.get("step", i))
            for k, v in rec.items():
                if k in ("epoch", "step") or isinstance(v, bool):
                    continue
                if isinstance(v, int | float) and math.isfinite(v):
                    curves.setdefault(k, []).append((float(x), float(v)))
    elif series:
        for k, steps in series.items():
            curves[k] = [(float(s), v) for s, (v, _ts) in sorted(steps.items())]
    return curves


def _plot_learning_curve(
    curves: Mapping[str, list[tuple[float, float]]], path: Path, title: str
) -> None:
    """Loss, accuracy and σ curves side by side (matplotlib Agg, no pyplot: thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = {
        "loss": [k for k in curves if "loss" in k],
        "accuracy": [k for k in curves if "acc" in k],
        "max σ": [k for k in curves if "sigma" in k],
    }
    groups = {g: ks for g, ks in groups.items() if ks}
    if not groups:
        groups = {"metrics": list(curves)[:6]}
    fig = Figure(figsize=(4.2 * len(groups), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (label, keys) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for k in sorted(keys):
            xs, ys = zip(*curves[k], strict=True)
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")


@dataclass(frozen=True)
class _ArtifactCopy:
    """An artifact file as one tracking URI's run of a trial holds it (``mlflow_artifacts``)."""

    digest: str
    run_id: str
    artifact_uri: str
    uploaded_at: str


_NO_COPY = _ArtifactCopy("", "", "", "")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spooled(directory: Path | None) -> dict[str, tuple[Path, str]]:
    """The artifact files of a spool folder: per artifact path (``model/state_dict.pt``), the
    file and its sha256 (meta.json and files still being written left out)."""
    out: dict[str, tuple[Path, str]] = {}
    if directory is None or not directory.is_dir():
        return out
    for file in sorted(directory.rglob("*")):
        rel = file.relative_to(directory).as_posix()
        if rel == _SPOOL_META or file.name.endswith(_PART) or not file.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):  # sent everywhere by another process
            out[rel] = (file, _digest(file))
    return out


def _read_spool(
    lab: Lab,
) -> tuple[dict[tuple[str, str], tuple[Path, str | None]], dict[Path, str]]:
    """The spool folders by trial (folder, study), and the unreadable ones (folder: why)."""
    found: dict[tuple[str, str], tuple[Path, str | None]] = {}
    errors: dict[Path, str] = {}
    root = _spool_root(lab)
    if not root.is_dir():
        return found, errors
    for meta in sorted(root.glob(f"*/*/{_SPOOL_META}")):
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            key = (info["model_run_id"], info["trial_id"])
            if not all(isinstance(k, str) and k for k in key):
                raise ValueError("model_run_id and trial_id must be non-empty strings")
            study = info.get("study")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            errors[meta.parent] = (
                f"{meta}: unreadable artifact spool record ({what}); "
                f"the artifacts in {meta.parent} are not uploaded"
            )
            continue
        found[key] = (meta.parent, study if isinstance(study, str) else None)
    return found, errors


def _artifacts_due(
    uri: str,
    run_id: str,
    spooled: Mapping[str, tuple[Path, str]],
    copies: Mapping[str, Mapping[str, _ArtifactCopy]],
    *,
    fetch: bool,
) -> list[tuple[str, str]]:
    """The artifacts (path, sha256) the trial's run ``run_id`` in ``uri`` lacks.

    A trial has each file of its spool folder and, for an artifact no longer spooled, the
    newest copy any tracking URI got. The run lacks one it was not given with that content
    (or was given as another run, one since replaced). ``fetch=False``: spooled ones only.
    """
    newest: dict[str, _ArtifactCopy] = {}
    for files in copies.values():
        for path, copy in files.items():
            if path not in newest or copy.uploaded_at > newest[path].uploaded_at:
                newest[path] = copy
    mine = copies.get(uri, {})
    due = []
    for path in sorted(set(spooled) | (set(newest) if fetch else set())):
        digest = spooled[path][1] if path in spooled else newest[path].digest
        have = mine.get(path)
        if have is None or have.digest != digest or have.run_id != run_id:
            due.append((path, digest))
    return due


def _same(run: RunRecord) -> RunRecord:
    return run


def _is_local(artifact_uri: str) -> bool:
    return urlparse(artifact_uri).scheme in ("", "file")


def _fetch_artifact(
    source_uri: str, copy: _ArtifactCopy, path: str, into: Path, sources: dict[str, _Backend]
) -> Path:
    """Copy ``path`` of another tracking URI's run (``copy``) to ``into/path``."""
    dest = into / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(copy.artifact_uri)
    if _is_local(copy.artifact_uri):  # a folder on this machine (file store, the lab's SQLite)
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else copy.artifact_uri)
        try:
            shutil.copyfile(root / path, dest)
        except OSError as exc:
            raise _BackendError(f"{root / path}: {exc}", transient=True) from exc
        return dest
    if parsed.scheme == "mlflow-artifacts":  # proxied by the tracking server
        source = sources.get(source_uri)
        if source is None and source_uri.startswith(("http://", "https://")):
            source = sources[source_uri] = _RestBackend(source_uri)
        if not isinstance(source, _RestBackend):
            raise _BackendError(
                f"{copy.artifact_uri}: served by a tracking server, {source_uri} is not one",
                transient=False,
            )
        source.download_artifact(copy.artifact_uri, path, dest)
        return dest
    try:  # s3://, gs://, ...: MLflow's artifact repositories know them
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        got = get_artifact_repository(copy.artifact_uri).download_artifacts(path, str(into))
    except Exception as exc:
        raise _BackendError(f"{copy.artifact_uri}/{path}: {exc}", transient=True) from exc
    if Path(got) != dest:
        shutil.move(got, dest)
    return dest


def _fetch_any(
    uri: str,
    copies: Mapping[str, Mapping[str, _ArtifactCopy]],
    path: str,
    digest: str,
    into: Path,
    sources: dict[str, _Backend],
) -> tuple[Path | None, str]:
    """Fetch ``path`` from a copy with content ``digest`` (one on this machine first); the
    file, or None and why."""
    holders = sorted(
        (
            (u, files[path])
            for u, files in copies.items()
            if files.get(path, _NO_COPY).digest == digest
        ),
        key=lambda c: (not _is_local(c[1].artifact_uri), c[0] == uri, c[0]),
    )
    why = []
    for source_uri, copy in holders:
        try:
            return _fetch_artifact(source_uri, copy, path, into, sources), ""
        except _BackendError as exc:
            why.append(str(exc))
    return None, "; ".join(why) or "no MLflow holds it"


def _mirror_artifacts(
    backend: _Backend,
    outbox: _Outbox,
    key: tuple[str, str],
    run_id: str,
    get_run: Callable[[], RunRecord | None],
    *,
    directory: Path | None,
    studies: Iterable[str | None],
    copies: Mapping[str, Mapping[str, _ArtifactCopy]] | None = None,
    sources: dict[str, _Backend] | None = None,
) -> tuple[int, list[str]]:
    """Give the trial's run in ``outbox.uri`` every artifact of the trial it lacks.

    The artifacts a trial's logger wrote wait in its spool folder
    (``lab/mlflow_outbox/<model_run_id>/<trial_id>/``); each upload is recorded per tracking
    URI, run and content (``mlflow_artifacts``), so a re-sync sends nothing twice. A spooled
    file is removed once every tracking URI the trial's study is mirrored to holds it. A URI
    that starts mirroring the study after that gets its files from another URI's copy
    (``sources`` given; ``None``: the spool only): a folder on this machine (file store, the
    lab's SQLite backend) is copied, a tracking server's is downloaded.

    Args:
        run_id: the trial's run in this URI; ``get_run`` gives its record, asked only when a
            file is due.
        directory: the trial's spool folder.
        studies: the trial's study names (its study, its model run id).
        copies: the trial's recorded copies (read from the outbox when None).
        sources: backends of other URIs opened to fetch from (filled as needed).

    Returns:
        How many files were uploaded, and one line per file no copy could be fetched of.

    Raises:
        _BackendError: an upload to this URI failed.
    """
    uri = outbox._key_uri()
    if copies is None:
        copies = outbox.artifact_copies(key).get(key, {})
    spooled = _spooled(directory)
    due = _artifacts_due(uri, run_id, spooled, copies, fetch=sources is not None)
    uploaded, errors = 0, []
    run = get_run() if due else None
    if due and run is None:
        errors.append(f"{key[0]}/{key[1]}: run {run_id} is gone from {uri}: artifacts not sent")
        due = []
    if due:
        assert run is not None
        with tempfile.TemporaryDirectory(prefix="thunderline-artifacts-") as tmp:
            for path, digest in due:
                if path in spooled:
                    local = spooled[path][0]
                else:
                    assert sources is not None
                    fetched, why = _fetch_any(uri, copies, path, digest, Path(tmp), sources)
                    if fetched is None:
                        errors.append(
                            f"{key[0]}/{key[1]}: artifact {path}: no copy could be fetched for "
                            f"{uri} ({why})"
                        )
                        continue
                    local, digest = fetched, _digest(fetched)
                backend.log_artifact(run, local, posixpath.dirname(path))
                outbox.mark_artifact(key, path, digest, run)
                uploaded += 1
    if spooled and directory is not None:
        _prune_spool(outbox, key, directory, spooled, outbox.mirror_uris(studies) | {uri})
    return uploaded, errors


def _prune_spool(
    outbox: _Outbox,
    key: tuple[str, str],
    directory: Path,
    spooled: Mapping[str, tuple[Path, str]],
    mirrors: set[str],
) -> None:
    """Remove the spooled files every tracking URI in ``mirrors`` holds (and the folder once
    no artifact is left in it)."""
    copies = outbox.artifact_copies(key).get(key, {})
    for path, (file, digest) in spooled.items():
        if all(copies.get(u, {}).get(path, _NO_COPY).digest == digest for u in mirrors):
            with contextlib.suppress(OSError):
                if _digest(file) == digest:  # not rewritten meanwhile
                    file.unlink()
    if not any(f.is_file() for f in directory.rglob("*") if f.name != _SPOOL_META):
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # the model run's folder, once empty


def _snapshot_state_dict(model: Any) -> Any:
    """A CPU copy of a module's (or a mapping's) tensors, safe to serialise later."""
    import torch

    sd = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    return {
        k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
        for k, v in sd.items()
    }


# ---------------------------------------------------------------------------------------------
# The logger
# ---------------------------------------------------------------------------------------------


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


def _has_unsent(rs: _RunSync) -> bool:
    """Whether the trial has something MLflow does not (a running trial can be complete)."""
    if rs.broken is not None or rs.run is None or rs.reconcile or rs.pending:
        return True
    if rs.artifacts_dir is not None:
        return True
    if rs.snap.status == "running":
        return False
    return rs.synced_mark != len(rs.seen)


class MLflowLogger:
    """Mirror a study's ``ml.*`` events to MLflow from a background thread.

    Args:
        bus: the event bus the study publishes on.
        lab: the lab (outbox in ``lab.db``, default MLflow backend ``lab/mlflow.db``,
            artifact spool in ``lab/mlflow_outbox/``).
        study: the study name: the MLflow experiment, and the events mirrored (those whose
            ``model_run_id`` or ``study`` is this name).
        store: the lab's trial store, if open (its database holds the outbox); by default the
            outbox opens ``lab.db`` itself.
        tracking_uri: MLflow to talk to (default ``$MLFLOW_TRACKING_URI``, else the lab's
            SQLite backend).
        flush_interval: seconds between metric batches of a running trial.
        max_backoff: longest wait (seconds) before retrying an unreachable MLflow.
        isolate: run MlflowClient (non-HTTP backends, e.g. the lab's SQLite) in a child
            process so its CPU work never competes with training for the GIL (default: on).

    Example:
        >>> bus = EventBus()  # doctest: +SKIP
        >>> with MLflowLogger(bus, lab=lab, study="sn-ab") as mlf:  # doctest: +SKIP
        ...     bus.publish(events.trial_start(model_run_id="sn-ab", trial_id="trial_0000",
        ...                                    study="sn-ab", spectral_norm=True))
        ...     mlf.flush(10)
        ...     mlf.run_id_for("trial_0000")
        '9a1b...'
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        lab: Lab,
        study: str,
        store: TrialStore | None = None,
        tracking_uri: str | None = None,
        flush_interval: float = 1.0,
        max_backoff: float = 30.0,
        isolate: bool = True,
    ) -> None:
        self.bus = bus
        self.isolate = isolate
        self.lab = lab
        self.study = study
        self.tracking_uri = _uri_key(tracking_uri or lab.mlflow_tracking_uri)
        self.flush_interval = flush_interval
        self.max_backoff = max_backoff
        self._store = store
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._abandon = False
        self._trials: dict[tuple[str, str], _RunSync] = {}
        self._run_ids: dict[str, str] = {}
        self._run_id_cond = threading.Condition()
        self._backend: _Backend | None = None
        self._ctx: _Context | None = None
        self._existing: dict[tuple[str, str], RunRecord] = {}
        self._outbox: _Outbox | None = None
        self._offline_until = 0.0
        self._failures = 0
        self._last_points_flush = time.monotonic()
        self._summary_due = False  # a trial began or ended: the parent run's tags may change
        self._summary_sent: tuple[dict[str, str], dict[str, str]] | None = None
        self.errors: list[str] = []
        self.stats = {"points": 0, "params": 0, "runs_created": 0, "artifacts": 0, "failures": 0}
        self._sub: Subscription = bus.subscribe("ml.*", self._on_event, name="MLflowLogger")
        self._thread = threading.Thread(target=self._run, name="thunderline-mlflow", daemon=True)
        self._thread.start()

    # -- the training thread's side: O(1), no locks, no I/O -------------------------------

    def _on_event(self, event: events.Event) -> None:
        self._queue.append(event)
        if event.name != "ml.run.metric":
            self._wake.set()

    def run_id_for(
        self, trial_id: str, second: str | None = None, *, timeout: float = 0.0
    ) -> str | None:
        """The trial's MLflow run id once its run exists (None before; never blocks by default).

        Called as ``run_id_for(trial_id)`` or ``run_id_for(model_run_id, trial_id)``.

        Args:
            trial_id: the trial (of this logger's study), or the model run id when
                ``second`` is given.
            second: the trial id, when the first argument is the model run id.
            timeout: wait up to this many seconds for the run to be created.
        """
        key = trial_id if second is None else f"{trial_id}\x1f{second}"
        run_id = self._run_ids.get(key)
        if run_id is not None or timeout <= 0:
            return run_id
        with self._run_id_cond:
            self._run_id_cond.wait_for(lambda: key in self._run_ids, timeout)
        return self._run_ids.get(key)

    def log_artifacts(
        self,
        trial_id: str,
        *,
        model: Any = None,
        sigma_table: pd.DataFrame | None = None,
        history: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
        model_run_id: str | None = None,
    ) -> None:
        """Queue a trial's artifacts: model state_dict, per-layer σ table, learning curve.

        The caller's thread only copies the tensors (a CPU snapshot) and the tables;
        serialisation, the PNG (matplotlib Agg) and the upload happen on the logger thread,
        and the files wait in ``lab/mlflow_outbox/`` until every MLflow the study is mirrored
        to has them (``mlflow-sync`` sends them to the others). Without ``history`` the curve
        is drawn from the trial's ``ml.run.metric`` events.
        """
        payload = {
            "state_dict": None if model is None else _snapshot_state_dict(model),
            "sigma_table": None if sigma_table is None else sigma_table.copy(),
            "history": None
            if history is None
            else (history.copy() if hasattr(history, "copy") else list(history)),
        }
        self._queue.append(("artifacts", (model_run_id or self.study, trial_id), payload))
        self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Send everything received so far (one attempt; skipped while MLflow is down).

        Returns:
            True if MLflow has everything the logger received.
        """
        marker = _Flush()
        self._queue.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            return False
        return self.pending() == 0

    def pending(self) -> int:
        """How many trials have something MLflow does not have yet."""
        return sum(1 for rs in list(self._trials.values()) if _has_unsent(rs))

    def close(self, timeout: float = 30.0) -> bool:
        """Stop listening, make a last attempt to send everything and stop the thread.

        Whatever MLflow could not take stays pending in the outbox for ``mlflow-sync``.

        Returns:
            True if everything reached MLflow.
        """
        if not self._closing:
            self.bus.unsubscribe(self._sub)
            self._closing = True
            self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon = True  # give up between two requests (each has a short timeout)
            self._thread.join(15.0)
        return self.pending() == 0

    def __enter__(self) -> MLflowLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the logger thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._outbox = _Outbox(self.lab.db_path, self._store, self.tracking_uri)
            self._outbox.mark_study(self.study, self.tracking_uri)
        except Exception as exc:  # the outbox is best effort too
            self._note_error(f"outbox unavailable: {exc}")
        try:  # connect now, so the first trial's run exists as early as possible
            self._online()
        except Exception as exc:
            self._went_offline(exc)
        while True:
            self._wake.wait(min(self.flush_interval, 0.5))
            self._wake.clear()
            closing = self._closing
            markers: list[_Flush] = []
            try:
                self._drain(markers)
                due = time.monotonic() - self._last_points_flush >= self.flush_interval
                self._pump(force=bool(markers) or closing or due, final=closing)
            except Exception as exc:  # never let the thread die
                self._note_error(f"logger thread: {type(exc).__name__}: {exc}")
                log.exception("MLflow logger iteration failed")
            for m in markers:
                m.done.set()
            if (closing and not self._queue) or self._abandon:
                break
        self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(Exception):
            self._drain([])
        if self._outbox is not None:
            for key, rs in self._trials.items():
                if _has_unsent(rs):
                    with contextlib.suppress(Exception):
                        self._outbox.mark_pending(key, rs.snap.study)
            self._outbox.close()
        if self._backend is not None:
            with contextlib.suppress(Exception):
                self._backend.close()

    def _note_error(self, message: str) -> None:
        self.stats["failures"] += 1
        self.errors.append(message)
        del self.errors[:-50]
        log.warning("MLflow: %s", message)

    def _drain(self, markers: list[_Flush]) -> None:
        q = self._queue
        while q:
            item = q.popleft()
            if isinstance(item, _Flush):
                markers.append(item)
            elif isinstance(item, tuple):
                self._spool(item[1], item[2])
            else:
                try:
                    self._apply(item)
                except Exception as exc:
                    self._note_error(f"cannot mirror event {getattr(item, 'id', '?')}: {exc}")

    def _state(self, key: tuple[str, str], study: str | None) -> _RunSync:
        rs = self._trials.get(key)
        if rs is None:
            rs = _RunSync(TrialSnapshot(key[0], key[1], study=study or self.study))
            existing = self._existing.get(key)
            if existing is not None:  # a resumed study: the run exists from an earlier process
                rs.run, rs.reconcile = existing, True
            self._trials[key] = rs
            self._summary_due = True
            if self._outbox is not None:
                try:
                    self._outbox.mark_pending(key, study or self.study)
                except Exception as exc:
                    self._note_error(f"outbox: {exc}")
        return rs

    def _apply(self, ev: Any) -> None:
        """Fold one event into its trial's snapshot (in memory only)."""
        if isinstance(ev, Mapping) or not hasattr(ev, "payload"):
            ev = events.validate_event(ev)
        p = ev.payload
        if isinstance(p, Mapping) or ev.id.startswith(LINK_ID_PREFIX):
            return
        if p.model_run_id != self.study and p.study != self.study:
            return
        rs = self._state((p.model_run_id, p.trial_id), p.study)
        if ev.id in rs.seen:
            return
        rs.seen.add(ev.id)
        snap = rs.snap
        ts = _ms(ev.timestamp)
        if snap.started_ms is None:
            snap.started_ms = ts
        if isinstance(p, events.RunMetric):
            step, series, pending = p.step, snap.series, rs.pending
            for k, v in p.points().items():
                steps = series.get(k)
                if steps is None:
                    steps = series[k] = {}
                steps[step] = (v, ts)
                if _metric_key_ok(k):
                    pending.append((k, v, ts, step))
            return
        if p.study:
            snap.study = p.study
        for attr in ("spectral_norm", "spectral_norm_coeff"):
            value = getattr(p, attr, None)
            if value is not None:
                setattr(snap, attr, value)
        snap.parameters.update(getattr(p, "parameters", None) or {})
        snap.metrics.update(getattr(p, "metrics", None) or {})
        if ev.name in ("ml.trial.start", "ml.run.start"):
            snap.started_ms = min(snap.started_ms, ts)
        elif ev.name == "ml.trial.complete":
            rs.trial_status, snap.ended_ms = p.status, ts
            self._summary_due = True
        elif ev.name == "ml.trial.failed":
            rs.trial_status, snap.ended_ms = "failed", ts
            snap.error_type, snap.error_message = p.error_type, p.error_message
        elif ev.name == "ml.run.stop":
            rs.run_status = "completed" if p.success else "failed"
            if rs.trial_status is None:
                snap.ended_ms = ts
        snap.status = rs.trial_status or rs.run_status or "running"

    def _spool(self, key: tuple[str, str], payload: Mapping[str, Any]) -> None:
        rs = self._state(key, None)
        sn = rs.snap.spectral_norm
        constraint = "?" if sn is None else "spectral norm" if sn else "no constraint"
        directory = _spool_dir(self.lab, key)
        try:
            _write_artifacts(
                directory,
                key,
                rs.snap.study,
                state_dict=payload.get("state_dict"),
                sigma_table=payload.get("sigma_table"),
                history=payload.get("history"),
                series=rs.snap.series,
                title=f"{key[1]} ({constraint})",
            )
            rs.artifacts_dir = directory
        except Exception as exc:
            self._note_error(f"{key[1]}: cannot write artifacts: {exc}")

    def _online(self) -> bool:
        """Connect (once) and set up the study's experiment; False while backing off."""
        if time.monotonic() < self._offline_until:
            return False
        if self._backend is None:
            self._backend = _open_backend(self.tracking_uri, isolate=self.isolate)
        if self._ctx is None:
            ctx = _ensure_context(self._backend, self.study, self.lab)
            self._existing = {}
            for run in self._backend.search_runs(
                [ctx.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'"
            ):
                key = (run.tags.get(TAG_MODEL_RUN_ID, ""), run.tags.get(TAG_TRIAL_ID, ""))
                if run.tags.get(TAG_ROLE) == "trial" and key not in self._existing:
                    self._existing[key] = run
            for key, rs in self._trials.items():
                if rs.run is None and key in self._existing:
                    rs.run, rs.reconcile = self._existing[key], True
            self._ctx = ctx
            if self._outbox is not None:
                self._outbox.mark_study(
                    self.study, self.tracking_uri, ctx.experiment_id, ctx.parent_run_id
                )
        return True

    def _went_offline(self, exc: BaseException) -> None:
        self._failures += 1
        delay = min(self.max_backoff, 0.5 * 2 ** min(self._failures - 1, 10))
        self._offline_until = time.monotonic() + delay
        self._note_error(f"{exc} (offline, retry in {delay:.1f}s)")

    def _pump(self, *, force: bool, final: bool) -> None:
        """Send what is due: new runs, params, tags, metric batches, final states, files."""
        if force:
            self._last_points_flush = time.monotonic()
        work = []
        for rs in list(self._trials.values()):
            if rs.broken is not None or not _has_unsent(rs):
                continue
            urgent = (
                rs.run is None
                or rs.reconcile
                or rs.snap.status != "running"
                or rs.artifacts_dir is not None
                or len(rs.pending) >= MAX_METRICS_PER_BATCH
            )
            if force or urgent:
                work.append(rs)
        if not work and not (final and self._ctx is not None):
            return
        try:
            if not self._online():
                return
        except Exception as exc:
            self._went_offline(exc)
            return
        assert self._backend is not None and self._ctx is not None
        for rs in work:
            if self._abandon:
                return
            flush_points = force or len(rs.pending) >= MAX_METRICS_PER_BATCH
            try:
                self._pump_trial(rs, flush_points=flush_points)
            except _BackendError as exc:
                rs.reconcile = True
                if exc.transient:
                    self._went_offline(exc)
                    return
                rs.broken = str(exc)
                self._note_error(f"{rs.snap.trial_id}: {exc}")
                if self._outbox is not None:
                    self._outbox.mark_pending(rs.snap.key, rs.snap.study, error=str(exc))
        self._failures = 0
        if self._summary_due or final:
            self._summary_due = False
            try:
                self._push_summary()
            except _BackendError as exc:
                self._summary_due = exc.transient
                self._note_error(f"study {self.study}: parent run: {exc}")
        if final:
            with contextlib.suppress(_BackendError):
                self._backend.set_status(self._ctx.parent_run_id, "FINISHED", _ms(events.utcnow()))

    def _push_summary(self) -> None:
        """The parent run's params and tags, from the store's trials of the study (other
        workers' too) and this logger's own, which the store may not have yet."""
        assert self._backend is not None and self._ctx is not None
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        if self._outbox is not None:
            with contextlib.suppress(sqlite3.Error):  # no trial store (events go to a gateway)
                for mr, tid, text in self._outbox.query(
                    "SELECT model_run_id, trial_id, parameters FROM trials "
                    "WHERE study = ? OR model_run_id = ?",
                    (self.study, self.study),
                ):
                    rows[(mr, tid)] = json.loads(text or "{}")
        for key, rs in list(self._trials.items()):
            row = {**rows.get(key, {}), **rs.snap.parameters}
            if rs.snap.spectral_norm is not None:
                row.setdefault("spectral_norm", rs.snap.spectral_norm)
            rows[key] = row
        if not rows:
            return
        summary = _study_summary(self.study, list(rows.values()))
        if summary == self._summary_sent:
            return
        n, conflicts = _push_study(self._backend, self._ctx, *summary)
        self.stats["params"] += n
        for c in conflicts:
            self._note_error(c)
        self._summary_sent = summary

    def _pump_trial(self, rs: _RunSync, *, flush_points: bool) -> None:
        assert self._backend is not None and self._ctx is not None
        stats = _push(self._backend, self._ctx, rs, flush_points=flush_points)
        self.stats["points"] += stats.points
        self.stats["params"] += stats.params
        self.stats["runs_created"] += int(stats.created)
        for c in stats.conflicts:
            self._note_error(c)
        run = rs.run
        assert run is not None
        if rs.linked != run.run_id:
            self._announce(rs, run)
        if rs.artifacts_dir is not None:
            self.stats["artifacts"] += self._send_artifacts(rs, run)
            rs.artifacts_dir = None
        if _up_to_date(rs) and rs.synced_mark != len(rs.seen):
            if self._outbox is not None:
                self._outbox.mark_synced(rs.snap.key, rs.snap.study, run.run_id, len(rs.seen))
            rs.synced_mark = len(rs.seen)

    def _send_artifacts(self, rs: _RunSync, run: RunRecord) -> int:
        """Upload the trial's spooled artifacts; they stay spooled for the other tracking URIs
        its study is mirrored to (:func:`_mirror_artifacts`), or for good without an outbox."""
        assert self._backend is not None
        if self._outbox is None:
            files = _spooled(rs.artifacts_dir)
            for path, (file, _digest) in files.items():
                self._backend.log_artifact(run, file, posixpath.dirname(path))
            return len(files)
        n, _ = _mirror_artifacts(
            self._backend,
            self._outbox,
            rs.snap.key,
            run.run_id,
            functools.partial(_same, run),
            directory=rs.artifacts_dir,
            studies=(rs.snap.study, rs.snap.model_run_id, self.study),
        )
        return n

    def _announce(self, rs: _RunSync, run: RunRecord) -> None:
        """Publish the mlflow_run_id write-back and wake run_id_for waiters."""
        rs.linked = run.run_id
        with self._run_id_cond:
            self._run_ids[rs.snap.trial_id] = run.run_id
            self._run_ids[f"{rs.snap.model_run_id}\x1f{rs.snap.trial_id}"] = run.run_id
            self._run_id_cond.notify_all()
        if self._outbox is not None:
            self._outbox.mark_pending(
                rs.snap.key, rs.snap.study, run_id=run.run_id, artifact_uri=run.artifact_uri
            )
        try:
            self.bus.publish(_link_event(rs.snap.key, rs.snap.study, run))
        except Exception as exc:
            self._note_error(f"cannot publish the mlflow_run_id of {rs.snap.trial_id}: {exc}")


def attach(
    bus: EventBus,
    *,
    lab: Lab,
    experiment: str,
    store: TrialStore | None = None,
    tracking_uri: str | None = None,
) -> MLflowLogger:
    """Attach an :class:`MLflowLogger` for study ``experiment`` to the bus (for ``run_study``).

    Example:
        >>> logger = attach(bus, lab=lab, experiment="sn-ab")  # doctest: +SKIP
        >>> logger.run_id_for("sn-ab", "trial_0000")  # doctest: +SKIP
    """
    return MLflowLogger(bus, lab=lab, study=experiment, store=store, tracking_uri=tracking_uri)


# ---------------------------------------------------------------------------------------------
# Sync: push pending trials, pull runs made outside the lab
# ---------------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What :func:`sync` did."""

    tracking_uri: str
    pushed_runs: int = 0
    created_runs: int = 0
    pushed_points: int = 0
    pushed_params: int = 0
    uploaded_artifacts: int = 0
    pulled_runs: int = 0
    adopted_trials: int = 0
    pulled_points: int = 0
    linked_trials: int = 0
    still_pending: int = 0
    conflicts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    nothing: str | None = None  # why there was nothing to sync (nothing was opened)

    def summary(self) -> str:
        """One line for the CLI."""
        if self.nothing is not None:
            return f"nothing to sync: {self.nothing}"
        return (
            f"pushed {self.pushed_runs} runs ({self.created_runs} created), "
            f"{self.pushed_points} metric points, {self.pushed_params} params, "
            f"{self.uploaded_artifacts} artifacts; pulled {self.pulled_runs} runs "
            f"({self.adopted_trials} adopted as trials), {self.pulled_points} metric points; "
            f"{self.still_pending} still pending"
        )


def _snapshot_from_store(store: TrialStore, outbox: _Outbox, key: tuple[str, str]) -> TrialSnapshot:
    row = store.trial(*key)
    if row is None:
        raise TrackingError(f"{key[0]}/{key[1]}: not in the store")
    snap = TrialSnapshot(
        model_run_id=key[0],
        trial_id=key[1],
        study=row.get("study"),
        spectral_norm=row.get("spectral_norm"),
        spectral_norm_coeff=row.get("spectral_norm_coeff"),
        parameters=dict(row.get("parameters") or {}),
        status=row.get("status") or "running",
        error_type=row.get("error_type"),
        error_message=row.get("error_message"),
        metrics={k: v for k, v in (row.get("metrics") or {}).items() if isinstance(v, int | float)},
        started_ms=_store_ts_ms(row.get("started_at")),
        ended_ms=_store_ts_ms(row.get("ended_at")),
    )
    for name, step, value, ts in outbox.metric_points(key):
        snap.series.setdefault(name, {})[int(step)] = (float(value), _store_ts_ms(ts) or 0)
    if snap.started_ms is None:
        first = [ts for steps in snap.series.values() for _v, ts in steps.values()]
        snap.started_ms = min(first) if first else None
    return snap


def sync(
    lab: Lab,
    store: TrialStore | None = None,
    tracking_uri: str | None = None,
    *,
    push: bool = True,
    pull: bool = True,
    all_studies: bool = False,
    experiments: Sequence[str] = (),
) -> SyncReport:
    """Push what MLflow lacks, pull runs made outside the lab; idempotent.

    Each tracking URI gets its own complete copy of every mirrored study (the outbox is kept
    per URI): syncing to a second MLflow creates its runs and gives them the trials' artifacts
    (from the spool, else copied from another MLflow's copy), syncing again to either one sends
    nothing. The study's parent run gets its settings and summary too. An artifact that cannot
    be had is a line in ``errors``; the rest of the sync goes on.

    Args:
        lab: the lab.
        store: its open trial store (opened from ``lab.db`` if None).
        tracking_uri: MLflow (default ``$MLFLOW_TRACKING_URI``, else the lab's SQLite backend).
        push: send pending trials (those of studies mirrored by :class:`MLflowLogger`).
        pull: adopt runs of the lab's experiments the store does not know.
        all_studies: also push studies that never had a logger attached.
        experiments: more experiment names to pull from.

    Example:
        >>> report = sync(Lab.resolve("lab"))  # doctest: +SKIP
        >>> report.summary()  # doctest: +SKIP
        'pushed 3 runs (3 created), 120 metric points, ...'

    Raises:
        TrackingError: when MLflow cannot be reached (nothing is lost: trials stay pending),
            or ``tracking_uri`` is an SQLite file that is no MLflow database: a trial store
            (MLflow would add its tables to it), a folder, not SQLite (nothing is written).
    """
    uri = _uri_key(tracking_uri or lab.mlflow_tracking_uri)
    folder = _missing_database_folder(uri)
    if folder is not None:  # before MLflow makes the folder and an empty database in it
        raise TrackingError(
            f"cannot reach MLflow at {uri}: no folder {folder} for its database (a mistyped "
            "path? to start a new MLflow there, make the folder first); nothing was synced"
        )
    path = _sqlite_database_path(uri)
    problem = path and _sqlite_database_problem(path, lab=lab, role="an MLflow database")
    if problem:  # MLflow would add its tables to a trial store; a folder costs minutes of retries
        raise TrackingError(f"cannot use MLflow at {uri}: {problem}; nothing was synced")
    own_store = store is None
    if store is None:
        store = lab.store()
    outbox = _Outbox(lab.db_path, store, uri)
    report = SyncReport(uri)
    if (
        path is not None
        and not path.exists()
        and not all_studies
        and not experiments
        and not outbox.studies()
    ):
        # no study of the lab logs to MLflow, and no database to pull from: opening it would
        # only leave an empty MLflow database in the lab (a lab fed by a gateway, say)
        outbox.close()
        if own_store:
            store.close()
        report.nothing = (
            f"no study of this lab logs to MLflow and {path} does not exist (--all-studies "
            "pushes every study)"
        )
        return report
    try:
        backend = _open_backend(uri)
    except _BackendError as exc:
        outbox.close()
        if own_store:
            store.close()
        raise TrackingError(f"cannot reach MLflow at {uri}: {exc}") from exc
    try:
        contexts: dict[str, _Context] = {}
        if push:
            artifacts = _SyncArtifacts(lab, outbox, backend, report)
            try:
                _sync_push(
                    lab,
                    store,
                    outbox,
                    backend,
                    report,
                    contexts,
                    artifacts,
                    all_studies=all_studies,
                )
            finally:
                artifacts.close()
        if pull:
            _sync_pull(lab, store, outbox, backend, report, contexts, experiments)
    except _BackendError as exc:
        raise TrackingError(
            f"MLflow sync stopped: {exc} (so far: {report.summary()}; "
            "what is left stays pending: run mlflow-sync again)"
        ) from exc
    finally:
        backend.close()
        outbox.close()
        if own_store:
            store.close()
    return report


@dataclass
class ForgetReport:
    """What :func:`forget_tracking_uri` did."""

    tracking_uri: str
    studies: int = 0
    trials: int = 0
    artifacts: int = 0
    freed_files: int = 0
    still_spooled: int = 0

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"forgot {self.studies} studies, {self.trials} trial rows and {self.artifacts} "
            f"artifact records; freed {self.freed_files} spooled files "
            f"({self.still_spooled} still spooled for the other MLflows)"
        )


_URI_TABLES = ("mlflow_studies", "mlflow_outbox", "mlflow_artifacts")


def forget_tracking_uri(
    lab: Lab, tracking_uri: str, store: TrialStore | None = None
) -> ForgetReport:
    """Stop mirroring the lab to ``tracking_uri`` (a retired MLflow): drop its outbox rows.

    Its rows in ``mlflow_studies``, ``mlflow_outbox`` and ``mlflow_artifacts`` (every study)
    are deleted in one transaction; then each spooled artifact file every remaining tracking
    URI of its study already holds is removed (files no remaining URI is mirrored to are
    kept: nothing else holds them). MLflow itself, and the trial store's ``mlflow_run_id``
    links, are not touched. Syncing to the URI later treats it as a new one: it gets every
    trial and artifact again (existing runs are found by their ``trial_id`` tag). Forget a URI
    no :class:`MLflowLogger` is still logging to: a logger would record it again.

    Args:
        lab: the lab.
        tracking_uri: the MLflow to forget, in any spelling (compared as :func:`_uri_key`).
        store: its open trial store (opened from ``lab.db`` if None).

    Raises:
        TrackingError: the lab has no record of ``tracking_uri`` (nothing is changed; the
            message names the URIs it knows).
    """
    uri = _uri_key(tracking_uri)
    own_store = store is None
    if store is None:
        store = lab.store()
    outbox = _Outbox(lab.db_path, store, uri)
    report = ForgetReport(uri)
    try:

        def delete() -> tuple[int, int, int]:
            known = sorted(
                {
                    row[0]
                    for table in _URI_TABLES
                    for row in outbox.conn.execute(f"SELECT DISTINCT tracking_uri FROM {table}")
                }
            )
            if uri not in known:
                raise TrackingError(
                    f"{tracking_uri}: not a tracking URI of this lab (as {uri}); it knows "
                    + (", ".join(known) if known else "none")
                )
            studies, trials, artifacts = (
                outbox.conn.execute(f"DELETE FROM {table} WHERE tracking_uri = ?", (uri,)).rowcount
                for table in _URI_TABLES
            )
            return studies, trials, artifacts

        report.studies, report.trials, report.artifacts = outbox._write(delete)
        spool, _unreadable = _read_spool(lab)  # an unreadable folder is left to the user
        rows = outbox.query("SELECT DISTINCT model_run_id, trial_id, study FROM mlflow_outbox")
        trial_studies: dict[tuple[str, str], set[str | None]] = {}
        for mr, tid, study in rows:
            trial_studies.setdefault((mr, tid), set()).add(study)
        for key, (directory, spool_study) in sorted(spool.items()):
            spooled = _spooled(directory)
            studies = {spool_study, key[0]} | trial_studies.get(key, set())
            mirrors = outbox.mirror_uris(studies)
            if spooled and mirrors:
                _prune_spool(outbox, key, directory, spooled, mirrors)
            left = sum(1 for file, _digest in spooled.values() if file.exists())
            report.freed_files += len(spooled) - left
            report.still_spooled += left
    finally:
        outbox.close()
        if own_store:
            store.close()
    return report


def _context_for(
    backend: _Backend,
    lab: Lab,
    outbox: _Outbox,
    contexts: dict[str, _Context],
    study: str,
    uri: str,
) -> _Context:
    ctx = contexts.get(study)
    if ctx is None:
        known = outbox.studies(uri).get(study)
        ids = (known[1], known[2]) if known is not None else (None, None)
        ctx = _ensure_context(backend, study, lab, ids)
        outbox.mark_study(study, uri, ctx.experiment_id, ctx.parent_run_id)
        contexts[study] = ctx
    return ctx


class _SyncArtifacts:
    """The artifact side of one :func:`sync`: every trial's run in this MLflow gets the
    trial's artifacts it lacks (:func:`_mirror_artifacts`), each trial once."""

    def __init__(self, lab: Lab, outbox: _Outbox, backend: _Backend, report: SyncReport) -> None:
        self.lab = lab
        self.outbox = outbox
        self.backend = backend
        self.report = report
        self.spool, self.unreadable = _read_spool(lab)
        self.copies = outbox.artifact_copies()
        self.sources: dict[str, _Backend] = {}  # other MLflows, opened to fetch artifacts from
        self.done: set[tuple[str, str]] = set()
        self.used: set[Path] = set()

    def remaining(self) -> list[tuple[str, str]]:
        """The trials with spooled or recorded artifacts not yet looked at."""
        return sorted((set(self.spool) | set(self.copies)) - self.done)

    def unsent(self) -> list[str]:
        """One line per spool folder left alone: its meta.json is unreadable and its name is
        not that of a trial pushed in this sync."""
        return [
            why
            for folder, why in sorted(self.unreadable.items())
            if folder not in self.used and folder.is_dir()
        ]

    def send(
        self,
        key: tuple[str, str],
        run_id: str,
        get_run: Callable[[], RunRecord | None],
        study: str | None,
    ) -> None:
        """Upload what the trial's run ``run_id`` lacks; a permanent failure is reported."""
        directory, spool_study = self.spool.get(key, (None, None))
        if directory is None and _spool_dir(self.lab, key).is_dir():  # meta.json unreadable
            directory = _spool_dir(self.lab, key)
        if directory is not None:
            self.used.add(directory)
        self.done.add(key)
        try:
            n, errors = _mirror_artifacts(
                self.backend,
                self.outbox,
                key,
                run_id,
                get_run,
                directory=directory,
                studies=(study, spool_study, key[0]),
                copies=self.copies.get(key, {}),
                sources=self.sources,
            )
        except _BackendError as exc:
            if exc.transient:
                raise
            self.report.errors.append(f"{key[0]}/{key[1]}: artifacts: {exc}")
            return
        self.report.uploaded_artifacts += n
        self.report.errors.extend(errors)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def _sync_push(
    lab: Lab,
    store: TrialStore,
    outbox: _Outbox,
    backend: _Backend,
    report: SyncReport,
    contexts: dict[str, _Context],
    artifacts: _SyncArtifacts,
    *,
    all_studies: bool,
) -> None:
    tracked = outbox.studies()
    states = outbox.outbox()
    counts = outbox.event_counts()
    trials = store.trials()
    by_study: dict[str, list[tuple[str, str]]] = {}
    mirrored: set[str] = set()  # studies with trials of the lab's own (not only pulled ones)
    for rec in trials[["model_run_id", "trial_id", "study"]].to_dict("records"):
        key = (rec["model_run_id"], rec["trial_id"])
        study = rec["study"] or rec["model_run_id"]
        if study not in tracked and rec["model_run_id"] in tracked:
            study = rec["model_run_id"]
        if study not in tracked and not all_studies:
            continue
        state = states.get(key)
        n = counts.get(key, 0)
        if n == 0 and (state is None or state[0] == "synced"):
            continue  # known only from MLflow (pulled): nothing to push
        mirrored.add(study)
        if state is not None and state[0] == "synced" and state[2] >= n:
            continue
        by_study.setdefault(study, []).append(key)
    for study, keys in by_study.items():
        ctx = _context_for(backend, lab, outbox, contexts, study, backend.uri)
        for key in keys:
            snap = _snapshot_from_store(store, outbox, key)
            rs = _RunSync(snap, reconcile=True)
            known_run = (states.get(key) or (None, None))[1]
            if known_run:
                rs.run = RunRecord(known_run, ctx.experiment_id, "", None, None, "", None, "")
            try:
                stats = _push(backend, ctx, rs)
            except _BackendError as exc:
                if exc.transient:
                    outbox.mark_pending(key, study, error=str(exc))
                    raise
                report.errors.append(f"{key[0]}/{key[1]}: {exc}")
                outbox.mark_pending(key, study, error=str(exc))
                continue
            assert rs.run is not None
            report.pushed_runs += 1
            report.created_runs += int(stats.created)
            report.pushed_points += stats.points
            report.pushed_params += stats.params
            report.conflicts.extend(stats.conflicts)
            # The store links a trial to one run: the first MLflow it reached keeps it, so a
            # copy in another MLflow does not take the link away (it is in this URI's outbox).
            linked = (store.trial(*key) or {}).get("mlflow_run_id")
            if linked != rs.run.run_id and linked in (None, known_run):
                store.append([_link_event(key, snap.study, rs.run)])
            outbox.mark_pending(key, study, run_id=rs.run.run_id, artifact_uri=rs.run.artifact_uri)
            artifacts.send(key, rs.run.run_id, functools.partial(_same, rs.run), study)
            if _up_to_date(rs) or snap.status == "running":
                outbox.mark_synced(key, study, rs.run.run_id, counts.get(key, 0))
        of_study = trials[(trials["study"] == study) | (trials["model_run_id"] == study)]
        if not (of_study["status"] == "running").any():
            parent = backend.get_run(ctx.parent_run_id)
            if parent is not None and parent.status == "RUNNING":
                backend.set_status(ctx.parent_run_id, "FINISHED", _ms(events.utcnow()))
    # Every mirrored study's parent run gets the study's settings and summary (also one
    # mirrored before parent runs had them, or whose trials were all synced already).
    for study in sorted(mirrored):
        of_study = trials[(trials["study"] == study) | (trials["model_run_id"] == study)]
        if of_study.empty:
            continue
        ctx = _context_for(backend, lab, outbox, contexts, study, backend.uri)
        rows = [
            {**p, "spectral_norm": sn} if sn is not None and "spectral_norm" not in p else p
            for p, sn in zip(of_study["parameters"], of_study["spectral_norm"], strict=True)
        ]
        n, conflicts = _push_study(backend, ctx, *_study_summary(study, rows))
        report.pushed_params += n
        report.conflicts.extend(conflicts)
    # Artifacts of trials that were otherwise synced: spooled after their run was, or held
    # by another MLflow of the lab and not by this one.
    states = outbox.outbox()
    for key in artifacts.remaining():
        run_id = (states.get(key) or (None, None))[1]
        if run_id is not None:
            artifacts.send(key, run_id, functools.partial(backend.get_run, run_id), None)
    report.errors.extend(artifacts.unsent())
    after = outbox.outbox()
    report.still_pending = sum(1 for s in after.values() if s[0] == "pending")


def _pull_experiments(
    lab: Lab, outbox: _Outbox, backend: _Backend, names: Sequence[str]
) -> list[tuple[str, str]]:
    own_backend = backend.uri == f"sqlite:///{lab.mlflow_db}"
    tracked = outbox.studies()
    known_ids = {v[1] for v in outbox.studies(backend.uri).values() if v[1]}
    chosen = []
    for exp_id, name, tags in backend.list_experiments():
        if (
            own_backend
            or exp_id in known_ids
            or name in tracked
            or name in names
            or tags.get(TAG_LAB) == str(lab.root)
        ):
            chosen.append((exp_id, name))
    return chosen


def _sync_pull(
    lab: Lab,
    store: TrialStore,
    outbox: _Outbox,
    backend: _Backend,
    report: SyncReport,
    contexts: dict[str, _Context],
    names: Sequence[str],
) -> None:
    trials = store.trials()
    known: dict[tuple[str, str], dict[str, Any]] = {
        (r["model_run_id"], r["trial_id"]): r for r in trials.to_dict("records")
    }
    recorded = outbox.outbox()
    for exp_id, exp_name in _pull_experiments(lab, outbox, backend, names):
        for run in backend.search_runs([exp_id], ""):
            if run.tags.get(TAG_ROLE) == "study":
                continue
            tagged = TAG_TRIAL_ID in run.tags and TAG_MODEL_RUN_ID in run.tags
            if tagged:
                key = (run.tags[TAG_MODEL_RUN_ID], run.tags[TAG_TRIAL_ID])
            else:
                key = (exp_name, f"mlflow_{run.run_id}")
            row = known.get(key)
            ours = run.tags.get(TAG_SOURCE) == SOURCE_VALUE
            if row is not None and ours:
                if not row.get("mlflow_run_id"):
                    store.append([_link_event(key, row.get("study"), run)])
                    report.linked_trials += 1
                continue
            try:
                n_events, n_points = _pull_run(
                    store, outbox, backend, run, key, exp_name, row, recorded=key in recorded
                )
            except events.EventValidationError as exc:  # e.g. a tag the events cannot hold
                report.errors.append(
                    f"experiment {exp_name!r}: run {run.run_id}: not pulled: "
                    + "; ".join(exc.lines())
                )
                continue
            if n_events:
                report.pulled_runs += 1
                report.pulled_points += n_points
                report.adopted_trials += int(row is None)
                report.linked_trials += int(row is not None)
            if not tagged:
                with contextlib.suppress(_BackendError):
                    backend.log_batch(
                        run.run_id,
                        tags={TAG_TRIAL_ID: key[1], TAG_MODEL_RUN_ID: key[0], TAG_STUDY: key[0]},
                    )


def _pull_run(
    store: TrialStore,
    outbox: _Outbox,
    backend: _Backend,
    run: RunRecord,
    key: tuple[str, str],
    exp_name: str,
    row: Mapping[str, Any] | None,
    *,
    recorded: bool = False,
) -> tuple[int, int]:
    """Append the events that bring a run made outside the lab into the store.

    An adopted run's trial is recorded synced in this URI's outbox (again, when its row is
    missing: ``recorded`` False, e.g. dropped by the migration of an old outbox).
    """
    params = {k: _parse_param(v) for k, v in run.params.items()}
    sn = _sn_from(params, run.tags)
    coeff = params.get("spectral_norm_coeff")
    coeff = float(coeff) if isinstance(coeff, int | float) and coeff > 0 else None
    study = run.tags.get(TAG_STUDY) or exp_name
    base: dict[str, Any] = {"model_run_id": key[0], "trial_id": key[1], "study": study}
    meta = {"mlflow_pull": True, "mlflow_experiment_id": run.experiment_id}
    out: list[events.Event] = []
    have: dict[str, set[int]] = {}
    for name, step, _v, _ts in outbox.metric_points(key):
        have.setdefault(name, set()).add(int(step))
    if row is None:
        start = dict(base, parameters=params, mlflow_run_id=run.run_id, metadata=meta)
        if coeff is not None:
            start["spectral_norm_coeff"] = coeff
        name = "ml.trial.start" if sn is not None else "ml.run.start"
        if sn is not None:
            start["spectral_norm"] = sn
        out.append(
            events.make_event(
                name,
                id=_pull_id("start", run.run_id),
                source=SOURCE,
                timestamp=_from_ms(run.start_time),
                **start,
            )
        )
    else:
        # A trial already linked to a run keeps that link; the outside run adds what the
        # store lacks (params, metric points) and is named in the event's metadata.
        missing = {k: v for k, v in params.items() if k not in (row.get("parameters") or {})}
        link = None if row.get("mlflow_run_id") else run.run_id
        if link or missing:
            out.append(
                events.run_start(
                    id=_pull_id("link", key[0], key[1], run.run_id, sorted(missing)),
                    source=SOURCE,
                    timestamp=_from_ms(run.start_time),
                    mlflow_run_id=link,
                    parameters=missing,
                    metadata={**meta, "mlflow_run_id": run.run_id},
                    **base,
                )
            )
    by_step: dict[int, dict[str, tuple[float, int]]] = {}
    summary: dict[str, float] = {}
    for k in sorted(run.metrics):
        if k.startswith(FINAL_PREFIX):
            summary[k[len(FINAL_PREFIX) :]] = run.metrics[k]
            continue
        if not _metric_key_ok(k) or not _EVENT_METRIC.fullmatch(k):
            continue
        for step, value, ts in backend.metric_history(run.run_id, k):
            if step < 0 or not math.isfinite(value) or step in have.get(k, ()):
                continue
            by_step.setdefault(step, {})[k] = (value, ts)
    n_points = 0
    for step, pts in sorted(by_step.items()):
        measurements = {k: v for k, (v, _ts) in sorted(pts.items())}
        n_points += len(measurements)
        out.append(
            events.run_metric(
                id=_pull_id("metric", run.run_id, step, sorted(measurements.items())),
                source=SOURCE,
                timestamp=_from_ms(max(ts for _v, ts in pts.values())),
                step=step,
                measurements=measurements,
                spectral_norm=sn,
                **base,
            )
        )
    adopted = row is None or bool(
        outbox.query("SELECT 1 FROM events WHERE id = ?", (_pull_id("start", run.run_id),))
    )
    if (
        adopted
        and (row is None or row.get("status") == "running")
        and run.status
        in (
            "FINISHED",
            "FAILED",
            "KILLED",
        )
    ):
        latest = {
            k: v
            for k, v in run.metrics.items()
            if not k.startswith(FINAL_PREFIX) and _EVENT_METRIC.fullmatch(k) and math.isfinite(v)
        }
        latest.update({k: v for k, v in summary.items() if math.isfinite(v)})
        end = dict(base, metrics=latest, mlflow_run_id=run.run_id, metadata=meta)
        ended = _from_ms(run.end_time or run.start_time)
        end_id = _pull_id("end", run.run_id, run.status)
        if sn is None:
            out.append(
                events.run_stop(
                    id=end_id,
                    source=SOURCE,
                    timestamp=ended,
                    success=run.status == "FINISHED",
                    **end,
                )
            )
        elif run.status == "FAILED":
            out.append(
                events.trial_failed(
                    id=end_id,
                    source=SOURCE,
                    timestamp=ended,
                    spectral_norm=sn,
                    parameters=params,
                    error_type=run.tags.get("error_type", "mlflow_failed"),
                    error_message=run.tags.get("error_message", "run FAILED in MLflow"),
                    **end,
                )
            )
        else:
            out.append(
                events.trial_complete(
                    id=end_id,
                    source=SOURCE,
                    timestamp=ended,
                    spectral_norm=sn,
                    parameters=params,
                    status="completed" if run.status == "FINISHED" else "cancelled",
                    **end,
                )
            )
    accepted = store.append(out).accepted if out else 0
    if adopted and (out or not recorded):
        outbox.mark_synced(key, study, run.run_id, 0)
    return accepted, n_points


# ---------------------------------------------------------------------------------------------
# Links for reports and the monitor
# ---------------------------------------------------------------------------------------------


def mlflow_ui_command(lab: Lab) -> str:
    """The command that browses the lab's MLflow data with no server."""
    return f"mlflow ui --backend-store-uri sqlite:///{lab.mlflow_db}"


def run_url(
    tracking_uri: str,
    experiment_id: str | None,
    run_id: str | None,
    *,
    ui_url: str = "http://127.0.0.1:5000",
) -> str | None:
    """The MLflow UI address of a run (``ui_url`` for a SQLite backend browsed by ``mlflow ui``).

    Example:
        >>> run_url("http://mlflow:5000", "3", "abc")
        'http://mlflow:5000/#/experiments/3/runs/abc'
    """
    if not experiment_id or not run_id:
        return None
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else ui_url
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_links(
    lab: Lab,
    store: TrialStore | None = None,
    *,
    study: str | None = None,
    ui_url: str = "http://127.0.0.1:5000",
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """Each trial's MLflow run, its UI link, artifact folder and sync state (no MLflow I/O).

    Columns: ``model_run_id, trial_id, study, mlflow_run_id, experiment_id, run_url,
    artifacts_uri, sync_state`` (``synced`` | ``pending`` | ``not mirrored``). For the
    comparison report and the monitor.

    ``tracking_uri`` chooses which MLflow's copy (a lab may be mirrored to several); by
    default each study's latest one, and a trial's run is the one the store links it to.

    Example:
        >>> mlflow_links(Lab.resolve("lab"), study="sn-ab")  # doctest: +SKIP
    """
    import pandas as pd

    own_store = store is None
    if store is None:
        store = lab.store()
    chosen = _uri_key(tracking_uri) if tracking_uri else None
    outbox = _Outbox(lab.db_path, store)
    try:
        trials = store.trials(study=study)
        studies = outbox.studies(chosen)
        default_uri = chosen or _uri_key(lab.mlflow_tracking_uri)
        uris = {v[0] for v in studies.values()} | {default_uri}
        states_of = {u: outbox.outbox(u) for u in uris}
        counts = outbox.event_counts()
    finally:
        outbox.close()
        if own_store:
            store.close()
    rows = []
    for rec in trials.to_dict("records"):
        key = (rec["model_run_id"], rec["trial_id"])
        tracked = studies.get(rec["study"]) or studies.get(rec["model_run_id"])
        uri, exp_id = (tracked[0], tracked[1]) if tracked else (default_uri, None)
        state = states_of[uri].get(key)
        if chosen is None:
            run_id = rec.get("mlflow_run_id") or (state[1] if state else None)
        else:  # the store's link may be to a run in another MLflow
            run_id = state[1] if state else None
        if state is None:
            sync_state = "pending" if tracked else "not mirrored"
        elif state[0] == "synced" and state[2] >= counts.get(key, 0):
            sync_state = "synced"
        else:
            sync_state = "pending"
        artifacts = state[4] if state else None
        rows.append(
            {
                "model_run_id": key[0],
                "trial_id": key[1],
                "study": rec["study"],
                "mlflow_run_id": run_id,
                "experiment_id": exp_id,
                "run_url": run_url(uri, exp_id, run_id, ui_url=ui_url),
                "artifacts_uri": artifacts,
                "sync_state": sync_state,
            }
        )
    columns = [
        "model_run_id",
        "trial_id",
        "study",
        "mlflow_run_id",
        "experiment_id",
        "run_url",
        "artifacts_uri",
        "sync_state",
    ]
    return pd.DataFrame(rows, columns=columns)

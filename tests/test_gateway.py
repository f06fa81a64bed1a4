"""ThunderGate: HTTP contract, group commit, security, EventClient, fuzzing, end to end.

Everything runs on loopback or in-process (httpx over the ASGI app). The kill -9
durability test lives in ``test_gateway_durability.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import uvicorn
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thunderline_lab import events as E
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import GatewayError, StoreError
from thunderline_lab.gateway import (
    EventClient,
    GroupCommitWriter,
    SendError,
    SendResult,
    create_app,
    is_loopback,
    parse_body,
    serve,
)
from thunderline_lab.lab import Lab
from thunderline_lab.store import StoreWriter, TrialStore

TABLES = ("model_runs", "trials", "metrics", "artifacts")
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
TOKEN = "test-token-0123456789"
NS = uuid.UUID("2b8a3f51-6c55-4a0e-9f0c-5e7a8d4a1b11")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def study_events(
    run: str = "sn-study", n_trials: int = 6, epochs: int = 5, seed: int = 0
) -> list[E.Event]:
    """A realistic study's events with deterministic ids and timestamps.

    Paired SN on/off twins (sharing ``pair_id`` and seed), per-epoch metrics, run start and
    stop, one diverged (failed) trial and one pruned trial.
    """
    rng = random.Random(seed)
    counter = iter(range(10**9))
    t = T0

    def ev_id() -> str:
        return uuid.uuid5(NS, f"{run}-{seed}-{next(counter)}").hex

    out: list[E.Event] = []
    for i in range(n_trials):
        tid = f"trial_{i:04d}"
        sn = i % 2 == 0
        coeff = 1.0 if sn else None
        params = {
            "lr": round(10 ** rng.uniform(-4, -2), 6),
            "depth": 2 + i % 3,
            "width": 64,
            "dropout": 0.1,
            "weight_decay": 1e-4,
            "spectral_norm": sn,
            "spectral_norm_coeff": coeff,
            "seed": 100 + i // 2,
            "pair_id": i // 2,
            "arm": "sn" if sn else "none",
        }
        t += timedelta(seconds=1)
        out.append(
            E.trial_start(
                id=ev_id(),
                timestamp=t,
                model_run_id=run,
                trial_id=tid,
                study=run,
                spectral_norm=sn,
                spectral_norm_coeff=coeff,
                parameters=params,
            )
        )
        t += timedelta(milliseconds=1)
        out.append(
            E.run_start(
                id=ev_id(),
                timestamp=t,
                model_run_id=run,
                trial_id=tid,
                study=run,
                spectral_norm=sn,
                parameters=params,
            )
        )
        diverged = i == 3
        acc = 0.5
        for epoch in range(epochs):
            t += timedelta(milliseconds=20)
            acc = min(0.99, acc + rng.uniform(0.0, 0.1))
            out.append(
                E.run_metric(
                    id=ev_id(),
                    timestamp=t,
                    model_run_id=run,
                    trial_id=tid,
                    study=run,
                    step=epoch,
                    spectral_norm=sn,
                    measurements={
                        "train_loss": 1.0 / (epoch + 1),
                        "val_loss": 1.1 / (epoch + 1),
                        "val_accuracy": acc,
                        "lr": params["lr"],
                        "max_sigma": 1.0 if sn else 1.0 + epoch / 3,
                    },
                )
            )
            if diverged and epoch == 2:
                break
        t += timedelta(milliseconds=5)
        out.append(
            E.run_stop(
                id=ev_id(),
                timestamp=t,
                model_run_id=run,
                trial_id=tid,
                study=run,
                success=not diverged,
                epochs=epochs,
                duration_ms=100,
                artifact_uri=None if diverged else f"file:///lab/runs/{tid}.pt",
            )
        )
        t += timedelta(milliseconds=1)
        if diverged:
            out.append(
                E.trial_failed(
                    id=ev_id(),
                    timestamp=t,
                    model_run_id=run,
                    trial_id=tid,
                    study=run,
                    error_type="diverged",
                    error_message="loss is nan at epoch 2",
                    spectral_norm=sn,
                    parameters=params,
                )
            )
        else:
            out.append(
                E.trial_complete(
                    id=ev_id(),
                    timestamp=t,
                    model_run_id=run,
                    trial_id=tid,
                    study=run,
                    spectral_norm=sn,
                    spectral_norm_coeff=coeff,
                    status="pruned" if i == 5 else "completed",
                    parameters=params,
                    metrics={
                        "val_accuracy": acc,
                        "test_accuracy": acc - 0.01,
                        "generalization_gap": 0.02,
                        "max_sigma": 1.0,
                        "epochs": epochs,
                    },
                    duration_ms=101,
                    rank=i + 1,
                )
            )
    return out


def snapshot(store: TrialStore) -> dict[str, pd.DataFrame]:
    return {t: store.table(t) for t in TABLES}


def assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for table in TABLES:
        pd.testing.assert_frame_equal(a[table], b[table], obj=table)


def local_store(events: list[E.Event]) -> TrialStore:
    store = TrialStore(":memory:")
    store.append(events)
    return store


def event_dict(**payload: Any) -> dict[str, Any]:
    base = {
        "model_run_id": "r",
        "trial_id": "t1",
        "step": 1,
        "metric_name": "loss",
        "metric_value": 0.5,
    }
    base.update(payload)
    return E.run_metric(**base).model_dump(mode="json")


class AsgiClient:
    """A synchronous facade over httpx.AsyncClient + ASGITransport (no sockets, fast)."""

    def __init__(
        self,
        app: Any,
        headers: dict[str, str] | None = None,
        raise_app_exceptions: bool = True,
        root_path: str = "",
    ) -> None:
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(
            app=app, raise_app_exceptions=raise_app_exceptions, root_path=root_path
        )
        self.http = httpx.AsyncClient(
            transport=transport, base_url="http://gateway", headers=headers
        )

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, url, **kw))

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def gather(self, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            return list(
                await asyncio.gather(*(self.http.request(m, u, **kw) for m, u, kw in requests))
            )

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture
def store() -> TrialStore:
    return TrialStore(":memory:")


@pytest.fixture
def gw(store: TrialStore) -> Iterator[AsgiClient]:
    app = create_app(store)
    client = AsgiClient(app)
    yield client
    client.close()
    app.state.writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Run the gateway with uvicorn on a loopback port in a background thread."""

    def __init__(self, app: Any, port: int | None = None, root_path: str = "") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="error", root_path=root_path
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def assert_names_fields(resp: httpx.Response) -> None:
    body = resp.json()
    assert isinstance(body.get("detail"), str) and body["detail"]
    assert body["errors"], body
    for err in body["errors"]:
        assert set(err) >= {"index", "path", "message", "rule"}
        assert isinstance(err["path"], str) and err["path"], err
        assert err["message"]
    assert "Traceback" not in resp.text


# ---------------------------------------------------------------------------------------------
# POST /api/events/ml
# ---------------------------------------------------------------------------------------------


def test_202_only_after_the_events_are_committed(gw: AsgiClient, store: TrialStore) -> None:
    evs = study_events()[:7]
    resp = gw.post("/api/events/ml", content="[" + ",".join(e.model_dump_json() for e in evs) + "]")
    assert resp.status_code == 202
    body = resp.json()
    assert body["accepted"] == 7 and body["duplicates"] == 0
    assert body["ids"] == [e.id for e in evs]
    assert body["last_seq"] == 7
    # the answer arrived, so the events are in the store (read on the same connection)
    stored = {e["id"] for e in store.events_after(0, 100)}
    assert stored == set(body["ids"])
    # an empty batch writes nothing and says where the log is (it said last_seq 0)
    empty = gw.post("/api/events/ml", content="[]")
    assert empty.status_code == 202
    assert empty.json() == {"accepted": 0, "duplicates": 0, "ids": [], "last_seq": 7}


def test_one_event_an_array_and_duplicates(gw: AsgiClient, store: TrialStore) -> None:
    ev = study_events()[0]
    one = gw.post("/api/events/ml", content=ev.model_dump_json())
    assert (one.status_code, one.json()["accepted"]) == (202, 1)
    again = gw.post("/api/events/ml", json=[ev.model_dump(mode="json")] * 3)
    assert again.status_code == 202
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 3)
    assert store.counts()["events"] == 1


def test_json_lines_body(gw: AsgiClient, store: TrialStore) -> None:
    evs = study_events()[:4]
    resp = gw.post(
        "/api/events/ml",
        content="\n".join(e.model_dump_json() for e in evs) + "\n",
        headers={"content-type": "application/x-ndjson"},
    )
    assert resp.status_code == 202 and resp.json()["accepted"] == 4
    assert store.counts()["events"] == 4


def test_json_lines_errors_name_their_lines(gw: AsgiClient, store: TrialStore) -> None:
    good, bad = event_dict(id="good"), event_dict(id="bad", step=2)
    bad["payload"]["step"] = -1
    body = "\n" + json.dumps(good) + "\n\n" + json.dumps(bad) + "\n"
    resp = gw.post("/api/events/ml", content=body)
    assert resp.status_code == 422
    (err,) = resp.json()["errors"]
    assert (err["index"], err["line"], err["path"]) == (1, 4, "payload.step")
    array = gw.post("/api/events/ml", json=[good, bad])  # no lines in one document
    assert array.status_code == 422 and "line" not in array.json()["errors"][0]
    assert store.counts()["events"] == 0


def test_seed_001_posts_with_default_attribution(gw: AsgiClient, store: TrialStore) -> None:
    posts = [
        {
            "event": "ml.run.start",
            "trial_id": "trial_007",
            "metadata": {"spectral_norm": True, "hyperparams": {"lr": 0.001}},
        },
        {
            "event": "ml.run.metric",
            "trial_id": "trial_007",
            "metadata": {"epoch": 0},
            "measurements": {"train_loss": 0.9, "val_accuracy": 0.61},
        },
        {
            "event": "ml.run.stop",
            "trial_id": "trial_007",
            "metadata": {"success": True, "epochs": 1, "mlflow_run_id": "mlflow_abc"},
            "measurements": {"duration_ms": 1200, "final_val_accuracy": 0.61},
        },
    ]
    for post in posts:
        resp = gw.post("/api/events/ml?model_run_id=cerebros-7", json=post)
        assert resp.status_code == 202, resp.text
    trial = store.trial("cerebros-7", "trial_007")
    assert trial is not None
    assert trial["status"] == "completed" and trial["mlflow_run_id"] == "mlflow_abc"
    history = store.metric_history("cerebros-7", "trial_007")
    assert set(history["name"]) == {"train_loss", "val_accuracy"}
    # the same post again is a duplicate (deterministic ids from the content)
    resp = gw.post("/api/events/ml?model_run_id=cerebros-7", json=posts[1])
    assert resp.json()["duplicates"] == 1


def test_seed_002_trial_report(gw: AsgiClient, store: TrialStore) -> None:
    report = {
        "run_id": "cerebros-run",
        "trials": [
            {
                "trial_id": "trial_007",
                "status": "succeeded",
                "spectral_norm": "true",
                "mlflow_run_id": "mlflow_abc",
                "metrics": {"accuracy": 0.95},
                "parameters": {"lr": 0.001},
            },
            {"trial_id": "trial_008", "status": "failed", "spectral_norm": 0, "error": "diverged"},
        ],
    }
    resp = gw.post("/api/events/ml", json=report)
    assert resp.status_code == 202 and resp.json()["accepted"] == 2
    trials = store.trials(model_run_id="cerebros-run").set_index("trial_id")
    assert trials.loc["trial_007", "status"] == "completed"
    assert bool(trials.loc["trial_007", "spectral_norm"]) is True
    assert trials.loc["trial_008", "status"] == "failed"


@pytest.mark.parametrize(
    "body, rule",
    [
        (b"{not json", "json_invalid"),
        (b"", "empty"),
        (b"   \n ", "empty"),
        (b"\xff\xfe{}", "encoding"),
        (b"[" * 20_000 + b"]" * 20_000, "json_depth"),
    ],
)
def test_400_for_unparseable_bodies(gw: AsgiClient, body: bytes, rule: str) -> None:
    resp = gw.post("/api/events/ml", content=body)
    assert resp.status_code == 400
    assert_names_fields(resp)
    assert resp.json()["errors"][0]["rule"] == rule


def test_422_lists_every_error_with_index_and_path(gw: AsgiClient, store: TrialStore) -> None:
    good = event_dict()
    bad_step = event_dict()
    bad_step["payload"]["step"] = -1
    bad_name = {**event_dict(), "name": "ml.run.nope"}
    bad_nan = event_dict()
    bad_nan["payload"]["metric_value"] = "NaN"
    no_trial = event_dict()
    del no_trial["payload"]["trial_id"]
    resp = gw.post("/api/events/ml", json=[good, bad_step, bad_name, bad_nan, no_trial])
    assert resp.status_code == 422
    assert_names_fields(resp)
    found = {(e["index"], e["path"]) for e in resp.json()["errors"]}
    assert {
        (1, "payload.step"),
        (2, "name"),
        (3, "payload.metric_value"),
        (4, "payload.trial_id"),
    } <= found
    assert store.counts()["events"] == 0  # all or nothing


def test_nan_and_infinity_in_free_form_fields_are_a_422_never_null(
    gw: AsgiClient, store: TrialStore
) -> None:
    start = (
        '{"id":"uf-15","timestamp":"2026-12-04T00:00:00Z","name":"ml.trial.start",'
        '"payload":{"model_run_id":"uf","trial_id":"t5","spectral_norm":true,'
        '"parameters":{"lr":NaN},"metadata":{"x":Infinity}}}'
    )
    generic = (
        '{"id":"g-1","timestamp":"2026-12-04T00:00:00Z","name":"system.note",'
        '"payload":{"v":-Infinity}}'
    )
    for body, expected in (
        (start, [(0, "payload.parameters.lr"), (0, "payload.metadata.x")]),
        (f"[{generic}]", [(0, "payload.v")]),
        (
            f"{generic}\n{start}\n",
            [(0, "payload.v"), (1, "payload.parameters.lr"), (1, "payload.metadata.x")],
        ),
    ):
        resp = gw.post("/api/events/ml", content=body)
        assert resp.status_code == 422, resp.text
        assert_names_fields(resp)
        errors = resp.json()["errors"]
        assert sorted((e["index"], e["path"]) for e in errors) == sorted(expected)
        assert {e["rule"] for e in errors} == {"finite_number"}
    assert store.counts()["events"] == 0
    # "NaN" as text is still text
    ok = start.replace("NaN", '"NaN"').replace("Infinity", '"Infinity"')
    assert gw.post("/api/events/ml", content=ok).status_code == 202
    assert store.trial("uf", "t5")["parameters"] == {"lr": "NaN"}


def test_422_for_values_the_store_cannot_hold(gw: AsgiClient, store: TrialStore) -> None:
    cases = {
        "payload.step": {**event_dict(), "payload": {**event_dict()["payload"], "step": 2**70}},
        "timestamp": {**event_dict(), "timestamp": "9999-12-31T23:59:59-23:59"},
        "payload.metadata.note": {
            **event_dict(),
            "payload": {**event_dict()["payload"], "metadata": {"note": "\ud800"}},
        },
    }
    for path, record in cases.items():
        resp = gw.post("/api/events/ml", content=json.dumps(record))
        assert resp.status_code == 422, (path, resp.text)
        assert_names_fields(resp)
        assert resp.json()["errors"][0]["path"] == path
    seed = {"trials": [{"trial_id": "t", "status": "succeeded", "duration_ms": 1e20}]}
    resp = gw.post("/api/events/ml", json=seed)
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["path"] == "trials[0].duration_ms"
    assert store.counts()["events"] == 0


def test_413_above_the_body_limit_declared_or_streamed(store: TrialStore) -> None:
    app = create_app(store, max_body_bytes=1000)
    gw = AsgiClient(app)
    try:
        resp = gw.post("/api/events/ml", content=b"[" + b" " * 2000 + b"]")
        assert resp.status_code == 413
        assert_names_fields(resp)

        async def chunks() -> Any:  # no Content-Length: the streamed size counts
            for _ in range(10):
                yield b" " * 200

        resp = gw.post("/api/events/ml", content=chunks())
        assert resp.status_code == 413
        small = gw.post("/api/events/ml", content=study_events()[0].model_dump_json())
        assert small.status_code == 202
    finally:
        gw.close()
        app.state.writer.close()


def test_413_above_the_batch_limit(store: TrialStore) -> None:
    app = create_app(store, max_batch_events=5)
    gw = AsgiClient(app)
    try:
        evs = study_events()[:6]
        resp = gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in evs])
        assert resp.status_code == 413
        assert_names_fields(resp)
        assert "limit is 5" in resp.json()["detail"]
        assert (
            gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in evs[:5]]).status_code
            == 202
        )
    finally:
        gw.close()
        app.state.writer.close()


def test_401_without_the_token(store: TrialStore) -> None:
    app = create_app(store, token=TOKEN)
    gw = AsgiClient(app)
    body = study_events()[0].model_dump_json()
    try:
        assert gw.post("/api/events/ml", content=body).status_code == 401
        wrong = gw.post("/api/events/ml", content=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert gw.get("/api/trials").status_code == 401
        assert gw.get("/api/events").status_code == 401
        ok = gw.post("/api/events/ml", content=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 202
        assert gw.get("/api/trials", headers={"x-thunderline-token": TOKEN}).status_code == 200
        assert gw.get("/healthz").status_code == 200  # liveness needs no token
        assert store.counts()["events"] == 1
    finally:
        gw.close()
        app.state.writer.close()


def test_request_parameter_errors_name_the_parameter(gw: AsgiClient) -> None:
    for url in ("/api/events?after=x", "/api/events?limit=0", "/api/events/ml?model_run_id="):
        resp = gw.request("POST" if url.startswith("/api/events/ml") else "GET", url, content=b"{}")
        assert resp.status_code == 422
        assert_names_fields(resp)
        assert resp.json()["errors"][0]["path"].startswith("query.")


def test_no_stack_traces_in_error_answers(
    store: TrialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(store)
    gw = AsgiClient(app, raise_app_exceptions=False)  # uvicorn logs it; the client never sees it

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals at /srv/x.py line 3")

    monkeypatch.setattr(store, "trials", boom)
    try:
        resp = gw.get("/api/trials")
        assert resp.status_code == 500
        assert "secret" not in resp.text and "Traceback" not in resp.text
        assert resp.json()["detail"].startswith("internal error")
    finally:
        gw.close()
        app.state.writer.close()


def raw_request(
    app: Any,
    method: str,
    path: bytes,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, Any]]:
    """One request straight to the ASGI app, its bytes as given (an HTTP client would
    percent-encode a query or refuse a header that a raw socket can send)."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(path.decode("latin-1")),
        "raw_path": path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"gateway"), *(headers or [])],
        "server": ("gateway", 80),
        "client": ("127.0.0.1", 5000),
    }
    asyncio.run(app(scope, receive, send))
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body_out)


def test_a_number_too_long_to_read_is_a_422_naming_its_field(
    gw: AsgiClient, store: TrialStore
) -> None:
    huge = "9" * 5000  # Python reads at most 4300 digits into an int
    canonical = event_dict()
    text = json.dumps(canonical).replace('"step": 1', f'"step": {huge}')
    seed = (
        '{"event": "ml.run.metric", "trial_id": "t", "metadata": {"epoch": 1}, '
        f'"measurements": {{"loss": -{huge}}}}}'
    )
    lines = json.dumps(event_dict()) + "\n\n" + text  # JSON lines: record 1 on line 3
    for body, index, path, line in (
        (text, 0, "payload.step", None),
        ("[" + json.dumps(event_dict()) + "," + text + "]", 1, "payload.step", None),
        (seed, 0, "measurements.loss", None),
        (lines, 1, "payload.step", 3),
    ):
        resp = gw.post("/api/events/ml", content=body)
        assert resp.status_code == 422, resp.text
        assert_names_fields(resp)
        (err,) = resp.json()["errors"]
        assert (err["index"], err["path"], err["rule"]) == (index, path, "number_too_long")
        assert err.get("line") == line
        assert "5000 digits" in err["message"]
        assert len(err["value"]) < 100
    with pytest.raises(E.EventValidationError, match=r"payload\.step"):
        parse_body(text.encode())
    assert store.counts()["events"] == 0


def test_model_run_id_in_the_query_is_read_as_utf8(store: TrialStore) -> None:
    app = create_app(store)
    seed = b'{"event": "ml.trial.start", "trial_id": "t", "metadata": {"spectral_norm": true}}'
    try:
        for query in (b"model_run_id=caf\xc3\xa9", b"model_run_id=caf%C3%A9"):
            status, answer = raw_request(app, "POST", b"/api/events/ml", query, body=seed)
            assert status == 202, answer
        assert store.trials()["model_run_id"].tolist() == ["caf\u00e9"]  # not "cafÃ©"
        for query in (b"model_run_id=%FF", b"model_run_id=caf\xe9"):
            status, answer = raw_request(app, "POST", b"/api/events/ml", query, body=seed)
            assert status == 422, answer
            (err,) = answer["errors"]
            assert (err["path"], err["rule"]) == ("query.model_run_id", "string_unicode")
        assert store.counts()["events"] == 1
    finally:
        app.state.writer.close()


def test_a_query_parameter_given_twice_is_refused_not_read_as_its_last(
    gw: AsgiClient, store: TrialStore
) -> None:
    # ?after=5&after=0 was read as after=0; a POST's model_run_id as its last value
    gw.post("/api/events/ml", content=study_events()[0].model_dump_json())
    seed = '{"event": "ml.trial.start", "trial_id": "t", "metadata": {"spectral_norm": true}}'
    for method, url, body in (
        ("GET", "/api/events?after=5&limit=3&after=0", None),
        ("GET", "/api/trials?study=a&study=b", None),
        ("POST", "/api/events/ml?model_run_id=a&model_run_id=b", seed),
    ):
        resp = gw.request(method, url, content=body)
        assert resp.status_code == 422, (url, resp.text)
        assert_names_fields(resp)
        (err,) = resp.json()["errors"]
        name = url.split("?")[1].split("=")[0]
        assert (err["path"], err["rule"]) == (f"query.{name}", "repeated")
        assert "given 2 times" in err["message"]
    assert store.counts()["events"] == 1  # the POST stored nothing
    assert gw.get("/api/events?after=0&limit=3").status_code == 200  # distinct names: fine


def test_a_compressed_body_is_refused_naming_the_header(gw: AsgiClient, store: TrialStore) -> None:
    import gzip

    body = study_events()[0].model_dump_json().encode()
    for encoding in ("gzip", "br", "deflate, gzip"):
        resp = gw.post(
            "/api/events/ml", content=gzip.compress(body), headers={"content-encoding": encoding}
        )
        assert resp.status_code == 415, resp.text
        assert_names_fields(resp)
        assert resp.json()["errors"][0]["path"] == "header.content-encoding"
        assert "uncompressed" in resp.json()["detail"]
    assert store.counts()["events"] == 0
    plain = gw.post("/api/events/ml", content=body, headers={"content-encoding": "identity"})
    assert plain.status_code == 202


def test_another_web_page_cannot_post_events_through_the_browser(
    gw: AsgiClient, store: TrialStore
) -> None:
    # without a token the gateway trusts loopback; a page on another site that the
    # researcher has open must not be able to write into the lab with a "simple" POST
    body = study_events()[0].model_dump_json()
    resp = gw.post(
        "/api/events/ml",
        content=body,
        headers={
            "content-type": "text/plain",
            "origin": "https://evil.example",
            "sec-fetch-site": "cross-site",
        },
    )
    assert resp.status_code == 403, resp.text
    assert_names_fields(resp)
    assert resp.json()["errors"][0]["path"] == "header.sec-fetch-site"
    assert store.counts()["events"] == 0
    docs_page = gw.post(  # /docs "Try it out": the gateway's own page
        "/api/events/ml", content=body, headers={"sec-fetch-site": "same-origin"}
    )
    assert docs_page.status_code == 202
    assert store.counts()["events"] == 1


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://gateway:8080"])
def test_a_page_of_another_origin_cannot_post_without_sec_fetch_site(
    gw: AsgiClient, store: TrialStore, origin: str
) -> None:
    # an older browser sends no Sec-Fetch-Site, but every cross-origin POST has an Origin
    body = study_events()[0].model_dump_json()
    headers = {"content-type": "text/plain", "origin": origin}
    resp = gw.post("/api/events/ml", content=body, headers=headers)
    assert resp.status_code == 403, resp.text
    assert store.counts()["events"] == 0
    same = gw.post("/api/events/ml", content=body, headers={"origin": "http://gateway"})
    assert same.status_code == 202  # the gateway's own /docs page
    plain = gw.post("/api/events/ml", content=study_events()[1].model_dump_json())
    assert plain.status_code == 202  # HTTP clients send no Origin
    assert store.counts()["events"] == 2


def test_header_errors_name_the_header_and_tokens_compare_as_sent_bytes(
    store: TrialStore,
) -> None:
    token = "t\u00f6ken-0123456789"  # not ASCII: its UTF-8 bytes arrive as they are
    app = create_app(store, token=token)
    body = study_events()[0].model_dump_json().encode()
    auth = [(b"authorization", b"Bearer " + token.encode())]
    try:
        status, answer = raw_request(app, "POST", b"/api/events/ml", headers=auth, body=body)
        assert status == 202, answer
        status, answer = raw_request(app, "GET", b"/api/events", headers=auth)
        assert status == 200, answer  # the GET routes read the same bytes
        assert [e["seq"] for e in answer["events"]] == [1]
        for method, path in (("POST", b"/api/events/ml"), ("GET", b"/api/trials")):
            status, answer = raw_request(
                app, method, path, headers=[(b"authorization", b"Token abc")], body=body
            )
            assert status == 401
            assert answer["errors"][0]["path"] == "header.authorization", answer
        status, answer = raw_request(
            app,
            "POST",
            b"/api/events/ml",
            headers=[*auth, (b"content-length", b"-1")],
            body=body,
        )
        assert status == 400
        assert answer["errors"][0]["path"] == "header.content-length", answer
    finally:
        app.state.writer.close()


# ---------------------------------------------------------------------------------------------
# GET endpoints, OpenAPI
# ---------------------------------------------------------------------------------------------


def test_events_after_pages_through_the_log(gw: AsgiClient) -> None:
    evs = study_events()
    gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in evs])
    seen: list[str] = []
    after = 0
    while True:
        page = gw.get(f"/api/events?after={after}&limit=7").json()
        if not page["events"]:
            assert page["next_after"] == after
            break
        assert [e["seq"] for e in page["events"]] == list(range(after + 1, page["next_after"] + 1))
        seen += [e["id"] for e in page["events"]]
        after = page["next_after"]
    assert seen == [e.id for e in evs]


def test_a_page_of_large_events_ends_at_the_byte_budget(
    gw: AsgiClient, store: TrialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import thunderline_lab.gateway as gateway_module

    evs = study_events()
    store.append(evs)
    monkeypatch.setattr(gateway_module, "EVENTS_PAGE_BYTES", 1)  # each event "large"
    seen: list[str] = []
    after = 0
    while True:
        page = gw.get(f"/api/events?after={after}&limit=1000").json()
        if not page["events"]:
            break
        assert len(page["events"]) == 1  # one event a page, not the whole log at once
        seen += [e["id"] for e in page["events"]]
        after = page["next_after"]
    assert seen == [e.id for e in evs]


def test_trials_and_one_trial(gw: AsgiClient) -> None:
    gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in study_events()])
    trials = gw.get("/api/trials").json()["trials"]
    assert [t["trial_id"] for t in trials] == [f"trial_{i:04d}" for i in range(6)]
    assert {t["status"] for t in trials} == {"completed", "failed", "pruned"}
    only_sn = gw.get("/api/trials?spectral_norm=true&status=completed").json()["trials"]
    assert only_sn and all(t["spectral_norm"] is True for t in only_sn)
    one = gw.get("/api/trials/sn-study/trial_0003")
    assert one.status_code == 200
    assert one.json()["error_type"] == "diverged" and one.json()["rank"] is None
    assert one.json()["parameters"]["pair_id"] == 1
    missing = gw.get("/api/trials/sn-study/trial_9999")
    assert missing.status_code == 404 and "trial_9999" in missing.json()["detail"]
    health = gw.get("/healthz").json()
    assert health["status"] == "ok" and health["last_seq"] == len(study_events())


def test_an_unknown_status_filter_is_a_422_naming_the_allowed_ones(gw: AsgiClient) -> None:
    resp = gw.get("/api/trials", params={"status": "bogus"})
    assert resp.status_code == 422
    [error] = resp.json()["errors"]
    assert error["path"] == "query.status"
    for status in ("running", *E.TERMINAL_STATUSES):
        assert status in error["message"]
        assert gw.get("/api/trials", params={"status": status}).status_code == 200


def test_healthz_answers_head(gw: AsgiClient) -> None:
    resp = gw.request("HEAD", "/healthz")
    assert resp.status_code == 200 and resp.content == b""


def test_a_trial_whose_ids_hold_slashes_is_found_when_they_are_encoded(gw: AsgiClient) -> None:
    start = E.trial_start(model_run_id="r/1", trial_id="a/b", spectral_norm=True)
    assert gw.post("/api/events/ml", json=start.model_dump(mode="json")).status_code == 202
    one = gw.get("/api/trials/r%2F1/a%2Fb")
    assert one.status_code == 200, one.text
    assert (one.json()["model_run_id"], one.json()["trial_id"]) == ("r/1", "a/b")
    ambiguous = gw.get("/api/trials/r/1/a/b")
    assert ambiguous.status_code == 404 and "%2F" in ambiguous.json()["detail"]


def _long_curve(run: str, trial: str, n: int) -> list[E.Event]:
    common = {"model_run_id": run, "trial_id": trial}
    return [
        E.trial_start(**common, spectral_norm=True),
        *(
            E.run_metric(**common, step=s, measurements={"loss": 1 / (s + 1), "acc": s / n})
            for s in range(n)
        ),
    ]


def test_trial_metrics_are_the_stores_downsampled_history(
    gw: AsgiClient, store: TrialStore
) -> None:
    store.append(_long_curve("r", "t", 3000))
    store.append(study_events())
    for run, trial, query, names, max_points in (
        ("r", "t", "max_points=100", None, 100),
        ("r", "t", "names=acc&max_points=50", ["acc"], 50),
        ("r", "t", "", None, 1000),  # the default: 1000 points a curve
        ("sn-study", "trial_0001", "names=val_loss,lr", ["val_loss", "lr"], 1000),
    ):
        url = f"/api/trials/{run}/{trial}/metrics?{query}"
        resp = gw.get(url)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert (body["model_run_id"], body["trial_id"]) == (run, trial)
        want = store.metric_history(run, trial, names, max_points=max_points)
        assert len(want) > 0
        got = [
            (trial, name, step, value)
            for name, curve in sorted(body["metrics"].items())
            for step, value in zip(curve["steps"], curve["values"], strict=True)
        ]
        assert got == list(want.itertuples(index=False, name=None)), url
        assert all(len(c["steps"]) <= max_points for c in body["metrics"].values())
    started = E.trial_start(model_run_id="r", trial_id="quiet", spectral_norm=False)
    store.append([started])
    quiet = gw.get("/api/trials/r/quiet/metrics")  # a trial without metrics yet
    assert quiet.status_code == 200 and quiet.json()["metrics"] == {}
    missing = gw.get("/api/trials/r/nope/metrics")
    assert missing.status_code == 404 and "'nope'" in missing.json()["detail"]


def test_trial_metrics_limits_name_the_parameter_and_need_the_token(store: TrialStore) -> None:
    store.append(_long_curve("r", "t", 10))
    app = create_app(store, token=TOKEN)
    gw = AsgiClient(app, headers={"authorization": f"Bearer {TOKEN}"})
    try:
        for query, field in (
            ("max_points=1", "query.max_points"),
            ("max_points=10001", "query.max_points"),
            ("max_points=many", "query.max_points"),
            ("names=acc,,loss", "query.names"),
            ("names=", "query.names"),
            ("names=" + ",".join(f"m{i}" for i in range(101)), "query.names"),
        ):
            resp = gw.get(f"/api/trials/r/t/metrics?{query}")
            assert resp.status_code == 422, query
            assert_names_fields(resp)
            assert [e["path"] for e in resp.json()["errors"]] == [field], query
        # the encoded route (ids holding '/') validates the same
        assert gw.get("/api/trials/r%2Fx/t/metrics?max_points=1").status_code == 422
        assert gw.get("/api/trials/r/t/metrics?max_points=2").status_code == 200
        no_token = gw.get("/api/trials/r/t/metrics", headers={"authorization": "Bearer nope"})
        assert no_token.status_code == 401
    finally:
        gw.close()
        app.state.writer.close()


def test_the_metrics_route_and_the_trial_route_never_take_each_others_paths(
    gw: AsgiClient, store: TrialStore
) -> None:
    store.append(_long_curve("r/1", "a/b", 5))  # ids holding '/': sent as %2F
    store.append(_long_curve("r", "metrics", 3))  # a trial named "metrics"
    store.append(_long_curve("r", "t/metrics", 4))  # ... and one named "t/metrics"
    store.append(_long_curve("r", "1", 2))  # what /api/trials/r%2F1 decodes to
    slashed = gw.get("/api/trials/r%2F1/a%2Fb/metrics?names=acc")
    assert slashed.status_code == 200, slashed.text
    assert (slashed.json()["model_run_id"], slashed.json()["trial_id"]) == ("r/1", "a/b")
    assert slashed.json()["metrics"]["acc"]["steps"] == [0, 1, 2, 3, 4]
    named = gw.get("/api/trials/r/metrics")  # the trial "metrics", not a metrics route
    assert named.status_code == 200 and named.json()["trial_id"] == "metrics"
    assert gw.get("/api/trials/r/metrics/metrics").json()["metrics"]["acc"]["steps"] == [0, 1, 2]
    encoded = gw.get("/api/trials/r/t%2Fmetrics")  # trial "t/metrics", not t's metrics
    assert encoded.status_code == 200 and encoded.json()["trial_id"] == "t/metrics"
    curves = gw.get("/api/trials/r/t%2Fmetrics/metrics").json()["metrics"]
    assert curves["loss"]["steps"] == [0, 1, 2, 3]
    one_id = gw.get("/api/trials/r%2F1")  # one id, not trial "1" of run "r"
    assert one_id.status_code == 404 and "%2F" in one_id.json()["detail"]
    assert gw.get("/api/trials/r/1").json()["trial_id"] == "1"
    assert gw.get("/api/trials/r/1/a/b/metrics").status_code == 404
    spec = gw.get("/openapi.json").json()
    route = spec["paths"]["/api/trials/{model_run_id}/{trial_id}/metrics"]["get"]
    assert {p["name"] for p in route["parameters"]} >= {"names", "max_points"}


def _mounted_under(prefix: str, app: Any, kind: str) -> Any:
    """``app`` as a sub-application at ``prefix`` of another app (Starlette or FastAPI)."""
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.routing import Mount

    if kind == "starlette":
        return Starlette(routes=[Mount(prefix, app=app)])
    outer = FastAPI()
    outer.mount(prefix, app)
    return outer


@pytest.mark.parametrize(
    "setup",
    [
        "root_path",  # uvicorn --root-path: the path the app sees starts with the prefix
        "fastapi_root_path",  # FastAPI(root_path=...): the path arrives without the prefix
        "starlette_mount",
        "fastapi_mount",
    ],
)
def test_every_route_and_the_docs_work_under_a_path_prefix(store: TrialStore, setup: str) -> None:
    store.append(_long_curve("r/1", "a/b", 5))  # ids holding '/': sent as %2F
    store.append(_long_curve("r", "t", 3))
    app = create_app(store)
    if setup == "root_path":
        gw = AsgiClient(app, root_path="/tg")
    elif setup == "fastapi_root_path":
        app.root_path = "/tg"
        gw = AsgiClient(app)
    else:
        gw = AsgiClient(_mounted_under("/tg", app, setup.removesuffix("_mount")))
    # the path the app is sent (a proxy in front of it strips its prefix, or not)
    at = "" if setup == "fastapi_root_path" else "/tg"
    try:
        one = gw.get(f"{at}/api/trials/r/t")
        assert one.status_code == 200, one.text
        assert one.json()["trial_id"] == "t"
        slashed = gw.get(f"{at}/api/trials/r%2F1/a%2Fb")
        assert slashed.status_code == 200, slashed.text
        assert (slashed.json()["model_run_id"], slashed.json()["trial_id"]) == ("r/1", "a/b")
        curves = gw.get(f"{at}/api/trials/r%2F1/a%2Fb/metrics?names=acc&max_points=2")
        assert curves.status_code == 200, curves.text
        assert curves.json()["metrics"]["acc"]["steps"] == [0, 4]
        assert gw.get(f"{at}/api/trials/r/t/metrics").json()["metrics"]["loss"]["steps"] == [
            0,
            1,
            2,
        ]
        ambiguous = gw.get(f"{at}/api/trials/r/1/a/b")
        assert ambiguous.status_code == 404 and "%2F" in ambiguous.json()["detail"]
        assert gw.get(f"{at}/api/trials/r/nope").status_code == 404
        assert gw.get(f"{at}/api/trials/r/t/metrics?max_points=1").status_code == 422
        posted = E.trial_start(model_run_id="p", trial_id="q", spectral_norm=False)
        resp = gw.post(f"{at}/api/events/ml", content=posted.model_dump_json())
        assert resp.status_code == 202, resp.text
        assert gw.get(f"{at}/api/trials/p/q").json()["spectral_norm"] is False
        assert gw.get(f"{at}/api/trials").json()["trials"]
        assert gw.get(f"{at}/api/events?limit=1").json()["next_after"] == 1
        assert gw.get(f"{at}/healthz").json()["status"] == "ok"
        # /docs points the browser at the prefixed URLs, which the proxy maps back
        docs = gw.get(f"{at}/docs")
        assert docs.status_code == 200
        for url in (
            "/tg/openapi.json",
            "/tg/docs/static/swagger-ui-bundle.js",
            "/tg/docs/static/swagger-ui.css",
        ):
            assert f"'{url}'" in docs.text or f'"{url}"' in docs.text, url
            assert gw.get(at + url.removeprefix("/tg")).status_code == 200, url
        spec = gw.get(f"{at}/openapi.json").json()
        assert {"url": "/tg"} in spec["servers"]  # "Try it out" calls the prefixed paths
    finally:
        gw.close()
        app.state.writer.close()


def test_uvicorn_root_path_behind_a_prefix_stripping_proxy(store: TrialStore) -> None:
    store.append(_long_curve("r/1", "a/b", 3))
    app = create_app(store)
    try:
        with ServerThread(app, root_path="/thundergate") as server:
            # the proxy maps /thundergate/... to the gateway's /...
            one = httpx.get(f"{server.url}/api/trials/r%2F1/a%2Fb", timeout=10)
            assert one.status_code == 200, one.text
            assert one.json()["trial_id"] == "a/b"
            curves = httpx.get(f"{server.url}/api/trials/r%2F1/a%2Fb/metrics", timeout=10)
            assert curves.json()["metrics"]["acc"]["steps"] == [0, 1, 2]
            docs = httpx.get(f"{server.url}/docs", timeout=10)
            assert "'/thundergate/openapi.json'" in docs.text
            started = E.trial_start(model_run_id="p", trial_id="q", spectral_norm=True)
            with EventClient(server.url) as client:  # in real life: the proxy's URL
                sent = client.send([started])
            assert sent.accepted == 1
    finally:
        app.state.writer.close()
    assert store.trial("p", "q") is not None


def test_serve_passes_the_root_path_to_uvicorn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        app.state.writer.close()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    serve(tmp_path / "lab", port=0, root_path="/thundergate/")
    assert seen["root_path"] == "/thundergate"
    serve(tmp_path / "lab", port=0)
    assert seen["root_path"] == ""
    from thunderline_lab.cli import main

    result = CliRunner().invoke(
        main, ["serve", "--lab", str(tmp_path / "lab"), "--port", "0", "--root-path", "/tg"]
    )
    assert result.exit_code == 0, result.output
    assert seen["root_path"] == "/tg"


def test_a_gateway_without_a_token_answers_only_loopback_host_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps: list[Any] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        apps.append(app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    serve(tmp_path / "lab", port=0, allowed_hosts=["lab.example"])
    serve(tmp_path / "lab2", port=0, token="a-long-token")
    tokenless, with_token = apps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    event = E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True).model_dump(
        mode="json"
    )
    with TestClient(tokenless, base_url="http://127.0.0.1:8765") as http:
        for host in ("127.0.0.1:8765", "localhost", "[::1]:8765", "lab.localhost", "LAB.example"):
            assert http.get("/healthz", headers={"host": host}).status_code == 200, host
        # DNS rebinding: the attacker's name now points at 127.0.0.1, its requests are
        # same-origin for the browser, but they still say whose name they were sent to
        for host in ("attacker.example", "attacker.example:8765", "127.0.0.1.nip.io", "[bad"):
            resp = http.post("/api/events/ml", json=event, headers={"host": host})
            assert resp.status_code == 403, host
            assert resp.json()["errors"][0]["path"] == "header.host"
            assert http.get("/api/trials", headers={"host": host}).status_code == 403
        assert tokenless.state.store.counts()["events"] == 0  # nothing was written
        assert http.post("/api/events/ml", json=event).status_code == 202
    with TestClient(with_token, base_url="http://lab.example") as http:  # the token protects
        resp = http.get("/healthz", headers={"authorization": "Bearer a-long-token"})
        assert resp.status_code == 200


def test_trials_keep_every_digit_of_their_floats(gw: AsgiClient) -> None:
    params = {"lr": 0.00012345678901234, "tiny": 1.2345678901234e-12}
    evs = [
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, parameters=params),
        E.trial_complete(
            model_run_id="r", trial_id="t", spectral_norm=True, metrics={"big": 123456789012.345}
        ),
    ]
    gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in evs])
    (trial,) = gw.get("/api/trials").json()["trials"]
    assert trial["parameters"] == params and trial["metrics"] == {"big": 123456789012.345}
    assert trial["rank"] is None and trial["ended_at"]


def test_openapi_documents_the_body_schema(gw: AsgiClient) -> None:
    spec = gw.get("/openapi.json").json()
    assert {
        "/api/events/ml",
        "/api/events",
        "/api/trials",
        "/api/trials/{model_run_id}/{trial_id}",
        "/healthz",
    } <= set(spec["paths"])
    post = spec["paths"]["/api/events/ml"]["post"]
    assert {"202", "400", "401", "413", "422"} <= set(post["responses"])
    text = json.dumps(spec)
    refs = {
        r.split("/")[-1] for r in __import__("re").findall(r'"#/components/schemas/[^"]+"', text)
    }
    assert {r.strip('"') for r in refs} <= set(spec["components"]["schemas"])
    assert "TrialCompleteEvent" in spec["components"]["schemas"]
    docs = gw.get("/docs")
    assert docs.status_code == 200
    # Swagger UI from the installed package: /docs works on a machine without internet
    assert "cdn." not in docs.text and "/docs/static/swagger-ui-bundle.js" in docs.text
    bundle = gw.get("/docs/static/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text


# ---------------------------------------------------------------------------------------------
# Group commit
# ---------------------------------------------------------------------------------------------


def test_openapi_declares_the_token_where_it_is_checked(store: TrialStore) -> None:
    app = create_app(store, token=TOKEN)
    http = AsgiClient(app)
    try:
        spec = http.get("/openapi.json").json()
        schemes = spec["components"]["securitySchemes"]
        assert schemes["bearerToken"] == {
            **schemes["bearerToken"],
            "type": "http",
            "scheme": "bearer",
        }
        assert schemes["tokenHeader"]["name"] == "X-Thunderline-Token"
        either = [{"bearerToken": []}, {"tokenHeader": []}]
        ops = {(m, path): op for path, item in spec["paths"].items() for m, op in item.items()}
        for (method, path), op in ops.items():
            assert op.get("security") == (None if path == "/healthz" else either), path
            codes = set(op["responses"])
            if (method, path) == ("post", "/api/events/ml"):
                assert {"400", "409", "413", "415"} <= codes
            else:
                assert not {"400", "409", "413", "415"} & codes, path
        assert ("get", "/api/trials") in ops and "401" in ops[("get", "/api/trials")]["responses"]
        # as documented, so checked: the bearer scheme and the header both open the routes
        assert http.get("/api/trials").status_code == 401
        for header in ({"authorization": f"Bearer {TOKEN}"}, {"x-thunderline-token": TOKEN}):
            assert http.get("/api/trials", headers=header).status_code == 200
    finally:
        http.close()
        app.state.writer.close()
    tokenless = create_app(TrialStore(":memory:"))
    spec = tokenless.openapi()
    assert "securitySchemes" not in spec["components"]
    assert all("security" not in op for item in spec["paths"].values() for op in item.values())


def test_concurrent_requests_share_one_transaction(gw: AsgiClient, store: TrialStore) -> None:
    evs = study_events(n_trials=6, epochs=5)
    requests = [("POST", "/api/events/ml", {"content": e.model_dump_json()}) for e in evs]
    # Hold the store while the requests arrive, so they queue up behind the writer.
    with store._lock:
        results: list[httpx.Response] = []
        t = threading.Thread(target=lambda: results.extend(gw.gather(*requests)))
        t.start()
        deadline = time.monotonic() + 10
        writer = gw.http._transport.app.state.writer  # type: ignore[attr-defined]
        while writer.pending_events < len(evs) and time.monotonic() < deadline:
            time.sleep(0.01)
    t.join()
    assert [r.status_code for r in results] == [202] * len(evs)
    assert writer.requests == len(evs)
    assert writer.groups <= 2  # the first request, then everyone who queued meanwhile
    assert store.counts()["events"] == len(evs)


def test_a_bad_request_does_not_fail_its_group(gw: AsgiClient, store: TrialStore) -> None:
    good = [study_events()[i].model_dump_json() for i in range(3)]
    deep = event_dict(id="bad-one")
    deep["payload"]["metadata"] = {"deep": json.loads("[" * 300 + "]" * 300)}
    bad = json.dumps(deep)
    with store._lock:
        results: list[httpx.Response] = []
        reqs = [("POST", "/api/events/ml", {"content": b}) for b in (good[0], bad, *good[1:])]
        t = threading.Thread(target=lambda: results.extend(gw.gather(*reqs)))
        t.start()
        time.sleep(0.3)
    t.join()
    assert [r.status_code for r in results] == [202, 422, 202, 202]
    assert results[1].json()["errors"][0]["path"] == "payload.metadata"
    assert store.counts()["events"] == 3


@pytest.mark.parametrize("restated", [False, True])
def test_an_event_sent_in_two_requests_of_one_group_is_stored_once(
    gw: AsgiClient, store: TrialStore, restated: bool
) -> None:
    evs = study_events()[:4]
    records = [e.model_dump(mode="json") for e in evs]
    repeat = _restated(evs[2]) if restated else records[2]
    bodies = [json.dumps(records[1:3]), json.dumps([repeat, records[3]])]
    writer = gw.http._transport.app.state.writer  # type: ignore[attr-defined]

    def wait_for(pending: int, queued: int) -> None:
        deadline = time.monotonic() + 10
        while (writer.pending_events, len(writer._queue)) != (pending, queued):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    other = AsgiClient(gw.http._transport.app)  # type: ignore[attr-defined]  # its own loop
    with store._lock:  # the writer takes the first request and waits: the next two queue
        first: list[httpx.Response] = []
        t1 = threading.Thread(
            target=lambda: first.append(
                other.post("/api/events/ml", content=evs[0].model_dump_json())
            )
        )
        t1.start()
        wait_for(1, 0)  # taken by the writer
        results: list[httpx.Response] = []
        reqs = [("POST", "/api/events/ml", {"content": b}) for b in bodies]
        t2 = threading.Thread(target=lambda: results.extend(gw.gather(*reqs)))
        t2.start()
        wait_for(5, 2)
    t1.join()
    t2.join()
    other.close()
    assert first[0].status_code == 202
    if restated:  # whichever went first is logged; the other names another event: 409
        assert sorted(r.status_code for r in results) == [202, 409]
        (err,) = next(r for r in results if r.status_code == 409).json()["errors"]
        assert (err["path"], err["rule"]) == ("payload.trial_id", "id_conflict")
        assert store.counts()["events"] == 3
        return
    assert [r.status_code for r in results] == [202, 202]
    counts = sorted((r.json()["accepted"], r.json()["duplicates"]) for r in results)
    assert counts == [(1, 1), (2, 0)]  # whichever went first logged evs[2]
    assert writer.groups == 2 and store.counts()["events"] == 4


def _restated(ev: E.Event) -> dict[str, Any]:
    """``ev``'s id with another payload: a second event under the first one's name."""
    other = ev.model_dump(mode="json")
    other["payload"]["trial_id"] = "somebody-else"
    return other


def test_409_when_an_id_already_names_another_event(gw: AsgiClient, store: TrialStore) -> None:
    evs = study_events()
    assert gw.post("/api/events/ml", content=evs[0].model_dump_json()).status_code == 202
    resp = gw.post("/api/events/ml", json=[evs[1].model_dump(mode="json"), _restated(evs[0])])
    assert resp.status_code == 409
    (err,) = resp.json()["errors"]
    assert (err["index"], err["path"], err["rule"]) == (1, "payload.trial_id", "id_conflict")
    assert evs[0].id in err["message"]
    assert store.counts()["events"] == 1  # evs[1] was not written either


def test_409_when_an_event_would_rewrite_a_finished_trial(
    gw: AsgiClient, store: TrialStore
) -> None:
    # a new ml.trial.complete for a finished trial, pruned and with the other arm, was a 202
    # that rewrote the trial (and took its pair out of the comparison)
    evs = [ev for ev in study_events() if ev.payload.trial_id == "trial_0000"]
    first = gw.post("/api/events/ml", json=[e.model_dump(mode="json") for e in evs])
    assert first.status_code == 202, first.text
    before = store.trials().to_json()
    done = next(e for e in evs if e.name == "ml.trial.complete").model_dump(mode="json")
    again = {**done, "id": "another-outcome"}
    again["payload"] = {**done["payload"], "spectral_norm": False, "status": "pruned"}
    resp = gw.post("/api/events/ml", json=again)
    assert resp.status_code == 409, resp.text
    assert resp.json()["detail"] == "2 events contradict what is stored"
    assert_names_fields(resp)
    rules = {(e["path"], e["rule"]) for e in resp.json()["errors"]}
    assert rules == {
        ("payload.spectral_norm", "trial_conflict"),
        ("payload.status", "trial_finished"),
    }
    assert store.trials().to_json() == before


def test_a_409_for_a_json_lines_body_names_each_records_line(
    gw: AsgiClient, store: TrialStore
) -> None:
    # the 422 of a JSON-lines body named each record's line; its 409 named only the index
    evs = study_events()
    assert gw.post("/api/events/ml", content=evs[0].model_dump_json()).status_code == 202
    body = evs[1].model_dump_json() + "\n\n" + json.dumps(_restated(evs[0])) + "\n"
    resp = gw.post("/api/events/ml", content=body)
    assert resp.status_code == 409, resp.text
    (err,) = resp.json()["errors"]
    assert (err["index"], err["line"], err["rule"]) == (1, 3, "id_conflict")
    assert store.counts()["events"] == 1


def test_a_409_for_a_seed_report_names_its_record_trial_and_line(
    gw: AsgiClient, store: TrialStore
) -> None:
    # a seed 002 record is one event per trial: the 409 named event 3 of a 2-record body
    def report(*trials: tuple[str, str]) -> str:
        return json.dumps({"trials": [{"trial_id": t, "status": st} for t, st in trials]})

    first = report(("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded"))
    assert gw.post("/api/events/ml?model_run_id=r", content=first).status_code == 202
    body = report(("d", "succeeded"), ("e", "succeeded"), ("f", "succeeded"))
    body += "\n" + report(("c", "failed"))
    resp = gw.post("/api/events/ml?model_run_id=r", content=body)
    assert resp.status_code == 409, resp.text
    (err,) = resp.json()["errors"]
    assert (err["index"], err["path"], err["line"], err["rule"]) == (
        1,
        "trials[0].status",
        2,
        "trial_finished",
    )
    assert store.counts()["trials"] == 3


def test_a_conflicting_request_does_not_fail_its_group(gw: AsgiClient, store: TrialStore) -> None:
    evs = study_events()[:3]
    bodies = [evs[0].model_dump_json(), json.dumps(_restated(evs[0])), evs[1].model_dump_json()]
    with store._lock:  # the writer waits: the three requests queue for one group
        results: list[httpx.Response] = []
        reqs = [("POST", "/api/events/ml", {"content": b}) for b in bodies]
        t = threading.Thread(target=lambda: results.extend(gw.gather(*reqs)))
        t.start()
        time.sleep(0.3)
    t.join()
    assert [r.status_code for r in results] == [202, 409, 202]
    assert store.counts()["events"] == 2
    assert store.trial("sn-study", "trial_0000") is not None
    assert store.trial("sn-study", "somebody-else") is None


def test_store_failure_is_a_503_never_a_202(
    store: TrialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(store)
    gw = AsgiClient(app)

    def fail(events: Any) -> Any:
        raise StoreError("disk full")

    monkeypatch.setattr(store, "append_prepared", fail)
    try:
        resp = gw.post("/api/events/ml", content=study_events()[0].model_dump_json())
        assert resp.status_code == 503 and resp.headers["retry-after"]
        assert "disk full" not in resp.text
    finally:
        gw.close()
        app.state.writer.close()


def test_backpressure_when_too_many_events_wait(store: TrialStore) -> None:
    writer = GroupCommitWriter(store, max_pending_events=20)
    evs = study_events()
    with store._lock:
        first = writer.submit(evs[:8])
        time.sleep(0.1)  # the writer takes the first request and blocks on the store
        second = writer.submit(evs[8:16])
        assert writer.pending_events == 16
        with pytest.raises(GatewayError, match="retry later"):
            writer.submit(evs[16:21])
    assert first.result(10).accepted == 8 and second.result(10).accepted == 8
    writer.close()


def test_parse_body_accepts_every_wire_shape() -> None:
    canonical = study_events()[0].model_dump_json().encode()
    seed = b'{"event": "ml.trial.start", "trial_id": "t", "metadata": {"spectral_norm": 1}}'
    assert [e.name for e in parse_body(canonical)] == ["ml.trial.start"]
    assert parse_body(seed, default_model_run_id="x")[0].payload.model_run_id == "x"  # type: ignore[union-attr]
    with pytest.raises(E.EventValidationError) as err:
        parse_body(b"[" + b",".join([canonical] * 3) + b"]", max_events=2)
    assert err.value.errors[0].rule == "batch_too_large"


def test_canonical_bodies_reach_the_store_on_the_fast_path_as_the_models_read_them() -> None:
    from thunderline_lab.gateway import _parse_for_store

    evs = study_events(n_trials=2, epochs=3)
    body = ("[" + ",".join(e.model_dump_json() for e in evs) + "]").encode()
    fast = _parse_for_store(body, default_model_run_id="x", max_events=1000)
    assert fast and all(E.is_fast(ev) for ev in fast)  # not the models: the fast path
    assert [E.to_event(ev) for ev in fast] == parse_body(body) == evs
    one = _parse_for_store(
        evs[0].model_dump_json().encode(), default_model_run_id="x", max_events=9
    )
    assert [E.to_event(ev) for ev in one] == evs[:1]
    seed = b'{"event": "ml.trial.start", "trial_id": "t", "metadata": {"spectral_norm": 1}}'
    assert not E.is_fast(_parse_for_store(seed, default_model_run_id="x", max_events=9)[0])
    via_fast, via_models = TrialStore(), TrialStore()
    via_fast.append(fast)
    via_models.append(evs)
    for table in TABLES:
        pd.testing.assert_frame_equal(via_fast.table(table), via_models.table(table))


# ---------------------------------------------------------------------------------------------
# Serving, security
# ---------------------------------------------------------------------------------------------


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.8.0.1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.org")


def test_serve_refuses_non_loopback_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match="without a token"):
        serve(tmp_path / "lab", host="0.0.0.0")
    with pytest.raises(GatewayError, match="too short"):
        serve(tmp_path / "lab", host="0.0.0.0", token="abc")


def test_serve_refuses_a_busy_port_and_a_token_padded_with_spaces(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GatewayError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            serve(tmp_path / "lab", port=port)
        assert not (tmp_path / "lab").exists()  # refused before the lab was created
        with pytest.raises(GatewayError, match="whitespace"):
            serve(tmp_path / "lab", port=port, token=" secret-token ")
        with pytest.raises(GatewayError, match="printable ASCII"):  # no HTTP client sends it
            serve(tmp_path / "lab", port=port, token="t\u00f6ken-0123456789")


def test_serve_on_port_0_says_the_port_it_got(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thunderline_lab.cli",
            "serve",
            "--lab",
            str(tmp_path),
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"ThunderGate on http://127\.0\.0\.1:(\d+) ", line)
        assert found, line
        port = int(found.group(1))
        assert port != 0
        for _ in range(100):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_refuses_non_loopback_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thunderline_lab.cli import main

    monkeypatch.delenv("THUNDERLINE_LAB_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["serve", "--lab", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "refusing to listen on 0.0.0.0 without a token" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# EventClient
# ---------------------------------------------------------------------------------------------


def mock_gateway(
    store: TrialStore, plan: list[int] | None = None, max_events: int | None = None
) -> httpx.MockTransport:
    """A transport answering like the gateway (parse + append), with scripted failures."""
    plan = list(plan or [])

    def handler(request: httpx.Request) -> httpx.Response:
        if plan:
            status = plan.pop(0)
            if status == 0:
                raise httpx.ConnectError("connection refused")
            return httpx.Response(status, json={"detail": "scripted", "errors": []})
        records = json.loads(request.content)
        if max_events is not None and len(records) > max_events:
            return httpx.Response(413, json={"detail": "too many", "errors": []})
        try:
            events = parse_body(request.content)
        except E.EventValidationError as exc:
            return httpx.Response(
                422,
                json={
                    "detail": "invalid",
                    "errors": [{**e.as_dict(), "path": e.path or "<event>"} for e in exc.errors],
                },
            )
        try:
            result = store.append(events)
        except E.EventConflictError as exc:
            return httpx.Response(
                409, json={"detail": "conflict", "errors": [e.as_dict() for e in exc.errors]}
            )
        return httpx.Response(
            202,
            json={
                "accepted": result.accepted,
                "duplicates": len(events) - result.accepted,
                "ids": [e.id for e in events],
                "last_seq": result.last_seq,
            },
        )

    return httpx.MockTransport(handler)


def test_client_retries_with_backoff(store: TrialStore) -> None:
    client = EventClient(
        "http://gw", transport=mock_gateway(store, [503, 0, 502]), backoff=0.001, max_retries=4
    )
    result = client.send(study_events()[:5])
    assert (result.sent, result.accepted, result.spooled) == (5, 5, 0)
    assert client.retries == 3
    client.close()


def test_client_without_spool_raises_when_unreachable(store: TrialStore) -> None:
    client = EventClient(
        "http://gw", transport=mock_gateway(store, [0] * 10), backoff=0.001, max_retries=2
    )
    with pytest.raises(GatewayError, match="unreachable"):
        client.send(study_events()[:2])
    client._http.close()


def test_client_raises_on_rejection_naming_the_field(store: TrialStore) -> None:
    client = EventClient("http://gw", transport=mock_gateway(store), backoff=0.001)
    bad = event_dict()
    bad["payload"]["step"] = -3
    with pytest.raises(GatewayError, match=r"record 0: payload.step"):
        client.send([bad])
    client.close()


def test_client_splits_batches_the_gateway_finds_too_large(store: TrialStore) -> None:
    client = EventClient("http://gw", transport=mock_gateway(store, max_events=3), batch_size=10)
    result = client.send(study_events())
    assert result.accepted == len(study_events())
    client.close()


def test_client_spools_and_replays(store: TrialStore, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    evs = study_events()
    client = EventClient(
        "http://gw",
        transport=mock_gateway(store, [0] * 5),
        spool=spool,
        backoff=0.001,
        max_retries=4,
        batch_size=10,
    )
    result = client.send(evs[:10])
    assert result.spooled == 10 and client.spooled() == 10
    assert store.counts()["events"] == 0
    # the next successful contact replays the spool first-come
    result = client.send(evs[10:])
    assert result.accepted == len(evs)
    assert client.spooled() == 0
    assert_same(snapshot(store), snapshot(local_store(evs)))
    client.close()


def test_replay_moves_rejected_lines_aside(store: TrialStore, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    good = study_events()[:3]
    bad = event_dict()
    bad["payload"]["step"] = -1
    lines = [
        good[0].model_dump_json(),
        json.dumps(bad),
        good[1].model_dump_json(),
        good[2].model_dump_json(),
    ]
    spool.write_text("\n".join(lines) + "\n")
    client = EventClient("http://gw", transport=mock_gateway(store), spool=spool)
    result = client.replay_spool()
    assert (result.accepted, result.rejected) == (3, 1)
    assert client.spooled() == 0
    assert json.loads((tmp_path / "spool.jsonl.rejected").read_text()) == bad
    client.close()


def test_replay_keeps_line_separators_inside_strings(store: TrialStore, tmp_path: Path) -> None:
    # JSON allows U+2028, U+2029 and NEL unescaped inside strings: a spooled line holding
    # them is one event, not three pieces glued back together
    spool = tmp_path / "spool.jsonl"
    failed = E.trial_failed(
        model_run_id="r",
        trial_id="t",
        error_type="crash",
        error_message="boom\u2028line two\x85x\u2029end",
    )
    client = EventClient(
        "http://gw",
        transport=mock_gateway(store, [0] * 2),
        spool=spool,
        max_retries=1,
        backoff=0.001,
    )
    assert client.send([failed]).spooled == 1
    result = client.replay_spool()
    assert (result.sent, result.accepted, result.rejected) == (1, 1, 0)
    assert store.trial("r", "t")["error_message"] == "boom\u2028line two\x85x\u2029end"
    client.close()


def test_replay_sets_aside_a_torn_line_alone(store: TrialStore, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    good = study_events()[:5]
    torn = good[0].model_dump_json()[:40]  # a crash mid-write
    spool.write_text("".join(e.model_dump_json() + "\n" for e in good) + torn + "\n")
    client = EventClient("http://gw", transport=mock_gateway(store), spool=spool)
    result = client.replay_spool()
    assert (result.accepted, result.rejected) == (5, 1)
    assert store.counts()["events"] == 5
    assert (tmp_path / "spool.jsonl.rejected").read_text() == torn + "\n"
    assert client.spooled() == 0
    client.close()


def test_a_fresh_clients_flush_replays_the_spool(store: TrialStore, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    evs = study_events()[:4]
    spool.write_text("".join(e.model_dump_json() + "\n" for e in evs))
    client = EventClient("http://gw", transport=mock_gateway(store), spool=spool)
    assert client.flush().accepted == 4
    assert client.spooled() == 0 and store.counts()["events"] == 4
    client.close()


def test_background_rejection_is_set_aside_and_the_rest_delivered(
    store: TrialStore, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    bus = EventBus()
    client = EventClient(
        "http://gw", transport=mock_gateway(store), spool=spool, flush_interval=0.01
    )
    client.attach(bus)
    poison = event_dict()
    poison["payload"]["step"] = -1
    evs = study_events()
    client.emit(poison)
    for ev in evs:
        bus.publish(ev)
    client.close()  # nothing left behind, nothing raised
    assert_same(snapshot(store), snapshot(local_store(evs)))
    assert json.loads((tmp_path / "spool.jsonl.rejected").read_text()) == poison
    assert client.stats.rejected == 1 and client.spooled() == 0


def test_background_conflict_is_set_aside_alone(store: TrialStore, tmp_path: Path) -> None:
    evs = study_events()
    store.append(evs[:1])
    client = EventClient(
        "http://gw",
        transport=mock_gateway(store),
        spool=tmp_path / "spool.jsonl",
        flush_interval=0.01,
    )
    for record in [_restated(evs[0]), *(e.model_dump(mode="json") for e in evs)]:
        client.emit(record)
    client.close()
    assert_same(snapshot(store), snapshot(local_store(evs)))
    assert json.loads((tmp_path / "spool.jsonl.rejected").read_text()) == _restated(evs[0])
    assert client.stats.rejected == 1


def test_background_rejection_without_spool_is_dropped_not_blocking(
    store: TrialStore, caplog: pytest.LogCaptureFixture
) -> None:
    client = EventClient("http://gw", transport=mock_gateway(store), flush_interval=0.01)
    poison = event_dict()
    poison["payload"]["step"] = -1
    evs = study_events()[:4]
    client.emit(poison)
    for ev in evs:
        client.emit(ev)
    client.close()
    assert store.counts()["events"] == 4
    assert client.stats.rejected == 1
    assert "rejected" in caplog.text and "payload.step" in caplog.text


def test_background_refused_token_keeps_the_events_in_the_spool(
    store: TrialStore, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    evs = study_events()[:3]
    client = EventClient(
        "http://gw", transport=mock_gateway(store, [401] * 10), spool=spool, flush_interval=0.01
    )
    for ev in evs:
        client.emit(ev)
    client.close()  # the token is wrong: the events wait in the spool, none is lost
    assert store.counts()["events"] == 0
    assert client.spooled() == 3
    replay = EventClient("http://gw", transport=mock_gateway(store), spool=spool)
    assert replay.replay_spool().accepted == 3
    replay.close()


def test_client_as_bus_subscriber(store: TrialStore) -> None:
    bus = EventBus()
    client = EventClient(
        "http://gw", transport=mock_gateway(store), batch_size=4, flush_interval=0.01
    )
    client.attach(bus)
    evs = study_events()
    for ev in evs:
        bus.publish(ev)
    client.close()
    assert bus.publish(evs[0]) == 0  # detached on close
    assert_same(snapshot(store), snapshot(local_store(evs)))


def test_client_reads_the_token_from_the_environment(
    store: TrialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(202, json={"accepted": 1, "duplicates": 0, "ids": [], "last_seq": 1})

    monkeypatch.setenv("THUNDERLINE_LAB_TOKEN", TOKEN)
    client = EventClient("http://gw/", transport=httpx.MockTransport(handler))
    client.send(study_events()[:1])
    client.close()
    assert seen == [f"Bearer {TOKEN}"]
    assert client.endpoint == "http://gw/api/events/ml"


@pytest.mark.parametrize(
    "url", ["127.0.0.1:18101", "htp://127.0.0.1:18101", "localhost:8765", "http://", "http://h:x"]
)
def test_client_refuses_a_url_it_could_never_reach(url: str, tmp_path: Path) -> None:
    # without a scheme or host every attempt fails like a gateway that is down, and the
    # events would be spooled without a word
    with pytest.raises(GatewayError, match=re.escape(repr(url))) as err:
        EventClient(url, spool=tmp_path / "s.jsonl")
    if url != "http://h:x":
        assert "http:// or https://" in str(err.value) and "host" in str(err.value)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (5, "url must be a str"),
        (None, "url must be a str"),
        (b"http://gw", "url must be a str"),
        ("http://h:80/?x=1", "must not hold a query"),
        ("http://h:80?x=1", "must not hold a query"),
        ("http://h:80/#top", "or a fragment"),
        ("http://h:80/?", "must not hold a query"),
        ("http://ho st:80", "whitespace"),
        ("http://h:80/a\nb", "control character"),
    ],
)
def test_client_refuses_a_url_it_would_mangle(url: Any, says: str, tmp_path: Path) -> None:
    # a query or fragment would have the ingest path appended to it, a host with a space
    # cannot be looked up: every event would be spooled as if the gateway were down
    with pytest.raises(GatewayError, match=re.escape(says)) as err:
        EventClient(url, spool=tmp_path / "s.jsonl")
    assert repr(url) in str(err.value)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (5, "token must be a str, not int"),
        (b"abc", "token must be a str, not bytes"),
        (["a"], "token must be a str, not list"),
        ("a\nb", "token must be printable ASCII"),
        ("tok\r", "token has leading or trailing whitespace"),
        ("a\x00b", "token must be printable ASCII"),
        ("jet\u00f3n", "token must be printable ASCII"),
        (" tok ", "token has leading or trailing whitespace"),
        ("tok ", "token has leading or trailing whitespace"),
    ],
)
def test_client_refuses_a_token_it_could_not_send_as_given(
    token: Any, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sent anyway, it would end as `Bearer 5`, `Bearer b'abc'`, a broken header or a 401
    # the user cannot explain; refused like serve() refuses them
    with pytest.raises(GatewayError, match=re.escape(says)) as err:
        EventClient("http://gw", token)
    assert repr(token) not in str(err.value)  # a secret is not echoed
    monkeypatch.setenv("THUNDERLINE_LAB_TOKEN", " tok ")
    with pytest.raises(GatewayError, match=r"\$THUNDERLINE_LAB_TOKEN has leading or trailing"):
        EventClient("http://gw")
    # a good token is sent as given; "" sends none, whatever the environment says
    assert EventClient("http://gw", TOKEN)._http.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in EventClient("http://gw", "")._http.headers


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("spool", 5, "spool must be a file path (a str or a Path), not int"),
        ("spool", b"s.jsonl", "spool must be a file path (a str or a Path), not bytes"),
        ("spool", "TMP", "spool must name a file, not a folder"),
        ("spool", "", "spool must name a file, not a folder"),
        ("batch_size", "x", "batch_size must be an integer, not str"),
        ("batch_size", 0, "batch_size must be at least 1, not 0"),
        ("batch_size", 2.0, "batch_size must be an integer, not float"),
        ("batch_size", True, "batch_size must be an integer, not bool"),
        ("max_buffer", -1, "max_buffer must be at least 1, not -1"),
        ("max_buffer", 0, "max_buffer must be at least 1, not 0"),
        ("max_retries", -1, "max_retries must be at least 0, not -1"),
        ("max_retries", None, "max_retries must be an integer, not NoneType"),
        ("timeout", -1, "timeout must be a finite number of seconds, more than 0"),
        ("timeout", 0, "timeout must be a finite number of seconds, more than 0"),
        ("timeout", "30", "timeout must be a number of seconds, not str"),
        ("timeout", float("nan"), "timeout must be a finite number of seconds"),
        ("flush_interval", -0.5, "flush_interval must be a finite number of seconds"),
        ("flush_interval", float("inf"), "flush_interval must be a finite number of seconds"),
        ("flush_interval", False, "flush_interval must be a number of seconds, not bool"),
        ("backoff", -0.1, "backoff must be a finite number of seconds, 0 or more"),
        ("max_backoff", -1, "max_backoff must be a finite number of seconds, 0 or more"),
    ],
)
def test_client_refuses_bad_settings_naming_them(
    option: str, value: Any, says: str, tmp_path: Path
) -> None:
    if value == "TMP":
        value = tmp_path  # a folder: every spooled batch would fail with IsADirectoryError
    with pytest.raises(GatewayError, match=re.escape(says)):
        EventClient("http://gw", **{option: value})
    edges: dict[str, Any] = {
        "spool": str(tmp_path / "s.jsonl"),
        "batch_size": 1,
        "max_buffer": 1,
        "max_retries": 0,
        "timeout": 1,
        "flush_interval": 0.01,
        "backoff": 0,
        "max_backoff": 0,
    }
    EventClient("http://gw", **{option: edges[option]}).close()  # the edge of the range: taken


@pytest.mark.parametrize(
    ("call", "says"),
    [
        ("send one", "of events, not TrialStartEvent (to send one event, pass [event])"),
        ("send dict", "events must be an iterable (a list) of events, not dict"),
        ("send str", "events must be an iterable (a list) of events, not str"),
        ("send int", "events must be an iterable (a list) of events, not int"),
        ("send [ev, 5]", "events[1] must be an event (an Event, a dict"),
        ("emit 5", "emit's event must be an event (an Event, a dict"),
        ("emit None", "emit's event must be an event (an Event, a dict"),
        ("attach None", "bus must be an EventBus, not NoneType"),
        ("attach pattern", "pattern must be a str such as 'ml.*', not int"),
    ],
)
def test_client_refuses_what_is_not_an_event_naming_what_it_takes(
    call: str, says: str, store: TrialStore
) -> None:
    client = EventClient("http://gw", transport=mock_gateway(store))
    ev = study_events()[0]
    actions: dict[str, Any] = {
        "send one": lambda: client.send(ev),
        "send dict": lambda: client.send(ev.model_dump(mode="json")),
        "send str": lambda: client.send(ev.model_dump_json()),
        "send int": lambda: client.send(5),
        "send [ev, 5]": lambda: client.send([ev, 5]),
        "emit 5": lambda: client.emit(5),
        "emit None": lambda: client.emit(None),
        "attach None": lambda: client.attach(None),
        "attach pattern": lambda: client.attach(EventBus(), 5),
    }
    with pytest.raises(GatewayError, match=re.escape(says)):
        actions[call]()
    assert client.stats == SendResult() and client._buffer == []  # nothing half-sent
    client.close()
    assert store.last_seq() == 0


def _metric_records(n: int, run: str = "r") -> list[dict[str, Any]]:
    return [
        E.run_metric(
            id=uuid.uuid5(NS, f"{run}-{i}").hex,
            model_run_id=run,
            trial_id="t1",
            step=i,
            metric_name="loss",
            metric_value=1.0 / (i + 1),
        ).model_dump(mode="json")
        for i in range(n)
    ]


def test_send_rejection_names_the_callers_index_and_sends_the_other_batches(
    store: TrialStore,
) -> None:
    evs = _metric_records(2500)
    evs[1500]["payload"]["step"] = -5
    evs[2400]["payload"]["step"] = -7
    client = EventClient("http://gw", transport=mock_gateway(store), backoff=0.001)
    with pytest.raises(SendError, match=r"record 1500: payload\.step") as err:
        client.send(evs)
    exc = err.value
    assert exc.rejected == [1500, 2400]
    assert [(e["index"], e["path"], e["status"]) for e in exc.errors] == [
        (1500, "payload.step", 422),
        (2400, "payload.step", 422),
    ]
    assert "record 2400: payload.step" in str(exc) and exc.unsent == []
    # every valid event is stored, the valid ones of the refused batches included
    assert (exc.result.sent, exc.result.accepted, exc.result.spooled) == (2498, 2498, 0)
    assert exc.result.rejected == 2 == client.stats.rejected
    stored = {e["id"] for e in store.events_after(0, 10_000)}
    assert stored == {e["id"] for i, e in enumerate(evs) if i not in (1500, 2400)}
    client.close()


def test_send_rejection_after_a_413_split_names_the_callers_index(store: TrialStore) -> None:
    evs = _metric_records(10)
    evs[7]["payload"]["step"] = -1
    client = EventClient("http://gw", transport=mock_gateway(store, max_events=3), batch_size=10)
    with pytest.raises(SendError) as err:
        client.send(evs)
    assert err.value.rejected == [7] and err.value.errors[0]["index"] == 7
    assert err.value.result.accepted == 9 == store.counts()["events"]
    client.close()


def test_send_spools_the_remaining_batches_once_the_gateway_is_down(
    store: TrialStore, tmp_path: Path
) -> None:
    evs = _metric_records(30)
    evs[3]["payload"]["step"] = -1
    calls: list[int] = []
    inner = mock_gateway(store)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if store.counts()["events"] >= 9:  # down after the first batch
            raise httpx.ConnectError("connection refused")
        return inner.handle_request(request)

    spool = tmp_path / "spool.jsonl"
    client = EventClient(
        "http://gw",
        transport=httpx.MockTransport(handler),
        spool=spool,
        batch_size=10,
        max_retries=1,
        backoff=0.001,
    )
    with pytest.raises(SendError) as err:
        client.send(evs)
    assert err.value.rejected == [3] and err.value.unsent == []
    assert (err.value.result.accepted, err.value.result.spooled) == (9, 20)
    assert client.spooled() == 20
    assert len(calls) == 2 + 2  # the refused batch twice, the next one with its retry
    client._http.close()


def test_send_without_spool_reports_what_it_could_not_send(store: TrialStore) -> None:
    evs = _metric_records(25)
    inner = mock_gateway(store)

    def handler(request: httpx.Request) -> httpx.Response:
        if store.counts()["events"] >= 10:
            raise httpx.ConnectError("connection refused")
        return inner.handle_request(request)

    client = EventClient(
        "http://gw", transport=httpx.MockTransport(handler), batch_size=10, max_retries=0
    )
    with pytest.raises(SendError, match="unreachable") as err:
        client.send(evs)
    assert err.value.unsent == list(range(10, 25)) and err.value.rejected == []
    assert err.value.result.accepted == 10
    client._http.close()


def test_send_with_a_refused_token_names_the_unsent_events(
    store: TrialStore, tmp_path: Path
) -> None:
    evs = _metric_records(15)
    client = EventClient(
        "http://gw",
        transport=mock_gateway(store, [401] * 10),
        spool=tmp_path / "spool.jsonl",
        batch_size=10,
    )
    with pytest.raises(SendError, match="refused the token") as err:
        client.send(evs)
    # not spooled: a wrong token is the caller's to fix, and it is told which events wait
    assert err.value.unsent == list(range(15)) and err.value.rejected == []
    assert err.value.result == SendResult() and client.spooled() == 0
    client._http.close()


def _deep_record(levels: int, trial: str = "deep") -> str:
    """A trial.start event whose metadata nests ``levels`` objects (as JSON text: Python's
    json cannot even write it)."""
    ev = E.trial_start(
        id=uuid.uuid5(NS, trial).hex, model_run_id="r", trial_id=trial, spectral_norm=True
    )
    text = ev.model_dump_json()
    nested = '{"a":' * levels + "{}" + "}" * levels
    return text.replace('"metadata":{}', '"metadata":' + nested)


def test_replay_sets_aside_a_line_too_deep_to_read(store: TrialStore, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    good = study_events()[:3]
    deep = _deep_record(1200)
    client = EventClient(
        "http://gw",
        transport=mock_gateway(store, [0] * 2),
        spool=spool,
        max_retries=1,
        backoff=0.001,
    )
    assert client.send([good[0], deep]).spooled == 2  # the gateway is down
    # back up: the deep line goes aside, the rest is replayed, again and again
    result = client.send(good[1:])
    assert result.accepted == 3 and client.spooled() == 0
    assert (tmp_path / "spool.jsonl.rejected").read_text() == deep + "\n"
    assert client.replay_spool() == SendResult()
    client.close()


def test_a_record_nested_too_deeply_in_an_array_is_a_422_naming_it(
    gw: AsgiClient, store: TrialStore
) -> None:
    good = study_events()[0].model_dump_json()
    for levels in (985, 5000):
        resp = gw.post("/api/events/ml", content=f"[{good},{_deep_record(levels)}]")
        assert resp.status_code == 422, resp.text
        assert_names_fields(resp)
        [error] = resp.json()["errors"]
        assert (error["index"], error["path"], error["rule"]) == (
            1,
            "payload.metadata",
            "json_depth",
        )
    # alone, the record is named too; the top level itself nested too deeply stays a 400
    resp = gw.post("/api/events/ml", content=_deep_record(5000))
    assert resp.status_code == 422 and resp.json()["errors"][0]["index"] == 0
    resp = gw.post("/api/events/ml", content=f"[{good}," + "[" * 5000 + "]" * 5000 + "]")
    assert resp.status_code == 400 and resp.json()["errors"][0]["index"] is None
    assert store.counts()["events"] == 0


def test_background_sender_sets_aside_only_the_record_nested_too_deeply(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    app = create_app(lab)
    evs = study_events()[:5]
    deep = _deep_record(985)
    spool = tmp_path / "spool.jsonl"
    with ServerThread(app) as server:
        client = EventClient(server.url, spool=spool, batch_size=6, flush_interval=60)
        for ev in evs[:3]:
            client.emit(ev)
        client.emit(deep)
        for ev in evs[3:]:
            client.emit(ev)
        client.close()
    assert (tmp_path / "spool.jsonl.rejected").read_text() == deep + "\n"
    assert client.stats.rejected == 1 and client.stats.accepted == 5
    with lab.store() as gateway_store:
        assert gateway_store.counts()["events"] == 5


# ---------------------------------------------------------------------------------------------
# Over real sockets: duplicate / reordered delivery via the spool; a worker process end to end
# ---------------------------------------------------------------------------------------------


def test_duplicate_and_reordered_delivery_via_spool(tmp_path: Path) -> None:
    evs = study_events(seed=3)
    port = free_port()
    spool = tmp_path / "spool.jsonl"
    # gateway down: everything lands in the spool
    client = EventClient(
        f"http://127.0.0.1:{port}",
        TOKEN,
        spool=spool,
        backoff=0.001,
        max_retries=1,
        batch_size=16,
        timeout=2,
    )
    assert client.send(evs).spooled == len(evs)
    # the spool is then delivered twice, shuffled, in two partial replays
    lines = spool.read_text().splitlines()
    rng = random.Random(7)
    shuffled = lines + lines[: len(lines) // 2]
    rng.shuffle(shuffled)
    half = len(shuffled) // 2
    spool.write_text("\n".join(shuffled[:half]) + "\n")
    lab = Lab(tmp_path / "lab")
    app = create_app(lab, token=TOKEN)
    with ServerThread(app, port):
        first = client.replay_spool()
        spool.write_text("\n".join(shuffled[half:]) + "\n")
        second = client.replay_spool()
        client.close()
    assert first.sent + second.sent == len(shuffled)
    assert first.accepted + second.accepted == len(evs)
    with lab.store() as gateway_store:
        assert gateway_store.counts()["events"] == len(evs)
        assert_same(snapshot(gateway_store), snapshot(local_store(evs)))


def _worker_main(argv: list[str]) -> None:
    """The worker process: a study publishing on its bus, reported through EventClient."""
    url, token, spool, seed = argv
    bus = EventBus()
    client = EventClient(url, token, spool=spool, batch_size=7, flush_interval=0.02)
    client.attach(bus)
    for ev in study_events(seed=int(seed)):
        bus.publish(ev)
    client.close()
    print(json.dumps({"sent": client.stats.sent, "spooled": client.spooled()}))


def test_end_to_end_worker_process_matches_a_local_run(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    app = create_app(lab, token=TOKEN)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_gateway as t; "
        "t._worker_main(sys.argv[2:])"
    )
    with ServerThread(app) as server:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(Path(__file__).parent),
                server.url,
                TOKEN,
                str(tmp_path / "spool.jsonl"),
                "11",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
        trials_over_http = httpx.get(
            f"{server.url}/api/trials", headers={"authorization": f"Bearer {TOKEN}"}
        ).json()
    evs = study_events(seed=11)
    assert report == {"sent": len(evs), "spooled": 0}
    # the local run: the same study on an in-process bus with a StoreWriter
    local = TrialStore(tmp_path / "local.db")
    bus = EventBus()
    with StoreWriter(local, bus):
        for ev in evs:
            bus.publish(ev)
    with lab.store() as remote:
        assert remote.counts() == local.counts()
        assert_same(snapshot(remote), snapshot(local))
        pd.testing.assert_frame_equal(remote.trials(), local.trials())
    assert len(trials_over_http["trials"]) == 6


# ---------------------------------------------------------------------------------------------
# Fuzzing: >= 10,000 generated requests, zero 5xx, every 4xx names the field
# ---------------------------------------------------------------------------------------------

_NAMES = [*E.ML_EVENT_NAMES, "ml.run.nope", "system.tick", "bogus", "", "grid.x.y"]
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(2**62, 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_json = st.recursive(
    _json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=4,
)
_timestamps = st.sampled_from(
    [
        "2026-11-22T12:34:56.789Z",
        "2026-11-22T12:34:56+02:00",
        "2026-11-22T12:34:56",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "yesterday",
        "",
        0,
        1764000000,
        None,
        "2026-02-30T00:00:00Z",
    ]
)
_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-5, 10**6)
    | st.sampled_from([2**63 - 1, 2**63, 2**64, "0.5", "NaN", None, True])
)
_metric_names = st.sampled_from(
    ["val_accuracy", "train_loss", "a b/c", "bad$name", "", "x" * 300, "\ud800"]
)
_ids = st.sampled_from(["trial_0001", "t", "", "x" * 300, 7, None, ["t"], "\ud800"])
_OPTIONAL = {
    "study": _ids,
    "step": _numbers,
    "metric_name": _metric_names,
    "metric_value": _numbers,
    "measurements": st.dictionaries(_metric_names, _numbers, max_size=2),
    "metrics": st.dictionaries(_metric_names, _numbers, max_size=2),
    "spectral_norm": _json_scalars,
    "spectral_norm_coeff": _numbers,
    "status": st.sampled_from(["completed", "pruned", "cancelled", "failed", "weird"]),
    "duration_ms": _numbers,
    "rank": _numbers,
    "epochs": _numbers,
    "success": _json_scalars,
    "error_message": _json_scalars,
    "error_type": _ids,
    "parameters": _json,
    "metadata": _json,
    "artifact_uri": _json_scalars,
    "mlflow_run_id": _ids,
    "unexpected": _json_scalars,
}


@st.composite
def _payloads(draw: st.DrawFn) -> dict[str, Any]:
    payload: dict[str, Any] = {"model_run_id": draw(_ids), "trial_id": draw(_ids)}
    for key in draw(st.lists(st.sampled_from(sorted(_OPTIONAL)), max_size=5, unique=True)):
        payload[key] = draw(_OPTIONAL[key])
    return payload


@st.composite
def _canonical(draw: st.DrawFn) -> Any:
    record: dict[str, Any] = {
        "id": draw(_ids),
        "name": draw(st.sampled_from(_NAMES)),
        "timestamp": draw(_timestamps),
        "payload": draw(_payloads() | _json),
    }
    extra = draw(
        st.sampled_from(
            [
                None,
                "source",
                "priority",
                "pipeline",
                "taxonomy_version",
                "correlation_id",
                "extra",
                "-id",
                "-name",
                "-payload",
            ]
        )
    )
    if extra is not None and extra.startswith("-"):
        record.pop(extra[1:])
    elif extra is not None:
        record[extra] = draw(_json_scalars)
    return record


@st.composite
def _seed001(draw: st.DrawFn) -> Any:
    meta = {
        k: draw(v)
        for k, v in draw(
            st.lists(
                st.sampled_from(
                    [
                        ("epoch", _numbers),
                        ("step", _numbers),
                        ("spectral_norm", _json_scalars),
                        ("hyperparams", _json),
                        ("success", _json_scalars),
                        ("epochs", _numbers),
                        ("mlflow_run_id", _ids),
                        ("model_run_id", _ids),
                        ("status", _json_scalars),
                        ("rank", _numbers),
                        ("error", _json_scalars),
                        ("timestamp", _timestamps),
                    ]
                ),
                max_size=4,
                unique_by=lambda kv: kv[0],
            )
        )
    }
    return {
        "event": draw(st.sampled_from([*E.ML_EVENT_NAMES, "ml.nope", 3])),
        "trial_id": draw(_ids),
        "metadata": meta if draw(st.booleans()) else draw(_json),
        "measurements": draw(st.dictionaries(_metric_names, _numbers, max_size=2)),
    }


@st.composite
def _seed002(draw: st.DrawFn) -> Any:
    trial = st.fixed_dictionaries(
        {"trial_id": _ids},
        optional={
            "status": st.sampled_from(["succeeded", "failed", "SUCCESS", "running", 1]),
            "spectral_norm": st.sampled_from(["true", "false", "yes", 1, 0, 2, "maybe", None]),
            "metrics": st.dictionaries(_metric_names, _numbers, max_size=2),
            "parameters": _json,
            "duration_ms": _numbers,
            "rank": _numbers,
            "error": _json_scalars,
            "timestamp": _timestamps,
        },
    )
    return {"run_id": draw(_ids), "trials": draw(st.lists(trial, max_size=3) | _json)}


_records = _canonical() | _seed001() | _seed002() | _json


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=48))
    if kind == 1:
        text = draw(
            st.lists(
                st.sampled_from(
                    [
                        "{",
                        "}",
                        "[",
                        "]",
                        '"',
                        ":",
                        ",",
                        "null",
                        "1e9",
                        "NaN",
                        "\\ud800",
                        '"name"',
                        "\n",
                        " ",
                    ]
                ),
                max_size=16,
            )
        )
        return "".join(text).encode()
    records = draw(st.lists(_records, min_size=1, max_size=4))
    if kind == 2:
        return "\n".join(json.dumps(r) for r in records).encode()
    if kind <= 5:
        return json.dumps(records[0]).encode()
    return json.dumps(records).encode()


# Systematic single-field mutations of valid inputs: every variant is one request, and a
# 422 must name the mutated field (or a field containing it).
_BAD_VALUES: list[Any] = [
    None,
    "",
    "x",
    -1,
    2**64,
    1.5,
    True,
    [],
    {},
    "\ud800",
    {"a": [1]},
    "9999-12-31T23:59:59-23:59",
]


@st.composite
def _valid_records(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(E.ML_EVENT_NAMES))
    payload: dict[str, Any] = {
        "model_run_id": "fuzz",
        "trial_id": f"t{draw(st.integers(0, 9))}",
        "study": "fuzz",
        "metadata": {"host": "w1", "k": [1, 2]},
    }
    if name == "ml.run.metric":
        payload["step"] = draw(st.integers(0, 100))
        payload["measurements"] = {"val_accuracy": draw(st.floats(0, 1)), "train_loss": 0.3}
    elif name == "ml.run.stop":
        payload.update(
            success=draw(st.booleans()),
            epochs=3,
            duration_ms=draw(st.integers(0, 10**9)),
            metrics={"val_accuracy": 0.8},
        )
    elif name == "ml.trial.failed":
        payload.update(error_message="nan loss", error_type="diverged", spectral_norm=True)
    else:
        payload.update(
            spectral_norm=draw(st.booleans()),
            spectral_norm_coeff=2.0,
            parameters={"lr": 0.001, "depth": 3},
            mlflow_run_id="mlf-1",
        )
        if name == "ml.trial.complete":
            payload.update(
                metrics={"val_accuracy": 0.9},
                duration_ms=12,
                rank=1,
                status=draw(st.sampled_from(["completed", "pruned"])),
            )
    return {
        "id": draw(st.uuids()).hex,
        "name": name,
        "timestamp": "2026-11-22T12:34:56.789Z",
        "payload": payload,
    }


def _leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield (*prefix, key)
            yield from _leaf_paths(sub, (*prefix, key))


def _mutate(record: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(record))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()


@pytest.mark.slow
def test_fuzz_10000_requests_no_5xx_and_every_4xx_names_the_field() -> None:
    store = TrialStore(":memory:")
    app = create_app(store, max_body_bytes=64 * 1024, max_batch_events=3)
    gw = AsgiClient(app)
    statuses: dict[int, int] = {}
    # Defaults give > 10,000 requests (1,000 arbitrary bodies + ~60 mutations of each of
    # 200 valid records); the environment may shrink them for quick local runs.
    n_bodies = int(os.environ.get("TL_FUZZ_BODIES", "1000"))
    n_valid = int(os.environ.get("TL_FUZZ_VALID", "200"))

    def post(body: bytes, run: str | None = None) -> httpx.Response:
        url = "/api/events/ml" + ("" if run is None else f"?model_run_id={run}")
        resp = gw.post(url, content=body)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        # 409: the generators reuse ids (few distinct ones) with other payloads
        assert resp.status_code in (202, 400, 409, 413, 422), (resp.status_code, resp.text, body)
        if resp.status_code == 202:
            ids = resp.json()["ids"]
            marks = ",".join("?" * len(ids))
            found = (
                store.conn.execute(
                    f"SELECT COUNT(*) FROM events WHERE id IN ({marks})", ids
                ).fetchone()[0]
                if ids
                else 0
            )
            assert found == len(set(ids))
        else:
            assert_names_fields(resp)
        return resp

    common: dict[str, Any] = {
        "derandomize": True,
        "database": None,
        "deadline": None,
        "suppress_health_check": list(HealthCheck),
    }

    @settings(max_examples=n_bodies, **common)
    @given(body=_bodies(), run=st.none() | st.sampled_from(["cerebros", "", "x" * 300]))
    def arbitrary(body: bytes, run: str | None) -> None:
        post(body, run)

    ids = itertools.count()

    @settings(max_examples=n_valid, **common)
    @given(
        record=_valid_records(),
        picks=st.lists(st.integers(0, len(_BAD_VALUES) - 1), min_size=3, max_size=3),
    )
    def mutated(record: dict[str, Any], picks: list[int]) -> None:
        # an id of its own (derandomized draws repeat ids): a mutation that stays valid
        # under the same id is a conflict (409), as it should be; and a trial of its own
        # (a second outcome for a finished trial, or another arm, is a 409 too)
        n = next(ids)
        payload = {**record["payload"], "trial_id": f"t-{n:06d}"}
        record = {**record, "id": f"fuzz-{n:06d}", "payload": payload}
        assert post(json.dumps(record).encode()).status_code == 202
        for path in _leaf_paths(record):
            for value in (_DELETE, *(_BAD_VALUES[i] for i in picks)):
                resp = post(json.dumps(_mutate(record, path, value)).encode())
                if resp.status_code == 422:
                    dotted = ".".join(path)
                    named = [e["path"] for e in resp.json()["errors"]]
                    assert any(
                        p == dotted or p.startswith(dotted + ".") or dotted.startswith(p + ".")
                        for p in named
                    ), (dotted, named)

    try:
        arbitrary()
        mutated()
    finally:
        gw.close()
        app.state.writer.close()
    total = sum(statuses.values())
    print(f"fuzz: {total} requests, by status {dict(sorted(statuses.items()))}")
    if "TL_FUZZ_BODIES" not in os.environ and "TL_FUZZ_VALID" not in os.environ:
        assert total >= 10_000, statuses
        assert statuses[202] > 300 and statuses[422] > 1000 and statuses[400] > 30
        assert statuses[409] > 1000  # valid mutations under a logged id


def test_a_json_lines_body_with_an_unreadable_line_names_every_broken_line(
    gw: AsgiClient, store: TrialStore
) -> None:
    """One unreadable line used to hide the other lines' faults: the answer now names each
    broken line (as ``thunderline-lab validate`` does) and nothing is stored."""
    good = json.dumps(event_dict())
    wrong_type = json.dumps(event_dict()).replace('"step": 1', '"step": "one"')
    unknown = json.dumps({**event_dict(), "name": "ml.nope"})
    body = "\n".join([good, good, wrong_type, "{bad", unknown])
    resp = gw.post("/api/events/ml", content=body)
    assert resp.status_code == 400, resp.text
    found = [(e.get("line"), e["path"], e["rule"]) for e in resp.json()["errors"]]
    assert found[1] == (4, "<body>", "json_invalid")  # the line as the other errors give it
    assert found[0][0] == 3 and found[0][1] == "payload.step"
    assert found[2][0] == 5 and found[2][1] == "name"
    assert store.counts()["events"] == 0


@pytest.mark.parametrize("levels", [257, 300, 500, 980, 5000])
def test_a_record_nested_too_deeply_is_a_422_naming_line_and_field_at_every_depth(
    gw: AsgiClient, store: TrialStore, levels: int
) -> None:
    # 257-480 levels were refused only by the store's writer ("nested too deeply to
    # store", [unstorable]) and 490-980 reached Python's recursion limit
    good = study_events()[0].model_dump_json()
    deep = _deep_record(levels - 1)  # metadata: levels - 1 objects around {}
    for body, index, line in ((deep, 0, 1), (f"[{good},{deep}]", 1, None)):
        resp = gw.post("/api/events/ml", content=body)
        assert resp.status_code == 422, resp.text
        assert_names_fields(resp)
        [error] = resp.json()["errors"]
        assert (error["index"], error["path"], error["rule"]) == (
            index,
            "payload.metadata",
            "json_depth",
        )
        assert error.get("line") == line
        assert error["message"] == (
            "nested too deeply (more than 256 levels of objects and arrays)"
        )
    assert store.counts()["events"] == 0


def test_a_misspelt_query_parameter_is_refused_not_ignored(
    gw: AsgiClient, store: TrialStore
) -> None:
    # ?model_run=myrun was ignored: the post was filed under the default run "cerebros"
    seed = '{"event": "ml.trial.start", "trial_id": "t", "metadata": {"spectral_norm": true}}'
    resp = gw.post("/api/events/ml?model_run=myrun", content=seed)
    assert resp.status_code == 422, resp.text
    assert_names_fields(resp)
    assert resp.json()["errors"] == [
        {
            "index": None,
            "path": "query.model_run",
            "message": "unknown parameter (did you mean 'model_run_id'?); expected model_run_id",
            "rule": "extra_forbidden",
            "value": '"myrun"',
        }
    ]
    assert store.counts()["events"] == 0
    assert gw.post("/api/events/ml?model_run_id=myrun", content=seed).status_code == 202
    for url, name, hint in (
        ("/api/events?afer=5", "afer", "after"),
        ("/api/events?after=0&limt=5", "limt", "limit"),
        ("/api/trials?stauts=failed", "stauts", "status"),
        ("/api/trials?spectral=true", "spectral", "spectral_norm"),
        ("/api/trials/myrun/t/metrics?name=loss", "name", "names"),
        ("/api/trials/my%2Frun/t/metrics?max_point=3", "max_point", "max_points"),
    ):
        resp = gw.get(url)
        assert resp.status_code == 422, (url, resp.text)
        assert_names_fields(resp)
        [err] = resp.json()["errors"]
        assert (err["path"], err["rule"]) == (f"query.{name}", "extra_forbidden"), url
        assert err["message"].startswith(f"unknown parameter (did you mean '{hint}'?); expected ")
    # a trial itself takes no parameter (names= asks for metrics: /metrics)
    for url in ("/api/trials/myrun/t?names=loss", "/api/trials/my%2Frun/t?names=loss"):
        resp = gw.get(url)
        assert resp.status_code == 422, (url, resp.text)
        [err] = resp.json()["errors"]
        assert (err["path"], err["message"]) == (
            "query.names",
            "unknown parameter: this endpoint takes none",
        )
    for url in (
        "/api/events?after=0&limit=5",
        "/api/trials?status=running&spectral_norm=false&study=s&model_run_id=myrun",
        "/api/trials/myrun/t",
        "/api/trials/myrun/t/metrics?names=loss&max_points=3",
        "/healthz?probe=1",  # liveness probes may add what they like
    ):
        assert gw.get(url).status_code == 200, url


def test_a_refused_query_parameter_is_named_only_once_the_token_is_right(
    store: TrialStore,
) -> None:
    app = create_app(store, token=TOKEN)
    gw = AsgiClient(app)
    try:
        assert gw.get("/api/trials?stauts=failed").status_code == 401
        assert gw.post("/api/events/ml?model_run=x", content=b"{}").status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert gw.get("/api/trials?stauts=failed", headers=auth).status_code == 422
    finally:
        gw.close()
        app.state.writer.close()


def test_an_empty_model_run_id_in_a_seed_post_is_a_422_not_the_default_run(
    gw: AsgiClient, store: TrialStore
) -> None:
    # both were filed under the default run "cerebros"
    for body, path in (
        (
            {
                "event": "ml.run.start",
                "trial_id": "t",
                "metadata": {"spectral_norm": True, "model_run_id": ""},
            },
            "metadata.model_run_id",
        ),
        (
            {"trials": [{"trial_id": "t", "status": "succeeded", "model_run_id": ""}]},
            "trials[0].model_run_id",
        ),
    ):
        resp = gw.post("/api/events/ml?model_run_id=myrun", content=json.dumps(body))
        assert resp.status_code == 422, resp.text
        [err] = resp.json()["errors"]
        assert (err["index"], err["path"], err["rule"]) == (0, path, "string_too_short")
        assert err["message"] == (
            "must be 1 to 256 characters (an empty one is not replaced by the default run)"
        )
    canonical = json.loads(study_events()[0].model_dump_json())
    canonical["payload"]["model_run_id"] = ""
    resp = gw.post("/api/events/ml", content=json.dumps(canonical))
    assert resp.status_code == 422 and resp.json()["errors"][0]["path"] == "payload.model_run_id"
    assert store.counts()["events"] == 0


@pytest.mark.parametrize("stamp", [5, -1, "5", 1700000000000, 0])
def test_a_numeric_timestamp_is_a_422_not_a_unix_time(
    gw: AsgiClient, store: TrialStore, stamp: Any
) -> None:
    # 5 was stored as 1970-01-01T00:00:05Z (and a seed post's 0 as the time of ingest)
    canonical = json.loads(study_events()[0].model_dump_json()) | {"timestamp": stamp}
    seed = {"event": "ml.trial.start", "trial_id": "t", "timestamp": stamp}
    for body, index, path in (
        (json.dumps(canonical), 0, "timestamp"),
        (json.dumps([study_events()[1].model_dump(mode="json"), canonical]), 1, "timestamp"),
        (json.dumps(seed), 0, "timestamp"),
    ):
        resp = gw.post("/api/events/ml", content=body)
        assert resp.status_code == 422, resp.text
        [err] = resp.json()["errors"]
        assert (err["index"], err["path"], err["rule"]) == (index, path, "datetime_type")
        assert err["message"] == "must be an RFC 3339 date-time string (e.g. 2026-11-22T12:34:56Z)"
    assert store.counts()["events"] == 0


def test_a_fractional_seed_duration_is_a_422_not_rounded(gw: AsgiClient, store: TrialStore) -> None:
    body = {"trials": [{"trial_id": "t", "status": "succeeded", "duration_ms": 2.7}]}
    resp = gw.post("/api/events/ml", content=json.dumps(body))
    assert resp.status_code == 422, resp.text
    [err] = resp.json()["errors"]
    assert (err["path"], err["rule"], err["value"]) == (
        "trials[0].duration_ms",
        "int_from_float",
        "2.7",
    )
    assert store.counts()["events"] == 0

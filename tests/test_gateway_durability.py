"""ThunderGate durability: kill -9 the gateway under load, restart it, lose nothing acknowledged.

``thunderline-lab serve`` runs as a subprocess on a loopback port. Client threads post
batches continuously and record every event id that got a 202; the gateway is killed with
SIGKILL (at least five times) and restarted on the same lab. At the end every acknowledged
id must be in the store, and replaying the event log must leave every table unchanged.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from thunderline_lab import events as E
from thunderline_lab.store import TrialStore

TABLES = ("model_runs", "trials", "metrics", "artifacts")
TOKEN = "durability-token-42"
KILLS = int(os.environ.get("TL_GATEWAY_KILLS", "5"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """``thunderline-lab serve`` as a subprocess that can be SIGKILLed and restarted."""

    def __init__(self, lab: Path, port: int) -> None:
        self.lab, self.port = lab, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = lab.parent / "gateway.log"

    def start(self) -> None:
        env = {**os.environ, "THUNDERLINE_LAB_TOKEN": TOKEN}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "thunderline_lab.cli",
                    "serve",
                    "--lab",
                    str(self.lab),
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("gateway did not become healthy")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Hammer(threading.Thread):
    """Posts batches of a study's events in a loop; records ids acknowledged with 202."""

    def __init__(self, url: str, worker: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.worker, self.stop_flag = url, worker, stop
        self.acked: set[str] = set()
        self.sent_batches = 0
        self.failures = 0
        self.rng = random.Random(worker)
        self.t = datetime(2026, 11, 22, tzinfo=UTC) + timedelta(hours=worker)

    def batch(self, k: int) -> list[dict[str, Any]]:
        run = f"load-{self.worker}"
        tid = f"trial_{k:04d}"
        out: list[E.Event] = []

        def ts() -> datetime:
            self.t += timedelta(milliseconds=1)
            return self.t

        sn = k % 2 == 0
        out.append(
            E.trial_start(
                model_run_id=run,
                trial_id=tid,
                spectral_norm=sn,
                study=run,
                parameters={"lr": 0.01, "pair_id": k // 2},
                timestamp=ts(),
            )
        )
        for epoch in range(self.rng.randint(3, 12)):
            out.append(
                E.run_metric(
                    model_run_id=run,
                    trial_id=tid,
                    step=epoch,
                    timestamp=ts(),
                    measurements={
                        "val_accuracy": self.rng.random(),
                        "train_loss": self.rng.random(),
                    },
                )
            )
        if k % 7 == 3:
            out.append(
                E.trial_failed(
                    model_run_id=run,
                    trial_id=tid,
                    error_type="diverged",
                    error_message="nan",
                    timestamp=ts(),
                )
            )
        else:
            out.append(
                E.trial_complete(
                    model_run_id=run,
                    trial_id=tid,
                    spectral_norm=sn,
                    metrics={"val_accuracy": self.rng.random()},
                    duration_ms=10,
                    timestamp=ts(),
                )
            )
        return [e.model_dump(mode="json") for e in out]

    def run(self) -> None:
        headers = {"authorization": f"Bearer {TOKEN}"}
        k = 0
        pending = self.batch(k)
        with httpx.Client(timeout=5, headers=headers) as http:
            while not self.stop_flag.is_set():
                try:
                    resp = http.post(f"{self.url}/api/events/ml", json=pending)
                except httpx.HTTPError:
                    self.failures += 1
                    time.sleep(0.02)
                    continue  # resend the same batch, as a client would: ids make it safe
                if resp.status_code == 202:
                    self.acked.update(resp.json()["ids"])
                    self.sent_batches += 1
                    k += 1
                    pending = self.batch(k)
                else:
                    self.failures += 1
                    time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    gateway = Gateway(lab, free_port())
    stop = threading.Event()
    hammers = [Hammer(gateway.url, w, stop) for w in range(3)]
    gateway.start()
    for h in hammers:
        h.start()
    rng = random.Random(2026)
    acked_at_kill: list[int] = []
    try:
        for _ in range(KILLS):
            floor = sum(len(h.acked) for h in hammers) + 200
            deadline = time.monotonic() + 60
            while sum(len(h.acked) for h in hammers) < floor and time.monotonic() < deadline:
                time.sleep(0.02)  # make sure the load is on before each kill
            time.sleep(rng.uniform(0.05, 0.3))
            gateway.kill9()
            acked_at_kill.append(sum(len(h.acked) for h in hammers))
            gateway.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for h in hammers:
            h.join(30)
        gateway.stop()

    acked = set().union(*(h.acked for h in hammers))
    assert len(acked_at_kill) == KILLS and acked_at_kill == sorted(acked_at_kill)
    assert len(acked) > 200 * KILLS
    store = TrialStore(lab / "lab.db")
    try:
        stored = {row[0] for row in store.conn.execute("SELECT id FROM events")}
        missing = acked - stored
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
        before = {t: store.table(t) for t in TABLES}
        store.replay()
        for t in TABLES:
            pd.testing.assert_frame_equal(store.table(t), before[t], obj=t)
        assert store.counts()["events"] == len(stored)
    finally:
        store.close()
    print(
        f"durability: {KILLS} kills, {len(acked)} events acknowledged, all in the store; "
        f"{sum(h.failures for h in hammers)} failed posts retried"
    )

"""P4: ThunderGate on loopback — batch ingest, single-event latency, group commit, seed loads,
kill -9 durability.

The gateway runs as a subprocess (uvicorn, the lab's defaults: WAL, ``synchronous=FULL`` so
every 202 is fsynced); the load generator is this process, a minimal asyncio HTTP/1.1
client over keep-alive connections (so the client's own overhead stays out of the figures).
Latency is measured open-loop from each request's *scheduled* send time, so a stalled
gateway cannot hide queueing (no coordinated omission).

Sections (all bounded in count and time):

``batch``      events/s of POSTed arrays (5,000 events per request, 2 connections) vs the
               same events appended in-process with ``TrialStore.append`` (the ceiling),
               the store's write transaction alone (rows prebuilt: the part one SQLite
               writer must do in series), and the floor under all: the same rows inserted
               bare into an events table, committed; interleaved rounds; goal ≥ 50,000
               events/s.
``latency``    single-event POSTs at 500 req/s open loop: p50/p95/p99; goal p95 ≤ 10 ms.
``group``      closed loop, 32 connections posting single events back to back, with group
               commit on vs off (one transaction per request): requests/s and the ratio.
``burst``      seed target: 100 trials/s, each trial's events (2 lifecycle + run start/stop +
               20 metric epochs) in one POST; floor p95 < 100 ms.
``sustained``  seed target: 1000 trials/min, every event its own POST (≈ 400 req/s), for
               ``--sustained-minutes`` (default 1; the issue's run is 10): latency
               percentiles and gateway RSS growth (goal ≤ 10 %).
``kill``       ``--kills`` (default 20) × SIGKILL of ``thunderline-lab serve`` under load,
               restart; every acknowledged event must be in the store and replay must leave
               the tables unchanged.

Usage:
    python benchmarks/bench_gateway.py [--quick] [--only batch latency ...]
        [--sustained-minutes 10] [--kills 20] [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from thunderline_lab import events as E
from thunderline_lab.store import PAGE_SIZE, TrialStore, format_ts

TOKEN = "bench-token-0123456789"
NICE = 0  # --nice: scheduling priority of the gateway and the load generator (0: unchanged)
EPOCHS = 20  # metric events per trial; 24 events per trial in all


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


class Study:
    """Generates a study's events, trial after trial, with unique ids and rising timestamps."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.k = 0
        self.t = datetime(2026, 11, 22, tzinfo=UTC)
        self._buffer: list[E.Event] = []

    def _ts(self) -> datetime:
        self.t += timedelta(microseconds=250)
        return self.t

    def trial(self) -> list[E.Event]:
        run, tid, sn = self.run, f"trial_{self.k:06d}", self.k % 2 == 0
        self.k += 1
        params = {
            "lr": 0.001,
            "depth": 3,
            "width": 128,
            "spectral_norm": sn,
            "pair_id": self.k // 2,
            "seed": self.k // 2,
        }
        out = [
            E.trial_start(
                model_run_id=run,
                trial_id=tid,
                study=run,
                spectral_norm=sn,
                parameters=params,
                timestamp=self._ts(),
            ),
            E.run_start(
                model_run_id=run, trial_id=tid, study=run, spectral_norm=sn, timestamp=self._ts()
            ),
        ]
        for epoch in range(EPOCHS):
            out.append(
                E.run_metric(
                    model_run_id=run,
                    trial_id=tid,
                    step=epoch,
                    timestamp=self._ts(),
                    measurements={
                        "train_loss": 1 / (epoch + 1),
                        "val_loss": 1.1 / (epoch + 1),
                        "val_accuracy": 0.5 + epoch / 50,
                        "lr": 0.001,
                        "max_sigma": 1.0 if sn else 1.0 + epoch / 10,
                    },
                )
            )
        out.append(
            E.run_stop(
                model_run_id=run, trial_id=tid, epochs=EPOCHS, duration_ms=900, timestamp=self._ts()
            )
        )
        out.append(
            E.trial_complete(
                model_run_id=run,
                trial_id=tid,
                study=run,
                spectral_norm=sn,
                parameters=params,
                duration_ms=950,
                timestamp=self._ts(),
                metrics={"val_accuracy": 0.9, "test_accuracy": 0.88},
            )
        )
        return out

    def events(self, n: int) -> list[E.Event]:
        """The next ``n`` events of the study (trials continue across calls)."""
        while len(self._buffer) < n:
            self._buffer += self.trial()
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def array_body(events: list[E.Event]) -> bytes:
    return ("[" + ",".join(e.model_dump_json() for e in events) + "]").encode()


# ---------------------------------------------------------------------------------------------
# Gateway process and a raw HTTP/1.1 client
# ---------------------------------------------------------------------------------------------


def _renice() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, NICE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """The gateway in a subprocess: ``thunderline-lab serve`` or ``gateway.serve(...)``."""

    def __init__(self, lab: Path, *, cli: bool = False, **options: Any) -> None:
        self.lab, self.cli, self.options = lab, cli, options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        t0 = time.perf_counter()
        env = {**os.environ, "THUNDERLINE_LAB_TOKEN": TOKEN}
        if self.cli:
            cmd = [
                sys.executable,
                "-m",
                "thunderline_lab.cli",
                "serve",
                "--lab",
                str(self.lab),
                "--port",
                str(self.port),
            ]
            if self.options.get("synchronous", "full") != "full":  # full is the default
                cmd += ["--synchronous", self.options["synchronous"]]
        else:
            args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            code = (
                f"from thunderline_lab.gateway import serve; serve({str(self.lab)!r}, "
                f"port={self.port}, token={TOKEN!r}, {args})"
            )
            cmd = [sys.executable, "-c", code]
        self.lab.mkdir(parents=True, exist_ok=True)
        log_path = self.lab / "gateway.log"
        with open(log_path, "ab") as log:  # a file, not a pipe nobody drains
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=log, preexec_fn=_renice if NICE else None
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.05)

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the gateway process has used: contention-proof."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/healthz", timeout=10).json())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawConn:
    """One keep-alive HTTP/1.1 connection; ``post`` returns the status code."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST /api/events/ml HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\nauthorization: Bearer {TOKEN}\r\n"
        )

    async def post(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        try:
            self.writer.write(f"{self.head}content-length: {len(body)}\r\n\r\n".encode() + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b""):
                    break
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            await self.reader.readexactly(length)
            return status
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.writer.close()
            self.writer = None
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def fmt_ms(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e3:6.2f} ms  p95 {pct(values, 95) * 1e3:6.2f} ms  "
        f"p99 {pct(values, 99) * 1e3:6.2f} ms  max {max(values, default=0) * 1e3:7.1f} ms"
    )


async def open_loop(
    port: int,
    bodies: Iterator[bytes],
    rate: float,
    n: int,
    connections: int = 32,
    on_tick: Callable[[float], None] | None = None,
) -> tuple[list[float], int, float]:
    """Send ``n`` bodies at ``rate``/s; latency from each scheduled time. (lat, errors, secs)"""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = RawConn(port)
        while True:
            item = await queue.get()
            if item is None:
                conn.close()
                return
            scheduled, body = item
            status = await conn.post(body)
            latencies.append(time.perf_counter() - scheduled)
            if status != 202:
                errors += 1

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter()
    next_tick = start + 5
    for i in range(n):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((target, next(bodies)))
        if on_tick is not None and time.perf_counter() >= next_tick:
            on_tick(time.perf_counter() - start)
            next_tick += 5
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return latencies, errors, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def sqlite_floor(db: Path, chunks: list[list[E.Event]], sync: str) -> float:
    """events/s of the bare log insert: the same events' rows, built before the clock
    starts, inserted into an events table alone (no validation, no projections, no HTTP)
    and committed per chunk at the gateway's ``synchronous`` level: what any design that
    keeps each event as a row of one SQLite file cannot beat on this machine."""
    import sqlite3

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # as the store's
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, timestamp TEXT NOT NULL, "
        "model_run_id TEXT, trial_id TEXT, body TEXT NOT NULL)"
    )
    rows = [
        [
            (e.id, e.name, format_ts(e), e.payload.model_run_id, e.payload.trial_id, body)
            for e, body in zip(chunk, E.dump_events(chunk), strict=True)
        ]
        for chunk in chunks
    ]
    t0 = time.perf_counter()
    for chunk_rows in rows:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR IGNORE INTO events (id, name, timestamp, model_run_id, trial_id, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            chunk_rows,
        )
        conn.execute("COMMIT")
    rate = sum(map(len, rows)) / (time.perf_counter() - t0)
    conn.close()
    return rate


def store_transaction_floor(db: Path, chunks: list[list[E.Event]], sync: str) -> float:
    """events/s of the store's write transaction alone: each chunk's rows built (parsed,
    validated, encoded) before the clock starts, then ``TrialStore``'s own transaction run
    and committed: the log insert, the metric-point and trial projections, the commit. This
    is the part one SQLite writer must do in series; what any ingest path with this schema,
    however parallel its parsing, cannot beat."""
    from thunderline_lab.store import _pending_from_fast

    store = TrialStore(db)
    store.conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    prebuilt = []
    for chunk in chunks:
        fast = E.fast_events(array_body(chunk))
        assert fast is not None
        pending = _pending_from_fast(fast)
        assert pending is not None
        prebuilt.append(pending)
    t0 = time.perf_counter()
    for pending in prebuilt:
        store._with_write_lock(lambda p=pending: store._append_locked(p, len(p)))
    rate = sum(map(len, prebuilt)) / (time.perf_counter() - t0)
    store.close()
    return rate


def bench_batch(root: Path, rounds: int, batch_events: int, batches: int, sync: str) -> None:
    print(
        f"\n[batch] {batches} × {batch_events}-event arrays per round over 2 connections vs "
        f"TrialStore.append in-process (synchronous={sync}), {rounds} interleaved rounds"
    )
    gw_rates, direct_rates, floor_rates, gw_cpu, direct_cpu = [], [], [], [], []
    txn_rates: list[float] = []
    study_floor, study_txn = Study("batch-floor"), Study("batch-txn")
    direct = TrialStore(root / "direct" / "lab.db")
    direct.conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    study_gw, study_direct = Study("batch-gw"), Study("batch-direct")
    with Gateway(root / "batch", synchronous=sync) as gw:
        for r in range(rounds):
            bodies = [array_body(study_gw.events(batch_events)) for _ in range(batches)]

            async def post_all(bodies: list[bytes] = bodies) -> int:
                conns = [RawConn(gw.port), RawConn(gw.port)]

                async def lane(c: RawConn, mine: list[bytes]) -> int:
                    bad = 0
                    for b in mine:
                        bad += await c.post(b) != 202
                    return bad

                bad = await asyncio.gather(*(lane(c, bodies[i::2]) for i, c in enumerate(conns)))
                for c in conns:
                    c.close()
                return sum(bad)

            n = batches * batch_events
            t0, cpu0 = time.perf_counter(), gw.cpu_s()
            errors = asyncio.run(post_all())
            gw_rate = n / (time.perf_counter() - t0)
            gw_cpu.append((gw.cpu_s() - cpu0) / n)
            chunks = [study_direct.events(batch_events) for _ in range(batches)]
            t0, cpu0 = time.perf_counter(), time.process_time()
            for chunk in chunks:
                direct.append(chunk)
            direct_rate = n / (time.perf_counter() - t0)
            direct_cpu.append((time.process_time() - cpu0) / n)
            floor_chunks = [study_floor.events(batch_events) for _ in range(batches)]
            floor_rates.append(sqlite_floor(root / "floor.db", floor_chunks, sync))
            txn_chunks = [study_txn.events(batch_events) for _ in range(batches)]
            txn_rates.append(store_transaction_floor(root / "txn" / "lab.db", txn_chunks, sync))
            gw_rates.append(gw_rate)
            direct_rates.append(direct_rate)
            print(
                f"  round {r + 1}: gateway {gw_rate:9,.0f} events/s  direct append "
                f"{direct_rate:9,.0f} events/s  store transaction alone {txn_rates[-1]:9,.0f} "
                f"events/s  bare SQLite insert {floor_rates[-1]:9,.0f} "
                f"events/s  errors {errors}  (CPU per event: gateway "
                f"{gw_cpu[-1] * 1e6:.0f} µs, direct {direct_cpu[-1] * 1e6:.0f} µs)"
            )
        health = gw.health()
    direct.close()
    g, d = statistics.median(gw_rates), statistics.median(direct_rates)
    print(
        f"  median: gateway {g:,.0f} events/s, direct {d:,.0f} events/s, "
        f"ratio gateway/direct {g / d:.2f}; goal 50,000 events/s: "
        f"{'met' if g >= 50_000 else 'NOT met'}; commits {health['commits']} for "
        f"{health['requests_committed']} requests"
    )
    f = statistics.median(floor_rates)
    print(
        f"  floor: the same rows inserted bare into an events table (no validation, "
        f"projections or HTTP), committed: {f:,.0f} events/s; gateway/floor {g / f:.2f}"
    )
    t = statistics.median(txn_rates)
    print(
        f"  the store's write transaction alone (rows prebuilt; log insert, projections, "
        f"commit: what one writer must do in series): {t:,.0f} events/s; gateway/that "
        f"{g / t:.2f}; the 50,000 events/s goal is "
        f"{'within' if t >= 50_000 else 'beyond'} it"
    )
    gc, dc = statistics.median(gw_cpu), statistics.median(direct_cpu)
    print(
        f"  CPU per event (contention-proof): gateway {gc * 1e6:.0f} µs, direct append "
        f"{dc * 1e6:.0f} µs → one free core sustains ≈ {1 / gc:,.0f} vs {1 / dc:,.0f} events/s"
    )


def bench_latency(root: Path, rate: float, seconds: float, sync: str) -> None:
    n = int(rate * seconds)
    print(
        f"\n[latency] {n} single-event POSTs at {rate:.0f} req/s open loop "
        f"(32 connections, synchronous={sync})"
    )
    study = Study("latency")
    bodies = iter([e.model_dump_json().encode() for e in study.events(n)])
    with Gateway(root / "latency", synchronous=sync) as gw:
        cpu0 = gw.cpu_s()
        lat, errors, secs = asyncio.run(open_loop(gw.port, bodies, rate, n))
        cpu = gw.cpu_s() - cpu0
        health = gw.health()
    print(f"  {fmt_ms(lat)}  achieved {n / secs:,.0f} req/s  errors {errors}")
    print(f"  gateway CPU {cpu / n * 1e3:.2f} ms per request ({cpu / secs:.0%} of one core)")
    print(
        f"  {health['commits']} commits for {health['requests_committed']} requests "
        f"({health['requests_committed'] / max(health['commits'], 1):.1f} requests/commit); "
        f"goal p95 ≤ 10 ms: {'met' if pct(lat, 95) <= 0.010 else 'NOT met'}"
    )


def bench_group(root: Path, rounds: int, seconds: float, sync: str) -> None:
    print(
        f"\n[group] closed loop, 32 connections posting single events for {seconds:.0f} s: "
        f"group commit on vs off (synchronous={sync}), {rounds} interleaved rounds"
    )
    results: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for group in (True, False):
            study = Study(f"group-{group}-{r}")
            with Gateway(root / f"group-{group}-{r}", synchronous=sync, group_commit=group) as gw:

                async def closed_loop(port: int = gw.port, study: Study = study) -> int:
                    deadline = time.perf_counter() + seconds
                    done = 0

                    async def lane() -> None:
                        nonlocal done
                        conn = RawConn(port)
                        while time.perf_counter() < deadline:
                            body = study.events(1)[0].model_dump_json().encode()
                            if await conn.post(body) == 202:
                                done += 1
                        conn.close()

                    await asyncio.gather(*(lane() for _ in range(32)))
                    return done

                cpu0 = gw.cpu_s()
                done = asyncio.run(closed_loop())
                cpu = gw.cpu_s() - cpu0
                health = gw.health()
            rate = done / seconds
            results[group].append(rate)
            print(
                f"  round {r + 1} group commit {'on ' if group else 'off'}: {rate:7,.0f} req/s"
                f"  ({health['requests_committed'] / max(health['commits'], 1):.1f} "
                f"requests/commit, gateway CPU {cpu / max(done, 1) * 1e3:.2f} ms/request)"
            )
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"  median: on {on:,.0f} req/s, off {off:,.0f} req/s, ratio on/off {on / off:.2f}")


def bench_burst(root: Path, seconds: float, sync: str) -> None:
    rate, n = 100.0, int(100 * seconds)
    print(
        f"\n[burst] seed 000: 100 trials/s for {seconds:.0f} s, each trial's 24 events in one "
        f"POST ({24 * rate:,.0f} events/s)"
    )
    study = Study("burst")
    bodies = iter([array_body(study.trial()) for _ in range(n)])
    with Gateway(root / "burst", synchronous=sync) as gw:
        lat, errors, secs = asyncio.run(open_loop(gw.port, bodies, rate, n))
    print(
        f"  {fmt_ms(lat)}  achieved {n / secs:,.0f} trials/s  errors {errors}; floor p95 < "
        f"100 ms: {'met' if pct(lat, 95) < 0.100 else 'NOT met'}"
    )


def bench_sustained(root: Path, minutes: float, sync: str) -> None:
    trials_per_s = 1000 / 60
    rate = trials_per_s * 24
    n = int(rate * minutes * 60)
    print(
        f"\n[sustained] seed 000: 1000 trials/min for {minutes:g} min, every event its own POST "
        f"({rate:.0f} req/s, {n:,} requests)"
    )
    study = Study("sustained")

    def bodies() -> Iterator[bytes]:
        while True:
            for ev in study.trial():
                yield ev.model_dump_json().encode()

    samples: list[tuple[float, float]] = []
    with Gateway(root / "sustained", synchronous=sync) as gw:
        samples.append((0.0, gw.rss_mib()))

        def tick(elapsed: float) -> None:
            samples.append((elapsed, gw.rss_mib()))

        cpu0 = gw.cpu_s()
        lat, errors, secs = asyncio.run(open_loop(gw.port, bodies(), rate, n, on_tick=tick))
        cpu = gw.cpu_s() - cpu0
        samples.append((secs, gw.rss_mib()))
        health = gw.health()
    warm = next((rss for t, rss in samples if t >= min(30.0, secs / 4)), samples[0][1])
    growth = (samples[-1][1] - warm) / warm
    print(f"  {fmt_ms(lat)}  achieved {n / secs:,.0f} req/s  errors {errors}")
    print(f"  gateway CPU {cpu / n * 1e3:.2f} ms per request ({cpu / secs:.0%} of one core)")
    print(
        f"  RSS MiB: start {samples[0][1]:.0f}, after warm-up {warm:.0f}, end "
        f"{samples[-1][1]:.0f}, max {max(r for _, r in samples):.0f} → growth "
        f"{growth:+.1%} (goal ≤ 10 %: {'met' if growth <= 0.10 else 'NOT met'})"
    )
    print(
        f"  {health['events_committed']:,} events committed in {health['commits']:,} commits; "
        f"floor p95 < 100 ms: {'met' if pct(lat, 95) < 0.100 else 'NOT met'}"
    )


def bench_kill(root: Path, kills: int) -> None:
    print(
        f"\n[kill] {kills} × kill -9 of `thunderline-lab serve` under load (3 posting threads), "
        f"restart each time"
    )
    lab = root / "kill"
    gw = Gateway(lab, cli=True)
    stop = threading.Event()
    acked: list[set[str]] = [set() for _ in range(3)]

    def hammer(i: int) -> None:
        study = Study(f"kill-{i}")
        pending = array_body(study.trial())
        ids: list[str] = []
        with httpx.Client(timeout=5, headers={"authorization": f"Bearer {TOKEN}"}) as http:
            while not stop.is_set():
                try:
                    resp = http.post(f"{gw.url}/api/events/ml", content=pending)
                except httpx.HTTPError:
                    time.sleep(0.02)
                    continue
                if resp.status_code == 202:
                    ids = resp.json()["ids"]
                    acked[i].update(ids)
                    pending = array_body(study.trial())
                else:
                    time.sleep(0.02)

    gw.start()
    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    restarts = []
    rng = random.Random(20)
    try:
        for _ in range(kills):
            floor = sum(map(len, acked)) + 100
            while sum(map(len, acked)) < floor:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.3))
            gw.kill9()
            restarts.append(gw.start())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        gw.stop()
    all_acked = set().union(*acked)
    store = TrialStore(lab / "lab.db")
    stored = {r[0] for r in store.conn.execute("SELECT id FROM events")}
    tables = ("model_runs", "trials", "metrics", "artifacts")
    before = {t: store.table(t) for t in tables}
    store.replay()
    same = all(before[t].equals(store.table(t)) for t in tables)
    store.close()
    lost = len(all_acked - stored)
    print(
        f"  {kills} kills, restart to healthy: median {statistics.median(restarts):.2f} s; "
        f"{len(all_acked):,} events acknowledged, {lost} lost; replay leaves tables "
        f"{'identical' if same else 'DIFFERENT'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["batch", "latency", "group", "burst", "sustained", "kill"],
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--sustained-minutes", type=float, default=1.0)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the gateway and the load generator at this priority (e.g. -10, as root) to "
        "measure the gateway rather than a crowded machine's scheduler",
    )
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    if NICE:
        _renice()
    sections = set(args.only or ["batch", "latency", "group", "burst", "sustained", "kill"])
    if args.quick:
        args.rounds, args.latency_seconds = 1, 3.0
        args.sustained_minutes, args.kills = min(args.sustained_minutes, 0.25), min(args.kills, 3)
    print(
        f"bench_gateway: nice {NICE}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; pandas {pd.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        if "batch" in sections:
            bench_batch(root, args.rounds, 5000, 2 if args.quick else 6, args.synchronous)
        if "latency" in sections:
            bench_latency(root, args.rate, args.latency_seconds, args.synchronous)
        if "group" in sections:
            bench_group(root, 1 if args.quick else 2, 2.0 if args.quick else 5.0, args.synchronous)
        if "burst" in sections:
            bench_burst(root, 2.0 if args.quick else 5.0, args.synchronous)
        if "sustained" in sections:
            bench_sustained(root, args.sustained_minutes, args.synchronous)
        if "kill" in sections:
            bench_kill(root, args.kills)


if __name__ == "__main__":
    main()

"""P1 and P2: event validation throughput, and the store's committed append vs MLflow.

P1: canonical ``ml.run.metric`` events validated per second: by the ingest fast path
    (``events.fast_events``: msgspec structs generated from the models, what the store and
    the gateway append) from parsed JSON dicts and from JSON text; into plain dicts
    (``events.validate_records``); and into pydantic event objects (``events.validate_events``,
    from dicts and from JSON text). Each figure times the call only; the result is freed
    after the clock stops. Seed 000 claims 0.1 ms per event.
P2: validate + dedupe + append + project, committed, in metric points per second — events
    shaped like the training loop's (5 measurements per epoch event, batches of 2,000) —
    against MLflow's own ``log_batch`` (1,000 metrics per request) into a SQLite backend,
    measured interleaved in the same run.

Usage: python benchmarks/bench_core.py [--events 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from thunderline_lab import events as E
from thunderline_lab.store import TrialStore

POINTS_PER_EVENT = 5


def metric_records(n: int, run: str = "bench") -> list[dict[str, Any]]:
    """Canonical metric events as a client would send them (parsed JSON dicts)."""
    out = []
    for i in range(n):
        ev = E.run_metric(
            model_run_id=run,
            trial_id=f"trial_{i // 100:04d}",
            step=i % 100,
            measurements={
                "train_loss": 1.0 / (i + 1),
                "val_loss": 1.1 / (i + 1),
                "val_accuracy": 0.5 + (i % 100) / 250,
                "lr": 0.001,
                "max_sigma": 1.0,
            },
        )
        out.append(json.loads(ev.to_json()))
    return out


def seed000_records(n: int) -> list[dict[str, Any]]:
    """Seed 000's own ``emit_run_metric`` example (one metric, metadata), as parsed JSON."""
    out = []
    for i in range(n):
        ev = E.run_metric(
            model_run_id="test-run",
            trial_id=f"trial_{i // 100:04d}",
            metric_name="val_accuracy",
            metric_value=0.8765,
            step=i % 100,
            spectral_norm=True,
            metadata={"learning_rate": 0.001},
        )
        out.append(json.loads(ev.to_json()))
    return out


def rate(fn: Any, arg: Any, n: int) -> float:
    t = time.perf_counter()
    out = fn(arg)
    elapsed = time.perf_counter() - t
    assert out is not None and len(out) == n  # the fast path vouched for every event
    return n / elapsed


def bench_validation(records: list[dict[str, Any]], text: str) -> dict[str, float]:
    raw = text.encode()
    n = len(records)
    return {
        "fast, from dicts": rate(E.fast_events, records, n),
        "fast, from JSON": rate(E.fast_events, raw, n),
        "into dicts": rate(E.validate_records, records, n),
        "objects, from dicts": rate(E.validate_events, records, n),
        "objects, from JSON": rate(E.validate_events_json, text, n),
    }


def bench_store(records: list[dict[str, Any]], folder: Path, batch: int = 2000) -> float:
    store = TrialStore(folder / f"lab-{time.monotonic_ns()}.db")
    t = time.perf_counter()
    for i in range(0, len(records), batch):
        store.append(records[i : i + batch])
    elapsed = time.perf_counter() - t
    assert store.counts()["metrics"] == len(records) * POINTS_PER_EVENT
    store.close()
    return len(records) * POINTS_PER_EVENT / elapsed


def mlflow_setup(folder: Path) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench", artifact_location=str(folder / "mlartifacts"))
    del mlflow
    return client, exp


def bench_mlflow(client: Any, exp: str, n_points: int) -> float:
    from mlflow.entities import Metric

    run = client.create_run(exp)
    now = int(time.time() * 1000)
    names = ["train_loss", "val_loss", "val_accuracy", "lr", "max_sigma"]
    metrics = [Metric(names[i % 5], 1.0 / (i + 1), now, i // 5) for i in range(n_points)]
    t = time.perf_counter()
    for i in range(0, n_points, 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    return n_points / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlflow-points", type=int, default=10_000)
    args = parser.parse_args()

    records = metric_records(args.events)
    seed000 = seed000_records(args.events)
    text, seed000_text = json.dumps(records), json.dumps(seed000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        client, exp = mlflow_setup(folder)
        p1: dict[str, list[float]] = {}
        p1_seed000: dict[str, list[float]] = {}
        p2_ours, p2_mlflow = [], []
        for _ in range(args.repeats):  # interleaved: each round measures all of them
            for k, v in bench_validation(records, text).items():
                p1.setdefault(k, []).append(v)
            for k, v in bench_validation(seed000, seed000_text).items():
                p1_seed000.setdefault(k, []).append(v)
            p2_ours.append(bench_store(records, folder))
            p2_mlflow.append(bench_mlflow(client, exp, args.mlflow_points))

    med = statistics.median
    print(
        f"P1 validation, {args.events} canonical ml.run.metric events, events/s, median of "
        f"{args.repeats} (goal >= 250,000):"
    )
    print(f"  {'':22s} {'5 measurements':>16s} {'seed 000 form':>16s}")
    for k in p1:
        print(f"  {k:22s} {med(p1[k]):>16,.0f} {med(p1_seed000[k]):>16,.0f}")
    fast = max(med(p1["fast, from dicts"]), med(p1["fast, from JSON"]))
    print(
        f"  fast path vs pydantic objects from dicts: {fast / med(p1['objects, from dicts']):.1f}x"
    )
    print(f"  vs seed 000's 0.1 ms/event claim (10,000/s): {fast / 10_000:.1f}x")
    print(f"P2 validate+dedupe+append+project, committed ({POINTS_PER_EVENT} points/event):")
    print(f"  thunderline store : {med(p2_ours):>10,.0f} points/s  (goal >= 100,000)")
    print(f"  MLflow log_batch  : {med(p2_mlflow):>10,.0f} points/s  (SQLite backend, 1000/req)")
    print(f"  ratio store/MLflow: {med(p2_ours) / med(p2_mlflow):.1f}x  (goal >= 20x)")


if __name__ == "__main__":
    main()

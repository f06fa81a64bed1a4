from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from thunderline_lab import events as E
from thunderline_lab.bus import AsyncEmitter, EventBus
from thunderline_lab.events import EventValidationError


def metric() -> E.Event:
    return E.run_metric(model_run_id="r", trial_id="t", step=0, metric_name="a", metric_value=1.0)


def start() -> E.Event:
    return E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)


@pytest.mark.parametrize(
    ("pattern", "metric_hits", "trial_hits"),
    [
        ("ml.*", 1, 1),
        ("ml.run.*", 1, 0),
        ("ml.trial.*", 0, 1),
        ("ml.run.metric", 1, 0),
        ("*", 1, 1),
    ],
)
def test_glob_patterns_route_events(pattern: str, metric_hits: int, trial_hits: int) -> None:
    bus = EventBus()
    seen: list[E.Event] = []
    bus.subscribe(pattern, seen.append)
    bus.publish(metric())
    assert len(seen) == metric_hits
    bus.publish(start())
    assert len(seen) == metric_hits + trial_hits


def test_failing_subscriber_does_not_break_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(ev: E.Event) -> None:
        raise RuntimeError("subscriber bug")

    sub = bus.subscribe("ml.*", broken, name="broken")
    bus.subscribe("ml.*", lambda ev: seen.append(ev.id))
    with caplog.at_level(logging.ERROR):
        delivered = bus.publish(metric())
    assert delivered == 1 and len(seen) == 1
    assert sub.failures == 1
    assert "broken" in caplog.text


def test_telemetry_hooks_see_start_stop_exception_and_dropped() -> None:
    bus = EventBus()
    kinds: list[tuple[str, dict[str, Any]]] = []
    bus.add_telemetry_hook(lambda kind, info: kinds.append((kind, info)))
    bus.publish(metric())  # nobody listens: dropped
    bus.subscribe("ml.run.*", lambda ev: 1 / 0)
    bus.publish(metric())
    names = [k for k, _ in kinds]
    assert names == [
        "publish.start",
        "dropped",
        "publish.start",
        "publish.exception",
        "publish.stop",
    ]
    assert kinds[3][1]["error"].startswith("ZeroDivisionError")
    assert bus.dropped == 1 and bus.published == 2


def test_unsubscribe_stops_delivery_and_refreshes_routes() -> None:
    bus = EventBus()
    seen: list[E.Event] = []
    sub = bus.subscribe("ml.*", seen.append)
    bus.publish(metric())
    bus.unsubscribe(sub)
    bus.publish(metric())
    assert len(seen) == 1
    bus.subscribe("ml.run.*", seen.append)  # a new subscriber invalidates the cached route
    bus.publish(metric())
    assert len(seen) == 2


def test_failing_telemetry_hook_is_contained() -> None:
    bus = EventBus()
    bus.add_telemetry_hook(lambda kind, info: 1 / 0)
    seen: list[E.Event] = []
    bus.subscribe("*", seen.append)
    assert bus.publish(metric()) == 1 and seen


# -- AsyncEmitter ---------------------------------------------------------------------------


def test_async_emitter_publishes_in_order_with_common_fields() -> None:
    bus = EventBus()
    seen: list[E.Event] = []
    bus.subscribe("ml.*", seen.append)
    before = datetime.now(UTC)
    emitter = AsyncEmitter(bus, interval=10.0, correlation_id="c-1", model_run_id="r", trial_id="t")
    emitter.emit("ml.run.start", spectral_norm=True)
    for step in range(3):
        emitter.emit("ml.run.metric", step=step, measurements={"train_loss": 1.0 / (step + 1)})
    built = E.run_stop(model_run_id="r", trial_id="t", epochs=3)
    emitter.publish(built)
    after = datetime.now(UTC)
    assert seen == []  # queued: the background thread has not had its turn (interval 10 s)
    emitter.close()
    assert [e.name for e in seen] == ["ml.run.start", *["ml.run.metric"] * 3, "ml.run.stop"]
    assert [e.payload.step for e in seen[1:4]] == [0, 1, 2]
    assert seen[-1] is built
    for ev in seen[:4]:
        assert ev.payload.model_run_id == "r" and ev.payload.trial_id == "t"
        assert ev.correlation_id == "c-1"
        assert before <= ev.timestamp <= after  # stamped when emitted, not when published
    assert len({e.id for e in seen}) == 5


def test_async_emitter_publishes_from_its_thread() -> None:
    bus = EventBus()
    got = threading.Event()
    bus.subscribe("ml.run.metric", lambda ev: got.set())
    with AsyncEmitter(bus, interval=0.01, model_run_id="r", trial_id="t") as emitter:
        emitter.emit("ml.run.metric", step=0, metric_name="val_loss", metric_value=0.5)
        assert got.wait(5.0)  # no flush needed


def test_async_emitter_raises_an_invalid_event_on_the_next_call() -> None:
    bus = EventBus()
    seen: list[E.Event] = []
    bus.subscribe("ml.*", seen.append)
    emitter = AsyncEmitter(bus, interval=10.0, model_run_id="r", trial_id="t")
    emitter.emit("ml.run.metric", step=0, measurements={"val_loss": 0.5})
    emitter.emit("ml.run.metric", step=1, measurements={"val_loss": float("nan")})
    emitter.emit("ml.run.metric", step=2, measurements={"val_loss": 0.4})
    with pytest.raises(EventValidationError) as info:
        emitter.flush()
    (err,) = info.value.errors
    assert err.path == "payload.measurements.val_loss" and err.rule == "finite_number"
    assert "ml.run.metric" in err.message
    assert [e.payload.step for e in seen] == [0, 2]  # the valid ones around it are published
    emitter.emit("ml.run.metric", step=-1, measurements={"val_loss": 0.4})
    emitter._drain()  # as the background thread would
    with pytest.raises(EventValidationError, match=r"payload\.step"):
        emitter.emit("ml.run.metric", step=3, measurements={"val_loss": 0.3})
    emitter.close()  # the error was reported once; nothing left to raise

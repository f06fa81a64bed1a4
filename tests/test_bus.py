from __future__ import annotations

import logging
from typing import Any

import pytest

from thunderline_lab import events as E
from thunderline_lab.bus import EventBus


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

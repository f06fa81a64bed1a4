"""Tests of thunderline_lab.monitor: the state fold, the three sources, throttling, modes."""

from __future__ import annotations

import gc
import itertools
import math
import os
import re
import socket
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pandas as pd
import pytest

from thunderline_lab import events
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import (
    ConfigError,
    GatewayError,
    StoreError,
    StudyError,
    ThunderlineLabError,
)
from thunderline_lab.monitor import (
    BackgroundRun,
    BusSource,
    CombinedSource,
    Curve,
    GatewayMirror,
    GatewaySource,
    LiveMonitor,
    MonitorState,
    StoreSource,
    as_source,
    detect_frontend,
    render_curves_png,
    render_panel_html,
    render_table_html,
    render_table_text,
    render_text_line,
    simulate_study,
    synthetic_study,
)
from thunderline_lab.store import TrialStore

STUDY = "mon-study"


def _fold(evs: list[Any], **kw: Any) -> MonitorState:
    state = MonitorState(STUDY, **kw)
    state.apply_many(evs)
    return state


def _view(state: MonitorState) -> list[tuple[Any, ...]]:
    """What the table shows, per trial (comparable across sources)."""
    return [
        (r.trial_id, r.status, r.arm, r.coeff, r.epoch, r.best, r.lipschitz, r.pair_id)
        for r in sorted(state.rows.values(), key=lambda r: r.trial_id)
    ]


# ---------------------------------------------------------------------------------------------
# Curve and state
# ---------------------------------------------------------------------------------------------


def test_curve_stays_bounded_and_keeps_first_and_last_points() -> None:
    curve = Curve(capacity=64)
    for step in range(100_000):
        curve.add(step, float(step) ** 0.5)
    steps, values = curve.points()
    assert len(steps) <= 65
    assert steps[0] == 0 and steps[-1] == 99_999
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    gaps = {b - a for a, b in itertools.pairwise(steps[:-1])}  # the last point: the latest
    assert len(gaps) == 1  # evenly strided
    assert values[-1] == pytest.approx(99_999**0.5)


def test_curve_updates_a_repeated_step_and_ignores_older_steps() -> None:
    curve = Curve(capacity=8)
    curve.add(0, 1.0)
    curve.add(1, 2.0)
    curve.add(1, 3.0)
    curve.add(0, 9.0)
    assert curve.points() == ([0, 1], [1.0, 3.0])


def test_state_folds_a_paired_study() -> None:
    evs = synthetic_study(STUDY, n_pairs=3, epochs=6, coeff=2.0, pruned=1, failed=1)
    state = _fold(evs)
    rows = {r.trial_id: r for r in state.rows.values()}
    assert len(rows) == 6
    statuses = sorted(r.status for r in rows.values())
    assert statuses == ["completed"] * 4 + ["failed", "pruned"]
    sn_rows = [r for r in rows.values() if r.arm == "SN"]
    assert len(sn_rows) == 3 and all(r.coeff == 2.0 for r in sn_rows)
    completed = [r for r in rows.values() if r.status == "completed"]
    assert all(r.epoch == 5 and r.best is not None and r.lipschitz is not None for r in completed)
    assert {r.pair_id for r in rows.values()} == {"pair_0000", "pair_0001", "pair_0002"}
    s = state.summary()
    assert (s["n_trials"], s["n_completed"], s["n_pruned"], s["n_failed"], s["n_running"]) == (
        6,
        4,
        1,
        1,
        0,
    )
    assert s["arms"]["SN"]["n"] == 2 and s["arms"]["none"]["n"] == 2
    assert s["paired"]["n"] == 2  # the pruned and the failed trial broke one pair each
    best = max(completed, key=lambda r: r.best or 0)
    assert s["best"]["trial_id"] == best.trial_id


def test_best_comes_from_the_trainers_best_value_when_reported() -> None:
    common = {"model_run_id": STUDY, "trial_id": "t", "study": STUDY}
    state = _fold(
        [
            events.trial_start(**common, spectral_norm=False),
            events.run_metric(**common, step=0, measurements={"val_accuracy": 0.5}),
            events.run_metric(**common, step=1, measurements={"val_accuracy": 0.7}),
            events.trial_complete(
                **common, spectral_norm=False, metrics={"best_val_accuracy": 0.65}
            ),
        ]
    )
    assert state.rows[(STUDY, "t")].best == 0.65


def test_dict_events_fold_like_event_objects() -> None:
    evs = synthetic_study(STUDY, n_pairs=2, epochs=4)
    as_dicts = [e.model_dump(mode="json") for e in evs]
    assert _view(_fold(evs)) == _view(_fold(as_dicts))


def test_other_studies_and_foreign_events_are_ignored() -> None:
    evs = synthetic_study("other", n_pairs=1, epochs=2)
    generic = events.validate_event(
        {"id": "x1", "name": "system.ping", "timestamp": "2026-01-01T00:00:00Z", "payload": {}}
    )
    state = _fold([*evs, generic])
    assert not state.rows and state.ignored == len(evs) + 1
    everything = MonitorState()  # study=None: every study counts
    everything.apply_many(evs)
    assert len(everything.rows) == 2


def test_memory_is_bounded_by_trials_not_events() -> None:
    state = MonitorState(STUDY, curve_points=50, max_curve_trials=10)
    for t in range(40):
        common = {"model_run_id": STUDY, "trial_id": f"t{t}", "study": STUDY}
        state.apply(events.trial_start(**common, spectral_norm=t % 2 == 0))
        for step in range(300):
            state.apply(
                {
                    "name": "ml.run.metric",
                    "payload": {
                        **common,
                        "step": step,
                        "measurements": {"val_accuracy": 0.5, "val_loss": 1.0, "train_loss": 1.0},
                    },
                }
            )
        state.apply(events.trial_complete(**common, spectral_norm=t % 2 == 0))
    assert len(state.rows) == 40
    assert len(state.curves) == 10
    assert state.n_points() <= 10 * 3 * 51
    assert state.events == 40 * 302


def test_load_history_uses_downsampled_store_history() -> None:
    store = TrialStore(":memory:")
    common = {"model_run_id": STUDY, "trial_id": "t0", "study": STUDY}
    store.append([events.trial_start(**common, spectral_norm=True)])
    store.append(
        [
            events.run_metric(**common, step=s, measurements={"val_accuracy": s / 5000})
            for s in range(5000)
        ]
    )
    state = MonitorState(STUDY)
    state.load_trials(store.trials(study=STUDY))
    n = state.load_history(store, STUDY, ["t0"], max_points=1000)
    assert 0 < n <= 1000
    steps, _ = state.curves[(STUDY, "t0")]["val_accuracy"].points()
    assert steps[0] == 0 and steps[-1] == 4999
    assert state.rows[(STUDY, "t0")].epoch == 4999


# ---------------------------------------------------------------------------------------------
# One contract, three sources
# ---------------------------------------------------------------------------------------------


class _Feed:
    """A source under test plus a way to deliver events to it."""

    def __init__(self, source: Any, deliver: Callable[[list[Any]], Any]) -> None:
        self.source = source
        self.deliver = deliver


def _fake_gateway(store: TrialStore, token: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != f"Bearer {token}":
            return httpx.Response(401, json={"detail": "token"})
        after = int(request.url.params["after"])
        limit = int(request.url.params["limit"])
        evs = store.events_after(after, limit)
        return httpx.Response(
            200, json={"events": evs, "next_after": evs[-1]["seq"] if evs else after}
        )

    return httpx.MockTransport(handler)


@pytest.fixture(params=["bus", "store", "gateway-mock", "gateway-app"])
def feed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Feed]:
    kind = request.param
    if kind == "bus":
        bus = EventBus()
        src: Any = BusSource(bus)
        yield _Feed(src, bus.publish_many)
        src.close()
        return
    store = TrialStore(tmp_path / "lab.db")
    if kind == "store":
        src = StoreSource(tmp_path / "lab.db", limit=7)
        yield _Feed(src, store.append)
        src.close()
    elif kind == "gateway-mock":
        client = httpx.Client(base_url="http://gw", transport=_fake_gateway(store, "s3cret-token"))
        gsrc = GatewaySource("http://gw", "s3cret-token", client=client, limit=7)
        yield _Feed(gsrc, store.append)
        client.close()
    else:
        gateway = pytest.importorskip("thunderline_lab.gateway")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # starlette: "use httpx2" deprecation notice
            from fastapi.testclient import TestClient

        with TestClient(gateway.create_app(store, token="s3cret-token")) as http:
            gsrc = GatewaySource(token="s3cret-token", client=http, limit=7)
            yield _Feed(gsrc, store.append)
    store.close()


def test_source_delivers_every_event_once_in_order(feed: _Feed) -> None:
    evs = synthetic_study(STUDY, n_pairs=2, epochs=5, failed=1)
    feed.deliver(evs[:9])
    first = feed.source.poll()
    feed.deliver(evs[9:])
    second = feed.source.poll()
    assert feed.source.poll() == []
    got = [e["id"] if isinstance(e, dict) else e.id for e in first + second]
    assert got == [e.id for e in evs]


def test_monitor_state_is_the_same_whatever_the_source(feed: _Feed) -> None:
    evs = synthetic_study(STUDY, n_pairs=3, epochs=4, pruned=1)
    mon = LiveMonitor(feed.source, STUDY, mode="text")
    feed.deliver(evs[:15])
    mon.pump()
    feed.deliver(evs[15:])
    mon.pump()
    assert _view(mon.state) == _view(_fold(evs))
    assert mon.state.summary()["n_done"] == 6


def test_store_source_after_none_tails_only_new_events(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    evs = synthetic_study(STUDY, n_pairs=1, epochs=3)
    store.append(evs[:4])
    src = StoreSource(store, after=None)
    store.append(evs[4:])
    assert [e["id"] for e in src.poll()] == [e.id for e in evs[4:]]


def test_gateway_errors_are_gateway_errors() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="internal")

    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"nope": 1})

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler, words in ((boom, "500"), (garbage, "malformed"), (unreachable, "cannot fetch")):
        client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
        with pytest.raises(GatewayError, match=words):
            GatewaySource(client=client).poll()


def test_as_source_wraps_buses_stores_and_urls(tmp_path: Path) -> None:
    TrialStore(tmp_path / "lab" / "lab.db").close()
    assert isinstance(as_source(EventBus()), BusSource)
    assert isinstance(as_source(tmp_path / "lab"), StoreSource)
    assert isinstance(as_source("http://127.0.0.1:1"), GatewaySource)


def test_bus_buffer_is_bounded_but_keeps_lifecycle_events() -> None:
    bus = EventBus()
    src = BusSource(bus, max_buffer=5)
    evs = synthetic_study(STUDY, n_pairs=1, epochs=10)
    bus.publish_many(evs)
    got = src.poll()
    names = [e.name for e in got]
    assert names.count("ml.trial.start") == 2 and names.count("ml.trial.complete") == 2
    assert src.dropped == len(evs) - len(got) > 0


def test_source_errors_do_not_stop_the_monitor() -> None:
    calls = {"n": 0}

    class Flaky:
        label = "flaky"
        poll_interval = 0.01

        def poll(self) -> list[Any]:
            calls["n"] += 1
            if calls["n"] < 3:
                raise GatewayError("gateway down")
            return list(synthetic_study(STUDY, n_pairs=1, epochs=2))

        def close(self) -> None:
            pass

    mon = LiveMonitor(Flaky(), STUDY, mode="text", text_interval=1e9).start(display=False)
    deadline = time.monotonic() + 20
    while mon.state.summary()["n_done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    mon.close()
    assert mon.source_errors >= 2 and mon.last_error == "gateway down"
    assert mon.state.summary()["n_done"] == 2


def _seeded_pair_events(
    study: str, group: str, seed: int, sn_acc: float, none_acc: float
) -> list[Any]:
    """A configuration's twins on one seed, as the study runner reports them."""
    out: list[Any] = []
    for sn, acc in ((True, sn_acc), (False, none_acc)):
        ids = {"model_run_id": study, "study": study, "trial_id": f"{group}_s{seed}_{int(sn)}"}
        params = {"group_id": group, "pair_id": f"{group}_s{seed}", "seed": seed}
        out.append(events.trial_start(**ids, spectral_norm=sn, parameters=params))
        out.append(
            events.trial_complete(
                **ids,
                spectral_norm=sn,
                status="completed",
                metrics={"best_val_accuracy": acc},
                parameters=params,
            )
        )
    return out


def test_paired_means_count_a_configuration_once_as_the_comparison_does() -> None:
    # two configurations, each on two seeds: 2 pairs (each arm's mean over its seeds), not 4
    evs = [
        *_seeded_pair_events(STUDY, "g0000", 0, 0.90, 0.80),
        *_seeded_pair_events(STUDY, "g0000", 1, 0.70, 0.80),
        *_seeded_pair_events(STUDY, "g0002", 0, 0.95, 0.85),
        *_seeded_pair_events(STUDY, "g0002", 1, 0.95, 0.85),
    ]
    summary = _fold(evs).summary()
    paired = summary["paired"]
    assert paired["n"] == 2
    assert paired["mean"] == pytest.approx((0.0 + 0.10) / 2)
    assert paired["se"] == pytest.approx(0.05)
    # the arms' running means too: one value per configuration (its seeds' mean)
    assert summary["arms"]["SN"]["n"] == 2
    assert summary["arms"]["SN"]["mean"] == pytest.approx((0.80 + 0.95) / 2)
    assert summary["arms"]["none"]["n"] == 2


def test_paired_means_leave_out_a_seed_whose_twin_did_not_complete() -> None:
    # g0000: seed 1 scores 0.10 above seed 0, SN changes nothing; SN's seed 1 is still running
    evs = [
        *_seeded_pair_events(STUDY, "g0000", 0, 0.80, 0.80),
        *_seeded_pair_events(STUDY, "g0000", 1, 0.90, 0.90)[2:],  # none's seed 1 only
        *_seeded_pair_events(STUDY, "g0002", 0, 0.85, 0.84),
    ]
    state = _fold(evs)
    paired = state.summary()["paired"]
    assert paired["n"] == 2
    assert paired["mean"] == pytest.approx((0.0 + 0.01) / 2)  # not (0.80 - 0.85 + 0.01) / 2


def test_paired_means_never_pair_trials_of_two_studies() -> None:
    # every study numbers its configurations g0000, g0002, ...: following two studies at
    # once (study=None), study a's g0000 is not study b's
    state = MonitorState(None)
    state.apply_many(
        [
            *_seeded_pair_events("a", "g0000", 0, 0.90, 0.80),
            *_seeded_pair_events("b", "g0000", 0, 0.60, 0.80),
        ]
    )
    paired = state.summary()["paired"]
    assert paired["n"] == 2
    assert paired["mean"] == pytest.approx((0.10 - 0.20) / 2)


# ---------------------------------------------------------------------------------------------
# Throttling, widgets, text mode, stop
# ---------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("thunderline_lab.monitor.time.monotonic", fake)
    return fake


def test_redraws_are_throttled_and_coalesced_whatever_the_event_rate(clock: _Clock) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", min_interval=0.25, plot_interval=1.0)
    mon.start(display=False, thread=False)
    evs = synthetic_study(STUDY, n_pairs=10, epochs=100)  # 2,040 events
    draws_at: list[float] = []
    for i, ev in enumerate(evs):
        bus.publish(ev)
        if i % 10 == 0:  # the pump runs every 1 ms of fake time: 1,000 events/s
            before = mon.redraws
            mon.pump()
            if mon.redraws > before:
                draws_at.append(clock.now)
        clock.now += 0.001
    span = clock.now - 1000.0
    assert mon.redraws <= 4 * span + 1
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(draws_at))
    mon.finish()
    assert mon.state.summary()["n_done"] == 20  # coalesced, never dropped
    mon.close()


def test_a_forced_final_redraw_keeps_the_rate_limit(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # fake time passes while the monitor waits
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr("thunderline_lab.monitor.time.sleep", sleep)
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", min_interval=0.25)
    mon.start(display=False, thread=False)
    bus.publish_many(synthetic_study(STUDY, n_pairs=2, epochs=3))
    clock.now += 0.3
    mon.pump()
    clock.now += 0.1  # the study ends 0.1 s after the last redraw
    mon.finish()
    times = list(mon.redraw_times)
    assert len(times) >= 2 and slept and abs(slept[-1] - 0.15) < 1e-9
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(times))
    assert "finished" in mon._widgets["panel"].value
    mon.close()


def test_widget_shows_table_curves_and_panel(clock: _Clock) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", max_table_rows=4)
    mon.start(display=False, thread=False)
    bus.publish_many(synthetic_study(STUDY, n_pairs=3, epochs=5))
    clock.now += 5
    mon.pump()
    w = mon._widgets
    assert w["table"].value.count('<tr class="tl-trial"') == 4
    assert "showing 4 of 6 trials" in w["table"].value
    assert bytes(w["curves"].value).startswith(b"\x89PNG")
    assert "6 done" in w["panel"].value and "paired Δ" in w["panel"].value
    assert w["stop"].layout.display == "none"  # nothing to stop in the foreground
    assert "tl-monitor" in mon.widget._dom_classes
    mon.close()


def test_stop_button_ends_a_background_study_cleanly() -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", min_interval=0.01)
    mon.start(display=False)
    started = threading.Event()

    def study() -> dict[str, int]:
        started.set()
        return simulate_study(
            bus, STUDY, n_pairs=50, epochs=20, delay=0.002, stop_event=mon.stop_event
        )

    trials_seen: list[str] = []

    def click_mid_trial(ev: events.Event) -> None:  # in the second trial's 5th epoch, not between
        if ev.payload.trial_id not in trials_seen:
            trials_seen.append(ev.payload.trial_id)
        if len(trials_seen) == 2 and ev.payload.step == 5 and not mon.should_stop():
            mon._widgets["stop"].click()

    bus.subscribe("ml.run.metric", click_mid_trial)
    run = mon.run_in_background(study)
    assert started.wait(10)
    assert mon._widgets["stop"].layout.display == ""
    counts = run.wait(30)
    assert counts["cancelled"] == 1
    assert counts["completed"] < 100
    assert mon.should_stop()
    s = mon.state.summary()
    assert s["n_cancelled"] == 1 and s["n_running"] == 0
    assert "stopped" in mon._widgets["panel"].value
    mon.close()


def test_background_failure_is_reported_once_and_reraised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mon = LiveMonitor.from_bus(EventBus(), STUDY, mode="text", text_interval=1e9)
    mon.start(display=False)

    def broken() -> None:
        raise RuntimeError("no data")

    # waited for (as under papermill): raised in the cell that ran the study
    with (
        caplog.at_level("DEBUG", logger="thunderline_lab.monitor"),
        pytest.raises(RuntimeError, match="no data"),
    ):
        mon.run_in_background(broken, wait=True)
    assert not [r for r in caplog.records if r.exc_info]  # the traceback shows once, raised
    assert "failed (RuntimeError: no data)" in mon._status
    run = mon._background
    assert run is not None
    with pytest.raises(RuntimeError, match="no data"):
        run.wait(5)
    mon.close()


def test_text_mode_prints_occasional_lines_and_a_final_table(
    clock: _Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="text", text_interval=10.0)
    mon.start(thread=False)
    for ev in synthetic_study(STUDY, n_pairs=4, epochs=50):
        bus.publish(ev)
        mon.pump()
        clock.now += 0.05  # 20 events/s for ~21 s
    mon.close()
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith(f"[monitor {STUDY}]")]
    assert 3 <= len(lines) <= 5  # start, ~every 10 s, final
    assert "8 trials so far: 8 done" in lines[-1] and "finished" in lines[-1]
    assert any(ln.startswith("trial") and "lipschitz" in ln for ln in out)  # final table


def test_papermill_like_headless_run_waits_for_the_study(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THUNDERLINE_MONITOR", "text")
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, text_interval=1e9)
    assert mon.headless
    mon.start()
    run = mon.run_in_background(lambda: simulate_study(bus, STUDY, n_pairs=2, epochs=3, delay=0))
    assert not run.running  # returned only when the study was over
    assert mon.state.summary()["n_done"] == 4
    assert "finished" in capsys.readouterr().out


def test_renderers_escape_and_describe_the_state() -> None:
    common = {"model_run_id": STUDY, "trial_id": "<b>x</b>", "study": STUDY}
    state = _fold([events.trial_start(**common, spectral_norm=True, spectral_norm_coeff=0.5)])
    table = render_table_html(state)
    assert "&lt;b&gt;x&lt;/b&gt;" in table and "<b>x</b>" not in table
    assert "on (c=0.5)" in table
    assert render_text_line(state).startswith(
        f"[monitor {STUDY}] 1 trial so far: 0 done, 1 running"
    )
    assert render_curves_png(state).startswith(b"\x89PNG")


def test_a_monitor_told_the_budget_shows_it_beside_the_trials_seen() -> None:
    bus = EventBus()
    common = {"model_run_id": STUDY, "trial_id": "t0", "study": STUDY}
    with LiveMonitor.from_bus(bus, STUDY, mode="text", budget=24) as mon:
        bus.publish(events.trial_start(**common, spectral_norm=True))
        mon.pump()
        assert render_text_line(mon.state).startswith(
            f"[monitor {STUDY}] 1 trial so far (budget 24): 0 done, 1 running"
        )
        assert "1 trial so far (budget 24): 0 done" in render_panel_html(mon.state)
        assert mon.state.summary()["budget"] == 24
    for bad in (0, True, "24", 2.5):
        with pytest.raises(ConfigError, match=r"^budget: expected the study's number of trials"):
            LiveMonitor.from_bus(EventBus(), STUDY, mode="text", budget=bad)


def test_the_table_counts_epochs_trained_of_those_planned() -> None:
    """A study's trials give their planned epochs: the table says 4/20 after the fourth epoch
    (step 3), not 3; a trial without the parameter shows its last step as reported."""
    planned = {"model_run_id": STUDY, "trial_id": "planned", "study": STUDY}
    bare = {"model_run_id": STUDY, "trial_id": "bare", "study": STUDY}
    evs: list[Any] = [
        events.trial_start(**planned, spectral_norm=True, parameters={"epochs": 20}),
        events.trial_start(**bare, spectral_norm=False, parameters={"epochs": True}),
    ]
    for step in range(4):
        evs.append(
            events.run_metric(**planned, step=step, metric_name="val_loss", metric_value=1.0)
        )
        evs.append(events.run_metric(**bare, step=step, metric_name="val_loss", metric_value=1.0))
    state = _fold(evs)
    table = render_table_html(state)
    assert "<td" in table and ">4/20</td>" in table
    cells = re.findall(r'data-trial="bare".*?</tr>', table, flags=re.S)[0]
    assert ">3</td>" in cells and "/" not in re.sub(r"</\w+>", "", cells)
    assert "planned epochs" in table  # the column says what it counts
    text = {line.split()[0]: line.split() for line in render_table_text(state).splitlines()}
    assert text["planned"][4] == "4/20" and text["bare"][4] == "3"
    # a trial seeded from the store (attaching to a running study) knows its plan too
    store_rows = pd.DataFrame(
        [
            {
                "model_run_id": STUDY,
                "trial_id": "loaded",
                "status": "completed",
                "spectral_norm": True,
                "spectral_norm_coeff": 1.0,
                "parameters": {"epochs": 30},
                "metrics": {"epochs": 12},  # stopped early
            }
        ]
    )
    state.load_trials(store_rows)
    assert ">12/30</td>" in render_table_html(state)


def test_save_snapshot_writes_png_and_html(tmp_path: Path) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="text")
    bus.publish_many(synthetic_study(STUDY, n_pairs=1, epochs=3))
    mon.pump()
    png, page = mon.save_snapshot(tmp_path)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert page.read_text().count('class="tl-trial"') == 2
    mon.close()


def test_from_store_snapshot_then_tail(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    evs = synthetic_study(STUDY, n_pairs=2, epochs=6)
    store.append(evs[: len(evs) // 2])
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text")
    assert mon.state.rows and mon.state.curves  # loaded without replaying the log
    store.append(evs[len(evs) // 2 :])
    mon.pump()
    assert _view(mon.state) == _view(_fold(evs))
    mon.close()


# ---------------------------------------------------------------------------------------------
# Frontend detection
# ---------------------------------------------------------------------------------------------


def _fake_ipython(monkeypatch: pytest.MonkeyPatch, shell: Any) -> None:
    mod = types.ModuleType("IPython")
    mod.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", mod)


def test_detect_frontend(monkeypatch: pytest.MonkeyPatch) -> None:
    # imported before IPython is faked below (ipywidgets imports IPython): otherwise this test
    # passed only when an earlier test of the same worker had imported it
    import ipywidgets  # noqa: F401

    monkeypatch.delenv("THUNDERLINE_MONITOR", raising=False)
    _fake_ipython(monkeypatch, None)
    assert detect_frontend()[0] == "text"

    zmq_shell = type("ZMQInteractiveShell", (), {})
    shell = zmq_shell()
    shell.kernel = types.SimpleNamespace(_allow_stdin=False)
    _fake_ipython(monkeypatch, shell)
    mode, reason = detect_frontend()
    assert mode == "text" and "headless" in reason
    shell.kernel._allow_stdin = True
    assert detect_frontend()[0] == "widget"

    _fake_ipython(monkeypatch, type("TerminalInteractiveShell", (), {})())
    assert detect_frontend()[0] == "text"

    monkeypatch.setenv("THUNDERLINE_MONITOR", "widget")
    assert detect_frontend() == ("widget", "$THUNDERLINE_MONITOR=widget")


# ---------------------------------------------------------------------------------------------
# A real headless kernel (what papermill and nbval do)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_executed_notebook_keeps_text_lines_and_a_static_snapshot(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('keep me')"),
        nbformat.v4.new_code_cell(
            "from thunderline_lab.bus import EventBus\n"
            "from thunderline_lab.monitor import LiveMonitor, simulate_study\n"
            "bus = EventBus()\n"
            "mon = LiveMonitor.from_bus(bus, 'nb-study', text_interval=0.05).start()\n"
            "run = mon.run_in_background(\n"
            "    lambda: simulate_study(bus, 'nb-study', n_pairs=2, epochs=4, delay=0.01))\n"
            "print(mon.mode, run.running)"
        ),
    ]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert nb.cells[0].outputs[0]["text"] == "keep me\n"
    outputs = nb.cells[1].outputs
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "[monitor nb-study]" in text and "finished" in text
    assert "text False" in text  # headless: the cell waited for the study
    data = [o["data"] for o in outputs if o["output_type"] == "display_data"]
    assert any("image/png" in d for d in data)
    assert any('class="tl-trial"' in d.get("text/html", "") for d in data)
    # the picture says what it shows (nbconvert's HTML export warned of an image without it)
    (png,) = [o for o in outputs if "image/png" in o.get("data", {})]
    alt = png["metadata"]["image/png"]["alt"]
    assert alt.startswith("learning curves of study nb-study per epoch, coloured by SN arm: ")


def test_trial_table_links_to_the_mlflow_run() -> None:
    from thunderline_lab.monitor import MonitorState, render_table_html

    state = MonitorState("s")
    state.apply(events.trial_start(model_run_id="s", trial_id="trial_0000", spectral_norm=True))
    state.apply(events.trial_start(model_run_id="s", trial_id="trial_0001", spectral_norm=False))
    # what the MLflow logger publishes once the trial's run exists
    state.apply(
        events.run_start(
            model_run_id="s",
            trial_id="trial_0000",
            mlflow_run_id="0123456789abcdef",
            metadata={"mlflow_link": True, "mlflow_experiment_id": "7"},
        )
    )
    html = render_table_html(state, mlflow_ui="http://mlflow.local:5000")
    assert 'href="http://mlflow.local:5000/#/experiments/7/runs/0123456789abcdef"' in html
    assert ">01234567</a>" in html
    assert state.rows[("s", "trial_0000")].status == "running"  # the link changes no status


# ---------------------------------------------------------------------------------------------
# "best" means what the trainer means: the objective at the lowest val_loss so far
# ---------------------------------------------------------------------------------------------


def _epochs(trial: str, points: list[tuple[float, float]]) -> list[Any]:
    common = {"model_run_id": STUDY, "trial_id": trial, "study": STUDY}
    return [events.trial_start(**common, spectral_norm=True)] + [
        events.run_metric(**common, step=i, measurements={"val_accuracy": a, "val_loss": v})
        for i, (a, v) in enumerate(points)
    ]


def test_running_best_is_the_objective_at_the_lowest_val_loss() -> None:
    # accuracy keeps rising while the loss turns up after epoch 1 (over-confidence)
    evs = _epochs("t", [(0.70, 0.9), (0.80, 0.5), (0.85, 0.6), (0.86, 0.7)])
    state = _fold(evs)
    row = state.rows[(STUDY, "t")]
    assert row.best == 0.80 and row.best_step == 1 and row.best_loss == 0.5
    common = {"model_run_id": STUDY, "trial_id": "t", "study": STUDY}
    state.apply(
        events.trial_complete(
            **common,
            spectral_norm=True,
            metrics={"best_val_accuracy": 0.80, "best_val_loss": 0.5, "val_accuracy": 0.86},
        )
    )
    assert row.best == 0.80  # the trainer's best is the running one: it does not fall


def test_an_objective_measured_once_after_training_is_the_summary_value() -> None:
    """objective="test_accuracy" has no per-epoch value: the trial's summary value is its
    best, whether the monitor is fed events or attaches to the store (with history)."""
    evs = []
    for trial, acc in (("t0", 0.79), ("t1", 0.84)):
        common = {"model_run_id": STUDY, "trial_id": trial, "study": STUDY}
        evs += _epochs(trial, [(0.70, 0.9), (0.80, 0.5), (0.82, 0.6)])
        evs.append(
            events.trial_complete(
                **common, spectral_norm=True, metrics={"test_accuracy": acc, "test_nll": 1 - acc}
            )
        )
    state = _fold(evs, objective="test_accuracy")
    assert [state.rows[(STUDY, t)].best for t in ("t0", "t1")] == [0.79, 0.84]
    assert state.summary()["best"]["value"] == 0.84
    low = _fold(evs, objective="test_nll", direction="min")
    assert low.summary()["best"]["trial_id"] == "t1"
    store = TrialStore(":memory:")
    store.append(evs)
    attached = MonitorState(STUDY, objective="test_accuracy")
    attached.load_trials(store.trials(study=STUDY))
    attached.load_history(store, STUDY, ["t0", "t1"], max_points=1000)
    assert _view(attached) == _view(state)
    # an objective on the curves keeps the live rule: the value at the lowest val_loss
    assert _fold(evs).rows[(STUDY, "t0")].best == 0.80


def test_running_best_takes_metrics_reported_one_by_one_at_a_step() -> None:
    common = {"model_run_id": STUDY, "trial_id": "t", "study": STUDY}

    def metric(step: int, name: str, value: float) -> events.Event:
        return events.run_metric(**common, step=step, metric_name=name, metric_value=value)

    state = _fold(
        [
            events.trial_start(**common, spectral_norm=False),
            metric(0, "val_accuracy", 0.6),  # the objective before the loss of its epoch
            metric(0, "val_loss", 1.0),
            metric(1, "val_loss", 0.8),  # the loss before the objective
            metric(1, "val_accuracy", 0.7),
            metric(2, "val_loss", 0.9),
            metric(2, "val_accuracy", 0.95),
        ]
    )
    assert state.rows[(STUDY, "t")].best == 0.7


def test_running_best_is_the_maximum_without_a_val_loss() -> None:
    common = {"model_run_id": STUDY, "trial_id": "t", "study": STUDY}
    state = _fold(
        [
            events.run_metric(**common, step=s, measurements={"val_accuracy": a})
            for s, a in enumerate((0.5, 0.9, 0.7))
        ]
    )
    assert state.rows[(STUDY, "t")].best == 0.9
    plain = MonitorState(STUDY, selection_metric=None)  # the old rule, on request
    plain.apply_many(_epochs("u", [(0.70, 0.9), (0.80, 0.5), (0.85, 0.6)]))
    assert plain.rows[(STUDY, "u")].best == 0.85


def test_snapshot_of_a_running_trial_uses_the_same_rule(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(_epochs("t", [(0.70, 0.9), (0.80, 0.5), (0.85, 0.6)]))
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text")
    assert mon.state.rows[(STUDY, "t")].best == 0.80
    mon.close()
    store.close()


def test_snapshot_of_a_pruned_trial_agrees_with_a_replay(tmp_path: Path) -> None:
    common = {"model_run_id": STUDY, "trial_id": "p", "study": STUDY, "spectral_norm": False}
    points = [(0.70, 0.9), (0.80, 0.5), (0.85, 0.6)]
    evs = [
        events.trial_start(**common),
        *_epochs("p", points)[1:],  # (its own start says SN on)
        # pruned: the trainer reports what it trained, no best_val_accuracy
        events.trial_complete(**common, status="pruned", metrics={"val_accuracy": 0.85}),
    ]
    store = TrialStore(tmp_path / "lab.db")
    store.append(evs)
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text")
    assert mon.state.rows[(STUDY, "p")].best == _fold(evs).rows[(STUDY, "p")].best == 0.80
    mon.close()
    q = {**common, "trial_id": "q"}  # the same curve, completed by a trainer with its best
    trained = [
        events.trial_start(**q),
        *_epochs("q", points)[1:],
        events.trial_complete(**q, metrics={"best_val_accuracy": 0.75}),
    ]
    store.append(trained)  # a trainer's own best is final, whatever the curve says
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text")
    assert mon.state.rows[(STUDY, "q")].best == _fold(trained).rows[(STUDY, "q")].best == 0.75
    mon.close()
    store.close()


def test_labels_say_what_best_and_the_plus_minus_are() -> None:
    state = _fold(synthetic_study(STUDY, n_pairs=3, epochs=4))
    line = render_text_line(state)
    assert "val_accuracy at lowest val_loss" in line
    assert "s.e. (n=3)" in line and "± " in line
    table = render_table_html(state)
    assert "val_accuracy at lowest val_loss</th>" in table
    assert 'title="val_accuracy at the epoch with the lowest val_loss so far' in table
    assert "s.e." in render_panel_html(state)
    assert "* best: val_accuracy at the epoch with the lowest val_loss" in render_table_text(state)


# ---------------------------------------------------------------------------------------------
# Missing labs, outages and what the final line says
# ---------------------------------------------------------------------------------------------


def test_from_store_on_a_missing_lab_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "typo_lab"
    with pytest.raises(StoreError, match=r"no trial store at .*typo_lab.*lab\.db") as err:
        LiveMonitor.from_store(typo, study=STUDY, mode="text")
    assert isinstance(err.value, ThunderlineLabError)
    with pytest.raises(StoreError):
        StoreSource(tmp_path / "other.db")
    assert not typo.exists() and not (tmp_path / "other.db").exists()
    mon = LiveMonitor.from_store(tmp_path / "new_lab", STUDY, mode="text", create=True)
    assert (tmp_path / "new_lab" / "lab.db").exists()  # on request (a study about to start)
    mon.close()


class _Outage:
    """A source that fails ``fail`` times (``GatewayError``), then delivers a small study."""

    label = "gateway http://gw"
    poll_interval = 0.001

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls = 0

    def poll(self) -> list[Any]:
        self.calls += 1
        if self.calls <= self.fail:
            raise GatewayError("gateway http://gw: cannot fetch events: connection refused")
        if self.calls == self.fail + 1:
            return list(synthetic_study(STUDY, n_pairs=1, epochs=2))
        return []

    def close(self) -> None:
        pass


def _wait_for(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, "the monitor's pump thread never got there"
        time.sleep(0.005)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "thunderline_lab.monitor" and r.levelname == "WARNING"
    ]


def test_an_outage_warns_once_and_its_recovery_once(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _Outage(fail=5)
    mon = LiveMonitor(source, STUDY, mode="text", text_interval=1e9)
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        mon.start()
        _wait_for(lambda: mon.state.summary()["n_done"] == 2)
        mon.close()
    warned = _warnings(caplog)
    assert len(warned) == 2, warned
    assert "failed" in warned[0] and "recovered after 5 failed polls" in warned[1]
    assert mon.source_errors == 5
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[monitor")]
    assert len(lines) == 2  # the first line and the final one: no line per retry
    assert "finished · 8 events · gateway http://gw" in lines[-1]


def test_an_unreachable_gateway_says_it_never_connected(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.Client(base_url="http://127.0.0.1:18999", transport=httpx.MockTransport(refuse))
    source = GatewaySource("http://127.0.0.1:18999", client=client, poll_interval=0.001)
    mon = LiveMonitor(source, STUDY, mode="text", text_interval=1e9)
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        mon.start()
        _wait_for(lambda: mon.source_errors >= 6)
        mon.close()
    client.close()
    assert len(_warnings(caplog)) == 1  # one warning, not one per retry
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[monitor")]
    assert len(lines) == 2
    assert "never connected to gateway http://127.0.0.1:18999" in lines[-1]
    assert "connection refused" in lines[-1]


def test_status_lines_during_an_outage_keep_the_text_interval(
    clock: _Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _Outage(fail=1000)
    mon = LiveMonitor(source, STUDY, mode="text", text_interval=10.0)
    mon.start(thread=False)
    for _ in range(300):  # a retry every 0.1 s for 30 s
        with pytest.raises(GatewayError):
            mon.pump()
        mon._source_failed(GatewayError("gateway http://gw: cannot fetch events: refused"))
        mon._maybe_redraw()
        clock.now += 0.1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[monitor")]
    assert len(lines) == 2  # the first line, then the error status once (it did not change)
    assert "source error (retrying)" in lines[-1]
    mon.close()


def test_final_status_says_what_a_snapshot_loaded(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=2, epochs=3))
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text", text_interval=1e9)
    mon.start(display=False, thread=False)
    mon.finish()
    assert "4 trials loaded from the store, then 0 new events" in mon._status
    mon.close()
    store.close()


# ---------------------------------------------------------------------------------------------
# Following a study: this kernel's bus plus every worker's events in the store
# ---------------------------------------------------------------------------------------------


def test_combined_source_shows_every_worker_and_counts_each_event_once(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    bus = EventBus()
    mon = LiveMonitor.from_store(tmp_path, STUDY, bus=bus, mode="text", text_interval=1e9)
    assert "bus + store" in mon.source.label
    ours = synthetic_study(STUDY, n_pairs=1, epochs=3)  # trial_0000, trial_0001
    theirs = [  # another worker's trials of the same study, only in the store
        e
        for e in synthetic_study(STUDY, n_pairs=2, epochs=3)
        if e.payload.trial_id in ("trial_0002", "trial_0003")
    ]
    bus.publish_many(ours)
    mon.pump()
    assert len(mon.state.rows) == 2  # at once, before the store has them
    store.append(ours)  # this kernel's writer catches up: the same events again
    store.append(theirs)
    mon.pump()
    assert _view(mon.state) == _view(_fold([*ours, *theirs]))
    assert mon.state.events == len(ours) + len(theirs)
    assert mon.source.duplicates == len(ours)
    mon.close()
    store.close()


def test_combined_source_keeps_events_when_one_source_fails() -> None:
    bus = EventBus()
    outage = _Outage(fail=1)
    src = CombinedSource(BusSource(bus), outage)
    ours = synthetic_study("ours", n_pairs=1, epochs=2)
    bus.publish_many(ours)
    with pytest.raises(GatewayError):
        src.poll()
    got = src.poll()  # the bus's events, kept, then the recovered source's
    assert [e.id for e in got[: len(ours)]] == [e.id for e in ours]
    assert {e.payload.study for e in got[len(ours) :]} == {STUDY}
    assert src.poll() == []


def test_study_finished_after_a_quiet_spell_with_no_trial_running(clock: _Clock) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="text", text_interval=1e9)
    mon.start(display=False, thread=False)
    assert not mon.study_finished(quiet=0.0)  # nothing seen yet: not finished
    evs = synthetic_study(STUDY, n_pairs=1, epochs=3)
    bus.publish_many(evs[:-1])  # the second trial still runs
    mon.pump()
    clock.now += 100
    assert not mon.study_finished(quiet=30.0)
    bus.publish(evs[-1])
    mon.pump()
    assert not mon.study_finished(quiet=30.0)  # the next trial may be about to start
    clock.now += 31
    mon.pump()
    assert mon.study_finished(quiet=30.0)
    mon.close()


def test_wait_for_running_trials_of_other_workers() -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="text", text_interval=1e9, poll_interval=0.01)
    mon.start(display=False)
    evs = synthetic_study(STUDY, n_pairs=1, epochs=2)
    bus.publish_many(evs[:-1])  # another worker's trial still runs
    late = threading.Timer(0.3, lambda: bus.publish(evs[-1]))
    late.start()
    assert mon.wait_for_running_trials(quiet=60.0, poll=0.01)  # sees it running, waits
    assert not late.is_alive() and mon.state.summary()["n_done"] == 2
    dead = {"model_run_id": STUDY, "trial_id": "dead_worker_trial", "study": STUDY}
    bus.publish(events.trial_start(**dead, spectral_norm=True))  # it never ends
    _wait_for(lambda: mon.state.summary()["n_running"] == 1)
    assert not mon.wait_for_running_trials(quiet=0.2, poll=0.01)  # nothing new: gives up
    mon.request_stop()
    assert not mon.wait_for_running_trials(quiet=60.0)  # Stop: no waiting
    mon.close()


# ---------------------------------------------------------------------------------------------
# Waiting for a background study: an interrupt stops it as the Stop button does
# ---------------------------------------------------------------------------------------------


def _long_study(bus: EventBus, mon: LiveMonitor) -> Callable[[], dict[str, int]]:
    return lambda: simulate_study(
        bus, STUDY, n_pairs=500, epochs=20, delay=0.001, stop_event=mon.stop_event
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to the own process is POSIX only")
def test_interrupting_the_wait_stops_the_study_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    import signal

    assert threading.current_thread() is threading.main_thread()  # where SIGINT lands
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", min_interval=0.01)
    mon.start(display=False)
    run = mon.run_in_background(_long_study(bus, mon))
    _wait_for(lambda: mon.state.summary()["n_running"] > 0)
    # the kernel's interrupt (■) arrives while the cell waits: a real SIGINT
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        counts = run.wait(60)  # returns: the results cells can run on what finished
    assert mon.should_stop() and counts["cancelled"] <= 1 and sum(counts.values()) < 1000
    assert any("interrupted" in m for m in _warnings(caplog))
    assert "stopped" in mon._widgets["panel"].value
    mon.close()


def test_waiting_returns_the_result_or_times_out() -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget", min_interval=0.01)
    mon.start(display=False)
    run = mon.run_in_background(
        lambda: simulate_study(bus, STUDY, n_pairs=1, epochs=2, delay=0), wait=False
    )
    assert run.wait(60)["completed"] == 2
    with pytest.raises(TimeoutError):
        BackgroundRun(stop=lambda: None).wait(0.01)
    mon.close()


# ---------------------------------------------------------------------------------------------
# Attaching through a gateway: the study's snapshot, then only newer events (as from_store)
# ---------------------------------------------------------------------------------------------

GW_TOKEN = "gw-token-0123456789"
SLASHED = "team/sn-ab"  # a model_run_id with a "/": the gateway's routes take it as %2F


class _Recorded:
    """ASGI wrapper that records every request the gateway receives (path and query)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            query = dict(parse_qsl(scope["query_string"].decode()))
            self.requests.append((scope["path"], query))
        await self.app(scope, receive, send)

    def events_afters(self) -> list[int]:
        return [int(q["after"]) for path, q in self.requests if path == "/api/events"]


class _Gateway:
    """The lab's gateway served by uvicorn on a loopback port, in a thread."""

    def __init__(self, store: TrialStore, port: int | None = None) -> None:
        import uvicorn

        from thunderline_lab.gateway import create_app

        self.app = _Recorded(create_app(store, token=GW_TOKEN))
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Gateway:
        self.thread.start()
        _wait_for(lambda: self.server.started or not self.thread.is_alive())
        assert self.server.started, "the gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _curves(state: MonitorState) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: {n: c.points() for n, c in cs.items()} for key, cs in state.curves.items()}


def _two_studies(store: TrialStore) -> tuple[list[Any], list[Any]]:
    """A lab whose log is mostly another study: 10 long trials of it around 6 of ours."""
    ours = synthetic_study(SLASHED, n_pairs=3, epochs=1200, pruned=1)  # > 1000 points a curve
    theirs = synthetic_study("other-study", n_pairs=5, epochs=300)
    store.append(theirs[:1500])
    store.append(ours)
    store.append(theirs[1500:])
    return ours, theirs


def test_from_gateway_attaches_like_from_store_without_replaying_the_log(
    tmp_path: Path,
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    _two_studies(store)
    attached_at = store.last_seq()
    assert attached_at > 9_000  # replaying it would take ten requests (1,000 events each)
    opts: dict[str, Any] = {"mode": "text", "max_plot_trials": 4}
    with _Gateway(store) as gw:
        mon = LiveMonitor.from_gateway(gw.url, GW_TOKEN, SLASHED, **opts)
        local = LiveMonitor.from_store(tmp_path, SLASHED, **opts)
        # the snapshot alone, before any poll: the same trials and downsampled curves
        assert _view(mon.state) == _view(local.state)
        assert len(mon.state.rows) == 6
        assert _curves(mon.state) == _curves(local.state)
        assert len(mon.state.curves) == 4  # the recent trials' curves only, as from_store
        assert max(len(c) for cs in mon.state.curves.values() for c in cs.values()) <= 1001
        assert mon.loaded_trials == local.loaded_trials == 6
        paths = [path for path, _ in gw.app.requests]
        assert paths[:2] == ["/healthz", "/api/trials"]
        assert gw.app.requests[1][1] == {"study": SLASHED}
        assert len(paths) == 2 + 4  # one metrics request per recent trial, no events yet
        assert all(p.startswith("/api/trials/team/sn-ab/trial_") for p in paths[2:])
        assert mon.source.after == attached_at

        mon.pump()
        assert gw.app.events_afters() == [attached_at]  # not 0: the log is not replayed
        assert mon.state.events == mon.state.ignored == 0  # no other study's events came

        more = [  # two new trials of ours, and more of the other study
            e
            for e in synthetic_study(SLASHED, n_pairs=4, epochs=3, seed=7)
            if e.payload.trial_id in ("trial_0006", "trial_0007")
        ]
        store.append([*more, *synthetic_study("third-study", n_pairs=1, epochs=2, seed=9)])
        mon.pump()
        local.pump()
        assert gw.app.events_afters() == [attached_at, attached_at]
        assert _view(mon.state) == _view(local.state)
        assert len(mon.state.rows) == 8
        assert mon.state.events == len(more)
        mon.finish()
        assert f"6 trials loaded from the gateway, then {len(more)} new events" in mon._status
        mon.close()
        local.close()
    store.close()


def test_from_gateway_without_snapshot_replays_the_log_from_0(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    ours, theirs = _two_studies(store)
    with _Gateway(store) as gw:
        mon = LiveMonitor.from_gateway(gw.url, GW_TOKEN, SLASHED, snapshot=False, mode="text")
        assert not mon.state.rows and not gw.app.requests  # nothing loaded: it replays
        while not gw.app.events_afters() or mon.source.after < store.last_seq():
            mon.pump()
        assert gw.app.events_afters()[0] == 0
        assert _view(mon.state) == _view(_fold_study(ours))
        assert mon.state.ignored == len(theirs)
        mon.close()
    store.close()


def test_from_gateway_started_before_its_gateway_attaches_when_it_comes_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    _two_studies(store)
    port = _free_port()
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        mon = LiveMonitor.from_gateway(
            f"http://127.0.0.1:{port}", GW_TOKEN, SLASHED, mode="text", poll_interval=0.01
        )
        assert not mon.state.rows  # nobody answered: the pump takes the snapshot
        mon.start(display=False)
        _wait_for(lambda: mon.source_errors >= 3)
        with _Gateway(store, port=port) as gw:
            _wait_for(lambda: mon.polls_ok > 0)
            mon.close()
    local = LiveMonitor.from_store(tmp_path, SLASHED, mode="text")
    assert _view(mon.state) == _view(local.state) and len(mon.state.rows) == 6
    assert mon.loaded_trials == 6
    assert gw.app.requests[0][0] == "/healthz"
    assert 0 not in gw.app.events_afters()  # attached with a snapshot, not a replay
    warned = _warnings(caplog)
    assert len(warned) == 2, warned  # one when it failed, one when it recovered
    assert "cannot fetch the last sequence number" in warned[0]
    assert "recovered after" in warned[1]
    local.close()
    store.close()


def _fold_study(evs: list[Any]) -> MonitorState:
    state = MonitorState(SLASHED)
    state.apply_many(evs)
    return state


# ---------------------------------------------------------------------------------------------
# A researcher's notebook: dropped monitors, outages, wrong tokens, re-runs, odd values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "widget"])
def test_a_monitor_nobody_holds_stops_its_pump_and_releases_its_source(mode: str) -> None:
    # a re-run cell rebinds `mon`: the old monitor must not poll (and print, and render)
    # forever, nor keep a bus subscription that buffers every event for nobody
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode=mode, text_interval=1e9, poll_interval=0.005).start(
        display=False
    )
    thread = mon._thread
    assert thread is not None
    while not mon.pumps:
        time.sleep(0.005)
    ref = weakref.ref(mon)
    del mon
    _wait_for(lambda: gc.collect() >= 0 and ref() is None)
    thread.join(30)
    assert not thread.is_alive()
    assert not bus.subscriptions
    never_started = LiveMonitor.from_bus(bus, STUDY, mode="text")
    assert len(bus.subscriptions) == 1
    del never_started
    gc.collect()
    assert not bus.subscriptions


class _Blackout:
    """A source that delivers a finished study, then fails while ``down`` is set."""

    label = "gateway http://gw"
    poll_interval = 0.001

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls = 0

    def poll(self) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            return list(synthetic_study(STUDY, n_pairs=1, epochs=2))
        if self.down.is_set():
            raise GatewayError("gateway http://gw: cannot fetch events: connection refused")
        return []

    def close(self) -> None:
        pass


def test_an_outage_is_not_a_quiet_spell() -> None:
    # between two trials the gateway goes away: no news is not "the study has finished"
    source = _Blackout()
    mon = LiveMonitor(source, STUDY, mode="text", text_interval=1e9).start(display=False)
    _wait_for(lambda: mon.state.summary()["n_done"] == 2)
    source.down.set()
    _wait_for(lambda: mon.source_errors > 0)
    assert not mon.study_finished(quiet=0.0)
    ok = mon.polls_ok
    source.down.clear()  # it comes back, and nothing happened meanwhile: now it is quiet
    _wait_for(lambda: mon.polls_ok > ok)
    assert mon.study_finished(quiet=0.0)
    mon.close()


def test_from_gateway_with_a_wrong_token_fails_at_once(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=1, epochs=2))
    with _Gateway(store) as gw:
        for token in ("not-the-token", None):
            with pytest.raises(GatewayError, match=r"401.*token") as err:
                LiveMonitor.from_gateway(gw.url, token, STUDY, mode="text")
            assert "not-the-token" not in str(err.value)  # never echo a secret
        mon = LiveMonitor.from_gateway(gw.url, GW_TOKEN, STUDY, mode="text")
        assert len(mon.state.rows) == 2
        mon.close()
    store.close()


@pytest.mark.parametrize("url", ["127.0.0.1:8765", "localhost:8765", "ftp://gw", "http://"])
def test_a_gateway_url_that_is_no_http_url_is_refused_at_once(url: str) -> None:
    with pytest.raises(GatewayError, match="http:// or https://"):
        LiveMonitor.from_gateway(url, "t", STUDY, mode="text")


def test_a_monitor_runs_one_study_at_a_time() -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="widget").start(display=False)
    release = threading.Event()
    run = mon.run_in_background(lambda: release.wait(60), wait=False)
    with pytest.raises(StudyError, match="still running") as err:
        mon.run_in_background(lambda: None, wait=False)
    assert isinstance(err.value, ThunderlineLabError)
    release.set()
    assert run.wait(60) is True
    with pytest.raises(StudyError, match="finished"):  # its final snapshot is taken
        mon.run_in_background(lambda: None, wait=False)
    mon.close()


def test_non_finite_values_in_raw_events_do_not_break_the_fold() -> None:
    common = {"model_run_id": STUDY, "trial_id": "t", "study": STUDY}
    nan, inf = float("nan"), float("inf")
    state = _fold(
        [
            {"name": "ml.trial.start", "payload": {**common, "spectral_norm": True}},
            {
                "name": "ml.trial.complete",
                "payload": {
                    **common,
                    "status": "completed",
                    "metrics": {"epochs": nan, "best_val_accuracy": inf, "lipschitz_upper": inf},
                },
            },
            {"name": "ml.trial.start", "payload": {**common, "trial_id": "u"}},
            {
                "name": "ml.trial.complete",
                "payload": {**common, "trial_id": "u", "metrics": {"epochs": inf}},
            },
        ]
    )
    t, u = state.rows[(STUDY, "t")], state.rows[(STUDY, "u")]
    assert (t.status, t.epoch, t.best) == ("completed", None, None)
    assert (u.status, u.epoch) == ("completed", None)
    assert "inf" in render_table_text(state)


def test_a_thousand_trial_study_shows_a_page_and_says_so() -> None:
    state = _fold(synthetic_study(STUDY, n_pairs=500, epochs=2))
    assert len(state.rows) == 1000
    table = render_table_html(state, max_rows=25)
    assert table.count('<tr class="tl-trial"') == 25
    assert "showing 25 of 1000 trials" in table
    text = render_table_text(state, max_rows=25).splitlines()
    assert len(text) == 1 + 25 + 2  # header, rows, what is left out, the note on best
    assert "… 975 more trials (showing 25 of 1000: running first, newest first)" in text


def test_from_store_waits_for_a_study_that_has_not_started_yet(tmp_path: Path) -> None:
    # the researcher opens the monitor first, then starts the study in a terminal
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study("older-study", n_pairs=1, epochs=2))
    mon = LiveMonitor.from_store(tmp_path, STUDY, mode="text", text_interval=1e9)
    mon.start(display=False, thread=False)
    mon.pump()
    assert not mon.state.rows and not mon.study_finished(quiet=0.0)  # waiting, not failed
    store.append(synthetic_study(STUDY, n_pairs=1, epochs=2))
    mon.pump()
    assert mon.state.summary()["n_done"] == 2 and mon.study_finished(quiet=0.0)
    assert mon.state.ignored == 0  # the older study was before the monitor: never read
    mon.close()
    with pytest.raises(StoreError, match="pass create=True"):  # no lab there at all
        LiveMonitor.from_store(tmp_path / "new_lab", STUDY, mode="text")
    store.close()


def test_a_gateway_that_goes_away_mid_follow_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    evs = synthetic_study(STUDY, n_pairs=2, epochs=2)
    store.append(evs[:8])  # the first pair, finished
    port = _free_port()
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        with _Gateway(store, port=port) as gw:
            mon = LiveMonitor.from_gateway(
                gw.url, GW_TOKEN, STUDY, mode="text", text_interval=1e9, poll_interval=0.01
            )
            mon.start(display=False)
            _wait_for(lambda: mon.polls_ok > 0)
        _wait_for(lambda: mon.source_errors > 0)  # gone: between two trials, nothing runs
        assert mon.state.summary()["n_done"] == 2
        assert not mon.study_finished(quiet=0.0)  # it cannot tell, so not finished
        store.append(evs[8:])  # meanwhile the study goes on
        with _Gateway(store, port=port):
            _wait_for(lambda: mon.state.summary()["n_done"] == 4)
            mon.close()
    assert mon.state.events == len(evs) - 8  # each new event once, none lost
    warned = _warnings(caplog)
    assert len(warned) == 2 and "recovered after" in warned[1], warned
    store.close()


def test_reading_the_state_while_the_pump_folds_sees_whole_batches() -> None:
    # follow() (the kernel's thread) asks study_finished() while the pump thread folds a
    # batch of new trials: it must not read the rows mid-fold (before: "RuntimeError:
    # dictionary changed size during iteration" out of follow)
    state = MonitorState(STUDY)
    evs = synthetic_study(STUDY, n_pairs=2, epochs=2)
    paused, proceed = threading.Event(), threading.Event()

    def batch() -> Iterator[Any]:
        yield from evs[:4]  # the first trial's events, then the fold is held up
        paused.set()
        assert proceed.wait(30)
        yield from evs[4:]

    fold = threading.Thread(target=state.apply_many, args=(batch(),))
    fold.start()
    assert paused.wait(30)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(state.summary()["n_trials"]))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # it waits for the batch to be folded
    proceed.set()
    fold.join(30)
    reader.join(30)
    assert seen == [4]


SECONDS = "expected a finite number of seconds"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"mode": "widgets"}, "mode: expected 'auto', 'widget' or 'text', got 'widgets'"),
        ({"direction": "maximize"}, "direction: expected 'max' or 'min', got 'maximize'"),
        # each of these failed only at the first pump (a TypeError), deep in a float(), or
        # never: a negative poll interval, no curve points, a table of -1 rows
        ({"text_interval": "x"}, f"text_interval: {SECONDS} >= 0, got 'x'"),
        ({"text_interval": math.nan}, f"text_interval: {SECONDS} >= 0, got nan"),
        ({"min_interval": "x"}, f"min_interval: {SECONDS} >= 0, got 'x'"),
        ({"min_interval": math.inf}, f"min_interval: {SECONDS} >= 0, got inf"),
        ({"plot_interval": "x"}, f"plot_interval: {SECONDS} >= 0, got 'x'"),
        ({"plot_interval": -0.5}, f"plot_interval: {SECONDS} >= 0, got -0.5"),
        ({"poll_interval": "fast"}, f"poll_interval: {SECONDS} > 0, or None"),
        (
            {"poll_interval": -1},
            f"poll_interval: {SECONDS} > 0, or None (the source's own pace), got -1",
        ),
        (
            {"poll_interval": 0},
            f"poll_interval: {SECONDS} > 0, or None (the source's own pace), got 0",
        ),
        (
            {"poll_interval": True},
            f"poll_interval: {SECONDS} > 0, or None (the source's own pace), got True",
        ),
        ({"curve_points": 0}, "curve_points: expected an integer >= 2, got 0"),
        ({"curve_points": -5}, "curve_points: expected an integer >= 2, got -5"),
        ({"max_table_rows": -1}, "max_table_rows: expected an integer >= 1, got -1"),
        ({"max_table_rows": 2.5}, "max_table_rows: expected an integer >= 1, got 2.5"),
        ({"max_plot_trials": 0}, "max_plot_trials: expected an integer >= 1, got 0"),
        ({"max_curve_trials": True}, "max_curve_trials: expected an integer >= 1, got True"),
        # a metric name cannot be checked before events arrive, but non-text or empty can
        ({"objective": ""}, "objective: expected a metric name, got ''"),
        ({"objective": 5}, "objective: expected a metric name, got 5"),
        ({"selection_metric": 3}, "selection_metric: expected a metric name, or None, got 3"),
        ({"snapshot_on_finish": "no"}, "snapshot_on_finish: expected True or False, got 'no'"),
        ({"title": 5}, "title: expected a title (text), or None, got 5"),
    ],
)
@pytest.mark.parametrize("how", ["from_bus", "LiveMonitor"])
def test_a_misspelt_monitor_option_is_a_config_error(
    options: dict[str, Any], words: str, how: str
) -> None:
    # mode="widgets" showed nothing at all, and did not wait under papermill either
    bus = EventBus()
    with pytest.raises(ConfigError, match=re.escape(words)):
        if how == "from_bus":
            LiveMonitor.from_bus(bus, STUDY, **options)
        else:
            LiveMonitor(bus, STUDY, **options)
    assert not bus.subscriptions  # nothing left subscribed


def test_a_misspelt_option_name_is_refused_and_options_at_their_bounds_are_taken() -> None:
    # a TypeError from the constructor left the bus subscribed for nobody
    bus = EventBus()
    with pytest.raises(ConfigError, match=r"text_intervall: no option of LiveMonitor \(did yo"):
        LiveMonitor.from_bus(bus, STUDY, text_intervall=1e9)
    assert not bus.subscriptions
    mon = LiveMonitor.from_bus(
        bus, STUDY, mode="text", min_interval=0, text_interval=0, poll_interval=2, curve_points=2
    )
    assert (mon.min_interval, mon.text_interval, mon.poll_interval) == (0, 0, 2.0)
    mon._release()
    mon = LiveMonitor.from_bus(bus, STUDY, mode="text", poll_interval=None)
    assert mon.poll_interval == BusSource.poll_interval  # None: the source's own pace
    mon._release()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"curve_points": 1}, "curve_points: expected an integer >= 2, got 1"),
        ({"max_curve_trials": 0}, "max_curve_trials: expected an integer >= 1, got 0"),
        ({"selection_metric": ""}, "selection_metric: expected a metric name, or None, got ''"),
        ({"curve_metrics": "val_loss"}, "curve_metrics: expected a list of metric names"),
        ({"direction": "up"}, "direction: expected 'max' or 'min', got 'up'"),
    ],
)
def test_monitor_state_refuses_bad_options(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        MonitorState(STUDY, **options)


# ---------------------------------------------------------------------------------------------
# Study names and sources as a notebook's parameters give them
# ---------------------------------------------------------------------------------------------


def test_a_study_named_by_a_number_is_followed_by_its_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # papermill -p study_name 2024 makes it the int 2024: it failed deep inside difflib
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study("2024", n_pairs=1, epochs=2))
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        mon = LiveMonitor.from_store(store, 2024, mode="text")
        assert mon.state.study == "2024" and mon.loaded_trials == 2
        mon._release()
        LiveMonitor.from_store(store, 5, mode="text")._release()  # waited for, by its text
    (notice,) = _warnings(caplog)
    assert "no trials of study '5' in this lab yet" in notice
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, 2024, mode="text")
    bus.publish_many(synthetic_study("2024", n_pairs=1, epochs=2))
    mon.pump()
    assert mon.state.summary()["n_done"] == 2 and mon.state.ignored == 0
    mon._release()
    assert MonitorState(7).study == "7"
    store.close()


@pytest.mark.parametrize("study", [2.5, True, ["a"], "", "  "])
def test_a_study_that_is_no_name_is_refused(tmp_path: Path, study: Any) -> None:
    TrialStore(tmp_path / "lab.db").close()
    bus = EventBus()
    words = "study: expected a study name (text; an integer is taken as its text), got "
    with pytest.raises(ConfigError, match=re.escape(words)):
        LiveMonitor.from_bus(bus, study, mode="text")
    with pytest.raises(ConfigError, match=re.escape(words)):
        LiveMonitor.from_store(tmp_path, study, bus=bus, mode="text")
    with pytest.raises(ConfigError, match=re.escape(words)):
        LiveMonitor.from_gateway("http://127.0.0.1:1", "t", study, mode="text")
    with pytest.raises(ConfigError, match=re.escape(words)):
        MonitorState(study)
    assert not bus.subscriptions


NO_STORE = "store: expected a TrialStore, a Lab, a lab directory or a lab.db path"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda: LiveMonitor.from_store(None, STUDY),
            f"{NO_STORE}, got NoneType None",
        ),
        (
            lambda: LiveMonitor.from_store(5, STUDY),
            f"{NO_STORE}, got int 5",
        ),
        (
            lambda: LiveMonitor(None, STUDY),
            "source: expected an event source, an EventBus, a TrialStore",
        ),
        (lambda: as_source(5), "source: expected an event source, an EventBus, a TrialStore"),
        (
            lambda: LiveMonitor.from_bus("notabus", STUDY),
            "bus: expected an EventBus, got str 'notabus'",
        ),
        (lambda: BusSource(None), "bus: expected an EventBus, got NoneType None"),
        (
            lambda: LiveMonitor.from_store(":memory:", STUDY, bus="b", create=True),
            "bus: expected an EventBus, got str 'b'",
        ),
        (
            lambda: LiveMonitor.from_gateway("http://127.0.0.1:1", "t", STUDY, bus=1),
            "bus: expected an EventBus, got int 1",
        ),
    ],
)
def test_a_source_of_the_wrong_kind_is_named(make: Callable[[], Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        make()


@pytest.mark.parametrize("address", ["127.0.0.1:8765", "localhost:8765/lab", "[::1]:8765"])
def test_a_gateway_address_without_http_is_not_taken_for_a_lab_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.chdir(tmp_path)
    hint = f"(a gateway URL needs http://, as in 'http://{address}')"
    with pytest.raises(StoreError, match=re.escape(hint)):
        LiveMonitor(address, STUDY, mode="text")
    with pytest.raises(StoreError, match=re.escape(hint)):
        LiveMonitor.from_store(address, STUDY, mode="text")
    assert not list(tmp_path.iterdir())  # nothing created
    with pytest.raises(StoreError, match="pass create=True"):  # a lab path: the usual hint
        LiveMonitor("no-such-lab", STUDY, mode="text")


def test_a_gateway_whose_log_now_ends_before_the_position_is_followed_from_its_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = TrialStore(tmp_path / "old.db"), TrialStore(tmp_path / "new.db")
    old.append(synthetic_study(STUDY, n_pairs=2, epochs=5))
    new.append(synthetic_study("other", n_pairs=1, epochs=1))
    serving = {"store": old}

    def handler(request: httpx.Request) -> httpx.Response:
        store = serving["store"]
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok", "last_seq": store.last_seq()})
        after = int(request.url.params["after"])
        evs = store.events_after(after, int(request.url.params["limit"]))
        return httpx.Response(
            200, json={"events": evs, "next_after": evs[-1]["seq"] if evs else after}
        )

    client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    source = GatewaySource(client=client, log_check_interval=0.0)
    assert len(source.poll()) == old.last_seq() > new.last_seq()
    assert source.poll() == [] and source.log_restarts == 0  # the same log: nothing new
    serving["store"] = new  # the gateway restarted on another lab
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        assert source.poll() == []  # nothing after the old position: the log is checked
    assert source.log_restarts == 1 and source.after == 0
    assert "before this monitor's position" in caplog.text
    got = source.poll()
    assert [e["id"] for e in got] == [e["id"] for e in new.events_after(0, 1000)]
    client.close()
    old.close()
    new.close()


def _trials(store: TrialStore) -> Any:
    return store.trials().sort_values(["model_run_id", "trial_id"]).reset_index(drop=True)


def test_gateway_mirror_copies_the_log_and_then_reads_only_what_is_new(tmp_path: Path) -> None:
    from thunderline_lab.lab import Lab

    served = TrialStore(tmp_path / "served.db")
    study = synthetic_study(SLASHED, n_pairs=2, epochs=3)
    served.append(study[:10])
    lab = Lab.resolve(tmp_path / "worker")
    with _Gateway(served) as gw, GatewayMirror(lab, gw.url, GW_TOKEN) as mirror:
        assert mirror.sync() == 10
        position = served.last_seq()
        served.append(study[10:])
        asked = len(gw.app.events_afters())
        assert mirror.sync() == len(study) - 10
        # the event at its position checked (the same log?), then on from there
        assert gw.app.events_afters()[asked : asked + 2] == [position - 1, position]
        assert mirror.sync() == 0
        with mirror.store() as copy:
            assert _trials(copy).equals(_trials(served))
            assert copy.last_seq() == len(study)
    assert mirror.path.parent == lab.root / "gateway-mirror"


def test_gateway_mirror_starts_again_when_the_gateway_serves_another_log(tmp_path: Path) -> None:
    from thunderline_lab.lab import Lab

    lab = Lab.resolve(tmp_path / "worker")
    first = TrialStore(tmp_path / "first.db")
    first.append(synthetic_study("first", n_pairs=2, epochs=3))
    port = _free_port()
    with _Gateway(first, port) as gw, GatewayMirror(lab, gw.url, GW_TOKEN) as mirror:
        mirror.sync()
    # the same address now serves a shorter log: restarted on another lab
    shorter = TrialStore(tmp_path / "shorter.db")
    shorter.append(synthetic_study("second", n_pairs=1, epochs=1))
    with _Gateway(shorter, port) as gw, GatewayMirror(lab, gw.url, GW_TOKEN) as mirror:
        mirror.sync()
        with mirror.store() as copy:
            assert _trials(copy).equals(_trials(shorter))  # nothing of the first log is left
    # a longer log of other events, served where the mirror's position is within it
    longer = TrialStore(tmp_path / "longer.db")
    longer.append(synthetic_study("third", n_pairs=4, epochs=4))
    assert longer.last_seq() > shorter.last_seq()
    with _Gateway(longer, port) as gw, GatewayMirror(lab, gw.url, GW_TOKEN) as mirror:
        mirror.sync()
        with mirror.store() as copy:
            assert _trials(copy).equals(_trials(longer))  # nothing of "second" is left
    # a longer log that logs one of the mirror's ids with other content
    other = TrialStore(tmp_path / "other.db")
    filler = synthetic_study("filler", n_pairs=3, epochs=3)
    clash = events.trial_start(model_run_id="clash", trial_id="t", spectral_norm=True)
    clash = clash.model_copy(update={"id": longer.events_after(0, 1)[0]["id"]})
    other.append([*filler, clash])
    with _Gateway(other, port) as gw, GatewayMirror(lab, gw.url, GW_TOKEN) as mirror:
        mirror.sync()
        with mirror.store() as copy:
            assert _trials(copy).equals(_trials(other))


def test_gateway_mirror_refuses_a_bad_url_and_creates_nothing_when_unreachable(
    tmp_path: Path,
) -> None:
    from thunderline_lab.lab import Lab

    lab = Lab.resolve(tmp_path / "worker")
    with pytest.raises(GatewayError, match="expected an http:// or https:// URL"):
        GatewayMirror(lab, "127.0.0.1:8765")
    with (
        GatewayMirror(lab, f"http://127.0.0.1:{_free_port()}", timeout=2) as mirror,
        pytest.raises(GatewayError, match="cannot fetch events"),
    ):
        mirror.sync()
    assert not lab.root.exists()


def test_a_study_the_lab_has_no_trials_of_is_waited_for_with_the_closest_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study("smoke", n_pairs=1, epochs=2))
    assert store.studies() == ["smoke"]
    with caplog.at_level("WARNING", logger="thunderline_lab.monitor"):
        LiveMonitor.from_store(store, "smok", mode="text")._release()
        LiveMonitor.from_store(store, "smoke", mode="text")._release()  # known: no notice
    (notice,) = _warnings(caplog)
    assert "no trials of study 'smok' in this lab yet: waiting for them" in notice
    assert "did you mean 'smoke'?" in notice and "the lab's studies: smoke" in notice


def test_a_study_the_gateway_has_no_trials_of_is_waited_for_with_the_closest_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study("smoke", n_pairs=1, epochs=2))
    with (
        _Gateway(store) as gw,
        caplog.at_level("WARNING", logger="thunderline_lab.monitor"),
    ):
        LiveMonitor.from_gateway(gw.url, GW_TOKEN, "smok", mode="text")._release()
        LiveMonitor.from_gateway(gw.url, GW_TOKEN, "smoke", mode="text")._release()  # known
    (notice,) = _warnings(caplog)
    assert "no trials of study 'smok' in this lab yet: waiting for them" in notice
    assert "did you mean 'smoke'?" in notice and "the lab's studies: smoke" in notice
    store.close()


def test_a_gateway_source_takes_the_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thunderline_lab import gateway
    from thunderline_lab.monitor import ENV_TOKEN

    assert ENV_TOKEN == gateway.ENV_TOKEN  # the one variable every part reads
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(SLASHED, n_pairs=1, epochs=1))
    with _Gateway(store) as gw:
        monkeypatch.delenv("THUNDERLINE_LAB_TOKEN", raising=False)
        with pytest.raises(GatewayError, match="401"):
            GatewaySource(gw.url).poll()
        monkeypatch.setenv("THUNDERLINE_LAB_TOKEN", GW_TOKEN)  # as the notebooks get it
        assert len(GatewaySource(gw.url).poll()) == store.last_seq()
        mon = LiveMonitor.from_gateway(gw.url, study=SLASHED, mode="text")
        assert mon.loaded_trials == 2
        mon._release()

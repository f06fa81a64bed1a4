"""The comparison snapshot keeper: writers leave a current snapshot behind them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_compare import _Spy  # counts the comparison's reads of the trials

from thunderline_lab import compare as cmp
from thunderline_lab import events as E
from thunderline_lab import keeper
from thunderline_lab.monitor import synthetic_study
from thunderline_lab.store import TrialStore

STUDY = "kept"


@pytest.fixture(autouse=True)
def quiet_keeper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No refresh by the keeper's thread unless a test asks (flush() does the work), and
    nothing left pending or cached for the next test."""
    monkeypatch.setattr(keeper, "IDLE_SECONDS", 3600.0)
    monkeypatch.setattr(keeper, "MAX_DELAY_SECONDS", 3600.0)
    monkeypatch.delenv(keeper.ENV_KEEP, raising=False)
    with keeper.keeping(10**9):
        keeper.flush()  # other tests' stores: forgotten (no study is that large)
    cmp.clear_cache()
    yield
    with keeper.keeping(10**9):
        keeper.flush()
    cmp.clear_cache()


def _same(a: cmp.ComparisonResult, b: cmp.ComparisonResult) -> None:
    pd.testing.assert_frame_equal(a.headline, b.headline, check_exact=True)
    pd.testing.assert_frame_equal(a.pairs, b.pairs, check_exact=True)
    pd.testing.assert_frame_equal(a.curves, b.curves, check_exact=True)
    pd.testing.assert_frame_equal(a.layer_sigma, b.layer_sigma, check_exact=True)
    assert a.notes == b.notes


def _wait_for(path: Path) -> None:
    """Until ``path`` exists (the keeper's thread at work), for a minute at most."""
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _meta(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        meta: dict[str, Any] = json.loads(npz["meta"].tobytes())
    return meta


def _snapshot(store: TrialStore, study: str = STUDY) -> Path:
    path = cmp._snapshot_path(store, study)
    assert path is not None
    return path


def test_a_written_study_is_compared_from_the_snapshot_its_writer_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=10):
        store.append(synthetic_study(STUDY, n_pairs=8, epochs=3, pruned=1))
        assert keeper.pending() == {str(tmp_path / "lab.db"): {STUDY}}
        assert not _snapshot(store).exists()  # nothing done on the append path
        saved = keeper.flush()
    assert saved == [_snapshot(store)] and saved[0].is_file()
    assert keeper.pending() == {}

    cmp.clear_cache()  # the next process to compare
    spy = _Spy(monkeypatch)
    loaded = cmp.snapshot_counts["loaded"]
    res = cmp.compare_study(store, STUDY)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    assert spy.bulk_reads == 0  # no trial read from the store's JSON
    _same(res, cmp.compare_study(store, STUDY, use_cache=False))


def test_the_keeper_catches_up_with_new_trials_and_a_current_snapshot_is_not_rewritten(
    tmp_path: Path,
) -> None:
    store = TrialStore(tmp_path / "lab.db")
    db = str(tmp_path / "lab.db")
    with keeper.keeping(min_trials=0):
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=2))
        (path,) = keeper.flush()
        assert keeper.flush() == []  # nothing pending
        point = E.run_metric(
            model_run_id=STUDY, trial_id="trial_0000", step=99, metric_name="lr", metric_value=0.1
        )
        store.append([point])  # a metric point changes no trial row: no study to refresh
        assert keeper.pending() == {db: set()}
        late = E.trial_start(
            model_run_id=STUDY,
            trial_id="late",
            study=STUDY,
            spectral_norm=True,
            parameters={"pair_id": "late"},
        )
        store.append([late, *synthetic_study("other", n_pairs=1, epochs=1)])
        assert keeper.pending() == {db: {"other", STUDY}}
        stamp = path.stat().st_mtime_ns
        assert path in keeper.flush()
        assert path.stat().st_mtime_ns != stamp  # the study's rows changed: saved again
        stamp = path.stat().st_mtime_ns
        assert keeper.flush() == []
        assert cmp.update_snapshot(store, STUDY) == path  # current: not rewritten
        assert path.stat().st_mtime_ns == stamp
    cmp.clear_cache()
    res = cmp.compare_study(store, STUDY)
    assert res.counts is not None
    _same(res, cmp.compare_study(store, STUDY, use_cache=False))


@pytest.mark.slow
def test_the_keeper_refreshes_another_studys_snapshot_that_fell_far_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keeper, "KEPT_LAG_EVENTS", 40)
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=0):
        store.append(synthetic_study(STUDY, n_pairs=3, epochs=2))
        (kept,) = keeper.flush()
        watermark = _meta(kept)["watermark"]
        store.append(synthetic_study("b", n_pairs=2, epochs=3))  # 20 events: not far yet
        assert kept not in keeper.flush()
        assert keeper.snapshots_behind(store, 40) == []
        store.append(synthetic_study("c", n_pairs=3, epochs=4))  # 36 more: 56 behind
        assert keeper.snapshots_behind(store, 40) == [STUDY]
        assert kept in keeper.flush()  # no append touched it, but it was far behind
    assert keeper.snapshots_behind(store, 40) == []  # every snapshot's watermark moved on
    assert _meta(kept)["watermark"] == store.last_seq() > watermark
    cmp.clear_cache()
    loaded = cmp.snapshot_counts["loaded"]
    res = cmp.compare_study(store, STUDY)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    _same(res, cmp.compare_study(store, STUDY, use_cache=False))


def test_a_small_study_is_left_to_be_read_from_scratch(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=100):
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=2))
        assert keeper.flush() == []
    assert not _snapshot(store).exists()


def test_the_keeper_is_switched_off_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(keeper.ENV_KEEP, "off")
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=2, epochs=1))
    assert keeper.pending() == {}
    monkeypatch.setenv(keeper.ENV_KEEP, "3")  # a number: the smallest study kept
    store.append(synthetic_study("b", n_pairs=2, epochs=1))
    assert keeper.flush() == [_snapshot(store, "b")]


def test_a_refused_append_tells_the_keeper_nothing(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    first = synthetic_study(STUDY, n_pairs=1, epochs=1)
    with keeper.keeping(min_trials=0):
        store.append(first)
        keeper.flush()
        clash = json.loads(first[0].to_json())
        clash["payload"]["spectral_norm"] = not clash["payload"]["spectral_norm"]
        late = E.trial_start(model_run_id=STUDY, trial_id="x", study="never", spectral_norm=True)
        with pytest.raises(E.EventConflictError):
            store.append([late, clash])  # the same id, another event: nothing is written
        assert keeper.pending() == {}


def test_an_in_memory_store_and_a_deleted_lab_keep_nothing(tmp_path: Path) -> None:
    with keeper.keeping(min_trials=0):
        TrialStore(":memory:").append(synthetic_study(STUDY, n_pairs=2, epochs=1))
        assert keeper.pending() == {}
        db = tmp_path / "gone" / "lab.db"
        store = TrialStore(db)
        store.append(synthetic_study(STUDY, n_pairs=2, epochs=1))
        store.close()
        for f in db.parent.iterdir():
            f.unlink()
        db.parent.rmdir()
        assert keeper.flush() == []
    assert not db.parent.exists()  # not created again by the keeper


def test_an_unwritable_cache_folder_is_no_error(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    (tmp_path / "cache").write_text("a file where the cache folder goes")
    with keeper.keeping(min_trials=0):
        store.append(synthetic_study(STUDY, n_pairs=2, epochs=1))
        assert keeper.flush() == []
    assert cmp.compare_study(store, STUDY).design == "paired"


def test_the_keepers_thread_refreshes_a_quiet_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keeper, "IDLE_SECONDS", 0.05)
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=0):
        store.append(synthetic_study(STUDY, n_pairs=2, epochs=1))
        _wait_for(_snapshot(store))
        assert _snapshot(store).exists()
        assert keeper.pending() == {}


def test_a_cli_ingest_leaves_the_snapshot_at_exit(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(e.to_json() for e in synthetic_study(STUDY, n_pairs=5, epochs=2)))
    env = {**os.environ, keeper.ENV_KEEP: "0"}
    script = "from thunderline_lab.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", script, "ingest", "--lab", str(lab), str(events)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    store = TrialStore(lab / "lab.db")
    assert _snapshot(store).is_file()  # written as the ingest exited
    loaded = cmp.snapshot_counts["loaded"]
    res = cmp.compare_study(store, STUDY)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    assert int(res.headline.loc[0, "n_pairs"]) == 5


@pytest.mark.slow
def test_a_comparison_while_the_keeper_compares_the_same_study_in_another_thread(
    tmp_path: Path,
) -> None:
    import threading

    store = TrialStore(tmp_path / "lab.db")
    errors: list[BaseException] = []
    with keeper.keeping(min_trials=0):
        for seed in range(4):
            # each round's trials are new ones (a finished trial keeps its arm and outcome)
            store.append(
                [
                    e.model_copy(
                        update={
                            "payload": e.payload.model_copy(
                                update={"trial_id": f"{e.payload.trial_id}-{seed}"}
                            )
                        }
                    )
                    for e in synthetic_study(STUDY, n_pairs=6, epochs=3, seed=seed)
                ]
            )

            def keep() -> None:
                try:
                    keeper.flush()
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            other = threading.Thread(target=keep)
            other.start()
            mine = cmp.compare_study(store, STUDY)
            other.join()
            assert not errors
            _same(mine, cmp.compare_study(store, STUDY, use_cache=False))
    assert _snapshot(store).is_file()


def test_a_fast_stream_of_points_gets_the_snapshot_refreshed_before_the_quiet_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keeper, "DUE_EVENTS", 30)  # IDLE and MAX_DELAY stay an hour
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=0):
        store.append(synthetic_study(STUDY, n_pairs=2, epochs=1))  # 12 events
        assert not _snapshot(store).exists()
        points = [
            E.run_metric(
                model_run_id=STUDY,
                trial_id="trial_0000",
                step=100 + i,
                metric_name="lr",
                metric_value=0.1,
            )
            for i in range(20)
        ]
        store.append(points)  # no trial row changed, but 32 events since the first change
        _wait_for(_snapshot(store))
        assert _snapshot(store).exists()


def test_the_keepers_child_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keeper.main([]) == 2
    assert "usage: python -m thunderline_lab.keeper DB STUDY" in capsys.readouterr().err
    assert keeper.main([str(tmp_path / "none.db"), STUDY]) == 1
    assert "none.db: no such trial store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    store = TrialStore(tmp_path / "lab.db")
    with keeper.keeping(min_trials=10**9):  # this process's own keeper stays out of it
        store.append(synthetic_study(STUDY, n_pairs=3, epochs=2))
    assert keeper.main([store.path, STUDY, "no-such-study"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(_snapshot(store))]  # a study with nothing to compare: no snapshot


def test_the_exit_never_fails_over_the_keeper(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(stop: bool = False) -> list[Path]:
        raise KeyboardInterrupt  # Ctrl-C while the exit waits for the keeper's child

    calls = []
    with monkeypatch.context() as patched:  # undone before the fixture's own flush
        patched.setattr(keeper._keeper(), "flush", interrupted)
        patched.setattr(keeper._log, "debug", lambda *args: calls.append(args))
        keeper._at_exit()  # no KeyboardInterrupt out of it: it gives up quietly
    assert calls and "KeyboardInterrupt" in calls[0][0] % calls[0][1:]


@pytest.mark.parametrize("raw", ["-5", "-1", "abc", "5.0", "1e4"])
def test_a_bad_setting_is_warned_about_once_and_the_default_kept(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # -5 was taken as 0 ("keep every study") without a word, and "abc" was warned about
    # at every append
    monkeypatch.setattr(keeper, "_WARNED", set(), raising=False)
    monkeypatch.setenv(keeper.ENV_KEEP, raw)
    caplog.set_level("WARNING", logger=keeper.__name__)
    store = TrialStore(tmp_path / "lab.db")
    for study in ("a", "b", "c"):
        store.append(synthetic_study(study, n_pairs=1, epochs=1))
    assert keeper.flush() == []  # the default: no study this small is kept
    warned = [r.getMessage() for r in caplog.records if keeper.ENV_KEEP in r.getMessage()]
    assert len(warned) == 1, warned
    assert f"{keeper.ENV_KEEP}={raw!r}" in warned[0]
    assert "'off' or a number of trials of at least 0" in warned[0]
    assert f"using {keeper.MIN_TRIALS}" in warned[0]
    caplog.clear()
    for good, kept in (("0", 0), ("3", 3), (" 7 ", 7), ("OFF", None)):  # taken, no warning
        monkeypatch.setenv(keeper.ENV_KEEP, good)
        assert keeper._threshold() == kept
    assert not caplog.records

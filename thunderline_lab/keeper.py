"""Keeps the comparison snapshots of the large studies a process writes current.

A comparison reads a study's values from a columnar snapshot beside the store
(:mod:`thunderline_lab.compare`); without one it reads every trial's JSON, which takes
0.4–0.9 s for 100,000 trials, mostly inside SQLite. So the writers keep it, as the store
keeps its other projections: every :class:`~thunderline_lab.store.TrialStore` append that
changes trial rows tells this module which studies changed (:func:`note`; an append only
records their names), and a thread of the writing process has the snapshot of each such
study of at least :data:`MIN_TRIALS` trials brought up to the store
(:func:`thunderline_lab.compare.update_snapshot`: the default comparison, details
included) once the study has been quiet for :data:`IDLE_SECONDS`, at the latest
:data:`MAX_DELAY_SECONDS` after its first change or :data:`DUE_EVENTS` events later, and at
exit for what is still pending. Other studies' events move every snapshot's watermark on,
and a snapshot too far behind the log is read from scratch; so the keeper also refreshes
the snapshot of any other large study of the lab once it is :data:`KEPT_LAG_EVENTS`
behind.

The comparison runs in a child process (``python -m thunderline_lab.keeper DB STUDY...``,
:func:`main`), which the thread waits for: its imports (scipy), frames and CPU stay out of
the writer, so a gateway's memory and request latency do not move. The child reads the
store through a connection of its own, so it only ever sees committed transactions. A
keeper that fails (a deleted lab, an unwritable folder) logs at debug level and leaves the
snapshot to the next comparison: a snapshot never changes a result, only its cost.

So a study written by ``thunderline-lab ingest``, the gateway, ``run``'s workers or a
notebook is compared from its snapshot by the next process that asks, and a long-lived
writer (the gateway) keeps it a few seconds behind the log at most. Smaller studies are
left alone: one of 5,000 trials is read from scratch in about 45 ms (headline), 60 ms (the
default 8 metrics) or 120 ms (details included) on a 2-core machine, once: that comparison
writes the snapshot the next one reads.

Configuration: ``THUNDERLINE_LAB_KEEP_SNAPSHOTS`` = ``off`` disables the keeper; an integer
of at least 0 sets :data:`MIN_TRIALS` (``0``: every study); anything else is warned about
once and :data:`MIN_TRIALS` kept.

Example:
    >>> import tempfile
    >>> from thunderline_lab.store import TrialStore
    >>> from thunderline_lab.monitor import synthetic_study
    >>> lab = tempfile.mkdtemp()
    >>> store = TrialStore(f"{lab}/lab.db")
    >>> with keeping(min_trials=0):
    ...     _ = store.append(synthetic_study("ab", n_pairs=4, epochs=2))
    ...     [p.parent.name for p in flush()]
    ['compare']
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DUE_EVENTS",
    "ENV_KEEP",
    "IDLE_SECONDS",
    "KEPT_LAG_EVENTS",
    "MAX_DELAY_SECONDS",
    "MIN_TRIALS",
    "flush",
    "keeping",
    "main",
    "note",
    "pending",
    "snapshots_behind",
]

_log = logging.getLogger(__name__)

ENV_KEEP = "THUNDERLINE_LAB_KEEP_SNAPSHOTS"
MIN_TRIALS = 5_000  # trials: a smaller study is compared from scratch in ~45-120 ms
IDLE_SECONDS = 2.0  # a study quiet this long has its snapshot brought up to the store
MAX_DELAY_SECONDS = 30.0  # ... and a busy one at the latest this long after its first change
# ... or once this many events came (a fast stream: a snapshot further behind than the
# comparison's incremental refresh reads, 250,000 events, would be read from scratch)
DUE_EVENTS = 150_000
KEPT_LAG_EVENTS = 100_000  # another large study's snapshot this far behind is refreshed too
_EXIT_TIMEOUT = 660.0  # seconds the exit waits for a refresh under way in the thread
_CHILD_TIMEOUT = 600.0  # seconds a child refreshing the snapshots may take


_WARNED: set[str] = set()  # the bad ENV_KEEP values already warned about in this process


def _threshold() -> int | None:
    """The minimum trials of a kept study, None when the keeper is off.

    A value that is neither ``off`` nor an integer of at least 0 is warned about (once per
    process and value: this runs at every append) and the default :data:`MIN_TRIALS` used.
    It is not refused: this is read inside every store append, and a snapshot only changes
    what a comparison costs, never its result, so a typo must not fail a writer.
    """
    raw = os.environ.get(ENV_KEEP, "").strip().lower()
    if not raw:
        return MIN_TRIALS
    if raw in ("off", "no", "false", "never"):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value >= 0:
        return value
    if raw not in _WARNED:
        _WARNED.add(raw)
        _log.warning(
            "%s=%r is not valid: it takes 'off' or a number of trials of at least 0 "
            "(0: every study); using %d",
            ENV_KEEP,
            raw,
            MIN_TRIALS,
        )
    return MIN_TRIALS


@dataclass
class _Dirty:
    """The studies of one store changed since its last refresh, and when."""

    studies: set[str] = field(default_factory=set)
    events: int = 0
    first: float = 0.0
    last: float = 0.0


class _Keeper:
    """The process's keeper: the stores' pending studies and the thread that refreshes them."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.dirty: dict[str, _Dirty] = {}
        self.scanned: dict[str, int] = {}  # per store: its last seq when snapshots were scanned
        self.thread: threading.Thread | None = None
        self.busy = False
        self.stopping = False
        self.min_trials_override: int | None = None

    def min_trials(self) -> int | None:
        if self.min_trials_override is not None:
            return self.min_trials_override
        return _threshold()

    def note(self, path: str, studies: Iterable[str], events: int) -> None:
        now = time.monotonic()
        with self.cond:
            entry = self.dirty.get(path)
            fresh = entry is None
            if entry is None:
                entry = self.dirty[path] = _Dirty(first=now)
            entry.studies.update(studies)
            entry.events += events
            entry.last = now
            if not fresh and entry.events < DUE_EVENTS:
                return  # the thread already waits for this store's due time
            if self.stopping:
                return  # exiting: flush() takes it
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="thunderline-snapshot-keeper", daemon=True
                )
                self.thread.start()
            self.cond.notify_all()

    def _due(self, now: float) -> tuple[list[tuple[str, set[str]]], float | None]:
        """The stores due for a refresh (taken off the list), and how long until the next."""
        due, wait = [], None
        for path, entry in list(self.dirty.items()):
            at = min(entry.last + IDLE_SECONDS, entry.first + MAX_DELAY_SECONDS)
            if at <= now or entry.events >= DUE_EVENTS:
                due.append((path, self.dirty.pop(path).studies))
            else:
                wait = at - now if wait is None else min(wait, at - now)
        return due, wait

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.stopping:
                        return
                    due, wait = self._due(time.monotonic())
                    if due:
                        self.busy = True
                        break
                    self.cond.wait(wait)
            try:
                for path, studies in due:
                    self.refresh(path, studies)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def flush(self, stop: bool = False) -> list[Path]:
        """Refresh every pending study now, in the caller's thread, after any refresh under
        way in the keeper's thread; ``stop`` ends that thread (at exit)."""
        with self.cond:
            self.stopping = self.stopping or stop
            self.cond.notify_all()
            deadline = time.monotonic() + _EXIT_TIMEOUT
            while self.busy and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            work = [(path, entry.studies) for path, entry in self.dirty.items()]
            self.dirty.clear()
        saved: list[Path] = []
        for path, studies in work:
            saved += self.refresh(path, studies)
        return saved

    def refresh(self, path: str, studies: set[str]) -> list[Path]:
        """Bring the snapshots of ``studies`` of the store at ``path`` up to it, and those of
        its other large studies that fell :data:`KEPT_LAG_EVENTS` behind the log, in a
        child process (:func:`main`); the paths of the snapshots saved or found current."""
        threshold = self.min_trials()
        if threshold is None or not Path(path).is_file():
            return []
        try:
            wanted = self._wanted(path, studies, threshold)
        except Exception as exc:  # the next comparison reads the store instead
            _log.debug("comparison snapshots of %s not kept: %s: %s", path, type(exc).__name__, exc)
            return []
        return _refresh_in_child(path, wanted) if wanted else []

    def _wanted(self, path: str, studies: set[str], threshold: int) -> list[str]:
        """Which of ``studies`` (and of the lab's snapshots far behind) are large enough."""
        from thunderline_lab.store import TrialStore

        with TrialStore(path) as store:  # a connection of its own: committed rows only
            last = store.last_seq()
            behind: set[str] = set()
            if last - self.scanned.get(path, -KEPT_LAG_EVENTS) >= KEPT_LAG_EVENTS // 4:
                # other studies' events move every snapshot's watermark on: one that falls
                # past what a refresh reads incrementally would be read from scratch
                behind = set(snapshots_behind(store, KEPT_LAG_EVENTS, threshold))
                self.scanned[path] = last
            wanted = []
            for study in sorted(studies | behind):
                (count,) = store.conn.execute(
                    "SELECT count(*) FROM trials WHERE study = ?", (study,)
                ).fetchone()
                if count >= threshold:
                    wanted.append(study)
        return wanted


def snapshots_behind(store: Any, events: int, min_rows: int = 0) -> list[str]:
    """The studies whose comparison snapshot beside ``store`` (a
    :class:`~thunderline_lab.store.TrialStore`) is more than ``events`` events behind its
    log and holds at least ``min_rows`` trials. Only each file's small ``meta`` member is
    read, without the comparison module (its imports stay out of the writer). A snapshot far
    behind is read from scratch by the next comparison (a refresh from the log stops at
    250,000 events). Unreadable or foreign files are skipped."""
    import json

    import numpy as np

    from thunderline_lab.store import snapshot_dir

    folder = snapshot_dir(store.path)
    if folder is None or not folder.is_dir():
        return []
    last, name, out = store.last_seq(), Path(store.path).name, []
    for path in sorted(folder.glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes())
            if meta["store"] != name:
                continue
            if last - int(meta["watermark"]) > events and int(meta["n"]) >= min_rows:
                out.append(str(meta["study"]))
        except Exception as exc:  # a truncated or foreign file: the next comparison's miss
            _log.debug("comparison snapshot %s not read: %s: %s", path, type(exc).__name__, exc)
    return out


def _refresh_in_child(path: str, studies: list[str]) -> list[Path]:
    """Run :func:`main` for ``studies`` of ``path`` in a new Python process and wait for it:
    the comparison's imports, frames and CPU stay out of the writer (a gateway's memory and
    request latency); only this thread waits. Returns the snapshots it reported."""
    cmd = [sys.executable, "-m", "thunderline_lab.keeper", path, *studies]
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, ENV_KEEP: "off"},
            timeout=_CHILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _log.debug("comparison snapshot keeper for %s did not run: %s", path, exc)
        return []
    if done.returncode != 0:
        _log.debug(
            "comparison snapshot keeper for %s exited %s: %s",
            path,
            done.returncode,
            done.stderr.strip()[-2000:],
        )
    return [Path(line) for line in done.stdout.splitlines() if line.strip()]


_KEEPER = _Keeper()
_KEEPER_LOCK = threading.Lock()


def _keeper() -> _Keeper:
    """The keeper of this process (a new one in a forked child: the parent's thread and
    connections are not its own)."""
    global _KEEPER
    with _KEEPER_LOCK:
        if _KEEPER.pid != os.getpid():
            _KEEPER = _Keeper()
        return _KEEPER


def note(path: str, studies: Iterable[str], events: int = 0) -> None:
    """Record that ``studies`` of the store at ``path`` changed, with ``events`` new events
    (called by the store after each append once one changed trial rows); their snapshots
    are refreshed later, off the caller's thread. Nothing happens when the keeper is off
    (:data:`ENV_KEEP`)."""
    keeper = _keeper()
    if keeper.min_trials() is None:
        return
    keeper.note(str(path), studies, events)
    _register_exit()


def pending() -> dict[str, set[str]]:
    """The stores and studies waiting for a refresh (a copy)."""
    keeper = _keeper()
    with keeper.cond:
        return {path: set(entry.studies) for path, entry in keeper.dirty.items()}


def flush() -> list[Path]:
    """Refresh every pending study's snapshot now (what the exit does); returns the paths
    of the snapshots saved or found current."""
    return _keeper().flush()


@contextlib.contextmanager
def keeping(min_trials: int) -> Iterator[None]:
    """Keep the snapshots of studies of at least ``min_trials`` trials within the block,
    whatever :data:`ENV_KEEP` says (tests, benchmarks)."""
    keeper = _keeper()
    before = keeper.min_trials_override
    keeper.min_trials_override = min_trials
    try:
        yield
    finally:
        keeper.min_trials_override = before


@functools.cache
def _register_exit() -> None:
    atexit.register(_at_exit)


def _at_exit() -> None:
    try:
        _keeper().flush(stop=True)
    except (Exception, KeyboardInterrupt) as exc:  # never fail an exit over a cache
        _log.debug("comparison snapshot keeper at exit: %r", exc)


def main(argv: list[str] | None = None) -> int:
    """``python -m thunderline_lab.keeper DB STUDY...``: bring the comparison snapshots of
    the studies of the store ``DB`` up to it (what a writer's keeper runs, in a process of
    its own); prints the path of each snapshot saved or found current, one per line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m thunderline_lab.keeper DB STUDY...", file=sys.stderr)
        return 2
    from thunderline_lab import compare
    from thunderline_lab.store import TrialStore

    db, studies = args[0], args[1:]
    if not Path(db).is_file():
        print(f"{db}: no such trial store", file=sys.stderr)
        return 1
    failed = 0
    with TrialStore(db) as store:
        for study in studies:
            try:
                saved = compare.update_snapshot(store, study)
            except Exception as exc:
                print(f"{db}: study {study!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed += 1
                continue
            if saved is not None:
                print(saved, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scheduling of the suite across pytest-xdist workers (``make test`` runs ``-n 2``).

- Tests marked ``slow`` (whole studies in subprocesses, servers, a browser) are collected
  first, so that the workers start on them rather than meet one of them at the very end.
- The tests against a database server (``postgres``, ``mysql``) run on one worker, one at a
  time: they share the server's database, where Optuna creates its tables on first use.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

_SERVER_MARKS = ("postgres", "mysql")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in _SERVER_MARKS):
            item.add_marker(pytest.mark.xdist_group("database-servers"))
    # a stable sort: the order within each kind is the files' own
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _tables_and_bytes(db: Path) -> tuple[set[str], bytes]:
    assert not Path(f"{db}-wal").exists()  # all of it in the file compared
    conn = sqlite3.connect(f"{db.as_uri()}?immutable=1", uri=True)  # opening writes nothing
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    return tables, db.read_bytes()


@pytest.fixture
def db_state() -> Callable[[Path], tuple[set[str], bytes]]:
    """A closed SQLite file's tables and bytes, read without writing (a refused command must
    leave both as they were)."""
    return _tables_and_bytes

"""Scheduling of the suite across pytest-xdist workers (``make test`` runs ``-n 2``).

- Tests marked ``slow`` (whole studies in subprocesses, servers, a browser) are collected
  first, so that the workers start on them rather than meet one of them at the very end.
- The tests against a database server (``postgres``, ``mysql``) run on one worker, one at a
  time: they share the server's database, where Optuna creates its tables on first use.
"""

from __future__ import annotations

import pytest

_SERVER_MARKS = ("postgres", "mysql")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in _SERVER_MARKS):
            item.add_marker(pytest.mark.xdist_group("database-servers"))
    # a stable sort: the order within each kind is the files' own
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

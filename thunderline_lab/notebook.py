"""Small helpers the notebooks call, so that the notebooks stay thin.

Profiles shrink a notebook's budget for CI without editing it: the notebook's ``profile``
parameter, or ``$THUNDERLINE_LAB_PROFILE`` (which wins, so nbval can force the test profile
on notebooks whose defaults are a researcher's real budget).

Example:
    >>> apply_profile({"n_trials": 24, "epochs": 30}, "test")
    {'n_trials': 4, 'epochs': 4}
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from thunderline_lab.errors import ConfigError
from thunderline_lab.lab import Lab

__all__ = [
    "PROFILES",
    "PROFILE_ENV",
    "apply_profile",
    "background_demo_study",
    "effective_profile",
    "ensure_studies",
    "follow",
]

PROFILE_ENV = "THUNDERLINE_LAB_PROFILE"
# "test" keeps every code path (paired twins, pruning, metrics, Lipschitz bounds) but with a
# budget that runs in CI: two SN-on/off pairs, a few epochs.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {},
    "test": {"n_trials": 4, "epochs": 4},
}


def effective_profile(profile: str | None = None) -> str:
    """``$THUNDERLINE_LAB_PROFILE`` if set, else ``profile``, else ``"full"``."""
    chosen = os.environ.get(PROFILE_ENV) or profile or "full"
    if chosen not in PROFILES:
        raise ConfigError(f"profile: unknown profile {chosen!r} (expected {', '.join(PROFILES)})")
    return chosen


def apply_profile(params: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """``params`` with the profile's overrides applied (only keys present in ``params``)."""
    overrides = PROFILES[effective_profile(profile)]
    return {k: overrides.get(k, v) for k, v in params.items()}


def follow(
    monitor: Any,
    *,
    timeout: float | None = None,
    until: Callable[[], bool] | None = None,
    poll: float = 0.5,
) -> None:
    """Keep a started monitor following its source until ``until()`` or ``timeout``.

    The monitor's own pump thread does the redrawing; this only waits. Interrupting the
    kernel ends the wait cleanly.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not (until is not None and until()):
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(poll)
    except KeyboardInterrupt:
        return


def _run_small_study(lab_root: str, study: str) -> None:
    from thunderline_lab.study import run_study

    run_study(study, lab=lab_root, **PROFILES["test"], mlflow=False)


def background_demo_study(
    lab: Lab, study: str, profile: str | None = None
) -> mp.process.BaseProcess | None:
    """Under the test profile, run a small real study in another process to follow.

    Returns the process (``join()`` it), or None under other profiles, where the notebook
    follows whatever study is already running in the lab.
    """
    if effective_profile(profile) != "test":
        return None
    proc = mp.get_context("spawn").Process(
        target=_run_small_study, args=(str(lab.root), study), daemon=True
    )
    proc.start()
    return proc


def ensure_studies(lab: Lab, studies: Sequence[str], profile: str | None = None) -> list[str]:
    """Under the test profile, run a small real study for each named study the lab lacks.

    Returns the names that had to be run. Under other profiles a missing study is an error,
    since comparing nothing would silently show nothing.

    Raises:
        ConfigError: a study has no trials in the lab (and the profile is not ``test``).
    """
    with lab.store() as store:
        known = set(store.trials()["study"]) if store.counts()["trials"] else set()
    missing = [s for s in studies if s not in known]
    if missing and effective_profile(profile) != "test":
        raise ConfigError(
            f"{lab.db_path}: no trials for {', '.join(missing)} "
            f"(studies in this lab: {', '.join(sorted(known)) or 'none'})"
        )
    for study in missing:
        _run_small_study(str(lab.root), study)
    return missing

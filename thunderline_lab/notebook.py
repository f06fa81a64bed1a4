"""Small helpers the notebooks call, so that the notebooks stay thin.

Profiles shrink a notebook's budget for CI without editing it: the notebook's ``profile``
parameter, or ``$THUNDERLINE_LAB_PROFILE`` (which wins, so nbval can force the test profile
on notebooks whose defaults are a researcher's real budget).

Example:
    >>> apply_profile({"n_trials": 24, "epochs": 30}, "test")
    {'n_trials': 4, 'epochs': 4}
"""

from __future__ import annotations

import functools
import inspect
import json
import multiprocessing as mp
import numbers
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from thunderline_lab.errors import (
    ConfigError,
    StudyError,
    ThunderlineLabError,
    did_you_mean,
    value_text,
)
from thunderline_lab.lab import Lab, study_name

if TYPE_CHECKING:
    import pandas as pd

    from thunderline_lab.monitor import BackgroundRun, LiveMonitor
    from thunderline_lab.store import TrialStore

__all__ = [
    "PROFILES",
    "PROFILE_ENV",
    "TRIAL_TABLE_COLUMNS",
    "apply_profile",
    "arm_means",
    "background_demo_study",
    "effective_profile",
    "ensure_studies",
    "flag",
    "follow",
    "results_store",
    "start_study",
    "study_names",
    "trials_table",
]

PROFILE_ENV = "THUNDERLINE_LAB_PROFILE"
# "test" keeps every code path (paired twins, pruning, metrics, Lipschitz bounds) but with a
# budget that runs in CI: two SN-on/off pairs, a few epochs.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {},
    "test": {"n_trials": 4, "epochs": 4},
}


def effective_profile(profile: str | None = None) -> str:
    """``$THUNDERLINE_LAB_PROFILE`` if set, else ``profile``, else ``"full"``.

    Raises:
        ConfigError: the profile is unknown or not a name; the message says where it came
            from (``profile`` or ``$THUNDERLINE_LAB_PROFILE``).
    """
    expected = ", ".join(PROFILES)
    env = os.environ.get(PROFILE_ENV)
    where, chosen = (f"${PROFILE_ENV}", env) if env else ("profile", profile or "full")
    if not isinstance(chosen, str):
        raise ConfigError(
            f"{where}: expected a profile name ({expected}), got {type(chosen).__name__} {chosen!r}"
        )
    if chosen not in PROFILES:
        raise ConfigError(f"{where}: unknown profile {chosen!r} (expected {expected})")
    return chosen


def apply_profile(params: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """``params`` with the profile's overrides applied (only keys present in ``params``).

    Raises:
        ConfigError: ``params`` is not a mapping, or the profile is unknown
            (:func:`effective_profile`).
    """
    if not isinstance(params, Mapping):
        raise ConfigError(
            "params: expected a mapping of parameter names to values, "
            f"got {type(params).__name__} {params!r}"
        )
    overrides = PROFILES[effective_profile(profile)]
    return {k: overrides.get(k, v) for k, v in params.items()}


def flag(name: str, value: Any) -> bool:
    """A notebook's on/off parameter ``name``, refused unless it is True or False.

    Papermill turns only the words ``True`` and ``False`` into booleans: ``-p monitor false``
    gives the text ``'false'``, which ``if monitor:`` would take as on.

    Raises:
        ConfigError: ``value`` is not a bool; the message names ``name`` and how to pass it.

    Example:
        >>> flag("monitor", False)
        False
        >>> flag("monitor", "false")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        thunderline_lab.errors.ConfigError: monitor: expected True or False, got the text ...
    """
    if isinstance(value, bool):
        return value
    meant = str(value).strip().casefold() in ("true", "yes", "on", "1")
    raise ConfigError(
        f"{name}: expected True or False, got {value_text(value)} (papermill: -p {name} {meant}, "
        f"capitalised, or -y '{name}: {str(meant).lower()}')"
    )


FollowEnd = Literal["finished", "timeout", "interrupted"]


def _check_seconds(
    name: str, value: Any, *, allow_none: bool = False, positive: bool = False
) -> None:
    """Refuse a duration that is not a number of seconds (>= 0; a poll finite and > 0)."""
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value  # not NaN
        and not (positive and value == float("inf"))  # a poll of inf would never look
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        rule = "> 0" if positive else ">= 0"
        none = " or None" if allow_none else ""
        raise ConfigError(f"follow: {name} must be a number of seconds {rule}{none}, got {value!r}")


def follow(
    monitor: LiveMonitor,
    *,
    timeout: float | None = None,
    until: Callable[[], bool] | None = None,
    quiet: float = 60.0,
    poll: float = 0.5,
    finish: bool = True,
) -> FollowEnd:
    """Keep a started monitor following its study until the study finishes.

    The study counts as finished when ``until()`` is true (a caller that knows, e.g. the
    process running the study has ended), else when the monitor sees it finished
    (:meth:`~thunderline_lab.monitor.LiveMonitor.study_finished`: it has trials, none
    runs, and nothing new arrived for ``quiet`` seconds). ``timeout`` (seconds; None: no
    limit) is an upper bound on the wait. The monitor's own pump thread does the
    redrawing; this only waits (and starts the monitor, if that was forgotten).
    Interrupting the kernel ends the wait cleanly.

    Args:
        finish: finish the monitor at the end (final line and static snapshot), with a
            status saying why following ended.

    Returns:
        ``"finished"``, ``"timeout"`` or ``"interrupted"``.

    Raises:
        ConfigError: ``timeout`` or ``quiet`` is not a number >= 0 (``timeout`` may be
            None), ``poll`` not a number > 0, or ``until`` not callable; or the timeout
            passed without a single trial of the study (a misspelt study name: the error
            names the closest of the lab's studies, and lists them), where a headless run
            would otherwise wait it out and end as if all was well.

    Example:
        >>> from thunderline_lab.bus import EventBus
        >>> from thunderline_lab.monitor import LiveMonitor, synthetic_study
        >>> bus = EventBus()
        >>> mon = LiveMonitor.from_bus(bus, "demo", mode="text")
        >>> mon = mon.start(display=False, thread=False)
        >>> _ = bus.publish_many(synthetic_study("demo", n_pairs=1, epochs=2))
        >>> mon.pump()  # doctest: +ELLIPSIS
        [monitor demo] 2 trials so far: 2 done, 0 running ...
        >>> follow(mon, quiet=0.0, finish=False)  # no trial runs, nothing new for 0 s
        'finished'
    """
    _check_seconds("timeout", timeout, allow_none=True)
    _check_seconds("quiet", quiet)
    _check_seconds("poll", poll, positive=True)
    if until is not None and not callable(until):
        raise ConfigError(f"follow: until must be a function returning a bool, got {until!r}")
    if not monitor._started:  # a monitor that never polls would never see the study end
        monitor.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    end: FollowEnd = "finished"
    try:
        while not (until() if until is not None else monitor.study_finished(quiet)):
            if deadline is not None and time.monotonic() >= deadline:
                end = "timeout"
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        end = "interrupted"
    never = end == "timeout" and not monitor.state.summary()["n_trials"]
    if finish:
        if never:
            status = f"stopped following after {timeout:g} s: no trial of the study appeared"
        elif end == "timeout":
            status = f"stopped following after {timeout:g} s (the study may still run)"
        elif end == "interrupted":
            status = "stopped following (interrupted; the study may still run)"
        else:
            status = "finished"
        monitor.finish(status)  # (drains what the source still holds)
    if end != "interrupted" and not monitor.state.summary()["n_trials"]:
        # timed out, or the study it waited for (``until``) ended, without a single trial:
        # a misspelt study, or a study that died before its first trial
        raise ConfigError(_no_trial_appeared(monitor, timeout if end == "timeout" else None))
    return end


def _no_trial_appeared(monitor: LiveMonitor, timeout: float | None) -> str:
    """What :func:`follow` says of a study none of whose trials appeared: the closest of the
    studies its source (the lab's store, a gateway) knows, and those studies."""
    study = monitor.state.study
    known: list[str] | None = None
    for source in getattr(monitor.source, "sources", [monitor.source]):  # a CombinedSource's
        reader = getattr(source, "store", source)  # a StoreSource's store; a GatewaySource
        if callable(getattr(reader, "studies", None)):
            try:
                known = list(reader.studies())
            except ThunderlineLabError:  # (a gateway gone away) the hint only is left out
                continue
            break
    what = "no trial" if study is None else f"no trial of study {study!r}"
    said = f"{what} appeared" + (
        f" in {timeout:g} s" if timeout is not None else " before the study ended"
    )
    if study is not None and known:
        said += did_you_mean(study, known, n=3)
    if known is not None:
        shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
        said += f"; studies in this lab: {shown or 'none'}"
    return said


def study_names(studies: str | int | Sequence[str | int]) -> list[str]:
    """The study names a notebook parameter gives: a name, a comma-separated string of
    names, a list of names, or a JSON list.

    ``papermill -p studies smoke`` passes a string; a string is one name, or several
    separated by commas (``-p studies smoke,spectral_norm_ab``; spaces around each are
    dropped), or, if it starts with ``[``, a JSON list of names; never a sequence of
    one-letter names. A list's names are kept as given (a name with a comma goes in a list).
    An integer is a name too, as its text: papermill makes ``-p studies 2024`` the int 2024,
    and the study's name is "2024" (as the monitor and :func:`start_study` take it).

    Raises:
        ConfigError: anything else (a float, a bool, a mapping, None, an empty list, an
            empty name).

    Example:
        >>> study_names("smoke"), study_names("a, b"), study_names(["a", "b"])
        (['smoke'], ['a', 'b'], ['a', 'b'])
        >>> study_names('["a", "b"]'), study_names(2024)
        (['a', 'b'], ['2024'])
    """
    integer = isinstance(studies, numbers.Integral) and not isinstance(studies, bool)
    value: Any = [studies] if integer else studies
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"studies: not a JSON list of study names: {studies!r}") from exc
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
        if len(value) > 1 and not all(value):
            raise ConfigError(f"studies: an empty name in {studies!r}")
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"studies: expected a study name or a list of names, "
            f"got {type(value).__name__} {value!r}"
        )
    if not value:
        raise ConfigError("studies: no study named (expected a name or a list of names)")
    names: list[str] = []
    for v in value:
        try:
            names.append(study_name(v, "studies"))
        except ConfigError:
            raise ConfigError(
                "studies: every study name must be a non-empty string (or an integer, taken "
                f"as its text), got {v!r}"
            ) from None
    return list(dict.fromkeys(names))  # each once, in order


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def start_study(
    name: str | int,
    *,
    lab: Lab,
    monitor: bool = True,
    gateway: str | None = None,
    worker_index: int = 0,
    monitor_options: Mapping[str, Any] | None = None,
    other_workers_quiet: float = 60.0,
    **study_kwargs: Any,
) -> BackgroundRun:
    """Run the study notebook's study (:func:`thunderline_lab.study.run_study`) under a
    live monitor; ``run.wait()`` gives its :class:`~thunderline_lab.study.StudyResult`.

    With a monitor the study runs in a background thread, so the kernel stays free and the
    monitor's Stop button works (it ends the study after the current epoch). In a live
    notebook the call returns at once; without a frontend (papermill, nbval) it waits for
    the study (and raises its error). Without a monitor the study runs here, in the
    foreground.

    The monitor follows the whole study: this kernel's events at once (its bus) and every
    other worker's as they reach the lab's store (``thunderline-lab run --workers N`` runs
    N copies of the notebook on one study). When this kernel's share is done while other
    workers' trials still run, it waits for them
    (:meth:`~thunderline_lab.monitor.LiveMonitor.wait_for_running_trials`, giving up after
    ``other_workers_quiet`` seconds without news), so the final snapshot and the results
    cells show the whole study. When the study reports through a ``gateway``, the monitor
    follows the gateway's log instead of the lab's store (the token from
    ``$THUNDERLINE_LAB_TOKEN``), and :func:`results_store` reads the study back from it.

    One study at a time per kernel: while a study this function started still runs (the
    researcher re-runs the cell), another call is refused, not run beside it as a second,
    competing study. Stop the first with ``run.stop()`` (its Stop button went with the
    cell's output) and wait for it with ``run.wait()``, then run the cell again: the study
    resumes.

    Args:
        name: the study name.
        lab: the lab the study writes to.
        monitor: follow the study with a :class:`~thunderline_lab.monitor.LiveMonitor`.
        gateway: report events through this gateway instead of the lab's store.
        worker_index: this notebook's index among the batch workers (for labels).
        monitor_options: keyword arguments of the monitor (``mode``, ``text_interval``, …).
        other_workers_quiet: see above.
        **study_kwargs: passed to :func:`~thunderline_lab.study.run_study`.

    Raises:
        ConfigError: ``name`` is no study name (text, or an integer: taken as its text);
            ``monitor`` or ``mlflow`` is not True or False (:func:`flag`: papermill's
            ``-p monitor false`` is the text 'false').
        StudyError: a study this function started is still running in this kernel.
    """
    from thunderline_lab.bus import EventBus
    from thunderline_lab.monitor import LiveMonitor
    from thunderline_lab.study import run_study

    name = study_name(name, "name")  # papermill -p study_name 2024 gives the int 2024
    monitor = flag("monitor", monitor)  # refused with papermill's way of passing it
    if "mlflow" in study_kwargs:
        study_kwargs["mlflow"] = flag("mlflow", study_kwargs["mlflow"])
    reserved = _hold_kernel(name)  # refused while another study of ours runs
    try:
        if not monitor:
            reserved.result = run_study(name, lab=lab, gateway=gateway, **study_kwargs)
            return reserved
        bus = EventBus()
        options = dict(monitor_options or {})
        default = inspect.signature(run_study).parameters.get("n_trials")
        n_trials = study_kwargs.get("n_trials", None if default is None else default.default)
        if _is_count(n_trials):  # the monitor shows "(budget 24)"; run_study checks it
            options.setdefault("budget", n_trials)
        if gateway:  # every worker's trials, as the gateway logs them
            mon = LiveMonitor.from_gateway(gateway, None, name, bus=bus, **options)
        else:
            mon = LiveMonitor.from_store(lab, name, bus=bus, create=True, **options)
        mon.start()

        def study() -> Any:
            result = run_study(
                name, lab=lab, bus=bus, gateway=gateway, should_stop=mon.stop_event, **study_kwargs
            )
            # other workers' trials still running: the final view waits
            mon.wait_for_running_trials(quiet=other_workers_quiet)
            return result

        run = mon.run_in_background(study, wait=False)
        _hold_kernel(name, run)  # the background run holds the kernel from now on
    finally:
        reserved.done.set()  # the foreground study has ended, or its placeholder is replaced
    if mon.headless:
        run.wait()  # no frontend (papermill, nbval): the study's error is raised in this cell
    return run


def results_store(lab: Lab, gateway: str | None = None, token: str | None = None) -> TrialStore:
    """The trial store a study's results are read from: the lab's own, or, for a study that
    reported through a ``gateway``, the lab's mirror of the gateway's log brought up to date
    (:class:`~thunderline_lab.monitor.GatewayMirror`; the token defaults to
    ``$THUNDERLINE_LAB_TOKEN``).

    Raises:
        GatewayError: the gateway is unreachable, refuses the token or answers badly.
    """
    if not gateway:
        return lab.store()
    from thunderline_lab.errors import GatewayError
    from thunderline_lab.monitor import GatewayMirror

    with GatewayMirror(lab, gateway, token) as mirror:
        try:
            mirror.sync()
        except GatewayError as exc:
            spool = lab.root / "gateway-spool.jsonl"  # where run_study's client keeps them
            try:
                waiting = sum(1 for line in spool.open("rb") if line.strip())
            except OSError:
                waiting = 0
            if not waiting:
                raise
            raise GatewayError(
                f"{exc}; {waiting} event(s) of this lab's studies wait in {spool} for the "
                "gateway: they are delivered when it answers again (run the study again, or "
                "thunderline_lab.gateway.EventClient(URL, spool=that file).flush()), and the "
                "results read back then"
            ) from exc
        return mirror.store()


# The trial table's columns, those a study has: what a researcher reads first.
TRIAL_TABLE_COLUMNS = (
    "trial_id",
    "status",
    "spectral_norm",
    "spectral_norm_coeff",
    "params.pair_id",
    "metrics.val_accuracy",
    "metrics.test_accuracy",
    "metrics.test_ece",
    "metrics.fgsm_acc_0.05",
    "metrics.lipschitz_upper",
    "duration_ms",
)


def trials_table(store: TrialStore, study: str | int, top: int | None = 20) -> pd.DataFrame:
    """The study's trials, best first: the columns of :data:`TRIAL_TABLE_COLUMNS` it has,
    sorted by validation accuracy (highest first, trials without one last; by trial id while
    no trial has completed), the first ``top`` (None: all).

    Raises:
        ConfigError: ``study`` is no study name, or ``top`` is not an integer >= 1 or None.
    """
    study = study_name(study, "study")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top: expected a number of rows >= 1 (or None: all), got {top!r}")
    trials = store.trials(study=study, expand=True)
    if "metrics.best_val_accuracy" in trials:
        # a pruned trial reports only best_val_accuracy: its best epoch's value, which a
        # completed trial's val_accuracy is too (its best epoch's weights are restored)
        best = trials["metrics.best_val_accuracy"]
        own = trials.get("metrics.val_accuracy")
        trials["metrics.val_accuracy"] = best if own is None else own.fillna(best)
    columns = [c for c in TRIAL_TABLE_COLUMNS if c in trials]
    if "metrics.val_accuracy" in trials:  # (no completed trial: none has the metric)
        trials = trials.sort_values("metrics.val_accuracy", ascending=False, kind="stable")
    else:
        trials = trials.sort_values("trial_id", kind="stable")
    return trials[columns] if top is None else trials[columns].head(top)


def arm_means(
    store: TrialStore,
    study: str | int,
    metrics: str | Sequence[str] = ("val_accuracy", "test_accuracy"),
) -> pd.DataFrame:
    """Seed 001's aggregate: the mean and std of each metric over the study's completed
    trials, by SN arm (:meth:`~thunderline_lab.store.TrialStore.mean_by_spectral_norm`), side
    by side, one row per arm.

    ``n`` counts the trials of an arm; where the metrics' counts differ (a metric some
    trials lack), each has its own ``n_<metric>`` instead, and no arm is left out.

    Raises:
        ConfigError: ``study`` is no study name, or ``metrics`` is not a metric name or a
            non-empty list of names.
    """
    study = study_name(study, "study")
    names = [metrics] if isinstance(metrics, str) else metrics
    if (
        not isinstance(names, Sequence)
        or not names
        or not all(isinstance(m, str) and m for m in names)
    ):
        raise ConfigError(
            f"metrics: expected a metric name or a list of names, got {value_text(metrics)}"
        )
    names = list(dict.fromkeys(names))
    frames = [
        store.mean_by_spectral_norm(name, study=study).rename(columns={"n": f"n_{name}"})
        for name in names
    ]
    out = functools.reduce(lambda a, b: a.merge(b, on="spectral_norm", how="outer"), frames)
    counts = [f"n_{name}" for name in names]
    if all(out[c].equals(out[counts[0]]) for c in counts):  # one count of trials per arm
        out = out.drop(columns=counts[1:]).rename(columns={counts[0]: "n"})
    return out.sort_values("spectral_norm", kind="stable").reset_index(drop=True)


# The study start_study runs in this kernel, as (name, run): one at a time.
_kernel_study: tuple[str, BackgroundRun] | None = None
_kernel_lock = threading.Lock()


def _hold_kernel(name: str, run: BackgroundRun | None = None) -> BackgroundRun:
    """Record ``run`` as the kernel's study; without one, check that none runs and hold the
    kernel with a placeholder run (until ``run`` replaces it, or it is marked done).

    Raises:
        StudyError: another study started here still runs.
    """
    from thunderline_lab.monitor import BackgroundRun

    global _kernel_study
    with _kernel_lock:
        if run is None:
            held = _kernel_study
            if held is not None and held[1].running:
                raise StudyError(
                    f"study {held[0]!r} (started by start_study) is still running in this "
                    f"kernel: not starting {name!r} beside it. Stop it with run.stop() and "
                    "wait for it with run.wait() (run: what start_study returned), then run "
                    "this cell again"
                )
            run = BackgroundRun()
        _kernel_study = (name, run)
        return run


def _run_small_study(lab_root: str, study: str) -> None:
    from thunderline_lab.study import run_study

    run_study(study, lab=lab_root, **PROFILES["test"], mlflow=False)


def background_demo_study(
    lab: Lab, study: str | int, profile: str | None = None
) -> mp.process.BaseProcess | None:
    """Under the test profile, run a small real study in another process to follow.

    Returns the process (``join()`` it), or None under other profiles, where the notebook
    follows whatever study is already running in the lab.

    Raises:
        ConfigError: ``study`` is no study name (text, or an integer: taken as its text),
            or the profile is unknown.
    """
    study = study_name(study)  # as the monitor following it takes it
    if effective_profile(profile) != "test":
        return None
    lab.store().close()  # the lab exists before the monitor looks for it
    proc = mp.get_context("spawn").Process(
        target=_run_small_study, args=(str(lab.root), study), daemon=True
    )
    proc.start()
    return proc


def ensure_studies(
    lab: Lab, studies: str | int | Sequence[str | int], profile: str | None = None
) -> list[str]:
    """Under the test profile, run a small real study for each named study the lab lacks.

    Returns the names that had to be run. Under other profiles a missing study is an error,
    since comparing nothing would silently show nothing.

    Raises:
        ConfigError: a study has no trials in the lab (and the profile is not ``test``), or
            ``studies`` is not a name or a list of names (:func:`study_names`).
    """
    studies = study_names(studies)
    test = effective_profile(profile) == "test"
    if not test and not lab.db_path.exists():  # a mistyped lab_dir: create nothing there
        raise ConfigError(
            f"no trial store at {lab.db_path} (check lab_dir; a study's first events create it)"
        )
    with lab.store() as store:
        known = store.studies()
    missing = [s for s in studies if s not in known]
    if missing and not test:
        names = ", ".join(repr(m) + did_you_mean(m, known) for m in missing)
        raise ConfigError(
            f"{lab.db_path}: no trials for {names} "
            f"(studies in this lab: {', '.join(known) or 'none'})"
        )
    for study in missing:
        _run_small_study(str(lab.root), study)
    return missing

"""Batch runs: execute a study's notebook with papermill, from a ``studies/*.toml`` config.

A study config names the notebook and the parameters injected into its ``parameters``
cell::

    [study]
    name = "spectral_norm_ab"                      # Optuna study name = model run id
    notebook = "notebooks/spectral_norm_study.ipynb"
    description = "digits, MLP, paired SN on/off"  # optional
    workers = 1                                    # optional default for --workers

    [parameters]
    dataset = "digits"
    n_trials = 24

:func:`load_study_config` validates it (unknown keys, wrong types, a missing notebook, a
parameter the notebook does not declare) with errors naming the file and key.
:func:`run_batch` executes the notebook into ``lab/runs/<study>/``, with N papermill
worker processes sharing one Optuna study, while a progress line (trials done/total, best so
far, ETA) follows the lab's trial store. A failed run raises
:class:`~thunderline_lab.errors.NotebookExecutionError` naming the notebook, the failing
cell and the saved executed copy. Re-running resumes: the study keeps its finished trials.
Each trial records the batch run that ran it, so the result counts this run's trials apart
from those another run of the same study finishes at the same time.

Example:
    >>> cfg = load_study_config("studies/smoke.toml")  # doctest: +SKIP
    >>> result = run_batch(cfg, lab="lab", workers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import tomllib
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thunderline_lab.errors import ConfigError, GatewayError, NotebookExecutionError, did_you_mean
from thunderline_lab.lab import Lab

log = logging.getLogger(__name__)

__all__ = [
    "BatchInterrupted",
    "BatchResult",
    "Progress",
    "StudyConfig",
    "StudySection",
    "load_study_config",
    "notebook_parameters",
    "parse_override",
    "run_batch",
]

# Parameters the runner injects itself (the notebook must declare them).
RUNNER_PARAMETERS = ("study_name", "lab_dir", "worker_index")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# The study name names folders (lab/runs/<name>, lab/reports/<name>): no separators, and no
# leading dot, so that "." and ".." cannot point at the lab itself or outside it.
_NAME_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$"
_NAME_RULE = (
    "must be letters, digits, '_', '-' or '.', not starting with '.' "
    "(it names the folders lab/runs/<name> and lab/reports/<name>)"
)


class StudySection(_Section):
    name: str = Field(min_length=1, pattern=_NAME_PATTERN)
    notebook: str = Field(min_length=1)
    description: str = ""
    workers: int = Field(default=1, ge=1, le=64)


class _StudyFile(_Section):
    study: StudySection
    parameters: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config: the study, its notebook (resolved path) and parameters."""

    path: Path
    name: str
    notebook: Path
    parameters: dict[str, Any]
    description: str = ""
    workers: int = 1


def _shown(value: Any) -> str:
    """A value of a study config or a ``-p`` as the user wrote it: JSON (``true``,
    ``"fast"``, ``[1, 2]``), which TOML's values and ``-p``'s read as, not Python's repr
    (``True``, ``'fast'``)."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # (a mapping with keys JSON cannot hold)
        return repr(value)


def _notebook_folders(config_path: Path) -> list[Path]:
    """The folders a config's relative ``study.notebook`` is looked for in, in order: the
    current folder, the config's and its parent (a repo's ``studies/x.toml`` naming
    ``notebooks/y.ipynb``)."""
    return [Path("."), config_path.parent, config_path.parent.parent]


def _resolve_notebook(config_path: Path, notebook: str) -> Path | None:
    candidates = [Path(notebook)]
    if not Path(notebook).is_absolute():
        candidates = [folder / notebook for folder in _notebook_folders(config_path)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _missing_config_hint(path: Path) -> str:
    """A did-you-mean for a study config that does not exist (``studies/smok.toml``, or
    ``smoke`` for ``studies/smoke.toml``), and the configs of the folder it names and of the
    ``studies/`` there (not the current folder's other TOML files: ``pyproject.toml``);
    "" when there are none."""
    folders = [path.parent / "studies"]
    if path.parent != Path("."):
        folders.append(path.parent)
    configs = sorted({c for f in folders if f.is_dir() for c in f.glob("*.toml")})
    if not configs:
        return ""
    # a name without its folder or suffix (`run smoke`): the config of that name
    same = [c for c in configs if c.stem == path.name.removesuffix(path.suffix or "\0")]
    hint = (
        f" (did you mean {str(same[0])!r}?)"
        if same
        else did_you_mean(str(path), [str(c) for c in configs])
    )
    listed = ", ".join(str(c) for c in configs[:10]) + (", ..." if len(configs) > 10 else "")
    return f"{hint}; study configs found: {listed}"


def load_study_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study config (TOML).

    Raises:
        ConfigError: naming the file and the key at fault (syntax, unknown key, wrong type,
            missing notebook, parameter not declared by the notebook).
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such study config{_missing_config_hint(p)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    try:
        doc = _StudyFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = [str(x) for x in err["loc"]]
            key = ".".join(loc)
            msg = {"extra_forbidden": "unknown key", "missing": "required key missing"}.get(
                err["type"], err["msg"]
            )
            if err["type"] == "extra_forbidden":
                section = StudySection if loc[:1] == ["study"] else _StudyFile
                msg += did_you_mean(loc[-1], section.model_fields)
            elif err["type"] == "string_pattern_mismatch" and loc == ["study", "name"]:
                msg = _NAME_RULE
            shown = "" if err["type"] == "missing" else f" (got {_shown(err.get('input'))})"
            problems.append(f"{p}: {key}: {msg}{shown}")
        raise _MultiConfigError(problems) from None
    notebook = _resolve_notebook(p, doc.study.notebook)
    if notebook is None:
        looked = ""
        if not Path(doc.study.notebook).is_absolute():  # (a config copied elsewhere)
            folders = dict.fromkeys(str(f.resolve()) for f in _notebook_folders(p))
            looked = f" (a relative path is looked for in {', '.join(folders)})"
        raise ConfigError(f"{p}: study.notebook: notebook not found: {doc.study.notebook}{looked}")
    if notebook.suffix != ".ipynb":
        raise ConfigError(
            f"{p}: study.notebook: {doc.study.notebook} is not a Jupyter notebook (.ipynb)"
        )
    try:
        declared = notebook_parameters(notebook)
    except ConfigError as exc:
        raise ConfigError(f"{p}: study.notebook: {exc}") from exc
    unknown = sorted(set(doc.parameters) - set(declared))
    if unknown:
        raise ConfigError(
            f"{p}: parameters.{unknown[0]}: not a parameter of {doc.study.notebook}"
            f"{did_you_mean(unknown[0], declared)} "
            f"(its parameters cell declares: {', '.join(sorted(declared))})"
        )
    for name in RUNNER_PARAMETERS:
        if name in doc.parameters:
            raise _set_by_runner(f"{p}: parameters.{name}", p.name)
    for name, value in doc.parameters.items():
        _check_type(f"{p}: parameters.{name}", value, declared[name])
        _check_choice(f"{p}: parameters.{name}", name, value)
    _check_study_values(f"{p}: parameters.", doc.parameters)
    return StudyConfig(
        path=p.resolve(),
        name=doc.study.name,
        notebook=notebook,
        parameters=dict(doc.parameters),
        description=doc.study.description,
        workers=doc.study.workers,
    )


class _MultiConfigError(ConfigError):
    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    def lines(self) -> list[str]:
        return self.problems


# What a value must be, judged by the notebook's default for it: the notebook's code was
# written for that kind (a text where a list is iterated fails deep in a cell, a text where
# a flag is tested is silently true).
_KINDS: tuple[tuple[type | tuple[type, ...], tuple[type, ...], str], ...] = (
    (bool, (bool,), "true or false"),
    (int, (int,), "a whole number"),
    (float, (int, float), "a number"),
    (str, (str,), "text"),
    ((list, tuple), (list, tuple), "a list"),
    (dict, (dict,), "a table"),
)


def _parameter_choices(name: str) -> tuple[str, ...] | None:
    """The values a study notebook's ``dataset``, ``architecture``, ``design`` or ``profile``
    may take (None for any other parameter): a typo is refused with the config, naming its file and
    key, not by the notebook's fourth cell after a run folder was made."""
    if name == "dataset":
        from thunderline_lab.data import available_datasets

        return tuple(available_datasets())
    if name == "architecture":
        from thunderline_lab.models import ARCHITECTURES

        return tuple(ARCHITECTURES)
    if name == "design":
        from typing import get_args

        from thunderline_lab.study import Design

        return tuple(get_args(Design))
    if name == "profile":
        from thunderline_lab.notebook import PROFILES

        return tuple(PROFILES)
    return None


def _budget_split(params: Mapping[str, Any], declared: Mapping[str, Any], total: int) -> str | None:
    """The warning of a budget that leaves the last group short (``budget_split``), for the
    study's design and seeds as the config, the overrides or the notebook's defaults say."""
    from thunderline_lab.study import budget_split

    def value(name: str, default: Any) -> Any:
        if name in params:
            return params[name]
        try:
            return ast.literal_eval(str(declared[name]))
        except (KeyError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return default

    seeds, design = value("seeds", [0]), value("design", "paired")
    if not total or not isinstance(seeds, list | tuple) or not seeds:
        return None
    return budget_split(str(design), seeds, total)


def _set_by_runner(where: str, config_name: str) -> ConfigError:
    """The error for a parameter of :data:`RUNNER_PARAMETERS` given in a config or by -p."""
    return ConfigError(
        f"{where}: set by the runner (the study's name is study.name in {config_name}, "
        "the lab is --lab, worker_index counts the workers)"
    )


def _check_study_values(where: str, params: Mapping[str, Any]) -> None:
    """What the study notebook's :func:`~thunderline_lab.study.run_study` would refuse in
    every worker (a search space no trial can run, seeds that are not integers), refused
    here first; ``where`` prefixes the parameter's name (``studies/x.toml: parameters.``)."""
    from thunderline_lab.study import check_study_parameters

    try:
        check_study_parameters(params)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


def _check_choice(where: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        return  # a wrong kind is _check_type's to say
    choices = _parameter_choices(name)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
        )


def _check_type(where: str, value: Any, default_source: Any) -> None:
    """Refuse ``value`` unless it is of the kind of the notebook's default.

    ``default_source`` is the default as written in the parameters cell; a default that is
    ``None`` or an expression (not a literal) accepts anything.

    Raises:
        ConfigError: naming ``where``, the kind expected and the value.
    """
    try:
        default = ast.literal_eval(str(default_source))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return
    for kind, accepted, label in _KINDS:
        if isinstance(default, kind):
            ok = isinstance(value, accepted) and not (isinstance(value, bool) and kind is not bool)
            if not ok:
                hint = (
                    f"; -p reads VALUE as JSON, text in quotes: '\"{value}\"'"
                    if kind is str and where.startswith("-p ")
                    else ""
                )
                raise ConfigError(
                    f"{where}: must be {label}, as the notebook's default {default_source} "
                    f"(got {_shown(value)}{hint})"
                )
            return


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, Any]:
    """The names (and inferred defaults) declared in a notebook's ``parameters`` cell.

    Raises:
        ConfigError: the notebook cannot be read or has no ``parameters`` cell.
    """
    import papermill

    try:
        with warnings.catch_warnings():  # its "does not end in .ipynb" warning: ours is better
            warnings.simplefilter("ignore", UserWarning)
            declared = papermill.inspect_notebook(str(notebook))
    except Exception as exc:  # papermill raises several kinds for unreadable notebooks
        raise ConfigError(f"{notebook}: cannot inspect notebook: {exc}") from exc
    if not declared:
        raise ConfigError(f"{notebook}: no cell tagged 'parameters'")
    return {name: info.get("default") for name, info in declared.items()}


def parse_override(name: str, value: str) -> tuple[str, Any]:
    """A ``-p NAME VALUE`` override: VALUE read as JSON (numbers, true, lists), else text."""
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


@dataclass
class BatchResult:
    """What a batch run produced."""

    config: StudyConfig
    lab: Lab
    outputs: list[Path]
    elapsed_s: float
    counts: dict[str, int] = field(default_factory=dict)
    best: float | None = None
    counts_before: dict[str, int] = field(default_factory=dict)
    total: int = 0
    gateway: str | None = None  # the study reported through this gateway
    store_path: Path | None = None  # the store its results are in (a gateway's: the mirror)
    batch_id: str | None = None  # this run's trials carry it (Optuna user attr "batch_id")
    # this run's trials by status (as ``counts``), from the lab's Optuna journal; None when
    # unknown (no journal, or the notebook keeps its study elsewhere)
    this_run: dict[str, int] | None = None

    @property
    def done_before(self) -> int:
        """Trials the study had finished before this run (it resumed them)."""
        return _done(self.counts_before)

    @property
    def done_total(self) -> int:
        """Trials the study has finished: before this run, by it, and by any other run."""
        return _done(self.counts)

    @property
    def done_now(self) -> int:
        """Trials this run finished (0: the study had nothing left to run).

        Its own trials (``this_run``), not those another run of the same study finished
        meanwhile; when they are unknown, the study's finished trials now less before.
        """
        if self.this_run is not None:
            return _done(self.this_run)
        return max(self.done_total - self.done_before, 0)

    @property
    def failed_now(self) -> int:
        """Trials this run finished as failed (diverged, errors), counted as :attr:`done_now`."""
        if self.this_run is not None:
            return self.this_run.get("failed", 0)
        return max(self.counts.get("failed", 0) - self.counts_before.get("failed", 0), 0)


class BatchInterrupted(KeyboardInterrupt):
    """A batch run stopped by Ctrl-C (or SIGTERM): its workers were stopped first.

    A :class:`KeyboardInterrupt`, not a ``ThunderlineLabError``: nothing is wrong, the user
    asked to stop, and code that knows nothing of batch runs stops as on any Ctrl-C. It
    carries what the run got done (``result``: counts, executed copies) so the CLI can say
    where things stand; the study keeps its finished trials and the next run resumes it.
    """

    def __init__(self, result: BatchResult) -> None:
        super().__init__(f"batch run of study {result.config.name} interrupted")
        self.result = result


def _done(counts: Mapping[str, int]) -> int:
    # what counts toward n_trials (run_study): stale and cancelled trials are retried
    return sum(counts.get(s, 0) for s in ("completed", "pruned", "failed"))


@dataclass
class Progress:
    """A progress line that stays readable when output is not a terminal.

    On a TTY the line is redrawn in place; otherwise a line is printed when the count of
    finished trials changes, at most every ``every_s`` seconds.
    """

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    every_s: float = 10.0
    done_before: int = 0  # trials a resumed study had finished: not this run's pace
    _last_print: float = 0.0
    _last_done: int = -1
    _last_state: str = ""
    _start: float = field(default_factory=lambda: time.monotonic())
    # (time, finished count) when this run's first trial finished: the pace is taken from
    # there on, not from the start, whose kernel start-up and imports no later trial pays
    # (measured from the start, 1 trial in 10 s of a 24-trial study read "ETA 242s" for a
    # study that ended 38 s later)
    _first: tuple[float, int] | None = None

    def update(self, counts: Mapping[str, int], best: float | None, *, final: bool = False) -> None:
        done = _done(counts)
        now = time.monotonic()
        if self._first is None and done > self.done_before:  # (a line printed or not)
            self._first = (now, done)
        tty = self.stream.isatty()
        if (
            not final
            and not tty
            and (done == self._last_done or now - self._last_print < self.every_s)
        ):
            return
        elapsed = now - self._start
        rate = 0.0  # no pace yet: until a second trial of this run finishes
        if self._first is not None and done > self._first[1] and now > self._first[0]:
            rate = (done - self._first[1]) / (now - self._first[0])
        left = max(self.total - done, 0)
        eta = f"{left / rate:,.0f}s" if rate > 0 and left else "-"
        best_txt = f"{best:.4f}" if best is not None else "-"
        state = (
            f"trials {done}/{self.total} (completed {counts.get('completed', 0)}, pruned "
            f"{counts.get('pruned', 0)}, failed {counts.get('failed', 0)}, running "
            f"{counts.get('running', 0)}"
            + "".join(f", {s} {counts[s]}" for s in ("stale", "cancelled") if counts.get(s))
            + f") | best val_accuracy {best_txt}"
        )
        if final and not tty and state == self._last_state:
            return  # the last line printed already says it
        self._last_state = state
        line = f"{state} | elapsed {elapsed:,.0f}s | ETA {eta}"
        if tty and not final:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(("\r" if tty else "") + line + "\n")
        self.stream.flush()
        self._last_print, self._last_done = now, done


class _Status:
    """A study's trial counts and best value, from the lab's store or, for a study that
    reports through a gateway, from the lab's mirror of the gateway's log (synced on each
    read; a gateway that stops answering leaves the last counts, with one warning)."""

    def __init__(self, lab: Lab, study: str, gateway: str | None) -> None:
        self.study = study
        self.mirror: Any = None
        self.db_path = lab.db_path
        self._warned = False
        if gateway:
            from thunderline_lab.monitor import GatewayMirror

            self.mirror = GatewayMirror(lab, gateway)
            self.db_path = self.mirror.path
            try:
                self.mirror.sync()  # unreachable, a refused token: said before any work
                _check_same_study(lab, study, gateway, self.mirror.path)
            except ConfigError:
                self.mirror.close()
                raise
            except GatewayError as exc:
                self.mirror.close()
                reason = str(exc).removeprefix(f"{self.mirror.source.label}: ")
                raise GatewayError(
                    f"study {study} reports through the gateway {gateway}: {reason} (is it "
                    "running, `thunderline-lab serve`? is the URL right? does "
                    "$THUNDERLINE_LAB_TOKEN hold its token?)"
                ) from exc

    def read(self) -> tuple[dict[str, int], float | None]:
        if self.mirror is not None:
            try:
                self.mirror.sync()
            except GatewayError as exc:
                if not self._warned:
                    log.warning("progress: %s (counts as last synced)", exc)
                    self._warned = True
        return _study_status(self.db_path, self.study)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()


def _check_same_study(lab: Lab, study: str, gateway: str, mirror: Path) -> None:
    """Refuse to run a study through a gateway that already holds trials of that name which
    this lab's Optuna study never ran (another worker lab, another machine): its trial ids
    would start again at 0 and overwrite those trials at the gateway.

    Raises:
        ConfigError: naming the study, the gateway and what to do instead.
    """
    counts, _ = _study_status(mirror, study)
    at_gateway = sum(counts.values())
    if not at_gateway or _local_study_trials(lab, study):
        return
    raise ConfigError(
        f"study {study}: the gateway {gateway} already holds {at_gateway} trial(s) of a study "
        f"of that name, which this lab's Optuna study ({lab.optuna_journal}) never ran "
        "(another worker lab or machine): running it here would overwrite them. Give this "
        "study another name, run it from the lab that started it, or point every worker at "
        "one shared Optuna storage (run_study(storage=...), docs/scaling-out.md)"
    )


# The study notebook's parameters that run_study keeps as the study's settings (Optuna user
# attrs), and refuses to change when it resumes the study.
_SETTING_PARAMETERS = (
    "dataset",
    "architecture",
    "design",
    "seeds",
    "search_space",
    "conv_sn_modes",
    "epochs",
)


def _check_study_settings(
    config: StudyConfig,
    lab: Lab,
    params: Mapping[str, Any],
    declared: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> None:
    """Refuse, before any worker starts, to resume a study with other settings than it was
    made with (``epochs``, ``dataset``, ...), as each worker's ``run_study`` would: it raised
    in the notebook after the "resuming" line, leaving a failed executed copy in ``runs/``.

    The study's settings are read from the lab's Optuna journal. Only a notebook declaring
    every parameter run_study makes them from (the study notebook's) is checked: how another
    notebook calls run_study is its own.

    Raises:
        ConfigError: naming where the changed value came from (``-p epochs``, the config's
            ``parameters.epochs``), with run_study's own message.
    """
    if not lab.optuna_journal.exists() or not set(_SETTING_PARAMETERS) <= set(declared):
        return
    from thunderline_lab.study import settings_change, study_settings

    values = dict(params)
    try:
        for name in _SETTING_PARAMETERS:
            if name not in values:  # the notebook's default, as the source text papermill read
                values[name] = ast.literal_eval(str(declared[name]))
        epochs, profiled = values["epochs"], ""
        if "profile" in declared:  # the notebook runs its profile's epochs (apply_profile)
            from thunderline_lab.notebook import apply_profile, effective_profile

            profile = values.get("profile", ast.literal_eval(str(declared["profile"])))
            epochs = apply_profile({"epochs": epochs}, profile)["epochs"]
            if epochs != values["epochs"]:
                profiled = f" (the {effective_profile(profile)} profile runs epochs={epochs})"
        # as the study notebook passes them on to run_study, and run_study keeps them
        now = study_settings(
            dataset=values["dataset"],
            architecture=values["architecture"],
            design=values["design"],
            seeds=values["seeds"],
            search_space=values["search_space"],
            conv_sn_modes=values["conv_sn_modes"],
            epochs=epochs,
        )
    except (ValueError, SyntaxError, ConfigError):
        return  # a default that is an expression, a bad value: the notebook decides
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(lab.optuna_journal)))
        have = storage.get_study_user_attrs(storage.get_study_id_from_name(config.name))
    except KeyError:  # a new study
        return
    except Exception as exc:  # unreadable: the study run will say what is wrong
        log.warning(
            "cannot read study %s's settings in %s: %s", config.name, lab.optuna_journal, exc
        )
        return
    change = settings_change(config.name, have, now)  # the rule of run_study's resume
    if change is not None:
        key, message = change
        # the parameters the setting is made from, by where they were given
        names = ("search_space", "conv_sn_modes") if key == "search_space" else (key,)
        where = next(
            (f"-p {n}" for n in names if n in overrides),
            next(
                (f"{config.path}: parameters.{n}" for n in names if n in config.parameters),
                f"{config.notebook.name}: {names[0]}",  # (the notebook's default)
            ),
        ) + (profiled if key == "epochs" else "")
        raise ConfigError(f"{where}: {message}")


def _local_study_trials(lab: Lab, study: str) -> int:
    """How many trials the lab's Optuna journal holds for ``study`` (0 without one)."""
    if not lab.optuna_journal.exists():
        return 0
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(lab.optuna_journal)))
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception:  # an unreadable journal: the study run will say what is wrong
        return 1
    return next((s.n_trials for s in summaries if s.study_name == study), 0)


def _batch_counts(lab: Lab, study: str, batch_id: str) -> dict[str, int] | None:
    """The trials of ``study`` that the batch run ``batch_id`` ran, by status as
    :func:`_study_status` counts them, from the lab's Optuna journal (each trial carries the
    batch id of the run that ran it: :data:`~thunderline_lab.study.BATCH_ATTR`).

    A trial failed as stale (its worker died) counts as ``stale``, not ``failed``: its retry is
    a trial of its own, counted for the run that ran it, so no trial is counted twice. A
    study that reports through a gateway keeps its Optuna study in the lab's journal too.

    Returns:
        The counts (statuses with none left out), or None when the journal cannot be read or
        does not hold the study (a notebook that keeps it in another Optuna storage).
    """
    if not lab.optuna_journal.exists():
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from thunderline_lab.study import BATCH_ATTR, count_trials

    try:
        storage = JournalStorage(JournalFileBackend(str(lab.optuna_journal)))
        trials = storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False)
    except KeyError:  # not in the journal: the study lives in another storage
        return None
    except Exception as exc:  # unreadable: the store's counts must do
        log.warning("cannot count this run's trials in %s: %s", lab.optuna_journal, exc)
        return None
    counts = count_trials([t for t in trials if t.user_attrs.get(BATCH_ATTR) == batch_id])
    counts.pop("finished")  # (a sum of three statuses, not a status)
    return {status: n for status, n in counts.items() if n}


def _study_status(db_path: Path, study: str) -> tuple[dict[str, int], float | None]:
    if not db_path.exists():
        return {}, None
    import sqlite3

    # a trial failed as stale (its worker died) is retried: counted apart
    sql = (
        "SELECT CASE WHEN status = 'failed' AND error_type = 'stale' THEN 'stale' "
        "ELSE status END AS s, COUNT(*), MAX({best}) FROM trials WHERE study = ? GROUP BY s"
    )
    best = "json_extract(metrics, '$.val_accuracy')"
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            try:
                rows = conn.execute(sql.format(best=best), (study,)).fetchall()
            except sqlite3.OperationalError as exc:
                if "malformed JSON" not in str(exc):
                    raise
                # a NaN written into a trial's metrics out of band (SQLite before 3.42
                # refuses the token): that trial has no best value, the others count
                best = f"CASE WHEN json_valid(metrics) THEN {best} END"
                rows = conn.execute(sql.format(best=best), (study,)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}, None
    counts = {status: n for status, n, _ in rows}
    bests = [b for status, _, b in rows if status == "completed" and b is not None]
    return counts, (max(bests) if bests else None)


def _source_cell_index(notebook: str, index: int) -> int:
    """The failing cell's index in the source notebook.

    papermill's index counts the injected-parameters cell it adds after the ``parameters``
    cell; the saved copy also carries papermill's error banners, so the source notebook's
    numbering is the one a researcher can find.
    """
    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return index
    for i, cell in enumerate(cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return index - 1 if index > i else index
    return index


def _kernel_transport() -> str:
    """``THUNDERLINE_LAB_KERNEL_TRANSPORT``: ``ipc`` (the default) or ``tcp``.

    Raises:
        ConfigError: any other value.
    """
    transport = os.environ.get("THUNDERLINE_LAB_KERNEL_TRANSPORT", "ipc").strip().lower()
    if transport not in ("ipc", "tcp"):
        raise ConfigError(
            f"THUNDERLINE_LAB_KERNEL_TRANSPORT={transport!r}: expected 'ipc' or 'tcp'"
        )
    return transport


def _kernel_manager_class() -> type[Any] | None:
    """The worker kernels' manager: IPC transport (Unix sockets in the user's private
    Jupyter runtime folder) where there is one, so that a study's code and outputs do not
    travel as plain text over loopback TCP, which any local user could listen to (and
    ipykernel warns about on every start); None elsewhere: papermill's default.
    ``THUNDERLINE_LAB_KERNEL_TRANSPORT=tcp`` keeps TCP (a runtime folder on a file system
    without Unix sockets)."""
    if os.name != "posix" or _kernel_transport() == "tcp":
        return None
    import uuid

    # the async manager, as papermill's default: nbclient polls an async client for the
    # kernel's death between messages; a blocking client (KernelManager's) holds its event
    # loop in the reply wait, so a killed kernel hung the run for good
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    runtime = jupyter_runtime_dir()
    # A Unix socket path holds ~107 bytes; "<runtime>/tl-<12 hex>-ipc-<port>" must fit.
    if len(os.fsencode(runtime)) > 80:
        return None
    try:
        os.makedirs(runtime, mode=0o700, exist_ok=True)
    except OSError:
        return None

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            # Each kernel its own socket files: the default name ("kernel-ipc" in the
            # working folder) is shared by the workers of a study, which would then
            # connect to each other's kernels.
            kwargs.setdefault("ip", os.path.join(runtime, f"tl-{uuid.uuid4().hex[:12]}-ipc"))
            super().__init__(**kwargs)

    return IPCKernelManager


def _execute(notebook: str, output: str, parameters: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Run one papermill worker (in a child process); returns an error description or {}."""
    import papermill
    from jupyter_client.manager import AsyncKernelManager
    from papermill.exceptions import PapermillExecutionError

    base: type[Any] = _kernel_manager_class() or AsyncKernelManager

    class TrackedKernelManager(base):
        """The kernel manager, kept where :func:`_interrupt_kernel` can reach it."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            _KERNELS.append(self)

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts a kernel before asking it to shut down; the idle
            # kernel of a finished notebook then logs "[IPKernelApp] ERROR | KeyboardInterrupt
            # caught in kernel." into every run's output, an error that is none. A kernel
            # still busy at shutdown is killed after the shutdown request's grace time.
            if getattr(self, "shutting_down", False):
                return
            await super()._async_interrupt_kernel()

    engine_options: dict[str, Any] = {"kernel_manager_class": TrackedKernelManager}
    try:
        papermill.execute_notebook(
            notebook,
            output,
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            cwd=cwd,
            **engine_options,
        )
    except PapermillExecutionError as exc:
        return {
            "cell_index": exc.cell_index,
            "source_index": _source_cell_index(notebook, exc.cell_index),
            "first_line": (exc.source or "").strip().splitlines()[0][:80] if exc.source else "",
            "ename": exc.ename,
            "evalue": exc.evalue,
        }
    except Exception as exc:  # kernel died, notebook unreadable, ...
        return {"cell_index": None, "ename": type(exc).__name__, "evalue": str(exc)}
    return {}


def _n_trials(
    config: StudyConfig,
    params: Mapping[str, Any],
    declared: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> int:
    """The study's trial budget (for the progress line), refused unless a whole number >= 1.

    A notebook with a ``profile`` parameter runs the budget of its profile
    (:func:`thunderline_lab.notebook.apply_profile`: ``$THUNDERLINE_LAB_PROFILE=test`` runs
    4 trials whatever ``n_trials`` says), so the progress total is that budget too.
    """
    if "n_trials" in params:
        value = params["n_trials"]
    else:  # the notebook's default, as the source text papermill read
        try:
            value = ast.literal_eval(str(declared.get("n_trials") or 0))
        except (ValueError, SyntaxError):
            return 0  # an expression: no progress total, the notebook decides
        if value == 0:
            return 0  # not declared: no progress total
    # an int only: floats (1e300, NaN) are refused by the notebook's study, or break int()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = "-p n_trials" if "n_trials" in overrides else f"{config.path}: parameters.n_trials"
        raise ConfigError(f"{where}: must be a whole number of trials >= 1 (got {_shown(value)})")
    if "profile" in declared:
        from thunderline_lab.notebook import apply_profile

        try:
            profile = params.get("profile", ast.literal_eval(str(declared["profile"])))
        except (ValueError, SyntaxError):
            profile = None
        value = apply_profile({"n_trials": value}, profile)["n_trials"]
    return int(value)


# This worker process's kernel managers (one per papermill run), for an interrupt to reach.
_KERNELS: list[Any] = []

# The runner asks a worker to stop with this signal, not SIGINT: during a run nbclient takes
# SIGINT over and shuts the kernel down mid-cell, which the kernel reports as tracebacks
# ("Socket operation on non-socket") while the study's running trials die with it.
_STOP_SIGNAL = getattr(signal, "SIGUSR1", signal.SIGINT)


def _interrupt_kernel(signum: int, frame: Any) -> None:
    """Interrupt the worker's kernel as Jupyter's ■ does: the running cell raises
    KeyboardInterrupt (the study records its running trials as cancelled and stops), the
    notebook fails in that cell, papermill saves the executed copy and shuts the kernel down.
    No kernel yet (still starting): stop the worker here."""
    for km in _KERNELS:
        pid = getattr(km.provisioner, "pid", None) if km.has_kernel else None
        if pid:
            os.kill(pid, signal.SIGINT)
            return
    raise KeyboardInterrupt


def _worker(
    conn: Any,
    notebook: str,
    output: str,
    parameters: dict[str, Any],
    cwd: str,
    env: Mapping[str, str],
) -> None:
    """A worker process: run :func:`_execute` and send its result to the runner.

    ``env`` is added to the worker's environment, which the kernel papermill starts
    inherits (the batch run's id: :data:`~thunderline_lab.study.BATCH_ENV`).

    The worker leaves the runner's process group, so a Ctrl-C in the terminal reaches the
    runner alone, which passes it on once to every worker (papermill then shuts its kernel
    down; the study records the running trials as cancelled, to be retried). A worker whose
    runner died (killed outright) stops the same way instead of running the study on
    unseen.
    """
    if hasattr(os, "setpgid"):
        # a session leader already, or not allowed: stay in the group
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    signal.signal(_STOP_SIGNAL, _interrupt_kernel)
    runner = os.getppid()

    def stop_when_orphaned() -> None:
        while os.getppid() == runner:
            time.sleep(1.0)
        os.kill(os.getpid(), _STOP_SIGNAL)
        time.sleep(30.0)  # the cell did not give way: shut the kernel down (nbclient)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    os.environ.update(env)
    try:
        result = _execute(notebook, output, parameters, cwd)
    except KeyboardInterrupt:  # stopped before papermill took the signal over
        result = {"cell_index": None, "ename": "KeyboardInterrupt", "evalue": "interrupted"}
    try:
        conn.send(result)
    finally:
        conn.close()


def _reserve_outputs(out_dir: Path, stem: str, n_workers: int) -> list[Path]:
    """Names for the workers' executed copies, ``<stem>-<UTC time>-w<i>.ipynb``, made
    empty files at once so that a run started in the same second (another terminal, a
    quick re-run) takes ``<stem>-<time>-2-w<i>`` instead of overwriting them."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        tag = stamp if attempt == 1 else f"{stamp}-{attempt}"
        paths = [out_dir / f"{stem}-{tag}-w{i}.ipynb" for i in range(n_workers)]
        made: list[Path] = []
        try:
            for path in paths:
                path.open("x").close()
                made.append(path)
        except FileExistsError:
            for path in made:
                path.unlink(missing_ok=True)
            continue
        return paths
    raise ConfigError(f"{out_dir}: cannot find a free name for the executed notebooks")


def _stop_workers(procs: Sequence[Any], grace_s: float = 30.0) -> None:
    """Pass an interrupt on to the workers and wait for them to end.

    ``_STOP_SIGNAL`` first (the worker interrupts its kernel: see :func:`_interrupt_kernel`);
    after ``grace_s`` seconds, or at a second Ctrl-C, SIGTERM (papermill shuts the kernel
    down), then SIGKILL.
    """
    from multiprocessing.connection import wait

    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, _STOP_SIGNAL)
    for action in ("terminate", "kill", None):
        deadline = time.monotonic() + grace_s
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: harder at once
        if action is None or not any(p.is_alive() for p in procs):
            break
        for p in procs:
            if p.is_alive():
                getattr(p, action)()
        grace_s = 10.0
    for p in procs:
        p.join(timeout=5.0)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (CI cancel, timeout): stop the workers as for Ctrl-C


def run_batch(
    config: StudyConfig,
    *,
    lab: str | os.PathLike[str] | Lab | None = None,
    workers: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    on_output: Callable[[Path], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> BatchResult:
    """Execute the study's notebook with papermill, ``workers`` processes on one study.

    ``on_start`` is called once the run is accepted (overrides, the budget and the gateway
    checked), just before the lab is created and the workers start.

    Raises:
        ConfigError: an override names a parameter the notebook does not declare (or one
            the runner sets), has the wrong kind of value, or
            ``THUNDERLINE_LAB_KERNEL_TRANSPORT`` is neither ``ipc`` nor ``tcp``.
        NotebookExecutionError: a worker's notebook failed; names notebook, cell and copy.
        BatchInterrupted: Ctrl-C or SIGTERM; the workers were stopped first.
        GatewayError: the study reports through a gateway (its ``gateway`` parameter) that
            does not answer, or refuses the token (``$THUNDERLINE_LAB_TOKEN``): said before
            any worker starts. The progress line then follows the lab's mirror of the
            gateway's log (:class:`~thunderline_lab.monitor.GatewayMirror`).
    """
    _kernel_transport()  # a bad setting is refused here, not in each worker
    lab_obj = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    n_workers = workers or config.workers
    declared = notebook_parameters(config.notebook)
    params = {**config.parameters, **(overrides or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(
            f"-p {unknown[0]}: not a parameter of {config.notebook.name}"
            f"{did_you_mean(unknown[0], declared)} "
            f"(its parameters cell declares: {', '.join(sorted(declared))})"
        )
    missing = [p for p in RUNNER_PARAMETERS if p not in declared]
    if missing:
        raise ConfigError(f"{config.notebook}: parameters cell must declare {', '.join(missing)}")
    for name, value in (overrides or {}).items():
        if name in RUNNER_PARAMETERS:
            raise _set_by_runner(f"-p {name}", config.path.name)
        _check_type(f"-p {name}", value, declared[name])
        _check_choice(f"-p {name}", name, value)
    if overrides:
        _check_study_values("-p ", params)
    total = _n_trials(config, params, declared, overrides or {})
    gateway = params.get("gateway") or None
    if gateway is not None:  # before any worker, named where it was set
        from thunderline_lab.gateway import _check_url

        try:
            _check_url(gateway)
        except GatewayError as exc:
            where = (
                "-p gateway (or --gateway)"
                if "gateway" in (overrides or {})
                else f"{config.path}: parameters.gateway"
            )
            raise ConfigError(f"{where}: {exc}") from None
    _check_study_settings(config, lab_obj, params, declared, overrides or {})
    status = _Status(lab_obj, config.name, gateway)
    if on_start is not None:
        on_start()
    lab_obj.ensure()  # only once the run is known to be acceptable
    try:
        return _run_workers(
            config,
            lab_obj,
            params,
            n_workers,
            total,
            status,
            progress,
            stream,
            on_output,
            _budget_split(params, declared, total),
        )
    finally:
        status.close()


def _run_workers(
    config: StudyConfig,
    lab_obj: Lab,
    params: dict[str, Any],
    n_workers: int,
    total: int,
    status: _Status,
    progress: bool,
    stream: TextIO | None,
    on_output: Callable[[Path], None] | None,
    split: str | None = None,
) -> BatchResult:
    params.update(study_name=config.name, lab_dir=str(lab_obj.root))
    out_dir = lab_obj.runs_dir / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = _reserve_outputs(out_dir, config.notebook.stem, n_workers)
    out_stream = stream or sys.stderr
    counts_before, _ = status.read()
    if progress and _done(counts_before):
        left = f" of {total}" if total else ""
        out_stream.write(
            f"resuming study {config.name}: {_done(counts_before)}{left} trials already "
            "finished are kept\n"
        )
    if progress and total and split is not None:  # (each worker's log says so too)
        out_stream.write(f"warning: study {config.name}: {split}\n")
    bar = (
        Progress(total, stream=out_stream, done_before=_done(counts_before))
        if progress and total
        else None
    )
    cwd = str(config.notebook.parent)
    started = time.monotonic()
    from thunderline_lab.study import BATCH_ENV

    # Each trial the workers run carries this id, so the run tells its own trials from those
    # of another run of the study at the same time (whose trials the store's counts hold too).
    batch_id = uuid.uuid4().hex

    def result_so_far() -> BatchResult:
        counts, best = status.read()
        return BatchResult(
            config=config,
            lab=lab_obj,
            outputs=[o for o in outputs if o.exists()],
            elapsed_s=time.monotonic() - started,
            counts=counts,
            best=best if best is None or math.isfinite(best) else None,
            counts_before=counts_before,
            total=total,
            gateway=params.get("gateway") or None,
            store_path=status.db_path,
            batch_id=batch_id,
            this_run=_batch_counts(lab_obj, config.name, batch_id),
        )

    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main else None
    try:
        try:
            for i, out in enumerate(outputs):
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker,
                    args=(
                        send,
                        str(config.notebook),
                        str(out),
                        {**params, "worker_index": i},
                        cwd,
                        {BATCH_ENV: batch_id},
                    ),
                    name=f"{config.name}-w{i}",
                )
                proc.start()
                send.close()
                procs.append(proc)
                pipes.append(recv)
            while any(p.is_alive() for p in procs):
                wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
                if bar is not None:
                    bar.update(*status.read())
        except KeyboardInterrupt:
            out_stream.write(
                f"\ninterrupted: stopping {len(procs)} worker(s) of study {config.name} "
                "(Ctrl-C again to stop them at once)\n"
            )
            out_stream.flush()
            _stop_workers(procs)
            for out in outputs:  # names reserved for workers that never wrote
                if out.exists() and out.stat().st_size == 0:
                    out.unlink()
            raise BatchInterrupted(result_so_far()) from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    results: list[dict[str, Any]] = []
    for proc, recv in zip(procs, pipes, strict=True):
        proc.join()
        try:
            res: dict[str, Any] | None = recv.recv() if recv.poll() else None
        except (EOFError, OSError):  # the pipe's end closed with nothing in it
            res = None
        if res is None:  # killed (out of memory, kill -9) before it could say anything
            res = {
                "cell_index": None,
                "ename": "WorkerDied",
                "evalue": f"the worker process ended with exit code {proc.exitcode}",
            }
        results.append(res)
        recv.close()
    result = result_so_far()
    if bar is not None:
        bar.update(result.counts, result.best, final=True)
    for out, res in zip(outputs, results, strict=True):
        if res:
            cell = res.get("cell_index")
            if res.get("ename") == "DeadKernelError":
                where = "a cell whose kernel died (killed, or out of memory)"
            elif res.get("ename") == "WorkerDied":
                where = "its worker process (killed, or out of memory)"
            elif cell is None:
                where = "kernel start-up"
            else:
                where = f"cell {res['source_index']}"
                if res.get("first_line"):
                    where += f" ({res['first_line']!r})"
            failed = result.failed_now
            trials = (
                f"; {failed} trial(s) of this run failed: thunderline-lab trials --lab "
                f"{lab_obj.root} --study {config.name} --status failed --format json shows why"
                if failed > 0
                else ""
            )
            saved = (
                f"executed copy saved at {out}"
                if out.exists() and out.stat().st_size
                else f"no executed copy (the worker ended before writing {out})"
            )
            raise NotebookExecutionError(
                f"notebook {config.notebook} failed in {where} "
                f"({res.get('ename')}: {res.get('evalue')}); {saved}{trials}"
            )
        if on_output is not None:
            on_output(out)
    return result

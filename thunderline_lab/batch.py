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

Example:
    >>> cfg = load_study_config("studies/smoke.toml")  # doctest: +SKIP
    >>> result = run_batch(cfg, lab="lab", workers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import json
import math
import multiprocessing as mp
import os
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thunderline_lab.errors import ConfigError, NotebookExecutionError
from thunderline_lab.lab import Lab

__all__ = [
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


class StudySection(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
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


def _resolve_notebook(config_path: Path, notebook: str) -> Path | None:
    candidates = [Path(notebook)]
    if not Path(notebook).is_absolute():
        candidates += [config_path.parent / notebook, config_path.parent.parent / notebook]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


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
        raise ConfigError(f"{p}: no such study config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    try:
        doc = _StudyFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(x) for x in err["loc"])
            msg = {"extra_forbidden": "unknown key", "missing": "required key missing"}.get(
                err["type"], err["msg"]
            )
            shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
            problems.append(f"{p}: {key}: {msg}{shown}")
        raise _MultiConfigError(problems) from None
    notebook = _resolve_notebook(p, doc.study.notebook)
    if notebook is None:
        raise ConfigError(f"{p}: study.notebook: notebook not found: {doc.study.notebook}")
    declared = notebook_parameters(notebook)
    unknown = sorted(set(doc.parameters) - set(declared))
    if unknown:
        raise ConfigError(
            f"{p}: parameters.{unknown[0]}: not a parameter of {doc.study.notebook} "
            f"(its parameters cell declares: {', '.join(sorted(declared))})"
        )
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


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, Any]:
    """The names (and inferred defaults) declared in a notebook's ``parameters`` cell.

    Raises:
        ConfigError: the notebook cannot be read or has no ``parameters`` cell.
    """
    import papermill

    try:
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


@dataclass
class Progress:
    """A progress line that stays readable when output is not a terminal.

    On a TTY the line is redrawn in place; otherwise a line is printed when the count of
    finished trials changes, at most every ``every_s`` seconds.
    """

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    every_s: float = 10.0
    _last_print: float = 0.0
    _last_done: int = -1
    _last_state: str = ""
    _start: float = field(default_factory=time.monotonic)

    def update(self, counts: Mapping[str, int], best: float | None, *, final: bool = False) -> None:
        # what counts toward n_trials (run_study): stale and cancelled trials are retried
        done = sum(counts.get(s, 0) for s in ("completed", "pruned", "failed"))
        now = time.monotonic()
        tty = self.stream.isatty()
        if (
            not final
            and not tty
            and (done == self._last_done or now - self._last_print < self.every_s)
        ):
            return
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
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


def _study_status(lab: Lab, study: str) -> tuple[dict[str, int], float | None]:
    if not lab.db_path.exists():
        return {}, None
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{lab.db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                # a trial failed as stale (its worker died) is retried: counted apart
                "SELECT CASE WHEN status = 'failed' AND error_type = 'stale' THEN 'stale' "
                "ELSE status END AS s, COUNT(*), MAX(json_extract(metrics, '$.val_accuracy')) "
                "FROM trials WHERE study = ? GROUP BY s",
                (study,),
            ).fetchall()
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
    from papermill.exceptions import PapermillExecutionError

    engine_options: dict[str, Any] = {}
    manager = _kernel_manager_class()
    if manager is not None:
        engine_options["kernel_manager_class"] = manager
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
    """The study's trial budget (for the progress line), refused unless a whole number."""
    if "n_trials" in params:
        value = params["n_trials"]
    else:  # the notebook's default, as the source text papermill read
        try:
            value = ast.literal_eval(str(declared.get("n_trials") or 0))
        except (ValueError, SyntaxError):
            return 0  # an expression: no progress total, the notebook decides
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        where = "-p n_trials" if "n_trials" in overrides else f"{config.path}: parameters.n_trials"
        raise ConfigError(f"{where}: must be a whole number of trials (got {value!r})")
    return int(value)


def run_batch(
    config: StudyConfig,
    *,
    lab: str | os.PathLike[str] | Lab | None = None,
    workers: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    on_output: Callable[[Path], None] | None = None,
) -> BatchResult:
    """Execute the study's notebook with papermill, ``workers`` processes on one study.

    Raises:
        ConfigError: an override names a parameter the notebook does not declare, or
            ``THUNDERLINE_LAB_KERNEL_TRANSPORT`` is neither ``ipc`` nor ``tcp``.
        NotebookExecutionError: a worker's notebook failed; names notebook, cell and copy.
    """
    _kernel_transport()  # a bad setting is refused here, not in each worker
    lab_obj = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    n_workers = workers or config.workers
    declared = notebook_parameters(config.notebook)
    params = {**config.parameters, **(overrides or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(
            f"-p {unknown[0]}: not a parameter of {config.notebook.name} "
            f"(its parameters cell declares: {', '.join(sorted(declared))})"
        )
    missing = [p for p in RUNNER_PARAMETERS if p not in declared]
    if missing:
        raise ConfigError(f"{config.notebook}: parameters cell must declare {', '.join(missing)}")
    total = _n_trials(config, params, declared, overrides or {})
    lab_obj.ensure()  # only once the run is known to be acceptable
    params.update(study_name=config.name, lab_dir=str(lab_obj.root))
    out_dir = lab_obj.runs_dir / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outputs = [out_dir / f"{config.notebook.stem}-{stamp}-w{i}.ipynb" for i in range(n_workers)]
    bar = Progress(total, stream=stream or sys.stderr) if progress and total else None
    cwd = str(config.notebook.parent)
    started = time.monotonic()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures: list[Future[dict[str, Any]]] = [
            pool.submit(
                _execute, str(config.notebook), str(out), {**params, "worker_index": i}, cwd
            )
            for i, out in enumerate(outputs)
        ]
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            if bar is not None:
                bar.update(*_study_status(lab_obj, config.name))
        results = [f.result() for f in futures]
    counts, best = _study_status(lab_obj, config.name)
    if bar is not None:
        bar.update(counts, best, final=True)
    for out, res in zip(outputs, results, strict=True):
        if res:
            cell = res.get("cell_index")
            if res.get("ename") == "DeadKernelError":
                where = "a cell whose kernel died (killed, or out of memory)"
            elif cell is None:
                where = "kernel start-up"
            else:
                where = f"cell {res['source_index']}"
                if res.get("first_line"):
                    where += f" ({res['first_line']!r})"
            raise NotebookExecutionError(
                f"notebook {config.notebook} failed in {where} "
                f"({res.get('ename')}: {res.get('evalue')}); "
                f"executed copy saved at {out}"
            )
        if on_output is not None:
            on_output(out)
    return BatchResult(
        config=config,
        lab=lab_obj,
        outputs=outputs,
        elapsed_s=time.monotonic() - started,
        counts=counts,
        best=best if best is None or math.isfinite(best) else None,
    )

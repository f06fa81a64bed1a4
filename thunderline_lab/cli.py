"""The ``thunderline-lab`` command line.

Every library error (:class:`~thunderline_lab.errors.ThunderlineLabError`) becomes clean
lines on stderr — one per broken field for invalid events — and a non-zero exit; no
tracebacks for bad input.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from thunderline_lab.errors import (
    ConfigError,
    StoreError,
    StudyError,
    ThunderlineLabError,
    TrackingError,
    did_you_mean,
)

if TYPE_CHECKING:
    from thunderline_lab.wire import LoadedEvents

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


class _NonEmptyPath(click.Path):
    """A :class:`click.Path` that refuses "", which ``Path`` would take as the current folder."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty (for the current folder, give .)", param, ctx)
        return super().convert(value, param, ctx)


lab_option = click.option(
    "--lab",
    "lab_dir",
    type=_NonEmptyPath(file_okay=False, path_type=Path),
    default=None,
    help="Lab directory (default: $THUNDERLINE_LAB_HOME or ./lab).",
)


gateway_option = click.option(
    "--gateway",
    metavar="URL",
    default=None,
    help="Read the study from this gateway's log (a study run with run --gateway), through "
    "the lab's mirror of it; its token from $THUNDERLINE_LAB_TOKEN.",
)


def _clean_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ThunderlineLabError as exc:
            for line in exc.lines():
                click.echo(f"error: {line}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # `... | head`: the reader has all it wanted
            # stdout's buffered rest would fail again at exit: point it at nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except OSError as exc:  # a path the user gave: a file in the way, no permission, ...
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _read_input(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_bytes().decode("utf-8"), path
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _load_events(path: str, model_run: str) -> LoadedEvents:
    from thunderline_lab.wire import load_events

    text, source = _read_input(path)
    return load_events(text, source, default_model_run_id=model_run)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="thunderline-lab")
def main() -> None:
    """thunderline-lab: a Jupyter-first workbench for studying spectral normalization."""


def _model_run_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--model-run`` as an event's model_run_id takes it: 1 to 256 characters (an empty
    one was refused only later, as each post's own ``model_run_id``)."""
    if not 1 <= len(value) <= 256:
        raise click.BadParameter("a model_run_id must be 1 to 256 characters", ctx, param)
    return value


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option given as "" (an unset variable in a script) is refused rather than taken as
    its default."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty", ctx, param)
    return value


model_run_option = click.option(
    "--model-run",
    default="cerebros",
    show_default=True,
    callback=_model_run_id,
    help="model_run_id for seed 001 posts that carry none.",
)


@main.command()
@click.argument("file", type=str)
@model_run_option
@_clean_errors
def validate(file: str, model_run: str) -> None:
    """Validate events in FILE (or - for stdin) and store nothing.

    FILE holds JSON (one event or an array), JSON lines, or the seeds' Cerebros payloads.
    """
    from thunderline_lab.events import EventValidationError
    from thunderline_lab.store import TrialStore

    loaded = _load_events(file, model_run)
    try:  # what ingest would refuse: text JSON cannot hold, an id naming two events, ...
        with TrialStore(":memory:") as scratch:
            scratch.append(loaded.events)
    except EventValidationError as exc:
        raise loaded.locate(exc) from None
    n = len(loaded.events)
    click.echo(f"ok: {n} valid event{'s' if n != 1 else ''} in {loaded.source}")


@main.command()
@click.argument("file", type=str)
@lab_option
@model_run_option
@_clean_errors
def ingest(file: str, lab_dir: Path | None, model_run: str) -> None:
    """Validate and append events from FILE (or -) to the lab's trial store."""
    from thunderline_lab.lab import Lab

    loaded = _load_events(file, model_run)
    from thunderline_lab.events import EventValidationError

    lab = Lab.resolve(lab_dir)
    with lab.store() as store:
        try:
            result = store.append(loaded.events)
        except EventValidationError as exc:
            raise loaded.locate(exc) from None
    click.echo(
        f"{loaded.source}: accepted {result.accepted}, duplicates {result.duplicates} "
        f"(store {lab.db_path}, last seq {result.last_seq})"
    )


@main.command()
@lab_option
@_clean_errors
def replay(lab_dir: Path | None) -> None:
    """Rebuild every table of the trial store from its event log."""
    from thunderline_lab.lab import Lab

    lab = Lab.resolve(lab_dir)
    if not lab.db_path.exists():
        raise StoreError(f"no trial store at {lab.db_path}")
    with lab.store() as store:
        counts = store.replay()
    click.echo("replayed: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@main.command()
@lab_option
@click.option("--study", default=None, help="Only this study (model run name).")
@click.option(
    "--status",
    default=None,
    type=click.Choice(["running", "completed", "pruned", "cancelled", "failed"]),
    help="Only trials in this status.",
)
@click.option(
    "--spectral-norm/--no-spectral-norm",
    "spectral_norm",
    default=None,
    help="Only trials with (or without) spectral normalization.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@gateway_option
@_clean_errors
def trials(
    lab_dir: Path | None,
    study: str | None,
    status: str | None,
    spectral_norm: bool | None,
    fmt: str,
    gateway: str | None,
) -> None:
    """List trials of the lab's store."""
    lab, store = _study_store(lab_dir, gateway)
    with store:
        df = store.trials(study=study, status=status, spectral_norm=spectral_norm)
        known = store.studies() if df.empty and study is not None else []
    if study is not None and df.empty and study not in known:  # a typo, not "no trials"
        raise StudyError(
            f"{store.path}: no study {study!r}{did_you_mean(study, known)}; "
            f"studies in this lab: {', '.join(known) or 'none'}"
            + ("" if gateway else _gateway_hint(lab))
        )
    if fmt == "json":
        from thunderline_lab.store import trial_records

        click.echo(json.dumps(trial_records(df), indent=2, default=str))
    elif fmt == "csv":
        out = df.copy()
        for col in ("parameters", "metrics"):
            out[col] = out[col].map(lambda d: json.dumps(d, sort_keys=True))
        click.echo(out.to_csv(index=False), nl=False)
    else:
        click.echo(_trials_table(df))


def _gateway_hint(lab: Any) -> str:
    """A hint for a study not in the lab's store when the lab mirrors a gateway's log (a
    study run with ``run --gateway`` lives there): "" otherwise."""
    mirrors = sorted((Path(lab.root) / "gateway-mirror").glob("*.db"))
    if not mirrors:
        return ""
    return (
        "; this lab also holds a mirror of a gateway's log (a study run with run --gateway "
        "reports there): read it with --gateway URL"
    )


def _study_store(lab_dir: Path | None, gateway: str | None) -> tuple[Any, Any]:
    """The lab and the store a study is read from: the lab's own, or its mirror of a
    gateway's log brought up to date (``--gateway``)."""
    from thunderline_lab.lab import Lab
    from thunderline_lab.notebook import results_store

    lab = Lab.resolve(lab_dir)
    if gateway:
        return lab, results_store(lab, gateway)
    if not lab.db_path.exists():
        raise StoreError(f"no trial store at {lab.db_path}")
    return lab, lab.store()


def _trials_table(df: Any) -> str:
    import pandas as pd

    if df.empty:
        return "no trials"
    shown = df[
        ["study", "trial_id", "status", "spectral_norm", "spectral_norm_coeff", "duration_ms"]
    ].copy()
    for metric in ("val_accuracy", "test_accuracy", "val_loss"):
        # a pruned trial reports only best_<metric>: the value at its best epoch, which is
        # what a completed trial's <metric> is too (its best epoch's weights are restored)
        values = df["metrics"].map(
            lambda m, k=metric: m.get(k) if m.get(k) is not None else m.get(f"best_{k}")
        )
        if values.notna().any():
            # (a trial without the metric: NaN once pandas holds the column, shown blank as
            # a missing duration is, not as "nan")
            shown[metric] = values.map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["spectral_norm"] = shown["spectral_norm"].map({True: "on", False: "off", None: "?"})
    shown["spectral_norm_coeff"] = shown["spectral_norm_coeff"].map(
        lambda v: "" if pd.isna(v) else f"{v:.3g}"
    )
    shown["duration_ms"] = shown["duration_ms"].map(lambda v: "" if pd.isna(v) else f"{int(v)}")
    return str(shown.to_string(index=False))


@main.command()
def schema() -> None:
    """Print the JSON Schema of every event the lab accepts."""
    from thunderline_lab.events import event_json_schema

    click.echo(json.dumps(event_json_schema(), indent=2))


class _RunCommand(click.Command):
    """``run``'s command: ``-p NAME=VALUE`` is read as ``-p NAME VALUE``.

    Researchers used to Hydra or ``key=value`` overrides type ``-p epochs=1``; click's
    two-value option then took the next ``-p`` as the value and failed on the rest with
    "Got unexpected extra argument". A parameter name never holds ``=``, so the first ``=``
    of the word after ``-p`` can only separate name and value.

    A value forgotten before the next option (``-p epochs --lab /tmp/x``) made click take
    ``--lab`` as the value and fail on ``/tmp/x`` ("Got unexpected extra argument"): a NAME
    or VALUE that is one of the command's options, or missing at the end, is refused naming
    the ``-p`` at fault. Other words starting with ``-`` stay values (``-p lr -0.5``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        options = {
            opt
            for param in self.get_params(ctx)
            if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts)
        }

        def refuse_option(word: str | None, said: str, placeholder: str) -> None:
            if word is None or word.split("=", 1)[0] in options:
                missing = placeholder.lower().replace(" ", " and ")
                got = "" if word is None else f"got the option {word}; "
                raise click.UsageError(
                    f"{said}: missing {missing} ({got}write {said} {placeholder})", ctx
                )

        split: list[str] = []
        words = iter(args)
        for word in words:
            split.append(word)
            if word == "--":
                split.extend(words)
                break
            if word in ("-p", "--parameter"):
                name = next(words, None)
                refuse_option(name, word, "NAME VALUE")
                assert name is not None
                if "=" in name:
                    split.extend(name.split("=", 1))
                else:  # NAME VALUE: the value is passed as it is, '=' and all
                    split.append(name)
                    value = next(words, None)
                    refuse_option(value, f"{word} {name}", "VALUE")
                    assert value is not None
                    split.append(value)
        return super().parse_args(ctx, split)


@main.command(cls=_RunCommand)
@click.argument("study_toml", type=click.Path(dir_okay=False, path_type=Path))
@lab_option
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="papermill worker processes sharing the study (default: the config's).",
)
@click.option(
    "-p",
    "--parameter",
    "overrides",
    type=(str, str),
    multiple=True,
    metavar="NAME VALUE",
    help="Override a notebook parameter (VALUE read as JSON); -p NAME=VALUE works too.",
)
@click.option(
    "--gateway",
    metavar="URL",
    default=None,
    help="Report the study's events through this gateway (thunderline-lab serve) instead of "
    "the lab's store; its token from $THUNDERLINE_LAB_TOKEN. Progress and the report read "
    "the lab's mirror of the gateway's log.",
)
@click.option("--no-report", is_flag=True, help="Skip the comparison report at the end.")
@_clean_errors
def run(
    study_toml: Path,
    lab_dir: Path | None,
    workers: int | None,
    overrides: tuple[tuple[str, str], ...],
    gateway: str | None,
    no_report: bool,
) -> None:
    """Execute a study notebook via papermill (the workbench's main job).

    Ctrl-C stops the workers (their running trials are recorded as cancelled), keeps the
    study's finished trials and exits with 130; running the same command again resumes.
    """
    from thunderline_lab.batch import (
        BatchInterrupted,
        load_study_config,
        parse_override,
        run_batch,
    )
    from thunderline_lab.lab import Lab

    config = load_study_config(study_toml)
    lab = Lab.resolve(lab_dir)
    given: dict[str, str] = {}
    for name, value in overrides:  # a repeated -p is a slip, not "the last one wins"
        if name in given:
            raise click.UsageError(
                f"-p {name} given twice ({given[name]} and {value}): give it once"
            )
        given[name] = value
    params = dict(parse_override(name, value) for name, value in overrides)
    if gateway is not None:
        if params.get("gateway", gateway) != gateway:
            raise click.UsageError(f"--gateway {gateway} and -p gateway {params['gateway']}")
        params["gateway"] = gateway

    def started() -> None:
        where = lab.runs_dir / config.name
        click.echo(f"study {config.name}: {config.notebook.name} -> {where}")

    try:
        result = run_batch(config, lab=lab, workers=workers, overrides=params, on_start=started)
    except BatchInterrupted as stop:
        got = stop.result
        click.echo(
            f"interrupted after {got.elapsed_s:,.0f}s: study {config.name} keeps its "
            f"{got.done_total} finished trial(s)"
            + "".join(f", {k} {v}" for k, v in sorted(got.counts.items()))
            + "; run the same command again to resume",
            err=True,
        )
        for out in got.outputs:
            click.echo(f"  executed notebook : {out}", err=True)
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    finished_before = result.done_before and result.done_before >= result.total > 0
    new = (
        "nothing left to run (the study had finished its trials already)"
        if finished_before and not result.done_now
        else f"{result.done_now} new trial(s)"
    )
    click.echo(
        f"finished in {result.elapsed_s:,.0f}s: {new}; study: "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    )
    if result.counts.get("running"):  # this run's workers have all stopped
        n = result.counts["running"]
        click.echo(
            f"warning: {n} trial{'s are' if n > 1 else ' is'} still running, not by this "
            "run's workers: another run's or machine's, or a dead worker's, which a later "
            "run fails as stale and re-runs once its heartbeat is older than the grace period "
            "(thunderline-lab trials --status running shows which)",
            err=True,
        )
    for out in result.outputs:
        click.echo(f"  executed notebook : {out}")
    if result.gateway:
        click.echo(
            f"  trials            : {result.gateway.rstrip('/')}/api/trials?study={config.name}"
        )
        click.echo(f"  gateway mirror    : {result.store_path}")
    else:
        click.echo(
            f"  trials            : thunderline-lab trials --lab {lab.root} --study {config.name}"
        )
    click.echo(f"  optuna dashboard  : thunderline-lab dashboard --lab {lab.root}")
    if lab.mlflow_db.exists():  # the study logged to MLflow (its `mlflow` parameter)
        click.echo(f"  mlflow ui         : mlflow ui --backend-store-uri {lab.mlflow_tracking_uri}")
    # (a study run through a gateway has its trials there, not in the lab's store)
    waiting = 0 if result.gateway else _mlflow_pending(lab, config.name)
    if waiting:  # MLflow was down or busy: the workers' loggers left them to the outbox
        click.echo(
            f"warning: {waiting} trial(s) of study {config.name} not yet in MLflow (waiting "
            f"in the lab's MLflow outbox, {lab.db_path}): thunderline-lab mlflow-sync --lab "
            f"{lab.root} pushes them",
            err=True,
        )
    if not no_report:
        report = _write_report(lab, config.name, result.store_path)
        if report is not None:
            click.echo(f"  comparison report : {report}")


def _write_report(lab: Any, study: str, db_path: Path | None = None) -> Path | None:
    """The SN-vs-none report for a study (from ``db_path``, default the lab's store), if the
    comparison module is available."""
    try:
        from thunderline_lab import compare
    except ImportError:
        return None
    from thunderline_lab.store import TrialStore

    with TrialStore(db_path) if db_path is not None else lab.store() as store:
        result = compare.compare_study(store, study)
        links = _mlflow_links(lab, store, study)
    out = compare.write_report(
        result, lab.reports_dir / compare.report_folder(study), mlflow_links=links
    )
    return Path(out)


def _mlflow_pending(lab: Any, study: str) -> int:
    """How many trials of ``study`` in the lab's store its MLflow outbox holds as not yet in
    MLflow (0 for a study run without MLflow logging)."""
    if not lab.db_path.exists():
        return 0
    try:
        from thunderline_lab.tracking import mlflow_links

        links = mlflow_links(lab, study=study)
    except (ImportError, ThunderlineLabError):
        return 0
    return int((links["sync_state"] == "pending").sum())


def _mlflow_links(lab: Any, store: Any, study: str) -> Any:
    """The study's MLflow run links for reports, or None when there are none to show."""
    try:
        from thunderline_lab.tracking import mlflow_links

        links = mlflow_links(lab, store, study=study)
    except ThunderlineLabError:
        return None
    # a study run without MLflow gets no (empty) "MLflow runs" section in its report
    mirrored = links["mlflow_run_id"].notna() | (links["sync_state"] != "not mirrored")
    return links if mirrored.any() else None


@main.command()
@lab_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; anything but loopback requires a token.",
)
@click.option("--port", default=8765, type=click.IntRange(0, 65535), show_default=True)
@click.option(
    "--token",
    envvar="THUNDERLINE_LAB_TOKEN",
    default=None,
    show_envvar=True,
    help="Require this bearer token on /api/* (needed off loopback).",
)
@click.option(
    "--synchronous",
    type=click.Choice(["full", "normal"]),
    default="full",
    show_default=True,
    help="full: fsync each commit (a 202 survives power loss); normal: survives a "
    "crash of the gateway only.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.option(
    "--root-path",
    default="",
    metavar="PREFIX",
    help="Path prefix a reverse proxy serves the gateway under (e.g. /thundergate), the "
    "proxy stripping it; routes and /docs work there.",
)
@click.option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Without a token only requests to localhost or a loopback address are answered "
    "(DNS rebinding); also answer this Host name (a local proxy passing its name on).",
)
@_clean_errors
def serve(
    lab_dir: Path | None,
    host: str,
    port: int,
    token: str | None,
    synchronous: str,
    log_level: str,
    root_path: str,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Run the event gateway (ThunderGate): POST /api/events/ml, GET /api/trials, /docs."""
    from thunderline_lab.gateway import serve as run_gateway
    from thunderline_lab.lab import Lab

    run_gateway(
        Lab.resolve(lab_dir),
        host=host,
        port=port,
        token=token,
        log_level=log_level,
        synchronous=synchronous,
        root_path=root_path,
        allowed_hosts=allowed_hosts,
    )


@main.command()
@lab_option
@click.option("--port", default=8080, type=click.IntRange(0, 65535), show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--storage",
    default=None,
    callback=_not_empty,
    help="Optuna storage instead of the lab's journal: a URL (e.g. postgresql+psycopg2://..., "
    "sqlite:///optuna.db) or an Optuna journal file.",
)
@click.option("--print-command", is_flag=True, help="Only print the optuna-dashboard command.")
@_clean_errors
def dashboard(
    lab_dir: Path | None, port: int, host: str, storage: str | None, print_command: bool
) -> None:
    """Open optuna-dashboard on the lab's Optuna studies (lab/optuna.journal)."""
    import os
    import shlex

    from thunderline_lab.lab import Lab
    from thunderline_lab.study import dashboard_command, make_storage

    lab = Lab.resolve(lab_dir)
    argv = dashboard_command(lab, host=host, port=port, storage=storage)
    if print_command:
        click.echo(shlex.join(argv))
        return
    rdb = argv[-2] == "RDBStorage"
    if rdb:  # reachable? (else optuna-dashboard dies in a long traceback)
        make_storage(storage, lab=lab)  # StudyError: one line, the password redacted
    # a port in use, an unknown host: one line now (gunicorn would retry for seconds and log)
    from thunderline_lab.gateway import _listen

    _listen(host, port).close()
    click.echo(
        f"optuna-dashboard on http://{host}:{port}/ ({'RDB' if rdb else argv[-1]})", err=True
    )
    os.execvp(argv[0], argv)


@main.command("compare")
@click.option("--study", required=True, help="The study (model run) to compare.")
@lab_option
@click.option(
    "--out",
    "out_dir",
    type=_NonEmptyPath(file_okay=False, path_type=Path),
    default=None,
    help="Report folder (default: LAB/reports/STUDY).",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="A metric to compare (repeatable, or comma-separated; default: the standard set "
    "it reports).",
)
@click.option(
    "--mode",
    type=click.Choice(["best", "final"]),
    default="best",
    show_default=True,
    help=(
        "best: the value at the best epoch (lowest validation loss, whose weights are "
        "restored); final: the value at the last epoch trained. Metrics measured after "
        "training on the restored model (test_*, robustness, calibration) are the same in "
        "both modes."
    ),
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Bootstrap seed."
)
@click.option(
    "--n-boot",
    type=click.IntRange(200, 1_000_000),
    default=2000,
    show_default=True,
    help="Bootstrap resamples.",
)
@click.option(
    "--confidence",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Level of the CIs, the bands and the verdict (favours needs p_holm < 1 - confidence).",
)
@click.option(
    "--statuses",
    default="completed",
    show_default=True,
    help="Trial statuses compared (comma-separated: completed, pruned, failed, ...).",
)
@gateway_option
@_clean_errors
def compare_cmd(
    study: str,
    lab_dir: Path | None,
    out_dir: Path | None,
    metrics: tuple[str, ...],
    mode: str,
    seed: int,
    n_boot: int,
    confidence: float,
    statuses: str,
    gateway: str | None,
) -> None:
    """SN vs none for a study: paired differences, bootstrap CIs, tests; report.md + PNGs."""
    from thunderline_lab.compare import (
        _direction_note,
        _status_list,
        compare_study,
        format_headline,
        report_folder,
        write_report,
    )

    # refused before the store is opened: --metric '' (an unset variable in a script) ran
    # the default set of metrics
    if any(not m.strip() for m in metrics):
        raise click.BadParameter("is empty", param_hint="'--metric'")
    try:
        status_list = _status_list(statuses)
    except StudyError as exc:
        raise click.BadParameter(
            str(exc).removeprefix("statuses: "), param_hint="'--statuses'"
        ) from None
    lab, store = _study_store(lab_dir, gateway)
    with store:
        try:
            result = compare_study(
                store,
                study,
                # "a,b" as the notebook's -p metrics and the API read it
                metrics=",".join(metrics) or None,
                mode=mode,  # type: ignore[arg-type]
                seed=seed,
                n_boot=n_boot,
                confidence=confidence,
                statuses=status_list,
            )
        except StudyError as exc:
            if gateway or not (hint := _gateway_hint(lab)) or study in store.studies():
                raise
            raise StudyError(f"{exc}{hint}") from None
        links = _mlflow_links(lab, store, study)
    folder = out_dir or lab.reports_dir / report_folder(study)
    report = write_report(result, folder, mlflow_links=links)
    click.echo(
        f"{study}: SN − none ({result.design} design, {mode} values, "
        f"{result.confidence * 100:.4g}% bootstrap CI, {', '.join(result.statuses)} trials)"
    )
    click.echo(result.format_table())
    click.echo(_direction_note(result.headline))
    for title, table in (
        ("By SN coefficient", result.by_coeff),
        ("By conv SN mode", result.by_mode),
    ):
        if not table.empty:
            click.echo(f"\n{title}")
            click.echo(format_headline(table, confidence=result.confidence))
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"report: {report}")


@main.command("mlflow-sync")
@lab_option
@click.option(
    "--tracking-uri",
    default=None,
    callback=_not_empty,
    help="MLflow to sync with (default: $MLFLOW_TRACKING_URI, else the lab's lab/mlflow.db).",
)
@click.option("--push/--no-push", default=True, show_default=True, help="Send pending trials.")
@click.option(
    "--pull/--no-pull", default=True, show_default=True, help="Adopt runs made outside the lab."
)
@click.option(
    "--all-studies", is_flag=True, help="Also push studies that were run without MLflow logging."
)
@click.option(
    "--forget",
    "forget_uri",
    metavar="URI",
    default=None,
    callback=_not_empty,
    help="Instead of syncing, forget this MLflow (a retired one): drop the lab's records of it "
    "and free the spooled artifacts the other MLflows hold. Syncing to it later starts afresh.",
)
@_clean_errors
def mlflow_sync(
    lab_dir: Path | None,
    tracking_uri: str | None,
    push: bool,
    pull: bool,
    all_studies: bool,
    forget_uri: str | None,
) -> None:
    """Push what MLflow lacks (the outbox) and pull runs logged outside the lab; idempotent.

    With --forget URI it only forgets that MLflow (no sync in the same call).
    """
    from thunderline_lab.lab import Lab
    from thunderline_lab.tracking import (
        _sqlite_database_path,
        _sqlite_database_problem,
        forget_tracking_uri,
        sync,
    )

    if forget_uri is not None:
        ctx = click.get_current_context()
        sync_options = {
            "tracking_uri": "--tracking-uri",
            "push": "--push/--no-push",
            "pull": "--pull/--no-pull",
            "all_studies": "--all-studies",
        }
        given = [
            flag
            for name, flag in sync_options.items()
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
        ]
        if given:
            raise click.UsageError(
                f"--forget cannot be combined with {', '.join(given)}: "
                "forget first, then sync in another call"
            )
    lab = Lab.resolve(lab_dir)
    if not lab.db_path.exists():
        raise StoreError(f"no trial store at {lab.db_path}")
    path = tracking_uri and _sqlite_database_path(tracking_uri)
    problem = path and _sqlite_database_problem(path, lab=lab, role="an MLflow database")
    if problem:  # sync says so too, but without naming the option
        raise TrackingError(f"--tracking-uri {tracking_uri}: {problem}; nothing was synced")
    if forget_uri is not None:
        forgot = forget_tracking_uri(lab, forget_uri)
        click.echo(f"mlflow {forgot.tracking_uri}: {forgot.summary()}")
        return
    report = sync(lab, tracking_uri=tracking_uri, push=push, pull=pull, all_studies=all_studies)
    click.echo(f"mlflow {report.tracking_uri}: {report.summary()}")
    for line in report.conflicts + report.errors:
        click.echo(f"warning: {line}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()

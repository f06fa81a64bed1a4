"""MLflow mirror: live logging off the training thread, outage survival, push/pull sync.

The acceptance test runs a real ``mlflow server`` on loopback, kills it (SIGKILL) in the
middle of a small study, finishes the study, restarts the server, runs ``mlflow-sync`` and
checks that every trial's params, metric histories and tags are in MLflow exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from thunderline_lab import events as E
from thunderline_lab import tracking
from thunderline_lab.bus import EventBus
from thunderline_lab.cli import main
from thunderline_lab.errors import TrackingError
from thunderline_lab.lab import Lab
from thunderline_lab.store import StoreWriter, TrialStore
from thunderline_lab.tracking import (
    FINAL_PREFIX,
    MLflowLogger,
    _link_event,
    _param_value,
    _parse_param,
    _RunSync,
    _up_to_date,
    mlflow_links,
    run_url,
    sync,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in mlflow

logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow").setLevel(logging.ERROR)
logging.getLogger("thunderline_lab.tracking").setLevel(logging.ERROR)

VENV_BIN = Path(sys.executable).parent
EPOCHS = 6


# ---------------------------------------------------------------------------------------------
# A small, realistic study: real (tiny) training, events as the study layer publishes them
# ---------------------------------------------------------------------------------------------


def _model(sn: bool, coeff: float) -> nn.Module:
    layers: list[nn.Module] = []
    for i, o in ((8, 16), (16, 2)):
        lin: nn.Module = nn.Linear(i, o)
        if sn:
            lin = nn.utils.parametrizations.spectral_norm(lin)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _sigma_table(model: nn.Module) -> pd.DataFrame:
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            sigma = torch.linalg.matrix_norm(mod.weight.detach(), ord=2).item()
            rows.append({"layer": name, "sigma": sigma})
    return pd.DataFrame(rows)


def run_trial(
    bus: EventBus,
    logger: MLflowLogger | None,
    study: str,
    number: int,
    *,
    after_epoch: Callable[[int, int], None] | None = None,
) -> None:
    """One trial: Optuna-style trial.start, run.start, a metric event per epoch, run.stop,
    artifacts, trial.complete (pruned / failed for some numbers)."""
    tid = f"trial_{number:04d}"
    sn = number % 2 == 0
    coeff = 1.0 if sn else None
    params = {
        "lr": 0.05,
        "depth": 2,
        "width": 16,
        "dropout": 0.0,
        "weight_decay": 1e-4,
        "spectral_norm": sn,
        "spectral_norm_coeff": coeff,
        "seed": number // 2,
        "pair_id": number // 2,
        "arm": "sn" if sn else "none",
    }
    ref = {"model_run_id": study, "trial_id": tid, "study": study}
    bus.publish(
        E.trial_start(**ref, spectral_norm=sn, spectral_norm_coeff=coeff, parameters=params)
    )
    bus.publish(E.run_start(**ref, spectral_norm=sn, spectral_norm_coeff=coeff))
    g = torch.Generator().manual_seed(number)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(number)
    model = _model(sn, coeff or 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for epoch in range(EPOCHS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            out = model(x)
            val_loss = nn.functional.cross_entropy(out, y).item()
            acc = (out.argmax(1) == y).float().mean().item()
        sigma = float(_sigma_table(model)["sigma"].max())
        m = {
            "train_loss": loss.item(),
            "val_loss": val_loss,
            "val_accuracy": acc,
            "lr": 0.05,
            "max_sigma": sigma,
        }
        history.append({"epoch": epoch, **m})
        bus.publish(E.run_metric(**ref, step=epoch, measurements=m, spectral_norm=sn))
        if after_epoch is not None:
            after_epoch(number, epoch)
    bus.publish(E.run_stop(**ref, epochs=EPOCHS, duration_ms=10))
    if logger is not None:
        logger.log_artifacts(tid, model=model, sigma_table=_sigma_table(model), history=history)
    run_id = logger.run_id_for(tid) if logger is not None else None
    metrics = {"val_accuracy": history[-1]["val_accuracy"], "test_accuracy": 0.5 + number / 100}
    if number == 4:
        bus.publish(
            E.trial_failed(
                **ref,
                spectral_norm=sn,
                error_type="diverged",
                error_message="loss became NaN at epoch 5",
                parameters=params,
                mlflow_run_id=run_id,
            )
        )
        return
    bus.publish(
        E.trial_complete(
            **ref,
            spectral_norm=sn,
            spectral_norm_coeff=coeff,
            status="pruned" if number == 3 else "completed",
            parameters=params,
            metrics=metrics,
            mlflow_run_id=run_id,
            duration_ms=10,
        )
    )


def wait_synced(logger: MLflowLogger, timeout: float = 180.0) -> bool:
    """Flush until MLflow has everything (a slow first connection may take a few rounds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logger.flush(max(1.0, deadline - time.monotonic())):
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------
# A real MLflow server on loopback
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` in its own process group (so SIGKILL takes its workers too)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination",
            str(self.root / "server-artifacts"),
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(
            "mlflow server did not start:\n" + (self.root / "server.log").read_text()
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def client_for() -> Callable[[str], Any]:
    from mlflow import MlflowClient

    return lambda uri: MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------------------------
# What "exactly once" means, checked against MLflow with MLflow's own client
# ---------------------------------------------------------------------------------------------


def expected_params(row: dict[str, Any]) -> dict[str, str]:
    return applicable_params(row)  # spectral_norm_coeff=None of the SN-off arm left out


def assert_mirrored(store: TrialStore, client: Any, study: str) -> dict[str, str]:
    """Every trial of the study is one run with its params, tags and metric histories."""
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("thunderline.role") == "study"]
    assert len(parents) == 1
    trial_runs = [r for r in runs if r.data.tags.get("thunderline.role") == "trial"]
    trials = store.trials(study=study)
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == sorted(trials["trial_id"])
    by_trial = {r.data.tags["trial_id"]: r for r in trial_runs}
    for row in trials.to_dict("records"):
        run = by_trial[row["trial_id"]]
        assert row["mlflow_run_id"] == run.info.run_id
        assert run.data.params == expected_params(row)
        tags = run.data.tags
        assert tags["trial_id"] == row["trial_id"]
        assert tags["model_run_id"] == study
        assert tags["study"] == study
        assert tags["constraint_method"] == ("spectral_norm" if row["spectral_norm"] else "none")
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["trial_status"] == row["status"]
        want_status = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}
        assert run.info.status == want_status[row["status"]]
        hist = store.metric_history(study, row["trial_id"])
        assert len(hist) == EPOCHS * 5
        for name, series in hist.groupby("name"):
            got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            got.sort()
            want = list(zip(series["step"].astype(int), series["value"], strict=True))
            assert got == want, f"{row['trial_id']} {name}"
        finals = {
            k[len(FINAL_PREFIX) :]: v
            for k, v in run.data.metrics.items()
            if k.startswith(FINAL_PREFIX)
        }
        assert finals == row["metrics"]
        arts = {
            a.path
            for d in ("model", "sigma", "plots")
            for a in client.list_artifacts(run.info.run_id, d)
        }
        assert arts == {"model/state_dict.pt", "sigma/sigma_table.csv", "plots/learning_curve.png"}
    return {r: run.info.run_id for r, run in by_trial.items()}


def n_points(client: Any, run_ids: dict[str, str]) -> int:
    return sum(
        len(client.get_metric_history(rid, name))
        for rid in run_ids.values()
        for name in ("train_loss", "val_loss", "val_accuracy", "lr", "max_sigma")
    )


# ---------------------------------------------------------------------------------------------
# Acceptance: server killed mid-study, study finishes, server back, mlflow-sync
# ---------------------------------------------------------------------------------------------

STUDY = "sn-outage"


@pytest.mark.slow
def test_server_killed_mid_study_then_sync_mirrors_every_trial_exactly_once(
    server: MlflowServer,
    tmp_path: Path,
    client_for: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = Lab.resolve(tmp_path / "lab").ensure()
    store = lab.store()
    bus = EventBus()
    writer = StoreWriter(store, bus, interval=0.05)
    logger = MLflowLogger(
        bus, lab=lab, study=STUDY, store=store, tracking_uri=server.url, flush_interval=0.2,
        max_backoff=0.5,
    )  # fmt: skip

    def kill_mid_trial(number: int, epoch: int) -> None:
        if number == 3 and epoch == 2:
            assert wait_synced(logger)  # trials 0-2 and half of trial 3 reached MLflow
            server.kill()

    for number in range(6):
        run_trial(bus, logger, STUDY, number, after_epoch=kill_mid_trial)
    assert not logger.close(timeout=20)  # MLflow is down: the rest waits in the outbox
    writer.close()
    assert logger.errors

    # Training was untouched: every event of every trial is in the store.
    trials = store.trials(study=STUDY)
    assert list(trials["status"]) == [
        "completed", "completed", "completed", "pruned", "failed", "completed"
    ]  # fmt: skip
    assert trials["mlflow_run_id"].notna().sum() == 4
    links = mlflow_links(lab, store, study=STUDY).set_index("trial_id")
    assert list(links["sync_state"]) == ["synced"] * 3 + ["pending"] * 3
    spool = lab.root / "mlflow_outbox"
    assert len(list(spool.glob("*/*/model/state_dict.pt"))) == 3  # trials 3-5 wait

    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    out = CliRunner().invoke(main, ["mlflow-sync", "--lab", str(lab.root)])
    assert out.exit_code == 0, out.output
    assert "pushed 3 runs (2 created)" in out.output
    assert "pulled 0 runs" in out.output

    client = client_for(server.url)
    run_ids = assert_mirrored(store, client, STUDY)
    assert not list(spool.glob("*/*/model/state_dict.pt"))
    links = mlflow_links(lab, store, study=STUDY).set_index("trial_id")
    assert list(links["sync_state"]) == ["synced"] * 6
    assert links["run_url"].iloc[0] == run_url(
        server.url, links["experiment_id"].iloc[0], run_ids["trial_0000"]
    )
    parent = client.search_runs(
        [client.get_experiment_by_name(STUDY).experiment_id], "tags.`thunderline.role` = 'study'"
    )[0]
    assert parent.info.status == "FINISHED"

    # Idempotent: a second sync sends nothing and duplicates nothing.
    points = n_points(client, run_ids)
    assert points == 6 * EPOCHS * 5
    again = sync(lab, store, tracking_uri=server.url)
    assert (again.pushed_runs, again.pushed_points, again.pulled_runs) == (0, 0, 0)
    # Even a forced full re-push (outbox forgotten) adds nothing.
    store.conn.execute("DELETE FROM mlflow_outbox")
    forced = sync(lab, store, tracking_uri=server.url)
    assert forced.pushed_runs == 6 and forced.created_runs == 0 and forced.pushed_points == 0
    assert n_points(client, run_ids) == points
    assert_mirrored(store, client, STUDY)
    store.close()


# ---------------------------------------------------------------------------------------------
# Pull: runs logged with the mlflow API directly appear in the store
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pull_adopts_runs_logged_directly_with_the_mlflow_api(
    server: MlflowServer, tmp_path: Path, client_for: Callable[[str], Any]
) -> None:
    import mlflow

    if not server.alive():
        server.start()
    study = "pulled-study"
    lab = Lab.resolve(tmp_path / "lab").ensure()
    store = lab.store()
    bus = EventBus()
    with (
        StoreWriter(store, bus, interval=0.05),
        MLflowLogger(bus, lab=lab, study=study, store=store, tracking_uri=server.url) as logger,
    ):
        run_trial(bus, logger, study, 0)
        assert wait_synced(logger)
    client = client_for(server.url)
    exp_id = client.get_experiment_by_name(study).experiment_id

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name="by-hand") as by_hand:
            mlflow.log_params({"lr": 0.3, "spectral_norm": True, "spectral_norm_coeff": 2.0})
            for step in range(3):
                mlflow.log_metrics(
                    {"val_accuracy": 0.6 + step / 10, "val_loss": 1.0 - step / 10}, step
                )
        with mlflow.start_run(experiment_id=exp_id, run_name="no-sn-flag") as unknown:
            mlflow.log_param("lr", 0.1)
            mlflow.log_metric("val_accuracy", 0.7, step=0)
        # A run made outside the lab but tagged with a known trial: matched, not adopted.
        with mlflow.start_run(
            experiment_id=exp_id, tags={"trial_id": "trial_0000", "model_run_id": study}
        ):
            mlflow.log_metric("extra_metric", 1.5, step=7)
    finally:
        mlflow.set_tracking_uri(previous)

    report = sync(lab, store, tracking_uri=server.url)
    assert report.pulled_runs == 3 and report.adopted_trials == 2
    assert (report.pushed_runs, report.errors) == (0, [])

    adopted = store.trial(study, f"mlflow_{by_hand.info.run_id}")
    assert adopted is not None
    assert adopted["status"] == "completed"
    assert adopted["spectral_norm"] is True and adopted["spectral_norm_coeff"] == 2.0
    assert adopted["mlflow_run_id"] == by_hand.info.run_id
    assert adopted["parameters"] == {"lr": 0.3, "spectral_norm": True, "spectral_norm_coeff": 2.0}
    hist = store.metric_history(study, f"mlflow_{by_hand.info.run_id}", "val_accuracy")
    assert list(hist["value"]) == pytest.approx([0.6, 0.7, 0.8])
    # Without a spectral_norm param or constraint tag the lab does not guess.
    no_flag = store.trial(study, f"mlflow_{unknown.info.run_id}")
    assert no_flag is not None and no_flag["spectral_norm"] is None
    assert no_flag["status"] == "completed"
    # The matched trial keeps its own run and gains the outside point.
    own = store.trial(study, "trial_0000")
    assert own is not None and own["mlflow_run_id"] == logger.run_id_for("trial_0000")
    extra = store.metric_history(study, "trial_0000", "extra_metric")
    assert list(extra["step"]) == [7]
    # Adopted runs get the cross-referencing tags.
    assert client.get_run(by_hand.info.run_id).data.tags["trial_id"] == (
        f"mlflow_{by_hand.info.run_id}"
    )

    before = store.counts()
    again = sync(lab, store, tracking_uri=server.url)
    assert (again.pulled_runs, again.pushed_runs) == (0, 0)
    assert store.counts() == before
    store.close()


# ---------------------------------------------------------------------------------------------
# The default: SQLite MLflow inside the lab, no server
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_sqlite_backend_in_the_lab(
    tmp_path: Path, client_for: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lab = Lab.resolve(tmp_path / "lab").ensure()
    study = "local-study"
    store = lab.store()
    bus = EventBus()
    with (
        StoreWriter(store, bus, interval=0.05) as writer,
        MLflowLogger(bus, lab=lab, study=study, store=store) as logger,
    ):
        for number in range(2):
            run_trial(bus, logger, study, number)
        assert wait_synced(logger)
        assert logger.run_id_for("trial_0001", timeout=5) is not None
        writer.flush()
    assert lab.mlflow_db.exists()
    assert lab.mlflow_tracking_uri == f"sqlite:///{lab.mlflow_db}"
    client = client_for(lab.mlflow_tracking_uri)
    assert_mirrored(store, client, study)
    art = Path(
        client.get_run(logger.run_id_for("trial_0000")).info.artifact_uri.removeprefix("file://")
    )
    assert art.is_relative_to(lab.mlflow_artifacts)
    assert (art / "plots" / "learning_curve.png").stat().st_size > 1000

    # A run logged straight into the lab's MLflow, in an experiment of its own, is pulled.
    exp = client.create_experiment("scratch", artifact_location=(tmp_path / "scratch").as_uri())
    run = client.create_run(exp, tags={"constraint_method": "none"})
    client.log_param(run.info.run_id, "lr", "0.2")
    client.log_metric(run.info.run_id, "val_accuracy", 0.75, step=1)
    client.set_terminated(run.info.run_id, "FINISHED")
    out = CliRunner().invoke(main, ["mlflow-sync", "--lab", str(lab.root)])
    assert out.exit_code == 0, out.output
    pulled = store.trial("scratch", f"mlflow_{run.info.run_id}")
    assert pulled is not None and pulled["spectral_norm"] is False
    assert pulled["metrics"] == {"val_accuracy": 0.75}
    store.close()


# ---------------------------------------------------------------------------------------------
# Fast tests: no MLflow at all
# ---------------------------------------------------------------------------------------------


def test_unreachable_mlflow_never_fails_or_stalls_training(tmp_path: Path) -> None:
    lab = Lab.resolve(tmp_path / "lab").ensure()
    store = lab.store()
    bus = EventBus()
    dead = f"http://127.0.0.1:{_free_port()}"
    with StoreWriter(store, bus, interval=0.05):
        logger = MLflowLogger(bus, lab=lab, study="s", store=store, tracking_uri=dead)
        for number in range(2):
            run_trial(bus, logger, "s", number)
        assert logger.run_id_for("trial_0000") is None
        assert not logger.flush(10)
        assert not logger.close(10)
    assert logger.errors and "Connection refused" in " ".join(logger.errors)
    assert list(store.trials()["status"]) == ["completed", "completed"]
    links = mlflow_links(lab, store)
    assert list(links["sync_state"]) == ["pending", "pending"]
    assert links["mlflow_run_id"].isna().all()
    out = CliRunner().invoke(
        main, ["mlflow-sync", "--lab", str(lab.root)], env={"MLFLOW_TRACKING_URI": dead}
    )
    assert out.exit_code == 1
    assert "error: MLflow sync stopped" in out.output and "stays pending" in out.output
    store.close()


def test_sync_to_a_database_in_a_folder_that_is_not_there_is_refused(tmp_path: Path) -> None:
    # a mistyped --tracking-uri: MLflow would make the folder and an empty database in it,
    # and push every trial there
    lab = Lab.resolve(tmp_path / "lab").ensure()
    lab.store().close()
    typo = tmp_path / "mlfow" / "mlflow.db"
    with pytest.raises(TrackingError, match=f"no folder {re.escape(str(typo.parent))}"):
        sync(lab, tracking_uri=f"sqlite:///{typo}")
    out = CliRunner().invoke(
        main, ["mlflow-sync", "--lab", str(lab.root), "--tracking-uri", f"sqlite:///{typo}"]
    )
    assert out.exit_code == 1
    assert "a mistyped path?" in out.output and "nothing was synced" in out.output
    assert not typo.parent.exists()
    assert tracking._missing_database_folder(f"sqlite:///{lab.mlflow_db}") is None
    assert tracking._missing_database_folder("sqlite:///:memory:") is None
    assert tracking._missing_database_folder("http://127.0.0.1:5000") is None


def test_sync_of_a_lab_no_study_of_which_logs_to_mlflow_makes_no_database(
    tmp_path: Path,
) -> None:
    # a lab fed only by a gateway: mlflow-sync quietly left an empty lab/mlflow.db behind
    from thunderline_lab.monitor import synthetic_study

    lab = Lab.resolve(tmp_path / "lab").ensure()
    with lab.store() as store:
        store.append(synthetic_study("gw", n_pairs=1, epochs=2))
    report = sync(lab)
    assert report.summary().startswith("nothing to sync: no study of this lab logs to MLflow")
    assert not lab.mlflow_db.exists()
    out = CliRunner().invoke(main, ["mlflow-sync", "--lab", str(lab.root)])
    assert out.exit_code == 0 and "nothing to sync" in out.output, out.output
    assert not lab.mlflow_db.exists()


def test_sync_to_a_trial_store_is_refused_and_writes_nothing(
    db_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --tracking-uri sqlite:///.../lab.db: MLflow added experiments, runs, params, tags and
    # alembic_version to the trial store, then failed ("duplicate column name: step")
    lab = Lab.resolve(tmp_path / "lab").ensure()
    other = Lab.resolve(tmp_path / "other")
    for each in (lab, other):
        with each.store() as store:
            store.append([E.trial_start(model_run_id="s", trial_id="t", spectral_norm=True)])
    (tmp_path / "link.db").symlink_to(lab.db_path)
    monkeypatch.chdir(tmp_path)
    before = db_state(lab.db_path), db_state(other.db_path)
    own = "that is the lab's trial store (lab.db), not an MLflow database; nothing was synced"
    cases = {
        f"sqlite:///{lab.db_path}": own,  # sqlite:////abs/lab/lab.db
        "sqlite:///lab/lab.db": own,
        "sqlite:///lab/../lab/lab.db": own,
        "sqlite:///link.db": own,
        f"sqlite:///{other.db_path}": "that is a thunderline-lab trial store (its events table), "
        "not an MLflow database; nothing was synced",
    }
    for uri, why in cases.items():
        out = CliRunner().invoke(main, ["mlflow-sync", "--lab", "lab", "--tracking-uri", uri])
        assert out.exit_code == 1, out.output
        assert out.output == f"error: --tracking-uri {uri}: {why}\n"
        with pytest.raises(TrackingError, match=re.escape(f"cannot use MLflow at {uri}: {why}")):
            sync(lab, tracking_uri=uri)
    out = CliRunner().invoke(
        main, ["mlflow-sync", "--lab", "lab"], env={"MLFLOW_TRACKING_URI": "sqlite:///lab/lab.db"}
    )
    assert out.exit_code == 1 and own in out.output
    assert (db_state(lab.db_path), db_state(other.db_path)) == before
    # the logger (run --mlflow with such a $MLFLOW_TRACKING_URI) opens nothing there either
    bus = EventBus()
    logger = MLflowLogger(bus, lab=lab, study="s", tracking_uri="sqlite:///link.db", isolate=False)
    bus.publish(E.trial_start(model_run_id="s", trial_id="t1", spectral_norm=True))
    assert not logger.close(10)
    assert any("trial store" in e for e in logger.errors), logger.errors
    assert db_state(other.db_path) == before[1]
    assert sorted(p.name for p in other.root.iterdir()) == ["lab.db"]  # no -wal, -shm made
    tables = db_state(lab.db_path)[0]  # the logger's outbox tables, none of MLflow's
    assert tables - before[0][0] <= {"mlflow_studies", "mlflow_outbox", "mlflow_artifacts"}


def test_sync_to_a_folder_or_a_file_that_is_no_database_fails_at_once(tmp_path: Path) -> None:
    # sqlite:////a/folder: MLflow retried for ~107 s (38 warning lines) before failing
    lab = Lab.resolve(tmp_path / "lab").ensure()
    lab.store().close()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    for target, why in (
        (tmp_path, f"{tmp_path} is a folder, not a database file"),
        (notes, f"{notes} is not an SQLite database"),
    ):
        uri = f"sqlite:///{target}"
        out = CliRunner().invoke(
            main, ["mlflow-sync", "--lab", str(lab.root), "--tracking-uri", uri]
        )
        assert out.exit_code == 1
        assert out.output == f"error: --tracking-uri {uri}: {why}; nothing was synced\n"
        with pytest.raises(TrackingError, match=re.escape(why)):
            sync(lab, tracking_uri=uri)
    assert notes.read_text() == "hello\n"


@pytest.mark.parametrize("option", ["--tracking-uri", "--forget"])
def test_an_empty_tracking_uri_is_refused_naming_the_option(tmp_path: Path, option: str) -> None:
    # --tracking-uri '' synced to the default MLflow; --forget '' said "error: : not a ..."
    lab = Lab.resolve(tmp_path / "lab").ensure()
    lab.store().close()
    out = CliRunner().invoke(main, ["mlflow-sync", "--lab", str(lab.root), option, ""])
    assert out.exit_code == 2
    assert f"Invalid value for '{option}': is empty" in out.output
    assert not lab.mlflow_db.exists()


def test_a_broken_lab_directory_cannot_reach_the_publisher(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    bus = EventBus()
    # Lab.resolve refuses a file; a lab folder replaced by one after it was resolved:
    lab = Lab(not_a_dir)
    logger = MLflowLogger(bus, lab=lab, study="s", tracking_uri=f"http://127.0.0.1:{_free_port()}")
    ev = E.trial_start(model_run_id="s", trial_id="t", spectral_norm=True)
    assert bus.publish(ev) == 1
    logger.log_artifacts("t", sigma_table=pd.DataFrame({"sigma": [1.0]}))
    assert not logger.close(10)
    assert any("outbox unavailable" in e for e in logger.errors)
    assert any("cannot write artifacts" in e for e in logger.errors)


def test_link_event_is_harmless_to_status_and_start_time() -> None:
    from thunderline_lab.tracking import RunRecord

    store = TrialStore(":memory:")
    run_trial_events = [
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True),
        E.run_metric(
            model_run_id="r", trial_id="t", step=0, metric_name="val_loss", metric_value=1
        ),
        E.trial_complete(model_run_id="r", trial_id="t", spectral_norm=True, status="pruned"),
    ]
    store.append(run_trial_events)
    before = store.trial("r", "t")
    run = RunRecord("abc123", "1", "RUNNING", None, None, "mlflow-artifacts:/1/abc", None, "active")
    link = _link_event(("r", "t"), None, run)
    assert link.name == "ml.run.start" and link.id.startswith("mlflow:")
    assert store.append([link]).accepted == 1
    assert store.append([_link_event(("r", "t"), None, run)]).accepted == 0  # deterministic id
    after = store.trial("r", "t")
    assert before is not None and after is not None
    assert after["mlflow_run_id"] == "abc123"
    for col in ("status", "started_at", "ended_at", "spectral_norm", "parameters", "metrics"):
        assert after[col] == before[col], col


@pytest.mark.parametrize(
    "value", [True, False, None, 3, 0.001, 1e-4, 2.5, "adamw", [1, 2], {"a": 1}]
)
def test_params_round_trip_through_mlflow_strings(value: Any) -> None:
    text = _param_value(value)
    assert isinstance(text, str)
    assert text == (str(value) if not isinstance(value, list | dict) else text)
    assert _parse_param(text) == value


def test_a_snapshot_is_up_to_date_only_when_everything_was_sent() -> None:
    from thunderline_lab.tracking import RunRecord, TrialSnapshot

    snap = TrialSnapshot("r", "t", spectral_norm=True, parameters={"lr": 0.1}, status="completed")
    snap.metrics = {"test_accuracy": 0.9}
    rs = _RunSync(snap, run=RunRecord("x", "1", "FINISHED", 1, 2, "", None, "active"))
    assert not _up_to_date(rs)
    rs.logged_params = snap.mlflow_params()
    rs.logged_status = "FINISHED"
    assert not _up_to_date(rs)  # final/test_accuracy not sent
    rs.logged_summary = {"test_accuracy": 0.9}
    assert _up_to_date(rs)
    assert snap.mlflow_params() == {"lr": "0.1", "spectral_norm": "True"}


# ---------------------------------------------------------------------------------------------
# Several tracking URIs, params that apply, the study's parent run (local file stores)
# ---------------------------------------------------------------------------------------------

SN_ONLY = ("spectral_norm_coeff", "n_power_iterations", "conv_sn_mode", "sn_layers")
CNN_ONLY = ("kernel_size", "pooling", "conv_sn_mode")


def study_events(study: str, arms: list[bool], *, architecture: str = "mlp") -> list[E.Event]:
    """A finished study's events as run_study and train_trial publish them: the study's
    parameters (``spectral_norm_coeff`` None for the SN-off arm) in ``ml.trial.start``, the
    model config (every field, whether it applies or not) plus those in ``ml.run.start``."""
    from thunderline_lab.models import ModelConfig

    out: list[E.Event] = []
    for number, sn in enumerate(arms):
        ref = {"model_run_id": study, "trial_id": f"trial_{number:04d}", "study": study}
        coeff = 1.5 if sn else None
        params: dict[str, Any] = {
            "spectral_norm": sn,
            "spectral_norm_coeff": coeff,
            "lr": 0.01 * (number + 1),
            "weight_decay": 1e-4,
            "depth": 2,
            "width": 16,
            "dropout": 0.0,
            "activation": "relu",
            "batchnorm": False,
            "n_power_iterations": 1,
            "batch_size": 64,
            "seed": number // 2,
            "pair_id": number // 2,
            "group_id": number // 2,
            "arm": "sn_on" if sn else "sn_off",
            "architecture": architecture,
            "dataset": "digits",
            "epochs": 2,
            "patience": None,
            "design": "paired",
        }
        if sn and architecture == "cnn":
            params["conv_sn_mode"] = "operator"
        config = ModelConfig(
            architecture=architecture, depth=2, width=16, spectral_norm=sn,
            spectral_norm_coeff=coeff or 1.0,
        ).to_dict()  # fmt: skip
        out += [
            E.trial_start(**ref, spectral_norm=sn, spectral_norm_coeff=coeff, parameters=params),
            E.run_start(
                **ref, spectral_norm=sn, spectral_norm_coeff=coeff, parameters={**config, **params}
            ),
            *(
                E.run_metric(**ref, step=s, measurements={"val_loss": 1.0 - s / 10 - number / 100})
                for s in range(2)
            ),
            E.run_stop(**ref, epochs=2),
            E.trial_complete(
                **ref,
                spectral_norm=sn,
                spectral_norm_coeff=coeff,
                parameters=params,
                metrics={"test_accuracy": 0.5 + number / 100},
            ),
        ]
    return out


def applicable_params(row: dict[str, Any]) -> dict[str, str]:
    """The params a trial's run should carry: no SN settings without SN, no CNN settings
    for an MLP."""
    params = row["parameters"]
    drop = set()
    if params.get("spectral_norm") is False:
        drop |= set(SN_ONLY)
    if params.get("architecture") not in (None, "cnn"):
        drop |= set(CNN_ONLY)
    return {k: _param_value(v) for k, v in params.items() if k not in drop}


def file_client(uri: str) -> Any:
    """MLflow's client of a file store (an absolute URI: MLflow caches stores by URI text)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri if "://" in uri else Path(uri).resolve().as_uri())


def trial_runs(uri: str, study: str) -> tuple[Any, dict[str, Any]]:
    """The study's parent run and its trial runs by trial_id, read with MLflow's client."""
    client = file_client(uri)
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no experiment {study!r} in {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("thunderline.role") == "study"]
    assert len(parents) == 1
    trials = [r for r in runs if r.data.tags.get("thunderline.role") == "trial"]
    by_trial = {r.data.tags["trial_id"]: r for r in trials}
    assert len(by_trial) == len(trials), "a trial has two runs"
    return parents[0], by_trial


def assert_copy(uri: str, store: TrialStore, study: str) -> dict[str, str]:
    """The study is complete in the MLflow at ``uri``: one run per trial with its params,
    metric history, final metrics and status."""
    client = file_client(uri)
    parent, by_trial = trial_runs(uri, study)
    trials = store.trials(study=study)
    assert sorted(by_trial) == sorted(trials["trial_id"])
    for row in trials.to_dict("records"):
        run = by_trial[row["trial_id"]]
        assert run.data.params == applicable_params(row), row["trial_id"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        hist = sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")
        )
        want = store.metric_history(study, row["trial_id"], "val_loss")
        assert hist == list(zip(want["step"].astype(int), want["value"], strict=True))
        assert run.data.metrics[FINAL_PREFIX + "test_accuracy"] == row["metrics"]["test_accuracy"]
    return {t: r.info.run_id for t, r in by_trial.items()}


@pytest.fixture
def file_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path, where ./mlruns-a and ./mlruns-b are MLflow file stores."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses them otherwise
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_each_tracking_uri_gets_its_own_complete_copy(file_stores: Path) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    store.append(study_events("multi", [True, False, True, False]))
    sync_a = ["mlflow-sync", "--lab", str(lab.root), "--tracking-uri", "./mlruns-a"]
    out = CliRunner().invoke(main, [*sync_a, "--all-studies"])
    assert out.exit_code == 0, out.output
    assert "pushed 4 runs (4 created)" in out.output
    runs_a = assert_copy("./mlruns-a", store, "multi")
    assert dict(zip(store.trials()["trial_id"], store.trials()["mlflow_run_id"], strict=True)) == (
        runs_a
    )

    # The user switches MLFLOW_TRACKING_URI: B gets every trial, A is not touched.
    out = CliRunner().invoke(
        main, ["mlflow-sync", "--lab", str(lab.root)], env={"MLFLOW_TRACKING_URI": "./mlruns-b"}
    )
    assert out.exit_code == 0, out.output
    assert "pushed 4 runs (4 created)" in out.output
    runs_b = assert_copy("./mlruns-b", store, "multi")
    assert set(runs_b.values()).isdisjoint(runs_a.values())
    assert assert_copy("./mlruns-a", store, "multi") == runs_a
    # The trials keep their link to the MLflow they were first mirrored to.
    assert set(store.trials()["mlflow_run_id"]) == set(runs_a.values())
    links_b = mlflow_links(lab, store, study="multi", tracking_uri="./mlruns-b")
    assert dict(zip(links_b["trial_id"], links_b["mlflow_run_id"], strict=True)) == runs_b
    assert set(links_b["sync_state"]) == {"synced"}

    # Each copy stays idempotent, however its URI is spelt.
    for uri in ("./mlruns-b", "./mlruns-a", (file_stores / "mlruns-a").as_uri()):
        again = sync(lab, store, tracking_uri=uri)
        assert (again.pushed_runs, again.created_runs, again.pushed_points) == (0, 0, 0), uri
        assert (again.pushed_params, again.errors, again.still_pending) == (0, [], 0), uri
    assert assert_copy("./mlruns-a", store, "multi") == runs_a
    assert assert_copy("./mlruns-b", store, "multi") == runs_b
    store.close()


def rewrite_as_old_outbox(store: TrialStore, spelt: str) -> tuple[int, int]:
    """Rewrite the bookkeeping as a lab made before the outbox knew its tracking URI: one row
    per study (its URI as the user spelt it) and one per trial; how many of each."""
    conn = store.conn
    studies = conn.execute(
        "SELECT study, experiment_id, parent_run_id, updated_at FROM mlflow_studies"
    ).fetchall()
    outbox = conn.execute(
        "SELECT model_run_id, trial_id, study, state, mlflow_run_id, artifact_uri, "
        "synced_events, attempts, last_error, updated_at FROM mlflow_outbox"
    ).fetchall()
    conn.executescript(
        """
        DROP TABLE mlflow_studies;
        DROP TABLE mlflow_outbox;
        DROP TABLE IF EXISTS mlflow_artifacts;
        CREATE TABLE mlflow_studies (study TEXT PRIMARY KEY, tracking_uri TEXT NOT NULL,
            experiment_id TEXT, parent_run_id TEXT, updated_at TEXT);
        CREATE TABLE mlflow_outbox (model_run_id TEXT NOT NULL, trial_id TEXT NOT NULL,
            study TEXT, state TEXT NOT NULL, mlflow_run_id TEXT, artifact_uri TEXT,
            synced_events INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT, updated_at TEXT, PRIMARY KEY (model_run_id, trial_id));
        """
    )
    conn.executemany("INSERT INTO mlflow_studies VALUES (?, ?, ?, ?, ?)",
                     [(s[0], spelt, *s[1:]) for s in studies])  # fmt: skip
    conn.executemany("INSERT INTO mlflow_outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", outbox)
    return len(studies), len(outbox)


def test_an_outbox_from_before_per_uri_keys_is_migrated_to_its_study_uri(
    file_stores: Path,
) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    store.append(study_events("old", [True, False]))
    first = sync(lab, store, tracking_uri="./mlruns-a", all_studies=True)
    assert first.created_runs == 2
    runs_a = assert_copy("./mlruns-a", store, "old")
    assert rewrite_as_old_outbox(store, "./mlruns-a") == (1, 2)

    links = mlflow_links(lab, store, study="old")  # opening the outbox migrates it
    assert dict(zip(links["trial_id"], links["mlflow_run_id"], strict=True)) == runs_a
    assert set(links["sync_state"]) == {"synced"}
    assert set(links["run_url"].isna()) == {False}
    again = sync(lab, store, tracking_uri="./mlruns-a")
    assert (again.pushed_runs, again.created_runs, again.pushed_points) == (0, 0, 0)
    to_b = sync(lab, store, tracking_uri="./mlruns-b")
    assert (to_b.pushed_runs, to_b.created_runs) == (2, 2)
    assert_copy("./mlruns-b", store, "old")
    assert assert_copy("./mlruns-a", store, "old") == runs_a
    store.close()


def test_runs_pulled_into_an_old_outbox_are_recorded_again_by_the_next_pull(
    file_stores: Path,
) -> None:
    from mlflow import MlflowClient

    uri = (file_stores / "mlruns-a").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("scratch"), tags={"constraint_method": "none"})
    client.log_metric(run.info.run_id, "val_accuracy", 0.75, step=1)
    client.set_terminated(run.info.run_id, "FINISHED")
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    store.append(study_events("old", [True]))
    sync(lab, store, tracking_uri=uri, all_studies=True)
    pulled = sync(lab, store, tracking_uri=uri, experiments=["scratch"])
    assert pulled.adopted_trials == 1
    adopted = f"mlflow_{run.info.run_id}"

    def links() -> dict[str, tuple[str, str]]:
        df = mlflow_links(lab, store, tracking_uri=uri)
        return {r.trial_id: (r.mlflow_run_id, r.sync_state) for r in df.itertuples()}

    before = links()
    assert before[adopted] == (run.info.run_id, "synced")
    # The adopted run's study ("scratch") was never mirrored: migrating drops its row ...
    assert rewrite_as_old_outbox(store, uri) == (1, 2)
    assert links()[adopted][1] == "not mirrored"
    counts = store.counts()
    # ... and the next pull records it again, adopting nothing twice.
    again = sync(lab, store, tracking_uri=uri, experiments=["scratch"])
    assert (again.pulled_runs, again.adopted_trials, again.pushed_runs) == (0, 0, 0)
    assert store.counts() == counts
    assert links() == before
    store.close()


def test_a_run_the_lab_cannot_hold_is_named_and_the_pull_goes_on(file_stores: Path) -> None:
    from mlflow import MlflowClient

    uri = (file_stores / "mlruns-a").as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("scratch")
    bad = client.create_run(exp, tags={"trial_id": "", "model_run_id": "by-hand"})
    good = client.create_run(exp, tags={"constraint_method": "none"})
    for run in (bad, good):
        client.log_metric(run.info.run_id, "val_accuracy", 0.75, step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    report = sync(lab, store, tracking_uri=uri, experiments=["scratch"])
    assert (report.pulled_runs, report.adopted_trials) == (1, 1)
    assert store.trial("scratch", f"mlflow_{good.info.run_id}") is not None
    assert len(report.errors) == 1
    assert f"experiment 'scratch': run {bad.info.run_id}: not pulled: " in report.errors[0]
    assert "payload.trial_id" in report.errors[0]
    store.close()


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_params_that_do_not_apply_to_a_trial_are_left_out(architecture: str) -> None:
    from thunderline_lab.tracking import TrialSnapshot

    for ev in study_events("s", [True, False], architecture=architecture):
        if ev.name != "ml.run.start":
            continue
        p = ev.payload
        snap = TrialSnapshot(
            "s", p.trial_id, spectral_norm=p.spectral_norm,
            spectral_norm_coeff=p.spectral_norm_coeff, parameters=dict(p.parameters),
        )  # fmt: skip
        got = snap.mlflow_params()
        assert all(got[k] != "None" for k in {*SN_ONLY, *CNN_ONLY} & set(got)), got
        assert got["architecture"] == architecture and got["lr"] == _param_value(p.parameters["lr"])
        sn_keys = {k for k in SN_ONLY if k in got}
        cnn_keys = {k for k in ("kernel_size", "pooling") if k in got}
        if p.spectral_norm:
            assert got["spectral_norm"] == "True" and got["spectral_norm_coeff"] == "1.5"
            assert sn_keys >= {"spectral_norm_coeff", "n_power_iterations", "sn_layers"}
            assert ("conv_sn_mode" in got) == (architecture == "cnn")
        else:
            assert got["spectral_norm"] == "False" and sn_keys == set()
        assert bool(cnn_keys) == (architecture == "cnn")
        assert got["patience"] == "None"  # applies: no early stopping
    # The lab's constraint flag alone (no spectral_norm parameter) decides too.
    snap = TrialSnapshot("s", "t", spectral_norm=False, parameters={"spectral_norm_coeff": None})
    assert snap.mlflow_params() == {"spectral_norm": "False"}


def test_the_parent_run_carries_the_study_settings(file_stores: Path) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    store.append(study_events("described", [True, False, True, False]))
    report = sync(lab, store, tracking_uri="./mlruns-a", all_studies=True)
    assert report.errors == []
    parent, _ = trial_runs("./mlruns-a", "described")
    assert parent.data.params == {
        "study": "described",
        "design": "paired",
        "dataset": "digits",
        "architecture": "mlp",
        "epochs": "2",
    }
    tags = parent.data.tags
    assert tags["n_trials"] == "4"
    assert tags["seeds"] == "[0, 1]"
    space = json.loads(tags["search_space"])
    assert space["lr"] == [0.01, 0.04]
    assert space["spectral_norm"] == [False, True]
    assert space["spectral_norm_coeff"] == [1.5]
    assert space["activation"] == ["relu"]
    assert not {"seed", "pair_id", "group_id", "arm", "design", "epochs"} & set(space)

    # More trials later (a resumed study): the summary follows, the settings stay.
    more = [
        ev
        for ev in study_events("described", [True, False, True, False, True, False])
        if ev.payload.trial_id in ("trial_0004", "trial_0005")
    ]
    store.append(more)
    again = sync(lab, store, tracking_uri="./mlruns-a")
    assert (again.created_runs, again.conflicts, again.errors) == (2, [], [])
    parent, _ = trial_runs("./mlruns-a", "described")
    assert parent.data.tags["n_trials"] == "6" and parent.data.tags["seeds"] == "[0, 1, 2]"
    assert json.loads(parent.data.tags["search_space"])["lr"] == [0.01, 0.06]
    assert parent.data.params["epochs"] == "2"
    store.close()


def test_the_logger_gives_the_parent_run_the_study_settings(file_stores: Path) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    bus = EventBus()
    uri = (file_stores / "mlruns-live").as_uri()
    with (
        StoreWriter(store, bus, interval=0.05),
        MLflowLogger(
            bus, lab=lab, study="live", store=store, tracking_uri=uri, isolate=False
        ) as logger,
    ):
        for ev in study_events("live", [True, False]):
            bus.publish(ev)
        assert wait_synced(logger, 60)
    assert not logger.errors
    parent, runs = trial_runs(uri, "live")
    assert parent.data.params["design"] == "paired" and parent.data.params["study"] == "live"
    assert parent.data.tags["n_trials"] == "2"
    assert "spectral_norm_coeff" not in runs["trial_0001"].data.params
    assert runs["trial_0000"].data.params["spectral_norm_coeff"] == "1.5"
    store.close()


# ---------------------------------------------------------------------------------------------
# Artifacts reach every tracking URI the lab is mirrored to
# ---------------------------------------------------------------------------------------------

ARTIFACTS = {"model/state_dict.pt", "sigma/sigma_table.csv", "plots/learning_curve.png"}


def log_with_artifacts(
    lab: Lab, store: TrialStore, uri: str, study: str, numbers: list[int]
) -> None:
    """Run trials ``numbers`` of a study live with a logger on ``uri``, artifacts included."""
    bus = EventBus()
    arms = [n % 2 == 0 for n in range(max(numbers) + 1)]
    wanted = {f"trial_{n:04d}" for n in numbers}
    with (
        StoreWriter(store, bus, interval=0.05) as writer,
        MLflowLogger(
            bus, lab=lab, study=study, store=store, tracking_uri=uri, isolate=False
        ) as mlf,
    ):
        for ev in study_events(study, arms):
            if ev.payload.trial_id in wanted:
                bus.publish(ev)
        for n in numbers:
            model = _model(arms[n], 1.0)
            history = [{"epoch": s, "val_loss": 1.0 - s / 10} for s in range(2)]
            mlf.log_artifacts(
                f"trial_{n:04d}", model=model, sigma_table=_sigma_table(model), history=history
            )
        assert wait_synced(mlf, 60)
        writer.flush()
    assert not mlf.errors


def artifacts_of(uri: str, study: str) -> dict[str, dict[str, bytes]]:
    """Per trial, its run's artifact files (path -> content), read from the file store."""
    out = {}
    for trial_id, run in trial_runs(uri, study)[1].items():
        root = Path(run.info.artifact_uri.removeprefix("file://"))
        out[trial_id] = {
            f.relative_to(root).as_posix(): f.read_bytes() for f in root.rglob("*") if f.is_file()
        }
    return out


def test_every_tracking_uri_gets_the_artifacts_once(file_stores: Path) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    spool = lab.root / "mlflow_outbox"
    uri_a = (file_stores / "mlruns-a").as_uri()
    log_with_artifacts(lab, store, uri_a, "arts", [0, 1])
    in_a = artifacts_of(uri_a, "arts")
    assert {t: set(files) for t, files in in_a.items()} == {
        "trial_0000": ARTIFACTS,
        "trial_0001": ARTIFACTS,
    }
    assert not list(spool.glob("*/*/*/*"))  # A was the only MLflow of the lab: spool emptied

    # B mirrors the lab later: it gets the artifacts from A's copy.
    to_b = sync(lab, store, tracking_uri="./mlruns-b")
    assert (to_b.created_runs, to_b.uploaded_artifacts, to_b.errors) == (2, 6, [])
    assert artifacts_of("./mlruns-b", "arts") == in_a

    # Trials logged to A from now on wait in the spool until B has them too.
    log_with_artifacts(lab, store, uri_a, "arts", [2, 3])
    assert len(list(spool.glob("*/*/model/state_dict.pt"))) == 2
    to_b = sync(lab, store, tracking_uri="./mlruns-b")
    assert (to_b.created_runs, to_b.uploaded_artifacts, to_b.errors) == (2, 6, [])
    in_a = artifacts_of(uri_a, "arts")
    assert len(in_a) == 4 and all(set(files) == ARTIFACTS for files in in_a.values())
    assert artifacts_of("./mlruns-b", "arts") == in_a
    assert not list(spool.glob("*/*/*/*"))  # every MLflow has them: the spool is emptied

    # A re-sync to either MLflow uploads nothing again.
    for uri in ("./mlruns-b", uri_a):
        again = sync(lab, store, tracking_uri=uri)
        assert (again.uploaded_artifacts, again.pushed_runs, again.errors) == (0, 0, []), uri
    store.close()


def mirror_rows(lab: Lab) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of the three per-URI MLflow tables of the lab, read on a connection of its own."""
    conn = sqlite3.connect(lab.db_path)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}"))
            for table in ("mlflow_studies", "mlflow_outbox", "mlflow_artifacts")
        }
    finally:
        conn.close()


def spooled_files(spool: Path) -> dict[str, bytes]:
    return {
        p.relative_to(spool).as_posix(): p.read_bytes()
        for p in spool.rglob("*")
        if p.is_file() and p.name != "meta.json"
    }


def test_forgetting_a_tracking_uri_frees_the_spool_and_a_later_sync_starts_afresh(
    file_stores: Path,
) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    spool = lab.root / "mlflow_outbox"
    uri_a, uri_b = (file_stores / "mlruns-a").as_uri(), (file_stores / "mlruns-b").as_uri()
    log_with_artifacts(lab, store, uri_a, "arts", [0, 1])
    assert sync(lab, store, tracking_uri="./mlruns-b").uploaded_artifacts == 6
    log_with_artifacts(lab, store, uri_a, "arts", [2, 3])
    assert len(spooled_files(spool)) == 6  # trials 2 and 3 wait for B

    # An unknown URI is a clean error naming the URIs the lab knows; nothing changes.
    rows, files = mirror_rows(lab), spooled_files(spool)
    forget = ["mlflow-sync", "--lab", str(lab.root), "--forget"]
    out = CliRunner().invoke(main, [*forget, "./mlruns-c"])
    assert out.exit_code == 1, out.output
    assert isinstance(out.exception, SystemExit)  # no traceback
    uri_c = (file_stores / "mlruns-c").as_uri()
    assert (
        f"error: ./mlruns-c: not a tracking URI of this lab (as {uri_c}); "
        f"it knows {uri_a}, {uri_b}" in out.output
    )
    # --forget does not sync in the same call.
    out = CliRunner().invoke(main, [*forget, "./mlruns-b", "--all-studies"])
    assert out.exit_code == 2 and "--forget cannot be combined with --all-studies" in out.output
    assert (mirror_rows(lab), spooled_files(spool)) == (rows, files)

    # Forgetting B (spelt another way): A holds every spooled file, so all of them are freed.
    out = CliRunner().invoke(main, [*forget, "mlruns-b"])
    assert out.exit_code == 0, out.output
    assert (
        f"mlflow {uri_b}: forgot 1 studies, 2 trial rows and 6 artifact records; "
        "freed 6 spooled files (0 still spooled for the other MLflows)" in out.output
    )
    assert spooled_files(spool) == {}
    # Only B's rows are gone, A's are as they were.
    assert mirror_rows(lab) == {t: [r for r in rs if uri_b not in r] for t, rs in rows.items()}
    # A trial logged to A from now on no longer waits for B.
    log_with_artifacts(lab, store, uri_a, "arts", [4])
    assert spooled_files(spool) == {}

    # Syncing to B again treats it as a new MLflow: every trial and artifact (from A's copy);
    # the runs B still holds are found by their trial_id tag, not made twice.
    to_b = sync(lab, store, tracking_uri="./mlruns-b")
    assert (to_b.pushed_runs, to_b.created_runs, to_b.uploaded_artifacts, to_b.errors) == (
        5,
        3,
        15,
        [],
    )
    in_a = artifacts_of(uri_a, "arts")
    assert len(in_a) == 5 and artifacts_of("./mlruns-b", "arts") == in_a
    again = sync(lab, store, tracking_uri="./mlruns-b")
    assert (again.uploaded_artifacts, again.pushed_runs, again.errors) == (0, 0, [])
    store.close()


@pytest.mark.slow
def test_a_tracking_uri_mirrored_later_gets_the_artifacts_of_a_server(
    server: MlflowServer, file_stores: Path, client_for: Callable[[str], Any]
) -> None:
    if not server.alive():
        server.start()
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    log_with_artifacts(lab, store, server.url, "served-arts", [0])
    assert not list((lab.root / "mlflow_outbox").glob("*/*/*/*"))  # the server has them
    to_b = sync(lab, store, tracking_uri="./mlruns-b")  # downloaded from the server
    assert (to_b.uploaded_artifacts, to_b.errors) == (3, [])
    in_b = artifacts_of("./mlruns-b", "served-arts")["trial_0000"]
    assert set(in_b) == ARTIFACTS
    client = client_for(server.url)
    trial = store.trial("served-arts", "trial_0000")
    assert trial is not None
    got = client.download_artifacts(
        trial["mlflow_run_id"], "sigma/sigma_table.csv", str(file_stores)
    )
    assert Path(got).read_bytes() == in_b["sigma/sigma_table.csv"]
    assert sync(lab, store, tracking_uri="./mlruns-b").uploaded_artifacts == 0
    store.close()


def test_an_unreadable_spool_record_is_reported_not_a_traceback(file_stores: Path) -> None:
    lab = Lab.resolve(file_stores / "lab").ensure()
    store = lab.store()
    store.append(study_events("spooled", [True]))
    spool = lab.root / "mlflow_outbox"

    def spool_folder(name: str) -> Path:  # artifacts whose meta.json a crash cut short
        folder = spool / "spooled" / name
        (folder / "sigma").mkdir(parents=True)
        (folder / "sigma" / "sigma_table.csv").write_text("layer,sigma\n0,1.0\n")
        (folder / "meta.json").write_text('{"model_run_id": "spooled", "tri')
        return folder

    # The folder of a trial being pushed is found by its name: uploaded, no warning.
    spool_folder("trial_0000")
    sync_a = ["mlflow-sync", "--lab", str(lab.root), "--tracking-uri", "./mlruns-a"]
    out = CliRunner().invoke(main, [*sync_a, "--all-studies"])
    assert out.exit_code == 0, out.output
    assert "pushed 1 runs (1 created)" in out.output and "1 artifacts" in out.output
    assert "warning" not in out.output
    assert not list(spool.rglob("*.csv"))
    # Any other is named in a warning and kept for the user to look at.
    stray = spool_folder("trial_0007")
    out = CliRunner().invoke(main, sync_a)
    assert out.exit_code == 0, out.output
    assert "pushed 0 runs" in out.output
    assert f"warning: {stray / 'meta.json'}: unreadable artifact spool record" in out.output
    assert (stray / "sigma" / "sigma_table.csv").exists()
    store.close()


def test_a_tracking_uri_that_is_not_mlflow_is_a_clean_error(tmp_path: Path) -> None:
    import http.server
    import threading

    class WebPage(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html><body>a web app, not MLflow</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, *args: Any) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebPage)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        lab = Lab.resolve(tmp_path / "lab").ensure()
        lab.store().close()
        url = f"http://127.0.0.1:{web.server_address[1]}"
        out = CliRunner().invoke(
            main, ["mlflow-sync", "--lab", str(lab.root), "--tracking-uri", url]
        )
    finally:
        web.shutdown()
        web.server_close()
    assert out.exit_code == 1
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert "error: MLflow sync stopped" in out.output
    assert f"is {url} an MLflow tracking server?" in out.output


# Opens a new MLflow database once told to (a line on stdin), as a study worker's logger
# does; everything MLflow imports on the way is imported before, so the openers start at once.
_OPEN_WHEN_TOLD = """\
import sys
import alembic.command, mlflow, mlflow.store.tracking.sqlalchemy_store
from thunderline_lab.tracking import _ClientBackend
print("ready", flush=True)
sys.stdin.readline()
try:
    _ClientBackend(sys.argv[1]).list_experiments()
    print("ok")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0])
"""


def test_processes_opening_a_new_mlflow_database_at_once_all_get_its_tables(
    tmp_path: Path,
) -> None:
    """`run --workers 2` on a new lab: both workers' loggers opened lab/mlflow.db at once and
    both ran MLflow's migrations; one failed half-way ("duplicate column name: step", "table
    trace_info already exists") and its trials could stay in the outbox."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_WHEN_TOLD, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:  # every one imported: then all at once
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert outputs == ["ok"] * 3
    assert (tmp_path / "mlflow.db.lock").exists()  # the lock beside the database

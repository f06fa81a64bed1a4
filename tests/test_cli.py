from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from thunderline_lab import events as E
from thunderline_lab.cli import main
from thunderline_lab.store import TrialStore


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def write_events(path: Path, n: int = 3) -> list[E.Event]:
    evs: list[E.Event] = [E.trial_start(model_run_id="s", trial_id="t0", spectral_norm=True)]
    evs += [
        E.run_metric(
            model_run_id="s",
            trial_id="t0",
            step=i,
            metric_name="val_loss",
            metric_value=1.0 / (i + 1),
        )
        for i in range(n)
    ]
    evs.append(
        E.trial_complete(
            model_run_id="s", trial_id="t0", spectral_norm=True, metrics={"val_accuracy": 0.93}
        )
    )
    path.write_text("\n".join(e.to_json() for e in evs))
    return evs


def test_validate_ok(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "ev.jsonl"
    write_events(f)
    result = runner.invoke(main, ["validate", str(f)])
    assert result.exit_code == 0, result.output
    assert "ok: 5 valid events" in result.output


def test_validate_prints_one_line_per_error(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    good = E.run_metric(model_run_id="s", trial_id="t", step=0, metric_name="a", metric_value=1.0)
    bad = json.loads(good.to_json())
    bad["payload"]["step"] = -2
    bad["payload"]["metric_value"] = "high"
    f.write_text(json.dumps([json.loads(good.to_json()), bad]))
    result = runner.invoke(main, ["validate", str(f)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2
    assert all(f"{f}: record 1: payload." in ln for ln in lines)
    assert "Traceback" not in result.output


def test_validate_refuses_what_ingest_would_an_id_naming_two_events(
    runner: CliRunner, tmp_path: Path
) -> None:
    # validate said "ok" of a file that ingest then refused
    start = json.loads(E.trial_start(model_run_id="s", trial_id="t", spectral_norm=True).to_json())
    other = {**start, "payload": {**start["payload"], "spectral_norm": False}}  # same id
    f = tmp_path / "dup.json"
    f.write_text(json.dumps([start, start, other]))  # a resend is fine, another event is not
    result = runner.invoke(main, ["validate", str(f)])
    assert result.exit_code == 1, result.output
    assert f"{f}: record 2: payload.spectral_norm: event id" in result.output
    assert "[id_conflict]" in result.output
    lab = tmp_path / "lab"
    refused = runner.invoke(main, ["ingest", str(f), "--lab", str(lab)])
    assert refused.exit_code == 1 and "record 2: payload.spectral_norm" in refused.output
    f.write_text(json.dumps([start, start]))
    assert runner.invoke(main, ["validate", str(f)]).exit_code == 0


def test_validate_malformed_json_names_file(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text('[{"name": ')
    result = runner.invoke(main, ["validate", str(f)])
    assert result.exit_code == 1 and f"{f}: invalid JSON" in result.output


def test_ingest_trials_and_replay(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "ev.jsonl"
    write_events(f)
    lab = tmp_path / "lab"
    result = runner.invoke(main, ["ingest", str(f), "--lab", str(lab)])
    assert result.exit_code == 0 and "accepted 5, duplicates 0" in result.output
    result = runner.invoke(main, ["ingest", str(f), "--lab", str(lab)])
    assert "accepted 0, duplicates 5" in result.output
    result = runner.invoke(main, ["trials", "--lab", str(lab), "--format", "json"])
    rows = json.loads(result.output)
    assert rows[0]["status"] == "completed" and rows[0]["spectral_norm"] is True
    assert rows[0]["metrics"] == {"val_accuracy": 0.93}
    for key in (
        "model_run_id",
        "trial_id",
        "study",
        "spectral_norm_coeff",
        "mlflow_run_id",
        "parameters",
        "duration_ms",
        "rank",
    ):
        assert key in rows[0]
    table = runner.invoke(main, ["trials", "--lab", str(lab)]).output
    assert "t0" in table and "0.9300" in table
    csv = runner.invoke(main, ["trials", "--lab", str(lab), "--format", "csv"]).output
    assert csv.splitlines()[0].startswith("model_run_id,trial_id")
    result = runner.invoke(main, ["replay", "--lab", str(lab)])
    assert result.exit_code == 0 and "events 5" in result.output and "trials 1" in result.output


def test_ingest_from_stdin_with_seed_payload(runner: CliRunner, tmp_path: Path) -> None:
    post = {
        "event": "ml.run.metric",
        "trial_id": "x",
        "metadata": {"epoch": 0},
        "measurements": {"loss": 1.0},
    }
    result = runner.invoke(
        main,
        ["ingest", "-", "--lab", str(tmp_path), "--model-run", "remote"],
        input=json.dumps(post),
    )
    assert result.exit_code == 0, result.output
    assert "<stdin>: accepted 1" in result.output


@pytest.mark.parametrize("command", ["validate", "ingest"])
@pytest.mark.parametrize("model_run", ["", "r" * 257])
def test_a_bad_model_run_option_is_named_as_the_option(
    runner: CliRunner, tmp_path: Path, command: str, model_run: str
) -> None:
    # it was refused as each post's "model_run_id", a field the file does not have
    post = {"event": "ml.trial.start", "trial_id": "t1", "metadata": {"spectral_norm": True}}
    f = tmp_path / "post.json"
    f.write_text(json.dumps(post))
    lab = ["--lab", str(tmp_path / "lab")] if command == "ingest" else []
    result = runner.invoke(main, [command, str(f), *lab, "--model-run", model_run])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--model-run': a model_run_id must be 1 to 256" in result.output
    assert "post.json" not in result.output
    assert not (tmp_path / "lab").exists()


def test_bad_ingest_keeps_store_intact(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "ev.jsonl"
    write_events(f)
    runner.invoke(main, ["ingest", str(f), "--lab", str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "ml.run.metric", "payload": {}}))
    result = runner.invoke(main, ["ingest", str(bad), "--lab", str(tmp_path)])
    assert result.exit_code == 1
    rows = json.loads(
        runner.invoke(main, ["trials", "--lab", str(tmp_path), "--format", "json"]).output
    )
    assert len(rows) == 1


def test_an_empty_report_folder_is_refused_naming_the_option(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compare --out '' wrote report.md and the plots into the current folder
    f = tmp_path / "ev.jsonl"
    write_events(f)
    lab = tmp_path / "lab"
    assert runner.invoke(main, ["ingest", str(f), "--lab", str(lab)]).exit_code == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(main, ["compare", "--lab", str(lab), "--study", "s", "--out", ""])
    assert result.exit_code == 2
    assert "Invalid value for '--out': is empty (for the current folder, give .)" in result.output
    assert not any(work.iterdir())


@pytest.mark.parametrize(
    "command", [["trials"], ["replay"], ["compare", "--study", "s"], ["ingest", "ev.jsonl"]]
)
def test_an_empty_lab_folder_is_refused_naming_the_option(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # --lab '' (an unset variable in a script) was the current folder: ingest made ./lab.db
    write_events(tmp_path / "ev.jsonl")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, [*command, "--lab", ""])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--lab': is empty (for the current folder, give .)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.jsonl"]


def test_trials_without_store_is_a_clean_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["trials", "--lab", str(tmp_path / "none")])
    assert result.exit_code != 0 and "no trial store" in result.output


def test_trials_of_a_study_the_lab_lacks_is_an_error_naming_the_closest(
    runner: CliRunner, tmp_path: Path
) -> None:
    f = tmp_path / "ev.jsonl"
    ids = {"model_run_id": "smoke", "trial_id": "t0", "study": "smoke"}
    f.write_text(E.trial_start(**ids, spectral_norm=True).model_dump_json() + "\n")
    lab = str(tmp_path / "lab")
    assert runner.invoke(main, ["ingest", str(f), "--lab", lab]).exit_code == 0
    result = runner.invoke(main, ["trials", "--lab", lab, "--study", "smok"])
    assert result.exit_code == 1
    assert "no study 'smok' (did you mean 'smoke'?); studies in this lab: smoke" in result.output
    # a study the lab has, with no trial matching the filters: "no trials", not an error
    result = runner.invoke(main, ["trials", "--lab", lab, "--study", "smoke", "--status", "failed"])
    assert result.exit_code == 0 and "no trials" in result.output


def test_the_trials_table_leaves_a_missing_metric_blank(runner: CliRunner, tmp_path: Path) -> None:
    # a cancelled trial (no metrics) showed "nan" under val_accuracy, a blank duration
    from thunderline_lab.monitor import synthetic_study

    evs = [
        e
        for e in synthetic_study("s", n_pairs=1, epochs=1)
        if not (e.name == "ml.trial.complete" and e.payload.trial_id == "trial_0001")
    ]
    (tmp_path / "ev.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in evs))
    ingested = runner.invoke(main, ["ingest", str(tmp_path / "ev.jsonl"), "--lab", str(tmp_path)])
    assert ingested.exit_code == 0, ingested.output
    table = runner.invoke(main, ["trials", "--lab", str(tmp_path)]).output
    assert "nan" not in table.lower(), table
    running = next(line for line in table.splitlines() if "trial_0001" in line)
    assert "running" in running and "0." not in running, table  # no value for it


def test_schema_is_json_schema(runner: CliRunner) -> None:
    result = runner.invoke(main, ["schema"])
    schema = json.loads(result.output)
    assert "ml.trial.complete" in json.dumps(schema)


def test_readme_mentions_every_cli_command() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in main.commands:
        assert re.search(rf"thunderline-lab {name}\b", readme), f"README lacks `{name}`"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["payload"].update(step=2**70), "line 1: payload.step: must be less than"),
        (lambda r: r.update(timestamp="0001-01-01T00:00:00+05:00"), "line 1: timestamp: is out"),
        (lambda r: r["payload"].update(metadata={"x": "\ud800"}), "line 1: cannot be written"),
    ],
)
def test_unstorable_input_is_a_clean_error_naming_file_and_record(
    runner: CliRunner, tmp_path: Path, mutate: object, expected: str
) -> None:
    record = json.loads(
        E.run_metric(
            model_run_id="s", trial_id="t", step=0, metric_name="a", metric_value=1.0
        ).to_json()
    )
    mutate(record)  # type: ignore[operator]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(record))
    for command in (["validate", str(f)], ["ingest", str(f), "--lab", str(tmp_path / "lab")]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1, result.output
        assert f"error: {f}: {expected}" in result.output
        assert "Traceback" not in result.output
    f.write_text(json.dumps(record, indent=2))  # one record over many lines: said by index
    result = runner.invoke(main, ["validate", str(f)])
    assert f"error: {f}: record 0: {expected.removeprefix('line 1: ')}" in result.output


def test_json_lines_errors_name_each_line_and_all_are_reported(
    runner: CliRunner, tmp_path: Path
) -> None:
    good = json.loads(
        E.run_metric(
            model_run_id="s", trial_id="t", step=0, metric_name="a", metric_value=1.0
        ).to_json()
    )
    nan = {**good, "id": "n", "payload": {**good["payload"], "metric_value": float("nan")}}
    typo = {**good, "id": "u", "name": "ml.run.metrc"}
    f = tmp_path / "events.jsonl"
    f.write_text(
        "\n".join([json.dumps(good), "", json.dumps(nan), json.dumps(typo), '{"id": ', ""])
    )
    lab = tmp_path / "lab"
    assert runner.invoke(main, ["ingest", "-", "--lab", str(lab)], input=json.dumps(good))
    for command in (["validate", str(f)], ["ingest", str(f), "--lab", str(lab)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1, result.output
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert [e.split(": ")[2] for e in errors] == ["line 3", "line 4", "line 5"], errors
        assert "payload.metric_value: must be a finite number" in errors[0]
        assert "name: unknown ml event name" in errors[1]
        assert "invalid JSON" in errors[2]
    with TrialStore(lab / "lab.db") as store:  # the one good event from before, untouched
        assert store.counts()["events"] == 1


def test_json_lines_store_errors_name_the_line(runner: CliRunner, tmp_path: Path) -> None:
    good = json.loads(E.trial_start(model_run_id="s", trial_id="t", spectral_norm=True).to_json())
    bad = json.loads(E.trial_start(model_run_id="s", trial_id="u", spectral_norm=True).to_json())
    bad["payload"]["parameters"] = {"x": "\ud800"}  # valid JSON, but SQLite cannot hold it
    f = tmp_path / "events.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    for command in (["validate", str(f)], ["ingest", str(f), "--lab", str(tmp_path / "lab")]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1, result.output
        assert f"error: {f}: line 3: cannot be written" in result.output, result.output


def test_trials_json_keeps_every_digit_and_status_is_checked(
    runner: CliRunner, tmp_path: Path
) -> None:
    lab = tmp_path / "lab"
    params = {"lr": 0.00012345678901234, "tiny": 1.2345678901234e-12}
    with TrialStore(lab / "lab.db") as store:
        store.append(
            [E.trial_start(model_run_id="s", trial_id="t", spectral_norm=False, parameters=params)]
        )
    out = runner.invoke(main, ["trials", "--lab", str(lab), "--format", "json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)
    assert row["parameters"] == params and row["ended_at"] is None
    bogus = runner.invoke(main, ["trials", "--lab", str(lab), "--status", "bogus"])
    assert bogus.exit_code == 2 and "'bogus' is not one of" in bogus.output


def test_a_file_in_the_way_of_the_lab_is_a_clean_error(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "ev.jsonl"
    write_events(f)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for args, env, said in (
        (["--lab", str(afile / "sub")], None, "error: lab directory "),
        ([], str(afile), f"error: $THUNDERLINE_LAB_HOME {afile}: a file, not a lab folder"),
    ):
        if env:
            monkeypatch.setenv("THUNDERLINE_LAB_HOME", env)
        result = runner.invoke(main, ["ingest", str(f), *args])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(said), result.output
        assert "Traceback" not in result.output
        assert afile.read_text() == "not a folder"


def test_deeply_nested_json_is_a_clean_error(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "deep.json"
    f.write_text("[" * 3000 + "]" * 3000)
    result = runner.invoke(main, ["validate", str(f)])
    assert result.exit_code == 1
    assert f"error: {f}: invalid JSON: nested too deeply [json_depth]" in result.output


def test_an_unreadable_input_is_an_error_line(runner: CliRunner, tmp_path: Path) -> None:
    missing = runner.invoke(main, ["validate", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1
    assert missing.output.startswith(f"error: {tmp_path / 'nope.json'}: cannot read: ")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    result = runner.invoke(main, ["validate", str(latin)])
    assert result.exit_code == 1 and f"error: {latin}: not UTF-8 text" in result.output


def test_a_reader_that_stops_early_gets_no_error(tmp_path: Path) -> None:
    """`thunderline-lab compare ... | head -1`: the closed pipe ends the command quietly
    (it printed "error: Broken pipe" and exited 1)."""
    import subprocess
    import sys

    store = TrialStore(tmp_path / "lab" / "lab.db")
    evs = []
    for i in range(8):
        sn = bool(i % 2)
        ids = {"model_run_id": "s", "trial_id": f"trial_{i:04d}", "study": "s"}
        params = {"pair_id": f"p{i // 2}"}
        evs.append(E.trial_start(**ids, spectral_norm=sn, parameters=params))
        acc = 0.8 + 0.01 * i
        evs.append(E.trial_complete(**ids, spectral_norm=sn, metrics={"val_accuracy": acc}))
    store.append(evs)
    store.close()
    lab = str(tmp_path / "lab")
    script = (
        "import sys; from thunderline_lab.cli import main; "
        f"sys.argv = ['thunderline-lab', 'compare', '--lab', {lab!r}, '--study', 's']; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line; the report's lines come later
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert b"SN" in first and "error" not in err.lower() and "Traceback" not in err


def test_a_study_missing_from_a_lab_that_mirrors_a_gateway_points_to_gateway(
    runner: CliRunner, tmp_path: Path
) -> None:
    lab = tmp_path / "lab"
    TrialStore(lab / "lab.db").close()
    hint = "read it with --gateway URL"
    for args in (["trials", "--study", "smoke"], ["compare", "--study", "smoke"]):
        plain = runner.invoke(main, [*args, "--lab", str(lab)])
        assert plain.exit_code == 1 and hint not in plain.output
    (lab / "gateway-mirror").mkdir()
    (lab / "gateway-mirror" / "127.0.0.1-8765.db").touch()
    for args in (["trials", "--study", "smoke"], ["compare", "--study", "smoke"]):
        result = runner.invoke(main, [*args, "--lab", str(lab)])
        assert result.exit_code == 1 and hint in result.output, result.output


ROOT = Path(__file__).resolve().parent.parent


def _fake_run(trials: dict[str, str]) -> Any:
    """A ``run_batch`` that runs nothing: the study ``smoke`` gets a completed trial per entry
    of ``trials``, logged to MLflow (its outbox) as the entry says: synced or pending."""
    from thunderline_lab.batch import BatchResult
    from thunderline_lab.tracking import _Outbox

    def run_batch(config: Any, *, lab: Any, on_start: Any = None, **kw: Any) -> BatchResult:
        lab.ensure()
        with lab.store() as store:
            outbox = _Outbox(lab.db_path, store, lab.mlflow_tracking_uri)
            outbox.mark_study("smoke", lab.mlflow_tracking_uri)
            for tid, state in trials.items():
                key = {"model_run_id": "smoke", "trial_id": tid}
                store.append(
                    [
                        E.trial_start(**key, spectral_norm=True, study="smoke"),
                        E.trial_complete(**key, spectral_norm=True, metrics={"val_loss": 0.1}),
                    ]
                )
                if state == "synced":
                    outbox.mark_synced(("smoke", tid), "smoke", f"run-{tid}", 2)
                else:
                    outbox.mark_pending(("smoke", tid), "smoke", error="MLflow is down")
            outbox.close()
        n = len(trials)
        return BatchResult(config, lab, [], 1.0, {"completed": n}, total=n)

    return run_batch


def test_run_says_which_trials_are_still_waiting_for_mlflow(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials a worker's MLflow logger could not send stayed in the outbox while the summary
    printed the `mlflow ui` line as if MLflow had them all."""
    lab = tmp_path / "lab"
    args = ["run", str(ROOT / "studies" / "smoke.toml"), "--lab", str(lab), "--no-report"]
    trials = {"trial_0000": "synced", "trial_0001": "pending", "trial_0002": "pending"}
    monkeypatch.setattr("thunderline_lab.batch.run_batch", _fake_run(trials))
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        "warning: 2 trial(s) of study smoke not yet in MLflow (waiting in the lab's MLflow "
        f"outbox, {lab / 'lab.db'}): thunderline-lab mlflow-sync --lab {lab} pushes them"
    ) in result.output
    monkeypatch.setattr("thunderline_lab.batch.run_batch", _fake_run({"trial_0003": "synced"}))
    args[3] = str(tmp_path / "lab2")
    result = runner.invoke(main, args)  # all of them in MLflow: nothing to say
    assert result.exit_code == 0 and "not yet in MLflow" not in result.output, result.output


def test_a_parameter_missing_its_value_before_an_option_is_named(
    runner: CliRunner, tmp_path: Path
) -> None:
    """`-p epochs --lab L` took --lab as the value of epochs and failed with "Got unexpected
    extra argument (L)", naming neither the -p nor the value it lacked."""
    lab = tmp_path / "lab"
    smoke = str(ROOT / "studies" / "smoke.toml")
    for args, expected in [
        (["-p", "epochs", "--lab", str(lab)], "-p epochs: missing value (got the option --lab;"),
        (["-p", "epochs", f"--lab={lab}"], f"-p epochs: missing value (got the option --lab={lab}"),
        (["--parameter", "epochs", "--workers", "2"], "--parameter epochs: missing value (got"),
        (["-p", "--lab", str(lab)], "-p: missing name and value (got the option --lab; write -p"),
        (["--lab", str(lab), "-p", "epochs"], "-p epochs: missing value (write -p epochs VALUE)"),
    ]:
        result = runner.invoke(main, ["run", smoke, *args])
        assert result.exit_code == 2, result.output
        assert f"Error: {expected}" in result.output and "extra argument" not in result.output
    assert not lab.exists()
    # a value that only starts with '-' is a value: here one the study refuses
    result = runner.invoke(main, ["run", smoke, "-p", "epochs", "-1", "--lab", str(lab)])
    assert result.exit_code == 1 and "error: -p epochs" in result.output, result.output


def test_a_parameter_given_twice_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    """`-p epochs 2 -p epochs 1` ran with epochs 1 and no word: the last one won."""
    lab = tmp_path / "lab"
    smoke = str(ROOT / "studies" / "smoke.toml")
    for args in (
        ["-p", "epochs", "2", "-p", "epochs", "1"],
        ["-p", "epochs=2", "-p", "epochs", "1"],
    ):
        result = runner.invoke(main, ["run", smoke, "--lab", str(lab), *args])
        assert result.exit_code == 2, result.output
        assert "Error: -p epochs given twice (2 and 1): give it once" in result.output
    assert not lab.exists()


def test_the_trials_table_shows_a_pruned_trials_best_epoch_value(
    runner: CliRunner, tmp_path: Path
) -> None:
    """A pruned trial reports best_val_accuracy only: the table left val_accuracy blank,
    though compare and the monitor use that value."""
    lab = tmp_path / "lab"
    ids = {"model_run_id": "s", "spectral_norm": False}
    with TrialStore(lab / "lab.db") as store:
        store.append(
            [
                E.trial_complete(**ids, trial_id="done", metrics={"val_accuracy": 0.9}),
                E.trial_complete(
                    **ids,
                    trial_id="cut",
                    status="pruned",
                    metrics={"best_val_accuracy": 0.5111, "best_val_loss": 1.25},
                ),
            ]
        )
    out = runner.invoke(main, ["trials", "--lab", str(lab)])
    assert out.exit_code == 0, out.output
    cut = next(line for line in out.output.splitlines() if " cut " in line)
    assert "0.5111" in cut and "1.2500" in cut

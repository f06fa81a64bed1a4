from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

from thunderline_lab import events as E
from thunderline_lab.batch import (
    BatchResult,
    Progress,
    _reserve_outputs,
    load_study_config,
    parse_override,
    run_batch,
)
from thunderline_lab.cli import main
from thunderline_lab.errors import ConfigError, NotebookExecutionError
from thunderline_lab.store import TrialStore

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.toml"))


def make_notebook(path: Path, body: str, extra_params: str = "") -> Path:
    params = nbformat.v4.new_code_cell(
        'study_name = "x"\nlab_dir = None\nworker_index = 0\nn_trials = 1\nboom = False'
        + extra_params
    )
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# test"), params, nbformat.v4.new_code_cell(body)]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "study.toml"
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_study_configs_are_valid(path: Path) -> None:
    cfg = load_study_config(path)
    assert cfg.notebook.exists() and cfg.name == path.stem
    assert cfg.parameters.get("n_trials", 1) >= 1


def test_default_study_has_a_real_budget() -> None:
    cfg = load_study_config(ROOT / "studies" / "spectral_norm_ab.toml")
    assert cfg.parameters["n_trials"] >= 20 and cfg.parameters["epochs"] >= 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[study]\nname = "a"\nnotebook = "nb.ipynb"\ncolour = 1\n', "study.colour: unknown key"),
        ('[study]\nname = "a"\nnotebook = "nb.ipynb"\nworkers = "two"\n', "study.workers"),
        ('[study]\nnotebook = "nb.ipynb"\n', "study.name: required key missing"),
        ('[study]\nname = "a"\nnotebook = "missing.ipynb"\n', "notebook not found: missing.ipynb"),
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nn_trails = 3\n',
            "parameters.n_trails: not a parameter of nb.ipynb",
        ),
        ('[study\nname = "a"\n', "invalid TOML"),
        ('[study]\nname = "a"\nnotebook = "nb.ipynb"\n[extra]\n', "extra: unknown key"),
        # a near miss is named
        (
            '[study]\nname = "a"\nnoteboook = "nb.ipynb"\n',
            "study.noteboook: unknown key (did you mean 'notebook'?)",
        ),
        (
            '[studdy]\nname = "a"\nnotebook = "nb.ipynb"\n',
            "studdy: unknown key (did you mean 'study'?)",
        ),
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameter]\nn_trials = 2\n',
            "parameter: unknown key (did you mean 'parameters'?)",
        ),
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nn_trails = 3\n',
            "(did you mean 'n_trials'?)",
        ),
        # "." and ".." would put lab/runs/<name> on the lab itself or outside it
        ('[study]\nname = ".."\nnotebook = "nb.ipynb"\n', "study.name: must be letters"),
        ('[study]\nname = "."\nnotebook = "nb.ipynb"\n', "not starting with '.'"),
        ('[study]\nname = "../x"\nnotebook = "nb.ipynb"\n', "study.name: must be letters"),
        ('[study]\nname = "a b"\nnotebook = "nb.ipynb"\n', "study.name: must be letters"),
        # not a notebook: the config's field is named, not only the notebook file
        ('[study]\nname = "a"\nnotebook = "study.toml"\n', "study.notebook: study.toml is not"),
        ('[study]\nname = "a"\nnotebook = "broken.ipynb"\n', "study.notebook: "),
        # a value of another kind than the notebook's default fails deep in a cell, or
        # (a text where a flag is tested) silently runs as true
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nboom = "no"\n',
            "parameters.boom: must be true or false, as the notebook's default False",
        ),
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nn_trials = 2.5\n',
            "parameters.n_trials: must be a whole number",
        ),
        # the runner sets these (as -p refuses them): a config's value was silently replaced
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nstudy_name = "b"\n',
            "parameters.study_name: set by the runner",
        ),
        (
            '[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\nlab_dir = "/tmp"\n',
            "parameters.lab_dir: set by the runner",
        ),
    ],
)
def test_broken_configs_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    make_notebook(tmp_path / "nb.ipynb", "pass")
    (tmp_path / "broken.ipynb").write_text('{"not": "a notebook"}')
    cfg = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study_config(cfg)
    assert str(cfg) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dataset", "digitz", "'digitz' is not one of breast_cancer, digits, moons, wine"),
        ("architecture", "cnnn", "'cnnn' is not one of mlp, cnn (did you mean 'cnn'?)"),
        ("design", "pared", "'pared' is not one of paired, tpe (did you mean 'paired'?)"),
        ("profile", "tset", "'tset' is not one of full, test (did you mean 'test'?)"),
    ],
)
def test_a_study_notebooks_choices_are_checked_with_the_config_and_overrides(
    tmp_path: Path, key: str, value: str, expected: str
) -> None:
    extra = '\ndataset = "digits"\narchitecture = "mlp"\ndesign = "paired"\nprofile = "full"'
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')", extra)
    cfg = write_config(
        tmp_path, f'[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\n{key} = "{value}"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_study_config(cfg)
    assert f"{cfg}: parameters.{key}: {expected}" in str(info.value)
    cfg = write_config(tmp_path, '[study]\nname = "a"\nnotebook = "nb.ipynb"\n')
    result = CliRunner().invoke(
        main, ["run", str(cfg), "--lab", str(tmp_path / "lab"), "-p", key, value]
    )
    assert result.exit_code == 1 and f"error: -p {key}: {expected}" in result.output
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('search_space = { lr = "fast" }', "parameters.search_space.lr: 'fast': lr must be"),
        ("search_space = { dropout = [0.0, 5.0] }", "search_space.dropout: 5.0: ModelConfig"),
        ("search_space = { depth = [1, 200] }", "depth: 200: ModelConfig.depth must be between"),
        ('search_space = { depth = [1, "x"] }', "search_space.depth: 'x': ModelConfig.depth"),
        ('conv_sn_modes = ["bogus"]', "parameters.conv_sn_modes: must be a list of 'operator'"),
        # an MLP's trials would be logged with a mode they never used, kept with the study
        ('conv_sn_modes = ["operator"]', "parameters.conv_sn_modes: only for a CNN study"),
        ('seeds = ["a"]', "parameters.seeds: must be distinct integers"),
        ("seeds = [0, 0]", "parameters.seeds: must be distinct integers"),
        # torch.manual_seed refuses it: every trial would fail in its worker
        ("seeds = [18446744073709551616]", "parameters.seeds: 18446744073709551616 is out of"),
        ("epochs = -1", "parameters.epochs: must be an integer >= 1, got -1"),
    ],
)
def test_values_no_trial_could_run_with_are_refused_before_any_worker_starts(
    tmp_path: Path, line: str, expected: str
) -> None:
    """Each would fail every trial (or the notebook) one by one, and tie the study's name to
    a broken config: refused with the config, naming the file and the parameter."""
    extra = "\nsearch_space = {}\nconv_sn_modes = None\nseeds = [0]\nepochs = 3"
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')", extra)
    cfg = write_config(
        tmp_path, f'[study]\nname = "a"\nnotebook = "nb.ipynb"\n[parameters]\n{line}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_study_config(cfg)
    assert f"{cfg}: " in str(info.value) and expected in str(info.value)
    key = line.split(" = ", 1)[0]
    cfg = write_config(tmp_path, '[study]\nname = "a"\nnotebook = "nb.ipynb"\n')
    as_json = json.dumps(tomllib.loads(line)[key])
    result = CliRunner().invoke(
        main, ["run", str(cfg), "--lab", str(tmp_path / "lab"), "-p", key, as_json]
    )
    assert result.exit_code == 1 and "error: -p " in result.output, result.output
    assert expected.removeprefix("parameters.") in result.output
    assert not (tmp_path / "lab").exists()


def test_cli_reports_broken_config_in_one_clean_line(tmp_path: Path) -> None:
    make_notebook(tmp_path / "nb.ipynb", "pass")
    cfg = write_config(tmp_path, '[study]\nname = "a"\nnotebook = "nb.ipynb"\nbogus = true\n')
    result = CliRunner().invoke(main, ["run", str(cfg), "--lab", str(tmp_path / "lab")])
    assert result.exit_code == 1
    assert f"error: {cfg}: study.bogus: unknown key" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("3", 3), ("0.5", 0.5), ("true", True), ('["a"]', ["a"]), ("digits", "digits")],
)
def test_parse_override_reads_json_or_text(value: str, parsed: object) -> None:
    assert parse_override("x", value) == ("x", parsed)


def test_progress_is_readable_without_a_tty() -> None:
    out = io.StringIO()
    bar = Progress(total=4, stream=out, every_s=0.0)
    bar.update({"completed": 1, "running": 1}, 0.9)
    bar.update({"completed": 1, "running": 1}, 0.9)  # unchanged: no new line
    bar.update({"completed": 3, "pruned": 1}, 0.95, final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("trials 1/4") and "best val_accuracy 0.9000" in lines[0]
    assert lines[1].startswith("trials 4/4") and "ETA -" in lines[1]
    bar.update({"completed": 3, "pruned": 1}, 0.95, final=True)  # a run's closing update
    assert out.getvalue().splitlines() == lines  # the same state is not printed twice
    # a stale trial (its worker died) is retried: not done, and said apart
    retried = Progress(total=4, stream=io.StringIO(), every_s=0.0)
    retried.update({"completed": 4, "stale": 1}, 0.9, final=True)
    assert retried.stream.getvalue().startswith(
        "trials 4/4 (completed 4, pruned 0, failed 0, running 0, stale 1)"
    )


def test_failing_notebook_names_notebook_cell_and_saved_copy(tmp_path: Path) -> None:
    nb = make_notebook(tmp_path / "fails.ipynb", "if not boom:\n    raise ValueError('bad data')")
    cfg = write_config(tmp_path, '[study]\nname = "f"\nnotebook = "fails.ipynb"\n')
    with pytest.raises(NotebookExecutionError) as info:
        run_batch(load_study_config(cfg), lab=tmp_path / "lab", progress=False)
    message = str(info.value)
    assert str(nb) in message and "cell 2" in message and "ValueError: bad data" in message
    saved = Path(message.split("executed copy saved at ")[1])
    assert saved.exists() and saved.parent == tmp_path / "lab" / "runs" / "f"
    executed = json.loads(saved.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("ename")]
    assert [e["ename"] for e in errors] == ["ValueError"]
    assert "'if not boom:'" in message


@pytest.mark.timeout(300)  # a dead kernel used to hang the run for good (IPC transport)
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_kernel_killed_mid_cell_fails_the_run_instead_of_hanging_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.setenv("THUNDERLINE_LAB_KERNEL_TRANSPORT", transport)
    make_notebook(
        tmp_path / "dies.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    )
    cfg = write_config(tmp_path, '[study]\nname = "d"\nnotebook = "dies.ipynb"\n')
    with pytest.raises(NotebookExecutionError, match="kernel died") as info:
        run_batch(load_study_config(cfg), lab=tmp_path / "lab", progress=False)
    assert "DeadKernelError" in str(info.value)


@pytest.mark.slow
def test_overrides_reach_the_notebook_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    make_notebook(tmp_path / "nb.ipynb", "assert boom is True and n_trials == 7")
    cfg = load_study_config(
        write_config(
            tmp_path, '[study]\nname = "o"\nnotebook = "nb.ipynb"\n[parameters]\nn_trials = 7\n'
        )
    )
    result = run_batch(cfg, lab=tmp_path / "lab", overrides={"boom": True}, progress=False)
    assert len(result.outputs) == 1 and result.outputs[0].exists()
    with pytest.raises(ConfigError, match="-p nope: not a parameter"):
        run_batch(cfg, lab=tmp_path / "lab", overrides={"nope": 1}, progress=False)


@pytest.mark.parametrize(("source", "value"), [("config", '"four"'), ("override", "four")])
def test_a_trial_budget_that_is_not_a_number_is_refused_before_anything_runs(
    tmp_path: Path, source: str, value: str
) -> None:
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')")
    text = '[study]\nname = "o"\nnotebook = "nb.ipynb"\n'
    overrides = {}
    if source == "config":
        text += f"[parameters]\nn_trials = {value}\n"
    else:
        overrides = {"n_trials": value}
    where = "-p n_trials" if source == "override" else "parameters.n_trials"
    # (a config's value is refused as soon as the config is read)
    with pytest.raises(ConfigError, match=f"{where}: must be a whole number"):
        cfg = load_study_config(write_config(tmp_path, text))
        run_batch(cfg, lab=tmp_path / "lab", overrides=overrides, progress=False)
    assert not (tmp_path / "lab").exists()  # refused before the lab was laid out


@pytest.mark.parametrize(
    ("source", "value", "problem"),
    [
        ("config", "5", "url must be a str"),
        ("config", '"notaurl"', "it needs http:// or https:// and a host"),
        ("override", "notaurl", "it needs http:// or https:// and a host"),
        ("override", "http://h:8765/?x=1", "must not hold a query"),
    ],
)
def test_a_bad_gateway_url_is_refused_naming_where_it_was_set(
    tmp_path: Path, source: str, value: str, problem: str
) -> None:
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')", "\ngateway = None")
    text = '[study]\nname = "o"\nnotebook = "nb.ipynb"\n'
    overrides = {}
    if source == "config":
        text += f"[parameters]\ngateway = {value}\n"
    else:
        overrides = {"gateway": value}
    cfg_path = write_config(tmp_path, text)
    where = (
        "-p gateway (or --gateway)" if source == "override" else f"{cfg_path}: parameters.gateway"
    )
    with pytest.raises(ConfigError) as info:
        run_batch(load_study_config(cfg_path), lab=tmp_path / "lab", overrides=overrides)
    assert str(info.value).startswith(f"{where}: bad gateway URL ")
    assert problem in str(info.value)
    assert not (tmp_path / "lab").exists()  # refused before the lab was laid out


@pytest.mark.skipif(sys.platform == "win32", reason="IPC transport is POSIX only")
def test_worker_kernels_talk_over_ipc_not_loopback_tcp(tmp_path: Path) -> None:
    make_notebook(
        tmp_path / "nb.ipynb",
        "from ipykernel.kernelapp import IPKernelApp\n"
        "print('transport', IPKernelApp.instance().transport)",
    )
    cfg = load_study_config(write_config(tmp_path, '[study]\nname = "t"\nnotebook = "nb.ipynb"\n'))
    (out,) = run_batch(cfg, lab=tmp_path / "lab", progress=False).outputs
    printed = [
        "".join(o.get("text", ""))
        for c in json.loads(out.read_text())["cells"]
        for o in c.get("outputs", [])
    ]
    assert "transport ipc\n" in printed


def test_kernel_transport_tcp_on_request_and_a_bad_value_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_notebook(
        tmp_path / "nb.ipynb",
        "from ipykernel.kernelapp import IPKernelApp\n"
        "print('transport', IPKernelApp.instance().transport)",
    )
    cfg = load_study_config(write_config(tmp_path, '[study]\nname = "t"\nnotebook = "nb.ipynb"\n'))
    monkeypatch.setenv("THUNDERLINE_LAB_KERNEL_TRANSPORT", "tcp")
    (out,) = run_batch(cfg, lab=tmp_path / "lab", progress=False).outputs
    assert "transport tcp" in out.read_text()
    monkeypatch.setenv("THUNDERLINE_LAB_KERNEL_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ConfigError, match="THUNDERLINE_LAB_KERNEL_TRANSPORT='carrier-pigeon'"):
        run_batch(cfg, lab=tmp_path / "lab", progress=False)


@pytest.mark.slow
def test_smoke_study_with_two_workers(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "thunderline_lab.cli",
            "run",
            str(ROOT / "studies" / "smoke.toml"),
            "--lab",
            str(lab),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the kernels are shut down without the interrupt that made each log an "ERROR"
    assert "KeyboardInterrupt caught in kernel" not in proc.stdout + proc.stderr
    executed = sorted((lab / "runs" / "smoke").glob("*.ipynb"))
    assert len(executed) == 2
    for path in executed:
        cells = json.loads(path.read_text())["cells"]
        assert all(
            c.get("metadata", {}).get("papermill", {}).get("exception") in (None, False)
            for c in cells
        )
    store = TrialStore(lab / "lab.db")
    trials = store.trials(study="smoke")
    assert len(trials[trials["status"] == "completed"]) >= 4
    assert set(trials["spectral_norm"]) == {True, False}  # both SN arms present
    assert "comparison report" in proc.stdout and (lab / "reports" / "smoke" / "report.md").exists()
    assert "optuna dashboard" in proc.stdout and "mlflow ui" in proc.stdout


def test_a_config_value_of_the_wrong_kind_is_shown_as_toml_writes_it(tmp_path: Path) -> None:
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')")
    cfg = write_config(
        tmp_path,
        '[study]\nname = "o"\nnotebook = "nb.ipynb"\n[parameters]\nn_trials = true\n',
    )
    result = CliRunner().invoke(main, ["run", str(cfg), "--lab", str(tmp_path / "lab")])
    assert result.exit_code == 1, result.output
    assert (
        "parameters.n_trials: must be a whole number, as the notebook's default 1 (got true)"
        in (result.output)
    )
    bad_name = write_config(tmp_path, '[study]\nname = 5\nnotebook = "nb.ipynb"\n')
    result = CliRunner().invoke(main, ["run", str(bad_name), "--lab", str(tmp_path / "lab")])
    assert "study.name: " in result.output and "(got 5)" in result.output
    quoted = write_config(tmp_path, '[study]\nname = "o"\nnotebook = "nb.ipynb"\nworkers = "2"\n')
    result = CliRunner().invoke(main, ["run", str(quoted), "--lab", str(tmp_path / "lab")])
    assert "study.workers: " in result.output and '(got "2")' in result.output, result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "n_trials", "0"], "-p n_trials: must be a whole number of trials >= 1 (got 0)"),
        (["-p", "n_trials", "NaN"], "-p n_trials: must be a whole number"),  # was a traceback
        (["-p", "n_trials", "Infinity"], "-p n_trials: must be a whole number"),
        (["-p", "boom", "maybe"], "-p boom: must be true or false"),  # was silently true
        # values shown as written (JSON/TOML), not as Python's True / 'x'
        (
            ["-p", "n_trials", "true"],
            "-p n_trials: must be a whole number, as the notebook's default 1 (got true)",
        ),
        (
            ["-p", "boom", "[1, 2]"],
            "-p boom: must be true or false, as the notebook's default False (got [1, 2])",
        ),
        (["-p", "n_trails=2"], "-p n_trails: not a parameter of nb.ipynb (did you mean"),
        (["-p", "study_name=other"], "-p study_name: set by the runner"),
    ],
)
def test_bad_overrides_are_refused_in_one_line_before_anything_runs(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')")
    cfg = write_config(tmp_path, '[study]\nname = "o"\nnotebook = "nb.ipynb"\n')
    result = CliRunner().invoke(main, ["run", str(cfg), "--lab", str(tmp_path / "lab"), *args])
    assert result.exit_code == 1, result.output
    assert f"error: {expected}" in result.output and "Traceback" not in result.output
    assert "study o:" not in result.output  # no "running into runs/o" line before a refusal
    assert not (tmp_path / "lab").exists()


def test_name_equals_value_overrides_and_the_profile_budget_in_the_progress_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # -p NAME=VALUE was read as NAME and the next "-p" as its value ("unexpected extra
    # argument"); under THUNDERLINE_LAB_PROFILE=test the notebook runs 4 trials, and the
    # progress line said "trials 4/3"
    make_notebook(
        tmp_path / "nb.ipynb",
        "assert boom is True and n_trials == 3 and epochs == 1",
        extra_params='\nepochs = 30\nprofile = "full"',
    )
    cfg = write_config(tmp_path, '[study]\nname = "o"\nnotebook = "nb.ipynb"\n')
    monkeypatch.setenv("THUNDERLINE_LAB_PROFILE", "test")
    args = ["run", str(cfg), "--lab", str(tmp_path / "lab"), "--no-report"]
    result = CliRunner().invoke(
        main, [*args, "-p", "n_trials=3", "-p", "boom=true", "-p", "epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "trials 0/4 " in result.output and "/3 " not in result.output


def test_rerunning_a_finished_study_says_it_resumed_and_had_nothing_left(tmp_path: Path) -> None:
    make_notebook(tmp_path / "nb.ipynb", "pass")
    cfg = write_config(tmp_path, '[study]\nname = "r"\nnotebook = "nb.ipynb"\n')
    with TrialStore(tmp_path / "lab" / "lab.db") as store:
        store.append(
            [
                E.trial_start(
                    model_run_id="r", trial_id="t0", spectral_norm=False, study="r", parameters={}
                ),
                E.trial_complete(
                    model_run_id="r",
                    trial_id="t0",
                    spectral_norm=False,
                    status="completed",
                    metrics={"val_accuracy": 0.9},
                ),
            ]
        )
    args = ["run", str(cfg), "--lab", str(tmp_path / "lab"), "--no-report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resuming study r: 1 of 1 trials already finished are kept" in result.output
    assert "nothing left to run" in result.output


def test_the_eta_is_paced_from_the_first_finished_trial_not_the_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("thunderline_lab.batch.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = Progress(total=24, stream=out, every_s=0.0)
    clock[0] = 110.0  # 10 s of kernel start-up and imports, then the first trial
    bar.update({"completed": 1}, 0.9)
    assert out.getvalue().splitlines()[-1].endswith("ETA -")  # was "ETA 230s"
    clock[0] = 112.0  # the next one 2 s later: 22 left at 2 s each
    bar.update({"completed": 2}, 0.9)
    assert out.getvalue().splitlines()[-1].endswith("| elapsed 12s | ETA 44s")


def test_the_eta_pace_starts_at_the_first_finish_even_when_that_update_is_not_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Piped output prints a line at most every every_s: the first finish fell in a quiet
    update, the pace started at the next printed line, and 12-trial runs read "ETA -" to
    the end."""
    clock = [100.0]
    monkeypatch.setattr("thunderline_lab.batch.time.monotonic", lambda: clock[0])
    out = io.StringIO()  # not a terminal
    bar = Progress(total=10, stream=out, every_s=10.0)
    bar.update({"running": 1}, None)  # printed: the first line
    clock[0] = 106.0
    bar.update({"completed": 1}, 0.9)  # the first finish, 6 s after the last line: quiet
    assert len(out.getvalue().splitlines()) == 1
    clock[0] = 116.0  # 10 s later, the second finish: 8 left at 10 s each
    bar.update({"completed": 2}, 0.9)
    assert out.getvalue().splitlines()[-1].endswith("| elapsed 16s | ETA 80s")


def test_resumed_progress_and_result_count_this_runs_trials_apart() -> None:
    out = io.StringIO()
    bar = Progress(total=4, stream=out, every_s=0.0, done_before=3)
    bar.update({"completed": 3}, 0.9)  # nothing new yet: no pace to tell an ETA from
    assert "ETA -" in out.getvalue()
    result = BatchResult(
        config=None,  # type: ignore[arg-type]
        lab=None,  # type: ignore[arg-type]
        outputs=[],
        elapsed_s=1.0,
        counts={"completed": 4, "cancelled": 1},
        counts_before={"completed": 3, "cancelled": 1},
        total=4,
    )
    assert (result.done_before, result.done_now) == (3, 1)


def test_executed_copies_of_runs_started_in_the_same_second_do_not_overwrite(
    tmp_path: Path,
) -> None:
    first = _reserve_outputs(tmp_path, "nb", 2)
    second = _reserve_outputs(tmp_path, "nb", 2)
    assert not set(first) & set(second) and all(p.exists() for p in first + second)
    assert [p.name.endswith(f"-w{i}.ipynb") for i, p in enumerate(second)] == [True, True]


def test_a_worker_killed_outright_fails_the_run_with_a_clean_error(tmp_path: Path) -> None:
    # the kernel's parent is the worker process: kill -9 it, as the OOM killer would
    make_notebook(tmp_path / "nb.ipynb", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    cfg = load_study_config(write_config(tmp_path, '[study]\nname = "k"\nnotebook = "nb.ipynb"\n'))
    with pytest.raises(NotebookExecutionError, match="its worker process") as info:
        run_batch(cfg, lab=tmp_path / "lab", progress=False)
    assert "exit code -9" in str(info.value)


@pytest.mark.slow
def test_a_notebook_failing_after_failed_trials_says_where_to_see_why(tmp_path: Path) -> None:
    make_notebook(
        tmp_path / "nb.ipynb",
        "import pathlib\n"
        "from thunderline_lab import events as E\n"
        "from thunderline_lab.store import TrialStore\n"
        "with TrialStore(pathlib.Path(lab_dir) / 'lab.db') as s:\n"
        "    ids = dict(model_run_id=study_name, trial_id='t0', spectral_norm=False)\n"
        "    s.append([E.trial_start(**ids, study=study_name, parameters={}),\n"
        "              E.trial_failed(**ids, error_type='diverged', error_message='nan')])\n"
        "raise KeyError('metrics.val_accuracy')",
    )
    cfg = load_study_config(write_config(tmp_path, '[study]\nname = "f"\nnotebook = "nb.ipynb"\n'))
    with pytest.raises(NotebookExecutionError) as info:
        run_batch(cfg, lab=tmp_path / "lab", progress=False)
    assert "1 trial(s) of this run failed" in str(info.value)
    assert "--study f --status failed" in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_stops_its_workers_and_kernels_and_says_how_to_resume(
    tmp_path: Path, signum: int
) -> None:
    # the signal reaches the runner alone (kill PID, a CI cancel, `timeout`): it used to
    # wait for the whole notebook, then print "Aborted!" (SIGTERM: left the workers running)
    lab = tmp_path / "lab"
    make_notebook(
        tmp_path / "nb.ipynb",
        "import os, pathlib, time\n"
        "pathlib.Path(lab_dir, 'kernel.pid').write_text(str(os.getpid()))\n"
        "for _ in range(1200):\n"
        "    time.sleep(0.1)\n"
        "pathlib.Path(lab_dir, 'finished').write_text('')",
    )
    cfg = write_config(tmp_path, '[study]\nname = "i"\nnotebook = "nb.ipynb"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "thunderline_lab.cli", "run", str(cfg), "--lab", str(lab)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        while not (lab / "kernel.pid").exists() and proc.poll() is None:
            time.sleep(0.2)
        kernel = int((lab / "kernel.pid").read_text())
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and "Aborted!" not in err
    assert not (lab / "finished").exists()
    (executed,) = (lab / "runs" / "i").glob("*.ipynb")
    assert "KeyboardInterrupt" in executed.read_text()  # the kernel was interrupted, and saved
    for _ in range(50):  # no kernel left behind (reaped at once; the loop spares a slow reaper)
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"kernel {kernel} still running")


def _serve(lab: Path, port: int, token: str) -> subprocess.Popen[str]:
    """``thunderline-lab serve`` on a loopback port, answering once it is up."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "thunderline_lab.cli", "serve"),
            *("--port", str(port), "--lab", str(lab), "--token", token),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    import httpx

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "serve ended"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.1)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_study_run_through_a_gateway_reports_there_and_reads_its_results_back(
    tmp_path: Path,
) -> None:
    """`run --gateway URL`: the events go to the gateway's lab, not the worker's store; the
    progress line, the notebook's results cells and the report read the lab's mirror of
    the gateway's log, which holds the same trials as the gateway's own store."""
    port, token = _port(), "gateway-token-0123"
    server = _serve(tmp_path / "server", port, token)
    try:
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "thunderline_lab.cli", "run"),
                *(str(ROOT / "studies" / "smoke.toml"), "--lab", str(tmp_path / "worker")),
                *("--gateway", f"http://127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "THUNDERLINE_LAB_TOKEN": token},
        )
        # reviewed from the worker lab afterwards: through the mirror, brought up to date
        url, worker = f"http://127.0.0.1:{port}", str(tmp_path / "worker")
        env = {"THUNDERLINE_LAB_TOKEN": token}
        listed = CliRunner().invoke(
            main, ["trials", "--lab", worker, "--study", "smoke", "--gateway", url], env=env
        )
        compared = CliRunner().invoke(
            main, ["compare", "--lab", worker, "--study", "smoke", "--gateway", url], env=env
        )
    finally:
        server.terminate()
        server.wait(30)
    assert listed.exit_code == 0 and listed.output.count("smoke") == 4, listed.output
    assert compared.exit_code == 0 and "val_accuracy" in compared.output, compared.output
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trials 4/4 (completed 4" in proc.stderr  # the progress line followed the gateway
    # the run counts its own trials in the worker lab's Optuna journal, as without a gateway
    assert ": 4 new trial(s); study: completed 4" in proc.stdout
    from thunderline_lab.batch import _batch_counts
    from thunderline_lab.lab import Lab

    (batch_id,) = set(_batch_ids(tmp_path / "worker", "smoke"))
    assert _batch_counts(Lab.resolve(tmp_path / "worker"), "smoke", batch_id) == {"completed": 4}
    assert f"http://127.0.0.1:{port}/api/trials?study=smoke" in proc.stdout
    served = TrialStore(tmp_path / "server" / "lab.db").trials(study="smoke")
    mirror = tmp_path / "worker" / "gateway-mirror" / f"127.0.0.1-{port}.db"
    mirrored = TrialStore(mirror).trials(study="smoke")
    assert len(served) == 4 and set(served["status"]) == {"completed"}
    key = ["model_run_id", "trial_id"]
    assert (
        served.sort_values(key)
        .reset_index(drop=True)
        .equals(mirrored.sort_values(key).reset_index(drop=True))
    )
    local = tmp_path / "worker" / "lab.db"
    assert not local.exists() or TrialStore(local).trials(study="smoke").empty
    report = (tmp_path / "worker" / "reports" / "smoke" / "report.md").read_text()
    assert "val_accuracy" in report
    (executed,) = (tmp_path / "worker" / "runs" / "smoke").glob("*.ipynb")
    nb = json.loads(executed.read_text())
    shown = "".join(  # the results cell's trial table: the four trials, read back
        "".join(out.get("data", {}).get("text/plain", ""))
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
    )
    assert all(t in shown for t in served["trial_id"])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "127.0.0.1:8765",
            "-p gateway (or --gateway): bad gateway URL '127.0.0.1:8765': it needs http://",
        ),
        ("http://127.0.0.1:{port}", "Connection refused"),
    ],
)
def test_a_gateway_that_does_not_answer_is_refused_before_anything_runs(
    tmp_path: Path, url: str, expected: str
) -> None:
    make_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('must not run')", "\ngateway = None")
    cfg = write_config(tmp_path, '[study]\nname = "o"\nnotebook = "nb.ipynb"\n')
    url = url.format(port=_port())  # nothing listens there
    result = CliRunner().invoke(
        main, ["run", str(cfg), "--lab", str(tmp_path / "lab"), "--gateway", url]
    )
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "lab").exists()


def test_the_progress_counts_survive_a_nan_written_into_a_trial(tmp_path: Path) -> None:
    import sqlite3

    from thunderline_lab.batch import _study_status

    store = TrialStore(tmp_path / "lab.db")
    for i, acc in enumerate((0.5, 0.75)):
        ids = {"model_run_id": "s", "trial_id": f"t{i}", "study": "s"}
        store.append(
            [
                E.trial_start(**ids, spectral_norm=bool(i)),
                E.trial_complete(**ids, spectral_norm=bool(i), metrics={"val_accuracy": acc}),
            ]
        )
    store.close()
    with sqlite3.connect(tmp_path / "lab.db") as conn:  # out of band: the store refuses NaN
        conn.execute("UPDATE trials SET metrics = '{\"val_accuracy\": NaN}' WHERE trial_id = 't1'")
    assert _study_status(tmp_path / "lab.db", "s") == ({"completed": 2}, 0.5)


def test_a_study_the_gateway_holds_from_another_lab_is_refused(tmp_path: Path) -> None:
    """Two worker labs running one study name through one gateway: the second would start
    its trial ids at 0 again and overwrite the first's trials at the gateway."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from thunderline_lab.batch import _check_same_study
    from thunderline_lab.lab import Lab

    mirror = TrialStore(tmp_path / "mirror.db")
    ids = {"model_run_id": "s", "trial_id": "trial_0000", "study": "s"}
    mirror.append([E.trial_start(**ids, spectral_norm=True)])
    mirror.close()
    lab = Lab.resolve(tmp_path / "worker").ensure()
    with pytest.raises(ConfigError, match=r"already holds 1 trial.*never ran"):
        _check_same_study(lab, "s", "http://gw", tmp_path / "mirror.db")
    _check_same_study(lab, "other", "http://gw", tmp_path / "mirror.db")  # not at the gateway
    # the lab that started it resumes it
    storage = JournalStorage(JournalFileBackend(str(lab.optuna_journal)))
    optuna.create_study(study_name="s", storage=storage).ask()
    _check_same_study(lab, "s", "http://gw", tmp_path / "mirror.db")


@pytest.mark.slow
def test_a_budget_that_splits_a_pair_is_warned_about_on_the_command_line(tmp_path: Path) -> None:
    """The worker's log says so inside its executed notebook only: run says it too."""
    make_notebook(tmp_path / "nb.ipynb", "pass", '\nseeds = [0, 1]\ndesign = "paired"')
    cfg = write_config(tmp_path, '[study]\nname = "a"\nnotebook = "nb.ipynb"\n')
    args = ["run", str(cfg), "--lab", str(tmp_path / "lab"), "-p", "n_trials", "6"]
    result = CliRunner().invoke(main, args)  # (its notebook runs no trial: no report)
    assert (
        "warning: study a: n_trials=6 is not a multiple of 4 (each configuration runs with SN "
        "on and off for 2 seeds): the last configuration will miss 2 of its trials"
    ) in result.output
    whole = CliRunner().invoke(main, [*args[:-1], "8"])
    assert "trials 0/8" in whole.output and "not a multiple" not in whole.output


def test_a_trial_left_running_when_the_workers_stop_is_warned_about(tmp_path: Path) -> None:
    """A dead worker's trial the run did not fail as stale (yet) stays "running": the run
    ends as the budget is counted as taken, and says that trial is not its own."""
    body = (
        "from thunderline_lab import events as E\n"
        "from thunderline_lab.lab import Lab\n"
        "store = Lab.resolve(lab_dir).store()\n"
        "ids = {'model_run_id': study_name, 'trial_id': 'trial_0000', 'study': study_name}\n"
        "store.append([E.trial_start(**ids, spectral_norm=True)])\n"
        "store.close()\n"
    )
    make_notebook(tmp_path / "nb.ipynb", body)
    cfg = write_config(tmp_path, '[study]\nname = "a"\nnotebook = "nb.ipynb"\n')
    result = CliRunner().invoke(main, ["run", str(cfg), "--lab", str(tmp_path / "lab")])
    assert "running 1" in result.output, result.output
    assert "warning: 1 trial is still running, not by this run's workers" in result.output


# A notebook cell running the lab's study with instant trainers; `another_run` runs trials
# as another `thunderline-lab run` of the same study would, finishing while this one runs
# (its trials land in the same store and Optuna journal, under that run's batch id).
_STUDY_CELL = """\
import os, pathlib, time
from unittest import mock
from thunderline_lab.study import BATCH_ENV, run_study
from thunderline_lab.training import TrialResult

def completed(config, dataset, **kw):
    return TrialResult("completed", {"best_val_loss": 0.5, "val_accuracy": 0.9}, [], duration_ms=1)

def diverged(config, dataset, **kw):
    return TrialResult("failed", {}, error="nan", error_type="diverged", duration_ms=1)

def study(n, trainer=completed):
    return run_study(study_name, lab=lab_dir, dataset="wine", design="tpe", n_trials=n,
                     epochs=1, trainer=trainer)

def another_run(n, trainer=completed):
    with mock.patch.dict(os.environ, {BATCH_ENV: "another-run"}):
        study(n, trainer)
"""


def _batch_ids(lab: Path, study: str) -> list[str | None]:
    """The batch id of each trial of ``study`` in the lab's Optuna journal, by number."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from thunderline_lab.study import BATCH_ATTR

    storage = JournalStorage(JournalFileBackend(str(lab / "optuna.journal")))
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    return [t.user_attrs.get(BATCH_ATTR) for t in trials]


def test_a_run_counts_its_own_trials_not_those_another_run_finished_meanwhile(
    tmp_path: Path,
) -> None:
    """Two `run`s of one study at once each printed the other's trials as their own: the
    count was the study's finished trials now less before."""
    make_notebook(tmp_path / "nb.ipynb", _STUDY_CELL + "another_run(2)\nstudy(3)\n")
    cfg = write_config(tmp_path, '[study]\nname = "c"\nnotebook = "nb.ipynb"\n')
    args = ["run", str(cfg), "--lab", str(tmp_path / "lab"), "--no-report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ": 1 new trial(s); study: completed 3" in result.output
    ids = _batch_ids(tmp_path / "lab", "c")
    assert ids[:2] == ["another-run", "another-run"] and ids[2] not in (None, "another-run")


def test_a_failed_run_counts_its_own_failed_trials_not_another_runs(tmp_path: Path) -> None:
    make_notebook(
        tmp_path / "nb.ipynb",
        _STUDY_CELL + "another_run(2, diverged)\nstudy(3, diverged)\nraise KeyError('x')\n",
    )
    cfg = load_study_config(write_config(tmp_path, '[study]\nname = "f"\nnotebook = "nb.ipynb"\n'))
    with pytest.raises(NotebookExecutionError) as info:
        run_batch(cfg, lab=tmp_path / "lab", progress=False)
    assert "; 1 trial(s) of this run failed: thunderline-lab trials" in str(info.value)


_INTERRUPTED_RUN = """\
import json, sys
from thunderline_lab.batch import BatchInterrupted, load_study_config, run_batch
if __name__ == "__main__":  # (the workers are spawned: they import this module)
    try:
        run_batch(load_study_config(sys.argv[1]), lab=sys.argv[2], progress=False)
    except BatchInterrupted as stop:
        r = stop.result
        this_run = getattr(r, "this_run", None)
        print(json.dumps({"done_now": r.done_now, "this_run": this_run, "counts": r.counts}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_interrupted_run_counts_its_own_trials(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    body = (
        _STUDY_CELL
        + "def hang_on_the_second(config, dataset, **kw):\n"
        + "    if kw['trial_id'] == 'trial_0003':\n"
        + "        pathlib.Path(lab_dir, 'hanging').touch()\n"
        + "        time.sleep(300)\n"
        + "    return completed(config, dataset, **kw)\n"
        + "another_run(2)\n"
        + "study(4, hang_on_the_second)\n"
    )
    make_notebook(tmp_path / "nb.ipynb", body)
    cfg = write_config(tmp_path, '[study]\nname = "i"\nnotebook = "nb.ipynb"\n')
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPTED_RUN)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cfg), str(lab)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        while not (lab / "hanging").exists() and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    got = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert got is not None, out + err
    # its trial 2 completed, its trial 3 was cancelled (to be retried); the other run's two
    # completed trials are the study's, not this run's
    assert got["done_now"] == 1 and got["counts"]["completed"] == 3, got
    assert got["this_run"] == {"completed": 1, "cancelled": 1}, got


def test_a_runs_own_trials_are_counted_by_status_a_stale_one_apart_from_its_retry(
    tmp_path: Path,
) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    from thunderline_lab.batch import _batch_counts
    from thunderline_lab.lab import Lab
    from thunderline_lab.study import BATCH_ATTR

    lab = Lab.resolve(tmp_path / "lab").ensure()
    assert _batch_counts(lab, "s", "b1") is None  # no journal: the store's counts must do
    storage = JournalStorage(JournalFileBackend(str(lab.optuna_journal)))
    study = optuna.create_study(study_name="s", storage=storage)

    def add(state: TrialState, batch: str | None, status: str | None = None) -> None:
        attrs: dict[str, object] = {BATCH_ATTR: batch} if batch else {}
        if status is not None:
            attrs["status"] = status
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, user_attrs=attrs))

    add(TrialState.COMPLETE, "b1")
    add(TrialState.PRUNED, "b1")
    add(TrialState.FAIL, "b1", "failed")  # diverged, an error: counts
    add(TrialState.FAIL, "b1")  # failed as stale (its worker died): retried, by b2 ...
    add(TrialState.COMPLETE, "b2")  # ... whose retry counts for b2 alone
    add(TrialState.FAIL, "b1", "cancelled")  # Ctrl-C: retried
    add(TrialState.FAIL, "b1", "surplus")  # stood down: never part of the study
    add(TrialState.RUNNING, "b1")
    add(TrialState.COMPLETE, None)  # run outside any batch run
    assert _batch_counts(lab, "s", "b1") == {
        "completed": 1,
        "pruned": 1,
        "failed": 1,
        "stale": 1,
        "cancelled": 1,
        "running": 1,
    }
    assert _batch_counts(lab, "s", "b2") == {"completed": 1}
    assert _batch_counts(lab, "s", "b3") == {}  # ran none
    assert _batch_counts(lab, "other", "b1") is None  # kept in another Optuna storage


def test_a_runs_result_counts_its_own_trials_when_known_else_the_stores_difference() -> None:
    def result(this_run: dict[str, int] | None) -> BatchResult:
        return BatchResult(
            config=None,  # type: ignore[arg-type]
            lab=None,  # type: ignore[arg-type]
            outputs=[],
            elapsed_s=1.0,
            counts={"completed": 5, "failed": 3, "stale": 1},
            counts_before={"completed": 1, "failed": 1},
            this_run=this_run,
        )

    own = result({"completed": 1, "failed": 1, "stale": 1, "cancelled": 1})
    assert (own.done_before, own.done_now, own.failed_now, own.done_total) == (2, 2, 1, 8)
    unknown = result(None)
    assert (unknown.done_now, unknown.failed_now, unknown.done_total) == (6, 2, 8)


# The study notebook's parameters that make a study's settings (what a resume must keep).
_SETTINGS_PARAMS = (
    '\ndataset = "wine"\narchitecture = "mlp"\ndesign = "tpe"\nseeds = [0]\nsearch_space = {}'
    '\nconv_sn_modes = None\nepochs = 1\nprofile = "full"'
)


def test_resuming_a_study_with_other_settings_is_refused_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    """A study made with epochs=2 and run again with the config's 3 said "resuming study",
    then failed inside the notebook on run_study's refusal, leaving a failed executed copy."""
    from thunderline_lab.study import run_study
    from thunderline_lab.training import TrialResult

    def completed(config: object, dataset: object, **kw: object) -> TrialResult:
        return TrialResult("completed", {"best_val_loss": 0.5}, [], duration_ms=1)

    lab = tmp_path / "lab"
    run_study("s", lab=lab, dataset="wine", design="tpe", epochs=2, n_trials=1, trainer=completed)
    make_notebook(tmp_path / "nb.ipynb", "pass", _SETTINGS_PARAMS)
    cfg = write_config(
        tmp_path, '[study]\nname = "s"\nnotebook = "nb.ipynb"\n[parameters]\nepochs = 3\n'
    )
    made_with = "study 's' was made with {}: its trials would not be comparable; use another"
    args = ["run", str(cfg), "--lab", str(lab), "--no-report"]
    for more, expected in [
        ([], f"{cfg.resolve()}: parameters.epochs: {made_with.format('epochs=2, not 3')}"),
        (["-p", "epochs", "4"], f"-p epochs: {made_with.format('epochs=2, not 4')}"),
        (
            ["-p", "epochs", "2", "-p", "seeds", "[1]"],
            f"-p seeds: {made_with.format('seeds=[0], not [1]')}",
        ),
    ]:
        result = CliRunner().invoke(main, [*args, *more])
        assert result.exit_code == 1, result.output
        assert f"error: {expected}" in result.output, result.output
        assert "resuming study" not in result.output and "study s:" not in result.output
        assert not (lab / "runs").exists()  # no worker started, no executed copy
    # the settings it was made with: resumed (nothing left to run)
    result = CliRunner().invoke(main, [*args, "-p", "epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "nothing left to run" in result.output


def test_a_missing_study_config_names_the_closest_and_lists_the_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run studies/smok.toml` and `run smoke` said only "no such study config"."""
    make_notebook(tmp_path / "nb.ipynb", "pass")
    (tmp_path / "studies").mkdir()
    for name in ("smoke", "two_moons"):
        (tmp_path / "studies" / f"{name}.toml").write_text("")
    (tmp_path / "pyproject.toml").write_text("")  # not a study config
    monkeypatch.chdir(tmp_path)
    listed = "; study configs found: studies/smoke.toml, studies/two_moons.toml"
    for given in ("studies/smok.toml", "smoke", "studies/smoke"):
        with pytest.raises(ConfigError) as info:
            load_study_config(given)
        assert str(info.value) == (
            f"{given}: no such study config (did you mean 'studies/smoke.toml'?){listed}"
        )


def test_a_notebook_not_found_says_where_its_relative_path_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config copied out of the repo said only "notebook not found: notebooks/x.ipynb"."""
    (tmp_path / "copied").mkdir()
    cfg = tmp_path / "copied" / "study.toml"
    cfg.write_text('[study]\nname = "c"\nnotebook = "notebooks/x.ipynb"\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as info:
        load_study_config(cfg)
    assert str(info.value) == (
        f"{cfg}: study.notebook: notebook not found: notebooks/x.ipynb (a relative path is "
        f"looked for in {tmp_path / 'elsewhere'}, {tmp_path / 'copied'}, {tmp_path})"
    )

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

from thunderline_lab.batch import Progress, load_study_config, parse_override, run_batch
from thunderline_lab.cli import main
from thunderline_lab.errors import ConfigError, NotebookExecutionError
from thunderline_lab.store import TrialStore

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.toml"))


def make_notebook(path: Path, body: str) -> Path:
    params = nbformat.v4.new_code_cell(
        'study_name = "x"\nlab_dir = None\nworker_index = 0\nn_trials = 1\nboom = False'
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
    ],
)
def test_broken_configs_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    make_notebook(tmp_path / "nb.ipynb", "pass")
    cfg = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study_config(cfg)
    assert str(cfg) in str(info.value) and expected in str(info.value)


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
    cfg = load_study_config(write_config(tmp_path, text))
    where = "-p n_trials" if source == "override" else "parameters.n_trials"
    with pytest.raises(ConfigError, match=f"{where}: must be a whole number of trials"):
        run_batch(cfg, lab=tmp_path / "lab", overrides=overrides, progress=False)
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

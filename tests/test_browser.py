"""The live monitor in a real browser: JupyterLab on loopback, driven by headless Chromium.

Starts JupyterLab (the .venv's) on a free loopback port with a random token, opens
``tests/notebooks/monitor_browser.ipynb`` (copied to a temporary folder) in Chromium via
Playwright, runs all cells, waits until the widget shows learning curves and a populated
trial table, asserts on the rendered DOM, presses Stop, and checks that the study stopped
cleanly and left its static snapshot. Screenshots go to ``test-artifacts/``.

The notebook runs a real study (``thunderline_lab.study.run_study`` on digits) when that
module imports, else synthetic study events; ``TL_MONITOR_DEMO=synthetic|study`` forces one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = Path(os.environ.get("TL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--headless",
]
NOTEBOOK = Path(__file__).parent / "notebooks" / "monitor_browser.ipynb"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on loopback serving a copy of the notebook (stopped afterwards)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no news/update toasts (and no network calls for them)
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}'
    )
    token = secrets.token_hex(16)
    port = _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "TL_MONITOR_LAB": str(tmp_path / "lab"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("THUNDERLINE_MONITOR", None)
    log = (tmp_path / "jupyterlab.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"JupyterLab exited ({proc.returncode}):\n"
                    + (tmp_path / "jupyterlab.log").read_text()[-3000:]
                )
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("JupyterLab did not answer within 90 s")
            time.sleep(0.5)
        yield {
            "base": base,
            "token": token,
            "root": root,
            "log": tmp_path / "jupyterlab.log",
            "lab": tmp_path / "lab",
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its kernels
            proc.wait(timeout=10)
        log.close()


def _wait_for(page: Any, script: str, what: str, timeout_s: float, log: Path) -> Any:
    """Poll ``script`` (a JS function) until truthy, accepting a kernel dialog meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _accept_kernel_dialog(page)
        value = page.evaluate(script)
        if value:
            return value
        page.wait_for_timeout(250)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "monitor_browser_timeout.png"), full_page=True)
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    raise AssertionError(
        f"timed out after {timeout_s:g} s waiting for {what}; cell outputs: {outputs!r}; "
        f"server log tail: {log.read_text()[-2000:]}"
    )


def _wait_for_kernel(server: dict[str, Any], page: Any, log: Path) -> None:
    """Until the notebook's kernel is connected and idle (server side and in the page)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _accept_kernel_dialog(page)
        sessions = httpx.get(
            f"{server['base']}/api/sessions", params={"token": server["token"]}, timeout=5
        ).json()
        states = [s["kernel"]["execution_state"] for s in sessions if s.get("kernel")]
        if "idle" in states:
            break
        page.wait_for_timeout(500)
    _wait_for(
        page,
        "() => /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent ?? '')",
        "the kernel to be idle in the page",
        60,
        log,
    )


def _accept_kernel_dialog(page: Any) -> None:
    """Under load JupyterLab sometimes asks which kernel to start: take the notebook's."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    if dialog.count():
        dialog.locator("button.jp-mod-accept").click()
        dialog.wait_for(state="detached", timeout=30_000)


@pytest.mark.slow
def test_live_monitor_renders_in_jupyterlab_and_stops_the_study(
    jupyterlab: dict[str, Any],
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    url = f"{jupyterlab['base']}/lab/tree/{NOTEBOOK.name}?reset&token={jupyterlab['token']}"
    log = jupyterlab["log"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=90_000)
            _wait_for(
                page,
                """() => document.querySelectorAll('.jp-Notebook .jp-Cell').length >= 3 &&
                   !!document.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
                """,
                "the notebook with an idle kernel",
                120,
                log,
            )
            _wait_for_kernel(jupyterlab, page, log)
            # run the code cells in order, each once the previous one has finished
            code_cells = page.locator(".jp-Notebook .jp-CodeCell")
            for i in range(code_cells.count()):
                prompt = (
                    "() => document.querySelectorAll('.jp-Notebook .jp-CodeCell')"
                    f"[{i}].querySelector('.jp-InputPrompt').textContent"
                )
                for attempt in range(3):  # a keystroke can get lost while the UI settles
                    code_cells.nth(i).locator(".jp-InputArea-editor").click()
                    page.keyboard.press("Shift+Enter")
                    try:
                        _wait_for(
                            page,
                            f"() => /\\[(\\*|\\d+)\\]/.test(({prompt})())",
                            f"code cell {i + 1} to start",
                            20,
                            log,
                        )
                        break
                    except AssertionError:
                        if attempt == 2:
                            raise
                _wait_for(
                    page,
                    f"() => /\\[\\d+\\]/.test(({prompt})())",
                    f"code cell {i + 1} to finish",
                    180,
                    log,
                )

            # live: the widget shows a populated trial table and rendered curves
            _wait_for(
                page,
                """() => {
                    const box = document.querySelector('.tl-monitor');
                    if (!box) return false;
                    const rows = box.querySelectorAll('table.tl-monitor-table tr.tl-trial');
                    const img = box.querySelector('img.tl-monitor-curves');
                    return rows.length >= 3 && img && img.complete && img.naturalWidth > 100;
                }""",
                "the live widget with curves and at least 3 trial rows",
                300,
                log,
            )
            box = page.locator(".tl-monitor").first
            panel = box.locator(".tl-monitor-panel").inner_text()
            assert "running" in panel and "done" in panel, panel
            assert "live" in box.locator(".tl-monitor-status").inner_text()
            rows = box.locator("tr.tl-trial")
            arms = {rows.nth(i).get_attribute("data-arm") for i in range(rows.count())}
            assert arms <= {"SN", "none", "?"} and arms & {"SN", "none"}
            curve = box.locator("img.tl-monitor-curves")
            assert curve.evaluate(
                "img => img.src.startsWith('blob:') || img.src.startsWith('data:image/png')"
            )
            assert page.locator("text=Error displaying widget").count() == 0
            page.screenshot(path=str(ARTIFACTS / "monitor_browser_live.png"), full_page=True)

            # Stop: the study ends cleanly and the widget turns into its static snapshot
            stop = box.locator("button.tl-monitor-stop")
            assert stop.is_visible()
            stop.click()
            _wait_for(
                page,
                """() => {
                    const snap = document.querySelector('.tl-monitor-snapshot');
                    return !!snap && snap.innerText.includes('stopped') &&
                           snap.querySelectorAll('tr.tl-trial').length >= 3 &&
                           snap.querySelector('img.tl-monitor-curves').naturalWidth > 100;
                }""",
                "the static snapshot after Stop",
                180,
                log,
            )
            snap = page.locator(".tl-monitor-snapshot").first
            statuses = snap.locator("tr.tl-trial").evaluate_all(
                "rows => rows.map(r => r.dataset.status)"
            )
            assert "running" not in statuses, statuses
            assert "cancelled" in statuses or "completed" in statuses, statuses
            outputs = " ".join(page.locator(".jp-OutputArea-output").all_inner_texts())
            assert "monitor mode: widget" in outputs, outputs
            assert "running in the background" in outputs, outputs
            page.screenshot(path=str(ARTIFACTS / "monitor_browser_stopped.png"), full_page=True)
        finally:
            browser.close()

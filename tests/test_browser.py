"""The NF4 playground in a real browser: JupyterLab serves a copy of its widget cell, headless Chromium runs it,
and moving the blocksize slider must change the error it shows.

What is checked is the part no kernel-side test can reach: the widget JavaScript loads in JupyterLab, the
slider answers the keyboard, the new value reaches the kernel, and the recomputed error comes back to the page.

Needs Chromium, its chromedriver, selenium and JupyterLab; without them the test is skipped (set
MINILORA_REQUIRE_BROWSER=1 to make that a failure instead, as CI should). Nothing is downloaded: the browser
and driver are the system's, the server listens on 127.0.0.1 only, with a random token, and serves a temporary
folder, so the repository is never written to. Screenshots before and after go to $MINILORA_ARTIFACTS
(default: test-artifacts/ at the repository root).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "course" / "04_nf4.ipynb"
WIDGET_MARK = 'description="blocksize"'     # how the playground cell is recognised
ARTIFACTS = Path(os.environ.get("MINILORA_ARTIFACTS") or ROOT / "test-artifacts")
TEST_NOTEBOOK = "nf4_playground.ipynb"


# --- what is needed, or the test skips ------------------------------------------------------------------------

def _executable(variable: str, *names: str) -> str | None:
    """The program named by environment `variable` if set, else the first of `names` on PATH; None if absent."""
    given = os.environ.get(variable)
    if given:
        return given if os.path.isfile(given) and os.access(given, os.X_OK) else None
    return next((found for found in map(shutil.which, names) if found), None)


CHROMIUM = _executable("MINILORA_CHROMIUM", "chromium", "chromium-browser")
CHROMEDRIVER = _executable("MINILORA_CHROMEDRIVER", "chromedriver")
MISSING = [name for name, ok in [
    ("chromium (apt-get install chromium)", CHROMIUM),
    ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
    *[(f"python package {m}", importlib.util.find_spec(m)) for m in
      ("selenium", "jupyterlab", "ipykernel", "ipywidgets", "jupyterlab_widgets")],
] if not ok]


def _need_browser() -> None:
    if not MISSING:
        return
    reason = "browser test needs " + ", ".join(MISSING)
    if os.environ.get("MINILORA_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (MINILORA_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


# --- a small notebook: the playground cell and only the statements it needs -----------------------------------

def _bound(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement defines (imports, def, class, plain assignment); empty for anything else."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _free(node: ast.AST) -> set[str]:
    """Global names `node` reads: names loaded, less builtins and any name it binds itself (good enough for
    notebook code, where a function does not read a global that it also assigns)."""
    loads, local = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else local).add(n.id)
        elif isinstance(n, ast.arg):
            local.add(n.arg)
        elif isinstance(n, ast.stmt) and n is not node:
            local |= _bound(n)
    return loads - local - set(dir(builtins))


def _bound_all(module: ast.Module) -> set[str]:
    """Every name the top-level statements of `module` define."""
    return set().union(*(_bound(s) for s in module.body))


def playground_notebook(source: Path) -> dict:
    """A notebook of three cells taken from `source`: its first code cell, the top-level statements the widget
    cell depends on (found by following names back through earlier cells), and the widget cell itself.

    Running the whole chapter would load MiniLM and quantize millions of weights; the widget needs none of it.
    """
    nb = json.loads(source.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    hits = [i for i, s in enumerate(code) if WIDGET_MARK in s]
    assert len(hits) == 1, f"expected one cell with {WIDGET_MARK} in {source.name}, found {len(hits)}"
    w = hits[0]
    stmts = [(i, s) for i in range(1, w) for s in ast.parse(code[i]).body]
    needed, seen, keep = _free(ast.parse(code[0] + "\n" + code[w])), set(), []
    while needed - seen:
        name = min(needed - seen)
        seen.add(name)
        defs = [(i, s) for i, s in stmts if name in _bound(s)]
        if not defs:
            if name in _bound_all(ast.parse(code[0])):
                continue
            raise AssertionError(f"the widget cell of {source.name} uses {name!r}, which no earlier import, def "
                                 "or assignment defines")
        if defs[-1] not in keep:                       # the last definition before the widget cell wins
            keep.append(defs[-1])
            needed |= _free(defs[-1][1])
    order = {id(s): k for k, (_, s) in enumerate(stmts)}
    middle = "\n".join(ast.get_source_segment(code[i], s) for i, s in sorted(keep, key=lambda t: order[id(t[1])]))

    def cell(k: int, text: str) -> dict:
        return {"cell_type": "code", "id": f"cell-{k}", "execution_count": None, "outputs": [], "source": text,
                "metadata": {"jupyter": {"source_hidden": True}}}   # screenshots show the widget, not the code

    header = f"# the statements of {source.name} that its playground cell needs\n"
    return {"cells": [cell(k, text) for k, text in enumerate([code[0], header + middle, code[w]])],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_playground_notebook_is_small_and_complete():
    """The extracted notebook compiles, keeps the widget cell verbatim, and leaves out the heavy cells."""
    nb = playground_notebook(NOTEBOOK)
    sources = [c["source"] for c in nb["cells"]]
    for s in sources:
        compile(s, TEST_NOTEBOOK, "exec")
    assert WIDGET_MARK in sources[2]
    defined = _bound_all(ast.parse(sources[0] + "\n" + sources[1]))
    assert _free(ast.parse(sources[2])) <= defined, "the widget cell would hit a NameError"
    assert "load_classifier()" not in sources[1], "the model-loading cell should not be needed"


# --- JupyterLab on 127.0.0.1 -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab: its base URL, token, root folder and log file."""

    def __init__(self, url: str, token: str, root: Path, log: Path) -> None:
        self.url, self.token, self.root, self.log = url, token, root, log

    def api(self, path: str, method: str = "GET") -> dict:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else {}

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no server log)"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab serving a temporary root that holds the playground notebook; stopped however the test ends."""
    _need_browser()
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    (root / TEST_NOTEBOOK).write_text(json.dumps(playground_notebook(NOTEBOOK), indent=1))
    # The kernel must be this interpreter, whatever kernels the machine has: a python3 spec in a JUPYTER_PATH
    # entry of our own comes before every other one.
    spec_dir = home / "share" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python", "metadata": {"debugger": False}}))
    # The news prompt is a toast over the notebook; nothing should ask to go online anyway.
    page_config = home / "config" / "labconfig" / "page_config.json"
    page_config.parent.mkdir(parents=True)
    page_config.write_text(json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)                     # the kernel's inline backend draws into the Output widget
    env.update({
        "JUPYTER_PATH": os.pathsep.join([str(home / "share"), env.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
        "JUPYTER_CONFIG_DIR": str(home / "config"),  # no user settings, workspaces or server config
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "OMP_NUM_THREADS": "1",                     # the widget's arithmetic is small; leave the cores to others
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    token, port = secrets.token_hex(24), _free_port()
    log = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",  # lets the test ask JupyterLab for its kernel's state
           "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                  # CI containers run as root; the server is loopback-only
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab not answering /api/status after 90 s:\n{server.log_tail()}",
                                pytrace=False)
                time.sleep(0.5)
        argv = server.api("/api/kernelspecs")["kernelspecs"]["python3"]["spec"]["argv"]
        assert argv[0] == sys.executable, f"python3 kernel would run {argv[0]}, not {sys.executable}"
        yield server
    finally:
        _stop(proc, server)


def _stop(proc: subprocess.Popen, server: Lab) -> None:
    """Shut the server down (kernels first, through its API), then make sure its process group is gone."""
    if proc.poll() is None:
        try:
            server.api("/api/shutdown", method="POST")
            proc.wait(timeout=20)
        except Exception:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


# --- headless Chromium -----------------------------------------------------------------------------------------

@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Headless Chromium driven through the system chromedriver; Selenium Manager never runs (nothing fetched)."""
    _need_browser()
    monkeypatch.setenv("SE_OFFLINE", "true")        # belt and braces: an explicit driver path already skips it
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


# --- the test --------------------------------------------------------------------------------------------------

KERNEL_STATE_JS = """
const app = window.jupyterapp;
const nb = app && app.shell.currentWidget;
if (!nb || !nb.sessionContext || !nb.context || !nb.context.path.endsWith(arguments[0])) return 'no notebook';
const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
return kernel ? kernel.status : 'no kernel';
"""

# Errors raised by the notebook's cells, read from JupyterLab's model (on the page they look like stderr).
CELL_ERRORS_JS = """
const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
const raised = [];
for (let i = 0; i < cells.length; i++) {
  const outputs = cells.get(i).outputs;
  for (let k = 0; outputs && k < outputs.length; k++) {
    const o = outputs.get(k).toJSON();
    if (o.output_type === 'error') raised.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
  }
}
return raised;
"""

# The text of the playground's readout: a Label widget (a <div class="widget-label">; <label> elements are
# descriptions) next to the slider whose text speaks of the error. ipywidgets 8 does not show a Label's own
# description, so the readout is found by what it says.
READOUT_JS = """
const box = arguments[0].closest('.widget-vbox');
const labels = box ? Array.from(box.querySelectorAll('div.widget-label')) : [];
const readout = labels.find(el => el.textContent.includes('error'));
return readout ? readout.textContent.trim() : null;
"""

# The plot the playground draws under its readout, as the image's data URL.
PLOT_JS = """
const box = arguments[0].closest('.widget-vbox');
const img = box && box.querySelector('.widget-output img');
return img ? img.src : null;
"""


@pytest.mark.slow
def test_blocksize_slider_changes_the_error_shown(lab: Lab, browser) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def page_text() -> str:
        try:
            return browser.find_element(By.TAG_NAME, "body").text[-1500:]
        except Exception as e:                      # the page itself may be what broke
            return f"(no page text: {e})"

    def wait(what: str, condition, timeout: float):
        try:
            return WebDriverWait(browser, timeout, poll_frequency=0.5).until(lambda d: condition())
        except TimeoutException:
            (ARTIFACTS / "browser-failure.html").write_text(browser.page_source)
            browser.save_screenshot(str(ARTIFACTS / "browser-failure.png"))
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}.\n--- page text (end) ---\n"
                        f"{page_text()}\n--- JupyterLab log (end) ---\n{lab.log_tail()}", pytrace=False)

    def kernel_state() -> str:
        return browser.execute_script(KERNEL_STATE_JS, TEST_NOTEBOOK)

    def error_text() -> str | None:
        return browser.execute_script(READOUT_JS, slider)

    def slider_value() -> str:
        return slider.find_element(By.CSS_SELECTOR, ".widget-readout").text.strip()

    browser.set_page_load_timeout(90)
    browser.get(f"{lab.url}/lab/tree/{TEST_NOTEBOOK}?token={lab.token}")
    wait("the notebook's kernel to be idle", lambda: kernel_state() == "idle", 120)
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    slider = wait("the blocksize slider to appear (the widget cell ran and its JavaScript loaded)", lambda: next(
        (el for el in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea .widget-slider")
         if el.find_elements(By.XPATH, ".//label[normalize-space()='blocksize']")), False), 180)
    wait("the error readout to be filled in", lambda: bool(error_text()), 60)
    wait("every cell to finish", lambda: kernel_state() == "idle", 60)
    raised = browser.execute_script(CELL_ERRORS_JS)
    assert raised == [], f"a cell raised: {raised}\n--- page text (end) ---\n{page_text()}"

    wait("the plot to be drawn", lambda: bool(browser.execute_script(PLOT_JS, slider)), 60)
    before_value, before, before_plot = slider_value(), error_text(), browser.execute_script(PLOT_JS, slider)
    assert f"blocksize {before_value}" in before, f"readout {before!r} does not match slider value {before_value!r}"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    browser.save_screenshot(str(ARTIFACTS / "nf4-playground-before.png"))

    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    handle.send_keys(Keys.ARROW_RIGHT)              # one step: the next blocksize in the list
    wait("the slider to move", lambda: slider_value() != before_value, 20)
    after_value = slider_value()
    wait(f"the error readout to show blocksize {after_value}",
         lambda: f"blocksize {after_value}" in (error_text() or ""), 60)
    after = error_text()
    wait("the plot to be redrawn", lambda: browser.execute_script(PLOT_JS, slider) not in (None, before_plot), 60)
    browser.save_screenshot(str(ARTIFACTS / "nf4-playground-after.png"))

    assert int(after_value) > int(before_value), f"ArrowRight should enlarge the block: {before_value} -> {after_value}"
    assert after != before, f"the error text did not change: {before!r}"
    if before.endswith(("normal)", "with outliers)")):
        # chapter 4 measures it: on Gaussian data, with or without outliers, every doubling of the block adds error
        pct = lambda s: float(s.split("%")[0])
        assert pct(after) > pct(before), f"error should grow with the blocksize: {before!r} -> {after!r}"

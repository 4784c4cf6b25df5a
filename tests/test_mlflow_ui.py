"""The real MLflow UI, in a headless Debian chromium driven by Playwright, shows this project's
runs: an experiment's child runs on the classic runs table ("Model training"), by names whose
visible part tells them apart.

MLflow 3.17's UI opens an experiment on its GenAI pages by default. Which side it opens on is
the UI's global "workflow type" (GenAI | Model training): the ``workflowType`` URL parameter,
else the browser's localStorage (``mlflow.workflowType_v1``), else ``genai``. The
``mlflow.experimentKind`` experiment tag is not read for this (the bundle's
``useExperimentKind`` still has its tag-reading branch, but an always-true flag makes it
return the kind derived from the workflow type), so the link this project prints carries
``?workflowType=machine_learning`` (``tracking.runs_page``);
``test_plain_experiment_url_opens_genai_view`` shows that without it, tag or not, the page
lands elsewhere.

The browser is Debian's ``chromium`` package (never ``playwright install``); the driver is
the ``playwright`` wheel. Without either the tests skip, naming what is missing (in CI,
DECOUPLED_REQUIRE_ALL_TESTS=1, that skip fails).
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, free_port
from decoupled import config, grid
from decoupled.tracking import EXPERIMENT_TAGS, charts_page, epoch_metrics, runs_page
from test_tracking import _record

# The real binary; /usr/bin/chromium is Debian's shell wrapper around it.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
SERVER_WAIT_S = 60
PAGE_WAIT_MS = 30_000

PARENT = "smoke"
# the smoke experiment's child runs, by the names this project gives them
SMOKE = config.load(REPO / "config/smoke.yaml")
CHILDREN = tuple(grid.run_name(SMOKE, key) for key in grid.runs(SMOKE))


def _chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _make_experiment(client, name: str, tags: dict, record: dict) -> str:
    """An experiment of the smoke grid's runs under a parent, each with two epochs of ``record``'s
    metrics, as this project logs them."""
    from mlflow.entities import Metric

    experiment_id = client.create_experiment(name, tags=tags)
    parent = client.create_run(experiment_id, run_name=PARENT).info.run_id
    for i, child in enumerate(CHILDREN):
        run = client.create_run(experiment_id, run_name=child, tags={"mlflow.parentRunId": parent}).info.run_id
        for epoch in (1, 2):
            metrics = epoch_metrics({**record, "test_acc": record["test_acc"] * (1 + 0.01 * (i + epoch))})
            client.log_batch(run, metrics=[Metric(k, float(v), 0, epoch) for k, v in metrics.items()])
        client.set_terminated(run)
    client.set_terminated(parent)
    return experiment_id


@contextlib.contextmanager
def serve_ui(uri: str, folder):
    """An ``mlflow ui`` on the store ``uri``, its log in ``folder``: its URL while the block runs.
    Stopped (its process group, by id) when the block ends."""
    port = free_port()
    log = open(folder / "server.log", "w")
    # One worker, not the default 4: it starts in half the time.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(
        command,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
        start_new_session=True,  # its own process group: its uvicorn worker is stopped with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow ui did not answer on {url} within {SERVER_WAIT_S} s:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the process group this started, by its id
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of it is left
        server.wait(5)
        log.close()


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """An ``mlflow ui`` on a fresh SQLite store: its URL and the ids of two experiments alike
    but for the experiment-kind tag."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    record = _record()
    experiments = {
        "tagged": _make_experiment(client, "tagged", EXPERIMENT_TAGS, record),
        "untagged": _make_experiment(client, "untagged", {}, record),
    }
    with serve_ui(uri, folder) as url:
        yield url, experiments


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not found (Debian's chromium package: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (pip install playwright; its browser is Debian's chromium)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    """A fresh browser context each test: no workflow type remembered in localStorage."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


# How much of a run name its cell shows: the characters that end left of the cell's clip edge
# (less the width of the ellipsis drawn when the name is cut).
_VISIBLE_TEXT_JS = """el => {
  const node = el.firstChild, text = el.textContent;
  let right = Infinity;
  for (let a = el.parentElement; a; a = a.parentElement) {
    const style = getComputedStyle(a);
    if (style.overflowX !== 'visible' || a.classList.contains('ag-cell')) right = Math.min(right, a.getBoundingClientRect().right);
    if (a.classList.contains('ag-cell')) break;
  }
  const range = document.createRange();
  range.selectNodeContents(node);
  const cut = range.getBoundingClientRect().right > right + 0.5;
  if (cut) {
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = getComputedStyle(el).font;
    right -= ctx.measureText('\u2026').width;
  }
  let visible = 0;
  for (let i = 1; i <= text.length; i++) {
    range.setStart(node, 0); range.setEnd(node, i);
    if (range.getBoundingClientRect().right > right + 0.5) break;
    visible = i;
  }
  return {text: text, visible: visible, cut: cut, ellipsis: getComputedStyle(el).textOverflow};
}"""


def _open_child_runs(page, ui: str, experiment_id: str) -> dict:
    """Open the experiment's runs table, unfold the parent run; its child runs' name links."""
    page.goto(runs_page(ui, experiment_id))
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/\w"), timeout=PAGE_WAIT_MS)  # a view chosen
    assert f"#/experiments/{experiment_id}/runs" in page.url, f"not the runs table: {page.url}"
    parent = _run_name(page, PARENT)
    parent.wait_for(timeout=PAGE_WAIT_MS)
    # Child runs sit folded under their parent: unfold it.
    page.locator("[role=row]", has=parent).locator('[data-component-id*="runnamecellrenderer"]').first.click()
    children = {name: _run_name(page, name) for name in CHILDREN}
    for link in children.values():
        link.wait_for(timeout=PAGE_WAIT_MS)
    return children


def _run_name(page, name: str):
    # the whole name: a sync run's ("dgl K2 s0") begins its async variants' ("dgl K2 s0 S1_B4")
    return page.locator('[role=gridcell][col-id="attributes.`Run Name`"] a', has_text=re.compile(rf"^{re.escape(name)}$")).first


def test_runs_view_url_lists_child_runs(page, mlflow_ui):
    url, experiments = mlflow_ui
    children = _open_child_runs(page, url, experiments["tagged"])
    for name, link in children.items():
        assert link.inner_text() == name  # the full name, in its link to the run
        assert link.get_attribute("href").startswith(f"#/experiments/{experiments['tagged']}/runs/")


def test_the_visible_part_of_each_run_name_tells_sync_from_async(page, mlflow_ui):
    """MLflow 3.17 gives Run Name a 190 px column (its initialWidth; a user can drag it wider,
    nothing sets it), where a child run shows ~14 characters and an ellipsis: each name shows
    its method and mode there (the old "dgl K3 s0" and "dgl K3 s0 S1_B10" told them apart only
    by a variant code); the full name, in its tooltip and the charts' legends, adds what the
    grid varies and the seed."""
    url, experiments = mlflow_ui
    children = _open_child_runs(page, url, experiments["tagged"])
    shown = {name: link.locator("span").first.evaluate(_VISIBLE_TEXT_JS) for name, link in children.items()}
    for name, seen in shown.items():
        assert seen["text"] == name
    keys = dict(zip(CHILDREN, grid.runs(SMOKE)))
    visible = {name: name[: seen["visible"]] for name, seen in shown.items()}
    for name, text in visible.items():
        assert text.startswith(f"{keys[name].method} {keys[name].mode}"), f"{name} shows only {text!r}"
    modes = {(keys[name].method, text.split(" ")[1]) for name, text in visible.items()}
    assert len(modes) == len({(key.method, key.mode) for key in keys.values()})


def test_the_printed_charts_link_opens_on_test_accuracy(page, mlflow_ui):
    """From the link the workflow prints (``tracking.how_to_browse``), with the parent run's row
    unfolded, the first chart is the test accuracy, each run a line named by its run name."""
    url, experiments = mlflow_ui
    experiment_id = experiments["tagged"]
    page.goto(charts_page(url, experiment_id))
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/runs"), timeout=PAGE_WAIT_MS)
    unfold = page.locator('[data-component-id*="runnamecellrenderer"]').first  # the parent run's row: its children fold under it
    unfold.wait_for(timeout=PAGE_WAIT_MS)
    unfold.click()
    cards = page.locator('[data-testid="experiment-view-compare-runs-card"]')
    cards.first.wait_for(timeout=PAGE_WAIT_MS)
    page.wait_for_timeout(1000)  # every section drawn
    titles = []
    for card in cards.all():
        title, box = card.locator("h4").first, card.bounding_box()
        if box is not None:
            titles.append((round(box["y"]), round(box["x"]), title.inner_text()))
    assert len(titles) >= 2, titles  # (the cards below the window are drawn when scrolled to)
    first = min(titles)
    assert first[2] == "acc/test", f"the first chart is {first[2]}: {sorted(titles)[:6]}"
    legend = cards.first.inner_text()
    shown = [name for name in CHILDREN if f"\n{name} (acc/test)" in legend]  # (MLflow draws the newest 10 runs at first)
    assert len(shown) >= 5 and {name.split(" ")[1] for name in shown} == {"sync", "async"}, legend[:800]


def test_plain_experiment_url_opens_genai_view(page, mlflow_ui):
    """The negative control: without ``workflowType`` the page is not the runs table, whether the
    experiment has the experiment-kind tag or not; so the parameter is what matters."""
    url, experiments = mlflow_ui
    for which, experiment_id in experiments.items():
        page.goto(f"{url}/#/experiments/{experiment_id}")
        page.wait_for_url("**workflowType=**", timeout=PAGE_WAIT_MS)  # the UI picked a default view
        assert "workflowType=genai" in page.url and "/runs" not in page.url, (
            f"{which} experiment: {page.url} - the plain experiment URL now opens the runs view; "
            "runs_page's workflowType parameter may no longer be needed"
        )

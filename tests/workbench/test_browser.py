"""A real browser on the generation widgets: JupyterLab on 127.0.0.1, notebooks/07_generate.ipynb
opened in headless Chromium (Debian's /usr/bin/chromium driven by playwright, no browser download),
Run All, a prompt typed into the widget, Generate clicked, generated text seen in the output area."""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CLLAMA_SKIP_BROWSER"):
            pytest.skip("CLLAMA_SKIP_BROWSER is set")
        pytest.fail(f"{CHROMIUM} missing: `apt-get install chromium` (.ci/run does) or set CLLAMA_SKIP_BROWSER=1")
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "07_generate.ipynb", tmp_path / "notebooks")
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", f"--LabApp.workspaces_dir={tmp_path / 'lab' / 'workspaces'}",
         f"--LabApp.user_settings_dir={tmp_path / 'lab' / 'settings'}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield f"{url}/lab/tree/notebooks/07_generate.ipynb?token={token}"
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.mark.slow
def test_generate_button_in_a_real_browser(jupyterlab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(jupyterlab)
            page.locator(".jp-Notebook").first.wait_for(timeout=90_000)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=90_000)  # kernel started
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            button = page.locator("button.cllama-generate")
            button.wait_for(timeout=180_000)  # all cells ran up to the widget demo
            prompt = page.locator(".cllama-prompt textarea")
            prompt.fill("def add(a, b):")
            button.click()
            expect(page.locator(".cllama-speed")).to_contain_text("tokens/s", timeout=60_000)
            output = page.locator(".cllama-output")
            expect(output).not_to_be_empty(timeout=10_000)
            text = output.inner_text()
            assert text.strip(), "the output area stayed empty"
            assert "error" not in page.locator(".cllama-speed").inner_text()
        finally:
            page.screenshot(path=str(tmp_path / "07_generate.png"), full_page=True)
            browser.close()
    print(f"screenshot: {tmp_path / '07_generate.png'}")

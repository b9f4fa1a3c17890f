"""The web page of `glmctl serve` in a real headless Chromium (Debian's package, driven over the
DevTools protocol): it loads, fills a [MASK] with the streamed result, highlights the span, and
shows the text the API returns for the same request."""
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from conftest import free_port
from test_serve import models, server  # noqa: F401 - the fixtures

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (the Makefile's test target installs Debian's chromium package)")


class Page:
    """One tab of a headless Chromium, over the DevTools websocket."""

    def __init__(self, browser: str, tmp: Path):
        port = free_port()
        self.proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--no-first-run", "--disable-extensions", f"--remote-debugging-port={port}",
                                      f"--user-data-dir={tmp / 'profile'}", "--window-size=1000,760", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                tabs = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                ws = next(t["webSocketDebuggerUrl"] for t in tabs if t.get("type") == "page")
                break
            except (httpx.TransportError, StopIteration, ValueError):
                assert self.proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
                time.sleep(0.2)
        self.ws = connect(ws, max_size=None, open_timeout=30)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expr: str, what: str, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.js(expr):
            assert time.monotonic() < deadline, f"the page never showed {what}"
            time.sleep(0.1)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.mark.slow
def test_page_fills_a_mask_with_the_streamed_result(server, tmp_path):  # noqa: F811
    page = Page(chromium(), tmp_path)
    try:
        page.call("Page.enable")
        page.call("Page.navigate", url=server.url + "/")
        page.wait("document.readyState === 'complete' && document.getElementById('model').textContent === 'tiny'",
                  "the model name")
        prompt = "Tsinghua University is in [MASK], China."
        page.js(f"document.getElementById('prompt').value = {json.dumps(prompt)}; "
                "document.getElementById('max_tokens').value = 6; document.getElementById('go').click(); true")
        page.wait("document.getElementById('status').textContent.startsWith('done')", "the finished fill")
        shown = page.js("document.getElementById('out').textContent")
        marked = page.js("[...document.querySelectorAll('#out mark')].map(m => m.textContent)")
        want = httpx.post(server.url + "/v1/completions",
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 6}).json()["choices"][0]
        assert shown == want["text"]
        assert marked == [want["text"][b["start"]:b["end"]] for b in want["blanks"]] and len(marked) == 1
        assert shown.startswith("Tsinghua University is in ") and shown.endswith(", China.")
        shot = page.call("Page.captureScreenshot", format="png")
        (tmp_path / "serve.png").write_bytes(base64.b64decode(shot["data"]))
        assert (tmp_path / "serve.png").stat().st_size > 1000
    finally:
        page.close()

"""The screenshot of docs/MLFLOW.md: the compare view of a finished run's MLflow store in headless Chromium.

    python scripts/mlflow_screenshot.py results/ci/mlflow.db docs/mlflow-compare.png

Starts `mlflow server` on a free 127.0.0.1 port over the store, opens the compare view (tcm_core.tracking.mlflow_store
.compare_view_url) in Chromium (Debian's `chromium`; driven over --remote-debugging-pipe, so nothing but the
standard library is needed), expands the study's row, closes the assistant panel and the shared-view banner, and
writes a small palette PNG. Used by hand for the docs; no test needs Chromium.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tcm_core.tracking.mlflow_store import compare_view_url

CHROMIUM = "/usr/lib/chromium/chromium"  # the binary: Debian's /usr/bin/chromium wrapper closes inherited fds
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]
CLICKS = [  # (what, JavaScript, text to wait for): what the view does not already do (docs/MLFLOW.md)
    ("close the assistant", "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
                            "?.click()", "matching runs"),
    ("hide the shared-view banner", "document.querySelector("
                                    "'[data-component-id=\"mlflow.experiment_page.shared_view.dismiss\"]')?.click()",
     "matching runs"),
    ("expand the study's row", "document.querySelector('[data-component-id*=runnamecellrenderer]').click()",
     "stage2:"),
]


class Chromium:
    """Chromium's DevTools protocol over a pipe: fd 3 (commands in), fd 4 (replies out), NUL-separated JSON."""

    def __init__(self, width: int, height: int) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def attach() -> None:  # dup first: dup2(3, 3) would keep fd 3's close-on-exec flag
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [CHROMIUM, *FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={width},{height}"]
        self.proc = subprocess.Popen([*args, "about:blank"], preexec_fn=attach, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.session = b"", 0, None

    def send(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.navigate", url=url)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for_text(self, text: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while not self.js(f"document.body.innerText.includes({json.dumps(text)})"):
            if time.time() > deadline:
                raise RuntimeError(f"the page never showed {text!r}")
            time.sleep(1)

    def png(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store.resolve()}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    base = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return proc, base
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def small_png(data: bytes, width: int) -> bytes:
    """The screenshot scaled to ``width`` pixels and stored with a 64-colour palette (a few tens of kB)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    out = io.BytesIO()
    image.quantize(colors=64).save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="the SQLite store of a finished run (results/<preset>/mlflow.db)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="width of the PNG (the page is drawn at 1800)")
    args = parser.parse_args()
    record = json.loads((args.store.parent / "mlflow.json").read_text())
    server, base = start_server(args.store)
    browser = Chromium(1800, 520)
    try:
        browser.open(compare_view_url(base, record["experiment_id"]))
        browser.wait_for_text("matching runs")
        time.sleep(3)  # the table's rows arrive after its footer
        for what, click, shows in CLICKS:
            browser.js(click)
            browser.wait_for_text(shows)
            time.sleep(2)
            print(f"clicked: {what}")
        args.out.write_bytes(small_png(browser.png(), args.width))
    finally:
        browser.close()
        os.killpg(server.pid, 15)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

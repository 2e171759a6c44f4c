"""Type a query into the built site's search in headless Chromium; print the hits and save a screenshot.

    mkdocs build --strict -d /tmp/site
    python docs/search_check.py /tmp/site fused_linear_cross_entropy --screenshot search.png

The site is served from a local HTTP server (mkdocs-material's search runs in a
web worker, which a ``file://`` page may not start), opened at ``/?q=QUERY``
(material types the ``q`` parameter into its search box) and read once the
worker has answered. Chromium is driven over ``--remote-debugging-pipe``, so
only the standard library is needed. Exit status 1 when nothing was found.
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

RESULTS_JS = """JSON.stringify({
  meta: (document.querySelector('.md-search-result__meta') || {}).textContent || '',
  hits: [...document.querySelectorAll('.md-search-result__item h1, .md-search-result__item h2')]
        .map(h => h.textContent.trim())})"""


class Pipe:
    """Chrome DevTools protocol over the two pipes Chromium reads (fd 3) and writes (fd 4)."""

    def __init__(self, to_browser: int, from_browser: int):
        self.out, self.inp, self.next_id, self.buffer = to_browser, from_browser, 0, b""

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our answer arrives
            while b"\0" not in self.buffer:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the debugging pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(site: str) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=site)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: any free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def search(site: str, query: str, screenshot: str | None, timeout_s: float = 30.0) -> dict:
    """The search box's status line and result titles for ``query`` on the site in ``site``."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    server = serve(site)
    (to_r, to_w), (from_r, from_w) = os.pipe(), os.pipe()

    def pipes_to_3_and_4():  # copy first: either end may itself be fd 3 or 4
        ends = os.dup(to_r), os.dup(from_w)
        os.dup2(ends[0], 3)
        os.dup2(ends[1], 4)

    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                             "--window-size=1280,900", "about:blank"], pass_fds=(3, 4), preexec_fn=pipes_to_3_and_4,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_r), os.close(from_w)
    try:
        cdp = Pipe(to_w, from_r)
        url = f"http://127.0.0.1:{server.server_address[1]}/?q={urllib.parse.quote(query)}"
        target = cdp.call("Target.createTarget", url=url)["targetId"]
        session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.monotonic() + timeout_s
        while True:
            value = cdp.call("Runtime.evaluate", session, expression=RESULTS_JS)["result"].get("value", "{}")
            found = json.loads(value)
            if (found["meta"] and "Initializing" not in found["meta"]) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        if screenshot:
            png = cdp.call("Page.captureScreenshot", session, format="png")["data"]
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(png))
        return found
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", help="the folder mkdocs build wrote")
    parser.add_argument("query", help="what to type into the search box")
    parser.add_argument("--screenshot", default=None, help="write a PNG of the page here (default: none)")
    args = parser.parse_args(argv)
    found = search(args.site, args.query, args.screenshot)
    print(found["meta"])
    for hit in found["hits"]:
        print(" ", hit)
    return 0 if found["hits"] else 1


if __name__ == "__main__":
    sys.exit(main())

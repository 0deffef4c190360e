"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``, installed by
.ci/run) loads the report of a real training run, with no console message, no network request
(Chromium's own net log), the run's ``<script>`` name shown as text in the parsed DOM, and plots
that are not blank in the screenshot. Each check is first shown to catch a bad page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from report_data import XSS  # noqa: E402

from seismo.report import write_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-default-apps", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    env = dict(os.environ, HOME=str(tmp))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the console, errors included (CSP violations are console errors)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def page_requests(netlog: Path) -> list[str]:
    """URLs the page asked the network for (Chromium's own background requests, initiated by no
    origin, are left out)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for ev in log["events"]:
        p = ev.get("params") or {}
        if ev["type"] == start and "url" in p and p.get("initiator") != "not an origin" and not p["url"].startswith(("file:", "data:")):
            urls.append(p["url"])
    return urls


def load(page: Path, tmp: Path, height: int) -> tuple[list[str], list[str], np.ndarray]:
    """(console messages, network requests, screenshot as an RGB array) of one page load."""
    shot, netlog = tmp / f"{page.stem}.png", tmp / f"{page.stem}.netlog.json"
    out = _chromium(page, tmp, f"--screenshot={shot}", f"--window-size=1300,{height}", f"--log-net-log={netlog}",
                    "--host-resolver-rules=MAP * ~NOTFOUND")
    assert shot.exists(), out.stderr[-2000:]
    return console_messages(out.stderr), page_requests(netlog), np.asarray(PIL.open(shot).convert("RGB")).astype(int)


def colorful_pixels(img: np.ndarray) -> int:
    """Pixels that are neither white, gray nor black: plot lines and heatmaps (text is gray-black)."""
    return int(((img.max(axis=2) - img.min(axis=2)) > 60).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of a real 60-step TinyGPT run at a learning rate that makes its logits grow."""
    import torch

    from seismo.proxy.presets import get_preset
    from seismo.proxy.train import train

    tmp = tmp_path_factory.mktemp("browser")
    cfg = get_preset("tiny")
    cfg.optim.lr = 0.1
    cfg.store = str(tmp / "seismo.sqlite")
    cfg.run_name = XSS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared CPU: a second thread only spins
    try:
        run = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return write_report(cfg.store, [run.run_id], tmp / "report.html")


def test_the_checks_catch_a_bad_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/a.png">'
                   '<script>console.error("boom")</script></body></html>')
    console, requests, _ = load(bad, tmp_path, 600)
    assert any("boom" in m for m in console)
    assert "http://example.invalid/a.png" in requests


def test_report_loads_with_no_console_message_and_no_request(report, tmp_path):
    console, requests, img = load(report, tmp_path, 7000)
    assert console == []
    assert requests == []
    # plots are drawn: compared with the same page without its figures, thousands of colored pixels
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<svg.*?</svg>", "", report.read_text(), flags=re.S))
    _, _, img_bare = load(bare, tmp_path, 7000)
    drawn, bare_count = colorful_pixels(img), colorful_pixels(img_bare)
    assert drawn - bare_count > 50_000, (drawn, bare_count)  # the rest: card borders, severity text, links
    # ... spread over the page's height (every figure), not one blob
    rows = np.nonzero((img.max(axis=2) - img.min(axis=2) > 60).sum(axis=1) > 20)[0]
    assert len(rows) > 300 and rows.max() - rows.min() > 2000


def test_a_script_run_name_is_text_in_the_browsers_dom(report, tmp_path):
    out = _chromium(report, tmp_path, "--dump-dom")
    dom = out.stdout
    assert "<h1>seismo report: &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in dom
    assert "<script" not in dom.lower()

"""The dashboard in a real browser: `streamlit run app.py` on a free port, driven in headless Chromium.

It opens every page, checks what is visible and that no Streamlit exception
box appears (on the Lambda and Batch pages: that the zone map is drawn, a zone's
tooltip shows on hover, and the borough flow table shows), saves a screenshot
of each page under ``test-artifacts/``, and checks that auto-refresh picks up a
speed file written while the page is open.
The browser is Debian's Chromium (``make browser``), driven by Playwright;
nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from periscope import kafka_local, speed_view, zones
from tests.conftest import ROOT, Demo, heartbeat

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REFRESH_S = 2
PAGES = [  # url path, text that must be visible once the page has rendered
    ("", "Trips (batch + speed)"),
    ("speed_layer", "Most recent trips"),
    ("batch_layer", "Pickup density"),
    ("model_monitor", "Hold-out metrics"),
    ("data_quality", "Dead letters (speed layer)"),
    ("operations", "Batch versions"),
]
ZONE_MAP_PAGES = {"": 1, "batch_layer": 2}
"""Pages with a zone map, and their deck.gl charts (the zone map is the last; the Batch page's density
map comes first)."""


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


def keep_alive(speed_dir: Path, stop: threading.Event) -> None:
    """Rewrite the running consumer's status every second, as kafka_consumer does."""
    while not stop.wait(1.0):
        heartbeat(speed_dir)


@pytest.fixture
def server(demo: Demo, tmp_path):  # noqa: F811 -- pytest injects the imported fixture
    """``streamlit run app.py`` on a free local port, reading a copy of the demo data through the env."""
    speed_dir = tmp_path / "speed"
    shutil.copytree(demo.speed_dir, speed_dir)
    heartbeat(speed_dir)
    port = kafka_local.free_ports(1)[0]
    env = {**os.environ, "PERISCOPE_VIEWS_DIR": str(demo.views_dir), "PERISCOPE_SPEED_DIR": str(speed_dir),
           "PERISCOPE_MODEL_DIR": str(demo.model_dir), "AIRFLOW_HOME": str(demo.airflow_home),
           "KAFKA_BOOTSTRAP_SERVERS": demo.bootstrap}
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--", "--refresh", str(REFRESH_S)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    beating = threading.Event()
    beat = threading.Thread(target=keep_alive, args=(speed_dir, beating), daemon=True)
    beat.start()
    try:
        wait_until_healthy(url, process)
        yield url, speed_dir
    finally:
        beating.set()
        beat.join()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric(page: Page, label: str):
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")


def settle(page: Page) -> None:
    """Wait until the page body has run to its end (its last line is the "Rendered ..." caption) and every
    chart and table has drawn."""
    expect(page.get_by_text("Rendered ").first).to_be_visible(timeout=60_000)
    expect(page.locator('[data-testid="stSkeleton"], [data-testid="stSkeletonElement"]')).to_have_count(0,
                                                                                                       timeout=30_000)
    for element in page.locator('[data-testid="stVegaLiteChart"], [data-testid="stDataFrame"]').all():
        if element.is_visible():  # not inside a closed expander
            expect(element.locator("canvas, svg.marks").first).to_be_visible(timeout=15_000)


def zone_map_and_flows(page: Page, decks: int, layered: bool) -> None:
    """The zone map is drawn (a deck.gl canvas, and hovering its middle shows the tooltip of a zone:
    on the Lambda page with the trips of each part) and the flow table shows, with boroughs."""
    charts = page.get_by_test_id("stDeckGlJsonChart")
    expect(charts).to_have_count(decks)
    zone_map = charts.last
    zone_map.scroll_into_view_if_needed()
    canvas = zone_map.locator("canvas").first
    expect(canvas).to_be_visible(timeout=15_000)
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tooltip = page.locator(".deck-tooltip").filter(has_text=re.compile(r"\)\s*[\d,]+ trips, mean "))
    expect(tooltip).to_be_visible(timeout=15_000)
    if layered:
        expect(tooltip).to_contain_text(re.compile(r"batch [\d,]+, speed [\d,]+"))
    flows = page.get_by_test_id("stDataFrame").filter(
        has=page.locator('[role="columnheader"]', has_text=re.compile(r"^from$")))
    expect(flows).to_have_count(1, timeout=15_000)
    headers = flows.locator('[role="columnheader"]')
    assert headers.all_inner_texts()[:3] == ["from", "to", "trips"]
    cells = flows.locator('[role="gridcell"]').all_inner_texts()
    assert cells[0] in zones.BOROUGHS and cells[1] in zones.BOROUGHS and int(cells[2]) > 0, cells[:3]


def test_every_page_in_headless_chromium(server, demo):  # noqa: F811
    url, speed_dir = server
    assert CHROMIUM.exists(), f"no Chromium at {CHROMIUM}: run `make browser` (Debian's chromium package)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            outside = []  # the machine may be offline: the dashboard must not need anything but its server
            page.on("request", lambda request: outside.append(request.url)
                    if not request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else None)
            for path, text in PAGES:
                page.goto(f"{url}/{path}", wait_until="domcontentloaded")
                expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=30_000)
                settle(page)
                assert page.locator('[data-testid="stException"]').count() == 0, path
                if path in ZONE_MAP_PAGES:
                    zone_map_and_flows(page, ZONE_MAP_PAGES[path], layered=not path)
                page.screenshot(path=str(ARTIFACTS / f"dashboard-{path or 'lambda_view'}.png"), full_page=True)

            page.goto(url, wait_until="domcontentloaded")
            total = metric(page, "Trips (batch + speed)")
            expect(total).to_have_text(f"{demo.batch_trips + demo.speed_trips:,}", timeout=30_000)
            expect(metric(page, "Batch trips")).to_have_text(f"{demo.batch_trips:,}")

            newer = demo.stream.tail(30).copy()
            newer["offset"] += 1000
            newer["id"] += "-newer"  # new trips: copies of trips already shown would be counted once
            speed_view.write_batch(speed_dir, 0, newer.assign(partition=0))
            expect(total).to_have_text(f"{demo.batch_trips + demo.speed_trips + 30:,}",
                                       timeout=5_000 + 3_000 * REFRESH_S)
            expect(metric(page, "Speed trips above the watermark")).to_have_text(f"{demo.speed_trips + 30:,}")
            assert page.locator('[data-testid="stException"]').count() == 0
            assert outside == []
        finally:
            browser.close()

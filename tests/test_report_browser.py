"""The report in a real browser: Debian's Chromium, driven by Playwright for Python.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; CI: ``make test-parts``) and the
``playwright`` package (a test extra). ``playwright install`` is never used: it downloads a
browser of its own. Without either the test skips with the reason (it fails under CI=true).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_fake_study

from pipeline.report import write_report

CHROMIUM = Path(os.environ.get("HNFM_CHROMIUM", "/usr/bin/chromium"))
#: Headless, and nothing that reaches out of the machine or keeps state between runs.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """A page of a fresh Chromium profile at 1280 x 900, and the console errors it logs."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]' -c constraints.txt)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (CI: make test-parts)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
        yield page, errors
        context.close()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    """The report of a finished tiny study (hand-made cells, real report code, every figure)."""
    root = tmp_path_factory.mktemp("browser_report")
    spec = make_fake_study(root, pending=("ctpet-dorig/fold_2",))
    md = write_report(spec.study_dir, root / "report", n_boot=200)
    return md.parent / "report.html"


def test_the_report_in_chromium(browser_page, report_html, tmp_path):
    page, errors = browser_page
    page.goto(report_html.as_uri(), wait_until="load")

    # Every figure loads, at a non-zero size.
    images = page.eval_on_selector_all(
        "img",
        """els => els.map(e => ({
        alt: e.alt, complete: e.complete, natural: e.naturalWidth,
        w: e.getBoundingClientRect().width, h: e.getBoundingClientRect().height}))""",
    )
    assert len(images) >= 5, images
    bad = [i["alt"] for i in images if not (i["complete"] and i["natural"] > 0 and i["w"] > 0 and i["h"] > 0)]
    assert not bad, f"figures that did not load or have no size: {bad}"

    # No horizontal scroll at 1280 px: wide tables scroll in their own box.
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways at 1280 px: {widths}"

    # A contents list links to every section, and every in-page link resolves.
    sections = page.eval_on_selector_all("h2[id], h3[id]", "els => els.map(e => e.id)")
    contents = page.eval_on_selector_all("nav.contents a", "els => els.map(e => e.getAttribute('href'))")
    assert len(sections) >= 8 and contents == [f"#{s}" for s in sections]
    links = page.eval_on_selector_all("a[href^='#']", "els => els.map(e => e.getAttribute('href'))")
    unresolved = [h for h in links if not page.evaluate("id => !!document.getElementById(id)", h[1:])]
    assert not unresolved, f"in-page links to nothing: {unresolved}"
    # Following the last one scrolls its section into view.
    page.click(f"nav.contents a[href='{contents[-1]}']")
    top = page.evaluate("id => document.getElementById(id).getBoundingClientRect().top", contents[-1][1:])
    assert 0 <= top < 900, top

    assert not errors, f"console errors: {errors}"

    # And it prints.
    pdf = tmp_path / "report.pdf"
    page.emulate_media(media="print")
    page.pdf(path=str(pdf), format="A4", print_background=True)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and data.count(b"/Type /Page") - data.count(b"/Type /Pages") >= 2

"""The HTML digest as a reader sees it: headless Chromium at phone and desktop widths.

Chromium and its WebDriver come from Debian (``chromium``, ``chromium-driver``;
tests/setup-services.sh installs them); selenium drives them. Where they are
missing these tests skip and say why; under CI (``CI=true``) they fail instead.

Each page is also saved as a screenshot, kept after the run in
``$DIGEST_SCREENSHOTS`` (default: ``paper-digest-screenshots`` in the system's
temp folder, e.g. /tmp/paper-digest-screenshots); the README says how to look.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from digest.cli import main
from digest.config import SmtpConfig, Subscriber
from digest.paper import Paper
from digest.render import DigestContent, DigestItem, render_digest

from .helpers import sample_dumps, write_config
from .smtp_helpers import (  # noqa: F401  (smtp_server_fixture provides the smtp_server fixture)
    StartServer,
    smtp_server_fixture,
)

WIDTHS = (375, 800)  # a phone held upright; a desktop mail client's reading pane
MIN_TARGET_PX = 40  # like/skip tap targets (the template aims at 44)
MIN_TEXT_PX = 12  # the smallest text anyone should have to read
MIN_GAP_PX = 8  # between the like and skip buttons of one paper

# Flags Chromium needs as root in a container with no network (see the brief in README).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)

# What the page reports about itself, measured by the browser's own layout.
MEASURE = """
const viewport = window.innerWidth;
const small = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const text = node.textContent.trim();
  const parent = node.parentElement;
  if (!text || !parent) continue;
  const range = document.createRange();
  range.selectNodeContents(node);
  const boxes = Array.from(range.getClientRects()).filter(r => r.width > 0 && r.height > 0);
  const style = getComputedStyle(parent);
  if (!boxes.length || style.visibility === "hidden" || Number(style.opacity) === 0) continue;
  const size = parseFloat(style.fontSize);
  if (size < arguments[0]) small.push([text.slice(0, 40), size]);
}
const targets = Array.from(document.querySelectorAll('a[href^="mailto:"]')).map(a => {
  const r = a.getBoundingClientRect();
  return {href: a.getAttribute("href"), text: a.textContent.trim(),
          left: r.left, right: r.right, top: r.top, height: r.height};
});
return {viewport: viewport,
        scrollWidth: Math.max(document.documentElement.scrollWidth, document.body.scrollWidth),
        small: small, targets: targets};
"""


def _chromium_unavailable(reason: str) -> None:
    message = f"browser tests need Chromium: {reason}"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message + " (CI must run them: tests/setup-services.sh installs it)")
    print(message)  # shown with -rs and -s: the reason is never silent
    pytest.skip(message)


def chromium_binary() -> str | None:
    """Debian's browser binary (its /usr/bin/chromium is a launcher script), or None."""
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def screenshot_folder() -> Path:
    folder = Path(os.environ.get("DIGEST_SCREENSHOTS")
                  or Path(tempfile.gettempdir()) / "paper-digest-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium under selenium, with a fresh profile; skip (fail in CI) without one."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _chromium_unavailable("selenium is not installed (pip install -e '.[test]')")
    binary = chromium_binary()
    driver_path = shutil.which("chromedriver") or (
        "/usr/lib/chromium/chromedriver" if os.path.exists("/usr/lib/chromium/chromedriver")
        else None)
    if binary is None or driver_path is None:
        _chromium_unavailable("chromium or chromedriver is not installed "
                              "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except WebDriverException as exc:
        _chromium_unavailable(f"chromium did not start: {exc.msg or exc}")
    try:
        yield driver
    finally:
        driver.quit()


@dataclass(frozen=True)
class Layout:
    viewport: int
    scroll_width: int
    small_text: list[tuple[str, float]]
    targets: list[dict[str, Any]]  # every mailto link: href, text and its box


def look_at(driver: Any, html: str, width: int, name: str, folder: Path) -> Layout:
    """Load ``html`` at ``width`` CSS px (a phone when narrow), measure it, keep a screenshot."""
    page = folder / f"{name}.html"
    page.write_text(html, encoding="utf-8")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get(page.as_uri())
    measured = driver.execute_script(MEASURE, MIN_TEXT_PX)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": min(int(height), 16000), "deviceScaleFactor": 1,
        "mobile": width < 600})
    shot = screenshot_folder() / f"{name}-{width}px.png"
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    return Layout(measured["viewport"], measured["scrollWidth"],
                  [tuple(s) for s in measured["small"]], measured["targets"])


def command_of(href: str) -> str:
    return parse_qs(urlsplit(href).query)["subject"][0]


def assert_readable(layout: Layout, width: int, papers: int) -> None:
    assert layout.viewport == width
    assert layout.scroll_width <= width, "the page scrolls sideways"
    assert layout.small_text == [], "text smaller than 12 px"
    rating = [t for t in layout.targets if unquote(command_of(t["href"])).split()[0]
              in ("like", "skip")]
    assert len(rating) == 2 * papers
    for target in rating:
        assert target["height"] >= MIN_TARGET_PX, target
    for n in range(1, papers + 1):
        like = next(t for t in rating if command_of(t["href"]) == f"like {n}")
        skip = next(t for t in rating if command_of(t["href"]) == f"skip {n}")
        same_row = abs(like["top"] - skip["top"]) < 1
        gap = skip["left"] - like["right"] if same_row else skip["top"] - like["top"]
        assert gap >= MIN_GAP_PX, (n, like, skip)


def pipeline_digest(folder: Path, smtp_server: StartServer) -> str:
    """The HTML part of a digest made by the real pipeline: dumps -> ingest -> send -> SMTP."""
    server = smtp_server()
    inbox = folder / "inbox"
    inbox.mkdir()
    for sample in sample_dumps():
        (inbox / sample.name).write_bytes(sample.read_bytes())
    # A daily-papers listing too, so ids, PDF and Hugging Face links and LaTeX are in play.
    listing = [{"paper": {"id": f"2603.{11000 + n}", "title": title, "summary": abstract,
                          "authors": [{"name": f"Author {n}-{k} Longsurname"} for k in range(6)],
                          "publishedAt": "2026-03-11T00:00:00.000Z", "upvotes": 40 - n}}
               for n, (title, abstract) in enumerate([
                   (r"\textsc{Domain-Bridge}: $\alpha$-weighted domain adaptation \& alignment",
                    "We adapt models across domains with an $\\alpha$-weighted objective. "
                    "Experiments show gains of 5% on every benchmark. " * 4),
                   (("Supercalifragilisticexpialidociouslylongidentifierthatneverbreaks for "
                    "domain generalization"),
                    "A title with one very long word must not widen the page on a phone. " * 5),
               ])]
    (inbox / "2026-03-11_daily.json").write_text(json.dumps(listing), encoding="utf-8")
    for path in inbox.iterdir():
        os.utime(path, (time.time() - 60,) * 2)
    config = write_config(folder, f"""
[digest]
inbox = "inbox"
state = "var/state.sqlite3"

[smtp]
host = "127.0.0.1"
port = {server.port}
security = "none"
retry_seconds = 0.01
from = "Paper Digest <digest@papers.example.org>"
reply_to = "digest+{{token}}@papers.example.org"

[defaults]
send_at = "08:00"
timezone = "Europe/Berlin"
max_papers = 10

[[subscribers]]
email = "alice@example.org"
name = "Alice Example"
interests = ["domain adaptation", "domain generalization"]
""")
    assert main(["--config", str(config), "ingest"]) == 0
    assert main(["--config", str(config), "send", "--force"]) == 0
    assert len(server.messages) == 1
    html = server.messages[0].message.get_body(("html",))
    assert html is not None
    return str(html.get_content())


def full_digest() -> str:
    """A digest with every feature at once: long author lists, relevance, code, wildcard."""
    items = []
    for n in range(1, 11):
        paper = Paper(
            id=f"2603.{n:05d}", arxiv_id=f"2603.{n:05d}", listed_on=date(2026, 3, 10 + n % 3),
            title=f"Paper {n}: cross-domain transfer of $\\beta$-VAE representations at scale",
            abstract="Domain adaptation transfers what a model knows across domains. " * 8,
            authors=tuple(f"Firstname{k} Lastname{k}" for k in range(n)),
            code_links=("https://github.com/example-laboratory/a-rather-long-repository-name",),
            source="daily-papers" if n % 2 else "page", abstract_is_summary=n == 3)
        items.append(DigestItem(n, paper, 1 - n / 20, "close to papers you liked on transfer",
                                explore=n == 9, relevance=("strong", "good", "weak", None)[n % 4]))
    content = DigestContent(Subscriber(email="alice@example.org", name="Alice Example"),
                            "abcdefghij234567", date(2026, 3, 12), 412, tuple(items),
                            personalised=False)
    message = render_digest(content, SmtpConfig(reply_to="digest+{token}@papers.example.org"),
                            now=datetime(2026, 3, 12, 7, tzinfo=UTC))
    html = message.get_body(("html",))
    assert html is not None
    return str(html.get_content())


@pytest.mark.slow
@pytest.mark.parametrize("width", WIDTHS)
def test_pipeline_digest_reads_well_in_chromium(browser: Any, tmp_path: Path,
                                                smtp_server: StartServer, width: int) -> None:
    html = pipeline_digest(tmp_path, smtp_server)
    layout = look_at(browser, html, width, "pipeline-digest", tmp_path)
    assert_readable(layout, width, papers=10)


@pytest.mark.slow
@pytest.mark.parametrize("width", WIDTHS)
def test_digest_with_every_feature_reads_well_in_chromium(browser: Any, tmp_path: Path,
                                                          width: int) -> None:
    layout = look_at(browser, full_digest(), width, "full-digest", tmp_path)
    assert_readable(layout, width, papers=10)

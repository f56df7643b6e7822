"""A real browser against a real `distillery serve`: Debian's chromium driven by Playwright.

Playwright never downloads a browser here (it could not: no network); `.ci/run` installs
Debian's `chromium` when /usr/bin/chromium is missing. Screenshots go to a temporary folder,
or to $DASHBOARD_SCREENSHOTS when set (e.g. docs/img to refresh the README's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.test_search_service import SEARCH
from tests.service_support import TINY_SPEC, client, wait_for_status

CHROMIUM = Path("/usr/bin/chromium")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


# Module scope (a launch is about a second): Playwright's sync API keeps an event loop
# running in the main thread while it is open, and tests after tests/browser (the async
# client's) call asyncio.run there. A package-scoped fixture lived to the session's end.
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("tests/browser need Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("DASHBOARD_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """A fresh browser context (its own sessionStorage) on the served dashboard, recording
    what a broken page would show: uncaught errors, CSP refusals, requests to other hosts."""

    def __init__(self, browser, url: str, shots: Path) -> None:
        self.url, self.shots = url, shots
        self.context = browser.new_context(viewport=DESKTOP, accept_downloads=True, base_url=url)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on(
            "console",
            lambda m: "Content Security Policy" in m.text and self.problems.append(m.text),
        )
        self.page.on(
            "request",
            lambda r: (
                r.url.startswith((url, "blob:", "data:"))
                or self.problems.append(f"request to another origin: {r.url}")
            ),
        )

    def sign_in(self, key: str) -> None:
        p = self.page
        p.goto("/")
        p.get_by_label("API key").fill(key)
        p.get_by_role("button", name="Sign in").click()
        p.wait_for_selector("#jobs-body[data-loaded]", state="attached")

    def open_job(self, job_id: str) -> None:
        self.page.goto(f"/#/jobs/{job_id}")
        self.page.wait_for_selector("h1 .badge")

    def shot(self, name: str, full_page: bool = True) -> None:
        self.page.screenshot(path=self.shots / f"{name}.png", full_page=full_page)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def web(browser, served, shots):
    page = Page(browser, served[0], shots)
    yield page
    page.close()
    assert not page.problems, page.problems


# TINY_SPEC with enough epochs for curves worth looking at (about 5 s on one CPU thread), and
# one gate it passes and one it cannot: the page shows both verdicts.
SMALL_SPEC = {
    **TINY_SPEC,
    "name": "digits-small",
    "dataset": {**TINY_SPEC["dataset"], "max_samples": 600},
    "teacher": {**TINY_SPEC["teacher"], "arch": "cnn_small", "epochs": 12},
    "student": {"arch": "cnn_tiny"},
    "distill": {"epochs": 30},
    "prune": {"amount": 0.3, "finetune_epochs": 10},
    "gates": {"max_accuracy_drop": 1.0, "min_size_ratio": 1000},
}


def _run(served, spec: dict, timeout: float) -> dict:
    """`spec` submitted as the served default tenant and run to success."""
    url, key, _ = served
    with client(url, key) as c:
        job = c.post("/v1/jobs", json=spec).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed", "cancelled"}, timeout)
    assert done["status"] == "succeeded", done["error"]
    return done


@pytest.fixture(scope="module")
def finished_job(served) -> dict:
    return _run(served, SMALL_SPEC, timeout=240)


# The service tests' small search (2 students x 2 prune amounts) with the int8 model of each:
# 8 candidates, some of them off the front, in 10 to 20 s.
SEARCH_SPEC = {
    **SEARCH,
    "name": "search-small",
    "search": {**SEARCH["search"], "quantize.method": [None, "int8_dynamic"]},
}


@pytest.fixture(scope="session")
def finished_search(served) -> dict:
    """SEARCH_SPEC, finished; shared by every module that looks at one."""
    return _run(served, SEARCH_SPEC, timeout=300)
